#!/bin/bash
# A fixed-load run with `perf stat` (syscalls, context switches) on the reflector.
# usage: bench/scripts/perf-stat-fixed.sh REFLECTOR_BIN DURATION RATE SESSIONS CLIENTS [JSON]
set -u
R=$1; D=$2; RATE=$3; S=$4; C=$5; J=${6:-/dev/null}
B=${B:-target/release/refleet-bench}
PORT=${PORT:-7171}
ST=$(mktemp -d)
"$R" --listen 127.0.0.1:$PORT --storage "file://$ST" --rate-limit 1000000 --rate-burst 1000000 >/dev/null 2>"$ST/log" &
RP=$!
sleep 0.5
perf stat -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,syscalls:sys_enter_writev -p $RP -o "$ST/perf.txt" &
PP=$!
sleep 0.2
"$B" --url http://127.0.0.1:$PORT/ --reflector-pid $RP --json "$J" fixed --sessions "$S" --clients "$C" --rate "$RATE" --duration "$D" 2>&1 | tail -6
kill -INT $PP; wait $PP
kill $RP; wait $RP 2>/dev/null
cat "$ST/perf.txt"
rm -rf "$ST"
