#!/bin/bash
# QEMU 7.2 TCG live-migration reproduction, with no NovaCron code in the path: see README.md
# beside it. Needs qemu-system-x86_64, socat and the test guest (scripts/build-guest).
#
#   run.sh TAG "EXTRA QEMU ARGS" "EXTRA KERNEL CMDLINE" [MAX_BANDWIDTH_BYTES]
#
# Environment: ACCEL (default tcg, e.g. tcg,thread=single); COMPARE_RAM=1 saves both guests' RAM
# once the destination has loaded the stream (before it runs) and lists the 4 KiB pages that
# differ; PAUSE_SOURCE=1 stops the source before `migrate` (the control: nothing to track).
# Working files in /tmp/migx/TAG.
set -u
TAG=$1; QARGS=$2; CMD=$3; BW=${4:-33554432}
D=/tmp/migx/$TAG; rm -rf "$D"; mkdir -p "$D"
G=~/.cache/novacron/guest
common="-nodefaults -nographic -machine q35 -accel ${ACCEL:-tcg} $QARGS -m 256M -kernel $G/vmlinuz -initrd $G/initrd.img"
cmdline="console=ttyS0 panic=-1 quiet novacron.workload=1 novacron.workload_mib=64 $CMD"
qemu-system-x86_64 $common -append "$cmdline" -serial file:$D/src.log -qmp unix:$D/src.qmp,server=on,wait=off -display none -daemonize -pidfile $D/src.pid
qemu-system-x86_64 $common -append "$cmdline" -serial file:$D/dst.log -qmp unix:$D/dst.qmp,server=on,wait=off -display none -incoming unix:$D/in.sock -S -daemonize -pidfile $D/dst.pid
qmp() { printf '{"execute":"qmp_capabilities"}\n%s\n' "$2" | socat - UNIX-CONNECT:$D/$1.qmp | tail -1; }
for i in $(seq 1 100); do grep -q "tick=2 " $D/src.log 2>/dev/null && break; sleep 0.2; done
[ "${PAUSE_SOURCE:-0}" = 1 ] && qmp src '{"execute":"stop"}' >/dev/null
qmp src "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":$BW}}" >/dev/null
qmp src "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$D/in.sock\"}}" >/dev/null
for i in $(seq 1 300); do s=$(qmp src '{"execute":"query-migrate"}'); echo "$s" | grep -q '"completed"\|"failed"' && break; sleep 0.2; done
migration=$(echo "$s" | grep -o '"status": "[a-z]*"\|"dirty-sync-count": [0-9]*\|"total-time": [0-9]*' | tr '\n' ' ')
srctick=$(grep -ao "tick=[0-9]*" $D/src.log | tail -1)
differing="not compared"
if [ "${COMPARE_RAM:-0}" = 1 ]; then
    for i in $(seq 1 100); do qmp dst '{"execute":"query-status"}' | grep -q inmigrate || break; sleep 0.1; done
    qmp src "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":268435456,\"filename\":\"$D/src.mem\"}}" >/dev/null
    qmp dst "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":268435456,\"filename\":\"$D/dst.mem\"}}" >/dev/null
    differing=$(cmp -l $D/src.mem $D/dst.mem | awk '{print int(($1-1)/4096)}' | uniq | tr '\n' ' ')
    rm -f $D/src.mem $D/dst.mem
fi
qmp dst '{"execute":"cont"}' >/dev/null
sleep 8
kill $(cat $D/src.pid) $(cat $D/dst.pid) 2>/dev/null
dsttick=$(grep -ao "tick=[0-9]*" $D/dst.log | tail -1)
echo "$TAG: migration $migration| source last ${srctick:-none}; destination last ${dsttick:-none}; $(grep -ac 'Oops\|BUG' $D/dst.log) oops; differing pages: ${differing:-none}"
