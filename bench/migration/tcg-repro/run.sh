#!/bin/bash
# QEMU 7.2 TCG live-migration reproduction: see README.md beside it. Needs qemu-system-x86_64, socat
# and the test guest (scripts/build-guest).
# usage: run.sh TAG "extra qemu args" "extra cmdline" bandwidth
set -u
TAG=$1; QARGS=$2; CMD=$3; BW=${4:-33554432}
D=/tmp/migx/$TAG; rm -rf $D; mkdir -p $D
G=~/.cache/novacron/guest
common="-nodefaults -nographic -machine q35 -accel tcg $QARGS -m 256M -kernel $G/vmlinuz -initrd $G/initrd.img"
cmdline="console=ttyS0 panic=-1 quiet novacron.workload=1 novacron.workload_mib=64 $CMD"
qemu-system-x86_64 $common -append "$cmdline" -serial file:$D/src.log -qmp unix:$D/src.qmp,server=on,wait=off -display none -daemonize -pidfile $D/src.pid
qemu-system-x86_64 $common -append "$cmdline" -serial file:$D/dst.log -qmp unix:$D/dst.qmp,server=on,wait=off -display none -incoming unix:$D/in.sock -S -daemonize -pidfile $D/dst.pid
qmp() { printf '{"execute":"qmp_capabilities"}\n%s\n' "$2" | socat - UNIX-CONNECT:$D/$1.qmp | tail -1; }
for i in $(seq 1 100); do grep -q "tick=2 " $D/src.log 2>/dev/null && break; sleep 0.2; done
qmp src "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":$BW}}" >/dev/null
qmp src "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$D/in.sock\"}}" >/dev/null
for i in $(seq 1 300); do s=$(qmp src '{"execute":"query-migrate"}'); echo "$s" | grep -q '"completed"\|"failed"' && break; sleep 0.2; done
echo "$s" | grep -o '"status": "[a-z]*"\|"dirty-sync-count": [0-9]*\|"total-time": [0-9]*' | tr '\n' ' '
srctick=$(grep -o "tick=[0-9]*" $D/src.log | tail -1)
qmp dst '{"execute":"cont"}' >/dev/null
sleep 8
kill $(cat $D/src.pid) $(cat $D/dst.pid) 2>/dev/null
echo; echo "src last $srctick; dst:"; grep -a "tick=\|Oops\|BUG\|error\|panic" $D/dst.log | tail -3
