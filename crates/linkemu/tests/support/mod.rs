//! Helpers shared by the integration tests: a UDP echo server, a TCP bulk receiver that
//! measures its own rate over a window, paced UDP senders, and polling with a deadline.
//! These tests need root (namespaces, TUN); CI runs as root.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Polls `condition` until it holds or `deadline` passes; returns whether it held.
pub fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::yield_now();
        pause(Duration::from_millis(10));
    }
}

/// Waits a fixed time. Only for pacing traffic generators and polling intervals, where time
/// itself is the point; never to wait for a condition.
#[allow(clippy::disallowed_methods)]
pub fn pause(duration: Duration) {
    std::thread::sleep(duration);
}

/// A UDP echo server on its own thread; stops when dropped.
pub struct EchoServer {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(socket: UdpSocket) -> Self {
        let address = socket.local_addr().expect("bound socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            while !stop_flag.load(Ordering::Relaxed) {
                if let Ok((length, peer)) = socket.recv_from(&mut buffer) {
                    let _ = socket.send_to(&buffer[..length], peer);
                }
            }
        });
        Self {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `count` sequential probes and returns the round-trip times of those answered within
/// `probe_timeout`.
pub fn measure_round_trips(
    client: &UdpSocket,
    server: SocketAddr,
    count: usize,
    probe_timeout: Duration,
) -> Vec<Duration> {
    client
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("read timeout");
    let mut round_trips = Vec::new();
    let mut buffer = [0u8; 64];
    for probe in 0..count as u64 {
        let started = Instant::now();
        client
            .send_to(&probe.to_be_bytes(), server)
            .expect("send probe");
        while started.elapsed() < probe_timeout {
            if let Ok((8, _)) = client.recv_from(&mut buffer)
                && buffer[..8] == probe.to_be_bytes()
            {
                round_trips.push(started.elapsed());
                break;
            }
        }
    }
    round_trips
}

/// The median of some durations.
pub fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Accepts one connection and returns the goodput (bits/s) of each of `windows` consecutive
/// windows of `window` after `warm_up` from the first byte.
pub fn tcp_receive_rates(
    listener: TcpListener,
    warm_up: Duration,
    window: Duration,
    windows: usize,
) -> Vec<f64> {
    let (mut stream, _) = listener.accept().expect("accept");
    let mut buffer = vec![0u8; 256 * 1024];
    let mut first_byte: Option<Instant> = None;
    let mut window_start: Option<(Instant, u64)> = None;
    let mut total = 0u64;
    let mut rates = Vec::with_capacity(windows);
    loop {
        let length = stream.read(&mut buffer).expect("read bulk data");
        assert!(length > 0, "sender closed before the windows ended");
        total += length as u64;
        let now = Instant::now();
        let started = *first_byte.get_or_insert(now);
        match window_start {
            None if now - started >= warm_up => window_start = Some((now, total)),
            Some((at, bytes)) if now - at >= window => {
                rates.push((total - bytes) as f64 * 8.0 / (now - at).as_secs_f64());
                if rates.len() == windows {
                    return rates;
                }
                window_start = Some((now, total));
            }
            _ => {}
        }
    }
}

/// Sends bulk data on `stream` until the peer closes or `stop` is set.
pub fn tcp_send_until_stopped(mut stream: TcpStream, stop: Arc<AtomicBool>) {
    let chunk = vec![0x5au8; 256 * 1024];
    // The receiver's reset may be tail-dropped at a full bottleneck; never block forever.
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    while !stop.load(Ordering::Relaxed) {
        if stream.write_all(&chunk).is_err() {
            return;
        }
    }
}

/// Sends `count` datagrams of `payload` bytes, each carrying its index, paced at `per_second`.
pub fn send_paced(socket: &UdpSocket, to: SocketAddr, count: u64, payload: usize, per_second: f64) {
    let mut datagram = vec![0u8; payload.max(8)];
    let started = Instant::now();
    for index in 0..count {
        let due = started + Duration::from_secs_f64(index as f64 / per_second);
        let now = Instant::now();
        if due > now {
            pause(due - now);
        }
        datagram[..8].copy_from_slice(&index.to_be_bytes());
        socket.send_to(&datagram, to).expect("send datagram");
    }
}

/// Namespaces currently bound under /run/netns.
pub fn namespace_exists(name: &str) -> bool {
    novacron_linkemu::netns::list_namespaces()
        .iter()
        .any(|existing| existing == name)
}
