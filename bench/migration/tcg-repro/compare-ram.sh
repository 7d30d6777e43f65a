#!/bin/bash
# Live-migrates the test guest QEMU to QEMU, then compares the source's final RAM with what the
# destination loaded (QMP pmemsave of both, before the destination runs): see README.md. Add a
# QMP "stop" on the source before "migrate" for the paused control. ACCEL=tcg,thread=single
# changes the accelerator options.
set -u
TAG=$1; QARGS=$2; CMD=$3; BW=${4:-33554432}
D=/tmp/migx/$TAG; rm -rf $D; mkdir -p $D
G=~/.cache/novacron/guest
common="-nodefaults -nographic -machine q35 -accel ${ACCEL:-tcg} $QARGS -m 256M -kernel $G/vmlinuz -initrd $G/initrd.img"
cmdline="console=ttyS0 panic=-1 quiet novacron.workload=1 novacron.workload_mib=64 $CMD"
qemu-system-x86_64 $common -append "$cmdline" -serial file:$D/src.log -qmp unix:$D/src.qmp,server=on,wait=off -display none -daemonize -pidfile $D/src.pid
qemu-system-x86_64 $common -append "$cmdline" -serial file:$D/dst.log -qmp unix:$D/dst.qmp,server=on,wait=off -display none -incoming unix:$D/in.sock -S -daemonize -pidfile $D/dst.pid
qmp() { printf '{"execute":"qmp_capabilities"}\n%s\n' "$2" | socat - UNIX-CONNECT:$D/$1.qmp | tail -1; }
for i in $(seq 1 100); do grep -q "tick=2 " $D/src.log 2>/dev/null && break; sleep 0.2; done
qmp src "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":$BW}}" >/dev/null
qmp src "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$D/in.sock\"}}" >/dev/null
for i in $(seq 1 300); do s=$(qmp src '{"execute":"query-migrate"}'); echo "$s" | grep -q '"completed"\|"failed"' && break; sleep 0.2; done
for i in $(seq 1 100); do qmp dst '{"execute":"query-status"}' | grep -q '"paused"\|"prelaunch"' && ! qmp dst '{"execute":"query-status"}' | grep -q inmigrate && break; sleep 0.1; done
qmp src "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":268435456,\"filename\":\"$D/src.mem\"}}"
qmp dst "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":268435456,\"filename\":\"$D/dst.mem\"}}"
sleep 1
diffpages=$(cmp -l $D/src.mem $D/dst.mem 2>/dev/null | awk "{print int((\$1-1)/4096)}" | uniq | tr "\n" " ")
qmp dst '{"execute":"cont"}' >/dev/null
sleep 8
kill $(cat $D/src.pid) $(cat $D/dst.pid) 2>/dev/null
dst=$(grep -ao "tick=[0-9]*" $D/dst.log | tail -1)
echo "$TAG: differing pages $diffpages; dst last ${dst:-none}; $(grep -ac 'Oops\|BUG' $D/dst.log) oops"
ls -la $D/src.mem $D/dst.mem 2>&1 | awk "{print \$5, \$9}"; rm -f $D/src.mem $D/dst.mem
