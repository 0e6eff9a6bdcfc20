#!/usr/bin/env bash
# Stops what start.sh started; with --clean also removes its state directory.
set -uo pipefail
DIR="${REFLEET_KUBE_DIR:-/tmp/refleet-kube}"
for name in apiserver etcd; do
  f="$DIR/$name.pid"
  [ -f "$f" ] || continue
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
done
[ "${1:-}" = "--clean" ] && rm -rf "$DIR"
exit 0
