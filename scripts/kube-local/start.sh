#!/usr/bin/env bash
# Starts etcd + kube-apiserver (no kubelet, scheduler or controller-manager) on loopback and
# prints the path of an admin kubeconfig once /readyz answers.
#
#   export KUBECONFIG=$(scripts/kube-local/start.sh)
#
# Knobs: REFLEET_KUBE_DIR (state: certs, etcd data, logs; default /tmp/refleet-kube),
# REFLEET_KUBE_CACHE (binaries, see build.sh), APISERVER_PORT (16443), ETCD_PORT (16379).
set -euo pipefail

CACHE="${REFLEET_KUBE_CACHE:-$HOME/.cache/refleet/kube}"
DIR="${REFLEET_KUBE_DIR:-/tmp/refleet-kube}"
APISERVER_PORT="${APISERVER_PORT:-16443}"
ETCD_PORT="${ETCD_PORT:-16379}"
BIN="$CACHE/bin"
say() { echo "[kube-local/start] $*" >&2; }

for b in etcd kube-apiserver; do
  [ -x "$BIN/$b" ] || { say "$BIN/$b is missing: run scripts/kube-local/build.sh"; exit 2; }
done
if [ -f "$DIR/apiserver.pid" ] && kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null; then
  echo "$DIR/kubeconfig"; exit 0
fi
mkdir -p "$DIR/pki" "$DIR/logs"
pki="$DIR/pki"

if [ ! -f "$pki/admin.crt" ]; then
  say "creating a CA and certificates in $pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=refleet-kube-ca" -keyout ca.key -out ca.crt 2>/dev/null
    sign() { # sign NAME SUBJECT EXTFILE
      openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile "$3" -out "$1.crt" 2>/dev/null
    }
    printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1\n' > server.ext
    printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext
    sign apiserver "/CN=kube-apiserver" server.ext
    # The admin is in system:masters, which RBAC never restricts; RBAC tests impersonate.
    sign admin "/O=system:masters/CN=refleet-admin" client.ext
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
fi

# etcd may still be running when only the apiserver was stopped (tests restart it alone).
if [ -f "$DIR/etcd.pid" ] && kill -0 "$(cat "$DIR/etcd.pid")" 2>/dev/null; then
  say "etcd already running on 127.0.0.1:$ETCD_PORT"
else
  say "etcd on 127.0.0.1:$ETCD_PORT"
  extra=()
  "$BIN/etcd" --help 2>&1 | grep -q -- --unsafe-no-fsync && extra+=(--unsafe-no-fsync)
  nohup "$BIN/etcd" --name refleet --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "refleet=http://127.0.0.1:$((ETCD_PORT + 1))" "${extra[@]}" > "$DIR/logs/etcd.log" 2>&1 &
  echo $! > "$DIR/etcd.pid"
fi
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done

say "kube-apiserver on https://127.0.0.1:$APISERVER_PORT"
nohup "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --authorization-mode RBAC \
  --endpoint-reconciler-type none \
  --disable-admission-plugins ServiceAccount \
  --cert-dir "$DIR/apiserver-certs" \
  ${REFLEET_KUBE_APISERVER_ARGS:-} \
  > "$DIR/logs/kube-apiserver.log" 2>&1 &
echo $! > "$DIR/apiserver.pid"

cat > "$DIR/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: refleet-kube
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: refleet-kube
  context: {cluster: refleet-kube, user: admin, namespace: default}
current-context: refleet-kube
KUBECONFIG

for _ in $(seq 1 600); do
  if curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
       "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1; then
    say "ready"
    echo "$DIR/kubeconfig"
    exit 0
  fi
  kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null || { say "kube-apiserver exited:"; tail -20 "$DIR/logs/kube-apiserver.log" >&2; exit 1; }
  sleep 0.2
done
say "kube-apiserver not ready in time"; tail -20 "$DIR/logs/kube-apiserver.log" >&2; exit 1
