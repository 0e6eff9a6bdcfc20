#!/bin/bash
# User-space instruction count of the reflector (start to stop) for a small fixed load;
# reproducible on a noisy machine. usage: bench/scripts/callgrind-fixed.sh REFLECTOR_BIN OUT_FILE [RATE]
# then: callgrind_annotate OUT_FILE | grep "PROGRAM TOTALS"
set -u
R=$1; O=$2; RATE=${3:-2}
B=${B:-target/release/refleet-bench}
PORT=${PORT:-7173}
ST=$(mktemp -d)
valgrind --tool=callgrind --callgrind-out-file="$O" "$R" --listen 127.0.0.1:$PORT --storage "file://$ST" --rate-limit 1000000 --rate-burst 1000000 >/dev/null 2>"$ST/log" &
VP=$!
for _ in $(seq 60); do curl -s 127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.5; done
"$B" --url http://127.0.0.1:$PORT/ fixed --sessions 20 --clients 10 --rate "$RATE" --duration 10s --tick-ms 1000 2>&1 | grep -E "delivered|latency|lost"
curl -s 127.0.0.1:$PORT/metrics | grep -E "^refleet_reflector_(deliveries_total|ticks_total|messages_reflected_total)"
kill -INT $VP; wait $VP
rm -rf "$ST"
