"""A real kube-apiserver + etcd (scripts/kube-local) on ports of its own, an admin REST
client for it, and the Helm CLI pointed at it."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import yaml

import chartlib

REPO = chartlib.REPO
KUBE_CACHE = Path(os.environ.get("REFLEET_KUBE_CACHE", Path.home() / ".cache/refleet/kube"))
HELM = os.environ.get("REFLEET_HELM", str(Path.home() / ".cache/refleet/helm/bin/helm"))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_base() -> int:
    """apiserver on base, etcd on base+1 and base+2: a range of its own (the operator's
    Rust tests use 22000+, start.sh's default is 16443/16379)."""
    for base in range(16500 + (os.getpid() % 50) * 8, 17400, 8):
        if all(_free(p) for p in (base, base + 1, base + 2)):
            return base
    raise RuntimeError("no free ports for kube-apiserver/etcd")


class Kube:
    def __init__(self) -> None:
        for b in ("etcd", "kube-apiserver"):
            if not (KUBE_CACHE / "bin" / b).exists():
                raise RuntimeError(f"{KUBE_CACHE / 'bin' / b} missing: run scripts/kube-local/build.sh")
        self.dir = Path(tempfile.mkdtemp(prefix="refleet-chart-kube-"))
        base = free_base()
        self.env = {**os.environ, "REFLEET_KUBE_DIR": str(self.dir), "APISERVER_PORT": str(base),
                    "ETCD_PORT": str(base + 1)}
        out = subprocess.run([str(REPO / "scripts/kube-local/start.sh")], env=self.env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"start.sh failed: {out.stderr}")
        admin = Path(out.stdout.strip())
        config = yaml.safe_load(admin.read_text())
        self.server = config["clusters"][0]["cluster"]["server"]
        pki = self.dir / "pki"
        self.ca = str(pki / "ca.crt")
        self.http = requests.Session()
        # Not REQUESTS_CA_BUNDLE and friends from the environment: this cluster's own CA.
        self.http.trust_env = False
        self.http.verify = self.ca
        self.http.cert = (str(pki / "admin.crt"), str(pki / "admin.key"))
        # Helm warns about a group- or world-readable kubeconfig: give it a private one.
        self.kubeconfig = self.dir / "helm-kubeconfig"
        shutil.copyfile(admin, self.kubeconfig)
        self.kubeconfig.chmod(0o600)

    def stop(self) -> None:
        subprocess.run([str(REPO / "scripts/kube-local/stop.sh"), "--clean"], env=self.env, capture_output=True)

    # ------------------------------------------------------------ REST

    def url(self, path: str) -> str:
        return self.server + path

    def get(self, path: str):
        return self.http.get(self.url(path), timeout=30)

    def create(self, path: str, body: dict):
        return self.http.post(self.url(path), json=body, timeout=30)

    def delete(self, path: str):
        return self.http.delete(self.url(path), timeout=30)

    def must(self, response, what: str = "") -> dict:
        assert response.ok, f"{what} {response.request.method} {response.url}: {response.status_code} {response.text}"
        return response.json()

    def eventually(self, what: str, fn, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def namespace(self, name: str, labels: dict[str, str]) -> None:
        self.must(self.create("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels}}), "namespace")

    def object_path(self, obj: dict, namespace: str) -> str:
        """REST path of a rendered object (core, or a group via discovery-free rules)."""
        api, kind, name = obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
        plural = {"Ingress": "ingresses", "PodDisruptionBudget": "poddisruptionbudgets",
                  "CustomResourceDefinition": "customresourcedefinitions"}.get(kind, kind.lower() + "s")
        prefix = f"/api/{api}" if "/" not in api else f"/apis/{api}"
        ns = obj["metadata"].get("namespace", namespace)
        cluster = kind in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace")
        return f"{prefix}/{plural}/{name}" if cluster else f"{prefix}/namespaces/{ns}/{plural}/{name}"

    def sa_token(self, namespace: str, sa: str) -> str:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
        r = self.must(self.create(f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token", body), "token")
        return r["status"]["token"]

    def token_kubeconfig(self, token: str, namespace: str) -> str:
        ca = base64.b64encode(Path(self.ca).read_bytes()).decode()
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "k", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "sa", "namespace": namespace}}],
            "current-context": "k",
        })

    # ------------------------------------------------------------ helm

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir),
               "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(self.dir / "helm-cache"),
               "HELM_CONFIG_HOME": str(self.dir / "helm-config"), "HELM_DATA_HOME": str(self.dir / "helm-data")}
        out = subprocess.run([HELM, *args], env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert out.returncode == 0, f"helm {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out
