#!/usr/bin/env python3
"""Raw TCP: how much a connection that has carried a transfer saves the next one.

Sends CHUNK bytes over CONNS BBR connections four times, 20 s apart, either on the same
connections each time ("kept") or on new ones ("fresh"), and prints each transfer's time (until
the receiver has every byte). Run it through the project's link emulator, as root:

    novacron-linkemu up --delay 25ms --loss 0.5% --rate 1gbit -- \\
        sh -c 'ip netns exec $LINKEMU_NS_A python3 bench/transport/kept_tcp.py kept 2'

(the receiver runs in the link's other namespace). The transport's connection pool
(crates/transport/src/pool.rs) rests on the difference.
"""
import os
import socket
import subprocess
import sys
import threading
import time

CHUNK = 150 * 1000 * 1000
PORT = 5599
RECEIVER = r"""
import socket, sys, threading
share = int(sys.argv[1])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", %d))
listener.listen(64)
def serve(connection):
    received = 0
    while True:
        data = connection.recv(1 << 20)
        if not data:
            return
        received += len(data)
        while received >= share:
            received -= share
            connection.sendall(b"k")
while True:
    connection, _ = listener.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
""" % PORT


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "kept"
    connections = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if mode not in ("kept", "fresh"):
        sys.exit("usage: kept_tcp.py kept|fresh [CONNECTIONS]")
    namespace_b, address_b = os.environ["LINKEMU_NS_B"], os.environ["LINKEMU_ADDR_B"]
    share = CHUNK // connections
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", namespace_b, sys.executable, "-c", RECEIVER, str(share)]
    )
    try:
        deadline = time.time() + 10
        payload = os.urandom(1 << 20)

        def dial():
            while True:
                try:
                    connection = socket.socket()
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
                    connection.connect((address_b, PORT))
                    return connection
                except ConnectionRefusedError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)

        def send(connection):
            left = share
            while left > 0:
                piece = min(left, len(payload))
                connection.sendall(payload[:piece])
                left -= piece
            assert connection.recv(1) == b"k"

        kept = [dial() for _ in range(connections)] if mode == "kept" else None
        for transfer in range(4):
            started = time.time()
            used = kept if kept else [dial() for _ in range(connections)]
            threads = [threading.Thread(target=send, args=(c,)) for c in used]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(f"{mode} {connections} transfer {transfer}: {time.time() - started:.3f} s", flush=True)
            if not kept:
                for connection in used:
                    connection.close()
            time.sleep(20)
    finally:
        receiver.kill()


if __name__ == "__main__":
    main()
