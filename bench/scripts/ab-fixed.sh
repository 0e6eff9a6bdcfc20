#!/bin/bash
# Alternating fixed-load runs of two reflector binaries (A, B) under the same conditions.
# usage: bench/scripts/ab-fixed.sh A_BIN B_BIN SESSIONS CLIENTS RATE DURATION PAIRS
set -u
A=$1; BB=$2; S=$3; C=$4; RATE=$5; D=$6; N=$7
B=${B:-target/release/refleet-bench}
RL="--rate-limit 1000000 --rate-burst 1000000"
for i in $(seq "$N"); do
  for bin in "$A" "$BB"; do
    out=$("$B" --spawn "$bin" --reflector-args "$RL" fixed --sessions "$S" --clients "$C" --rate "$RATE" --duration "$D" 2>&1)
    lat=$(echo "$out" | grep -oE "p50 [0-9.]+ ms, p90 [0-9.]+ ms, p99 [0-9.]+ ms")
    cpu=$(echo "$out" | grep -oE "[0-9.]+ µs CPU per delivery")
    faults=$(echo "$out" | grep -oE "lost [0-9]+, duplicated [0-9]+, reordered [0-9]+")
    echo "$i $bin load=$(cut -d' ' -f1 /proc/loadavg) | $lat | $cpu | $faults"
  done
done
