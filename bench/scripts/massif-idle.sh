#!/bin/bash
# Heap profile of the reflector holding N idle joined connections (10 per session, 1 s ticks).
# usage: bench/scripts/massif-idle.sh REFLECTOR_BIN OUT_FILE [N]   then: ms_print OUT_FILE
set -u
R=$1; O=$2; N=${3:-1000}
B=${B:-target/release/refleet-bench}
PORT=${PORT:-7172}
ST=$(mktemp -d)
valgrind --tool=massif --massif-out-file="$O" --detailed-freq=1 --max-snapshots=40 --threshold=0.5 "$R" --listen 127.0.0.1:$PORT --storage "file://$ST" >/dev/null 2>"$ST/log" &
VP=$!
for _ in $(seq 60); do curl -s 127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.5; done
"$B" --url http://127.0.0.1:$PORT/ --reflector-pid $VP idle --connections "$N" --tick-ms 1000 --per-session 10 --settle 3s --measure 3s --join-timeout 60s 2>&1 | tail -4
kill -INT $VP; wait $VP
rm -rf "$ST"
