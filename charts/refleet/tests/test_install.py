"""The chart with the Helm CLI (v4, built from its Go module) against a real kube-apiserver +
etcd (scripts/kube-local) in namespaces that enforce the restricted Pod Security Standard:
install with defaults (every object accepted, no warnings, CRDs Established), the operator
pod admitted, the operator binary run as the chart's ServiceAccount and non-root user with
the chart's environment, a second release with namespaced RBAC and the toggles this
apiserver has kinds for, a bad value refused, upgrade, uninstall.

There is no kubelet, scheduler or controller-manager: nothing waits for pods, the Deployment
makes no pods (the test creates one from its template), and ServiceMonitor, PodMonitor,
PrometheusRule, Certificate, HTTPRoute and GRPCRoute have no CRDs here (test_render.py renders
and checks them)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import time

import pytest
import yaml

import chartlib
import sandbox
from kubelocal import Kube
from chartlib import BIN

NS = "refleet-chart"
RELEASE = "rf"
CHART = str(chartlib.CHART)
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest",
              "pod-security.kubernetes.io/warn": "restricted", "pod-security.kubernetes.io/audit": "restricted"}
SANDBOX_POD = f"{RELEASE}-operator-sandbox"


@pytest.fixture(scope="module")
def kube():
    k = Kube()
    try:
        k.namespace(NS, RESTRICTED)
        yield k
    finally:
        k.stop()


def no_warnings(out) -> None:
    text = out.stdout + out.stderr
    bad = [line for line in text.splitlines() if re.search(r"warn", line, re.I)]
    assert bad == [], f"helm printed warnings:\n" + "\n".join(bad)


def manifest(kube: Kube, release: str, namespace: str) -> list[dict]:
    out = kube.helm("get", "manifest", release, "-n", namespace)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def established(kube: Kube, name: str) -> bool:
    crd = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}").json()
    return any(c["type"] == "Established" and c["status"] == "True" for c in crd.get("status", {}).get("conditions", []))


def test_install_with_defaults_into_a_restricted_namespace(kube):
    started = time.monotonic()
    out = kube.helm("install", RELEASE, CHART, "-n", NS)
    no_warnings(out)
    assert "STATUS: deployed" in out.stdout
    assert f"svc/{RELEASE}-router 8080:8080" in out.stdout  # NOTES.txt
    objects = manifest(kube, RELEASE, NS)
    kinds = sorted({o["kind"] for o in objects})
    # No Secret: the operator creates its own (a rendered one would change on every render).
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment",
                     "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount"]
    for obj in objects:
        path = kube.object_path(obj, NS)
        r = kube.get(path)
        assert r.status_code == 200, f"{obj['kind']} {obj['metadata']['name']} not stored: {r.text}"
        stored = r.json()
        assert stored["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    for crd in ("reflectorpools.refleet.dev", "sessions.refleet.dev"):
        kube.eventually(f"{crd} Established", lambda: established(kube, crd), 30)
        stored = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}").json()
        assert stored["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    dep = kube.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{RELEASE}-operator").json()
    assert dep["spec"]["replicas"] == 2
    assert kube.get(f"/api/v1/namespaces/{NS}/secrets/{RELEASE}-report-key").status_code == 404
    print(f"install + checks: {time.monotonic() - started:.1f}s")


def deployment_pod(kube: Kube) -> dict:
    dep = kube.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{RELEASE}-operator").json()
    template = dep["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": SANDBOX_POD, "labels": template["metadata"]["labels"]},
            "spec": template["spec"]}


def test_pod_security_admits_the_operator_pod_and_refuses_a_weaker_one(kube):
    weaker = deployment_pod(kube)
    weaker["metadata"]["name"] = "weaker"
    weaker["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    r = kube.create(f"/api/v1/namespaces/{NS}/pods", weaker)
    assert r.status_code == 403 and "violates PodSecurity" in r.text, r.text  # enforcement is on
    r = kube.create(f"/api/v1/namespaces/{NS}/pods", deployment_pod(kube))
    assert r.status_code == 201, r.text
    assert "warning" not in {k.lower() for k in r.headers}, r.headers.get("Warning")


@pytest.fixture(scope="module")
def operator(kube):
    """`refleet operator` as the chart's ServiceAccount with the chart's Deployment env,
    non-root with a read-only root filesystem, standing in for the pod SANDBOX_POD."""
    work = sandbox.workdir()
    dep = kube.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{RELEASE}-operator").json()
    [container] = dep["spec"]["template"]["spec"]["containers"]
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    (work / "in/kubeconfig").write_text(kube.token_kubeconfig(kube.sa_token(NS, sa), NS))
    ports = {name: sandbox.free_port() for name in ("router", "report", "metrics")}
    env = {}
    for e in container["env"]:
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = {"metadata.name": SANDBOX_POD, "metadata.namespace": NS}[field] if field else e["value"]
    # The same settings, on loopback ports of this test.
    for name, var, port in (("router", "REFLEET_ROUTER_LISTEN", 8080), ("report", "REFLEET_REPORT_LISTEN", 8081),
                            ("metrics", "REFLEET_METRICS_LISTEN", 9090)):
        assert env[var] == f"0.0.0.0:{port}"
        env[var] = f"127.0.0.1:{ports[name]}"
    assert env["REFLEET_REPORT_SECRET"] == f"{RELEASE}-report-key"
    # API keys are on by default and none exist yet: the optional Secret volume is empty.
    assert env["REFLEET_API_KEYS_DIR"] == "/etc/refleet/api-keys"
    (work / "in/api-keys").mkdir()
    env["REFLEET_API_KEYS_DIR"] = str(work / "in/api-keys")
    env.update({"KUBECONFIG": str(work / "in/kubeconfig"), "HOSTNAME": SANDBOX_POD, "TMPDIR": str(work / "tmp")})
    log = work / "operator.log"
    assert container["command"] == ["/usr/local/bin/refleet", "operator"]
    proc = sandbox.start([str(BIN), "operator"], env, [work / "tmp"], log)
    pid = sandbox.the_binary(proc, "refleet")
    yield {"proc": proc, "pid": pid, "ports": ports, "log": log, "env": env}
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()
    shutil.rmtree(work, ignore_errors=True)


def test_operator_runs_non_root_with_the_chart_rbac_and_env(kube, operator):
    proc, log, ports = operator["proc"], operator["log"], operator["ports"]
    status, body = sandbox.wait_http(f"http://127.0.0.1:{ports['metrics']}/healthz", proc, log)
    assert status == 200
    st = sandbox.process_status(operator["pid"])
    assert st["Uid"].split() == ["65532"] * 4 and st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
    lease_name = operator["env"]["REFLEET_LEASE_NAME"]
    lease = kube.eventually("the Lease held by the operator", lambda: (
        (l := kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{lease_name}")).ok
        and l.json()["spec"].get("holderIdentity") == SANDBOX_POD and l.json()), 60)
    assert lease["spec"]["holderIdentity"] == SANDBOX_POD
    kube.eventually("refleet_operator_leader 1", lambda: re.search(
        r"^refleet_operator_leader 1$", sandbox.http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")[1], re.M), 30)
    # A pool in the restricted namespace: the operator creates its reflector pod, which the
    # PodSecurity admission accepts (operator/src/controller/pod.rs's securityContext).
    pool = {"apiVersion": "refleet.dev/v1alpha1", "kind": "ReflectorPool", "metadata": {"name": "arena"},
            "spec": {"defaults": {"image": "refleet:test"}, "regions": [{"name": "eu"}],
                     "files": {"publicURL": "http://files.test/"}, "reflectorURL": {"template": "ws://{pod}.test/"}}}
    kube.must(kube.create(f"/apis/refleet.dev/v1alpha1/namespaces/{NS}/reflectorpools", pool), "pool")
    pods = kube.eventually("a reflector pod", lambda: kube.get(
        f"/api/v1/namespaces/{NS}/pods?labelSelector=refleet.dev/pool=arena").json()["items"], 60)
    spec = pods[0]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]} >= {"/data", "/tmp"}
    assert "forbidden" not in log.read_text().lower(), log.read_text()[-4000:]


def test_operator_serves_routing_and_labels_its_pod_leader(kube, operator):
    """What the router/report/join-token flags add (`refleet operator --help`): the router and
    report ports answer, the leader labels its pod for the Services, and the operator creates
    the join-token key Secret with the chart's RBAC."""
    proc, log, ports = operator["proc"], operator["log"], operator["ports"]
    sandbox.wait_http(f"http://127.0.0.1:{ports['metrics']}/healthz", proc, log)
    problems = []
    try:
        sandbox.wait_http(f"http://127.0.0.1:{ports['router']}/v1/shards?namespace={NS}&session=lobby", proc, log, 15)
    except AssertionError:
        problems.append("the router does not answer on REFLEET_ROUTER_LISTEN")
    try:
        kube.eventually("the report port", lambda: _connects(ports["report"]), 10)
    except AssertionError:
        problems.append("nothing listens on REFLEET_REPORT_LISTEN")
    try:
        kube.eventually("the leader label", lambda: kube.get(f"/api/v1/namespaces/{NS}/pods/{SANDBOX_POD}").json()
                        ["metadata"].get("labels", {}).get("refleet.dev/leader") == "true", 20)
    except AssertionError:
        problems.append(f"pod {SANDBOX_POD} never got refleet.dev/leader=true")
    secret = operator["env"]["REFLEET_TOKEN_SECRET"]
    try:
        data = kube.eventually("the join-token Secret", lambda: (
            (s := kube.get(f"/api/v1/namespaces/{NS}/secrets/{secret}")).ok and s.json().get("data")), 15)
        assert {"kid", "signing-key"} <= set(data)
    except AssertionError:
        problems.append(f"Secret {secret} (keys kid, signing-key) was not created")
    # The report key: created by the operator (the chart renders none), and each reflector pod
    # gets only its own credential derived from it.
    secret = operator["env"]["REFLEET_REPORT_SECRET"]
    try:
        data = kube.eventually("the report key Secret", lambda: (
            (s := kube.get(f"/api/v1/namespaces/{NS}/secrets/{secret}")).ok and s.json().get("data")), 15)
        key = base64.b64decode(data["token"]).strip()
        assert len(key) >= 16
        pods = kube.get(f"/api/v1/namespaces/{NS}/pods?labelSelector=refleet.dev/pool=arena").json()["items"]
        assert pods, "no reflector pod"
        for pod in pods:
            name, region = pod["metadata"]["name"], pod["metadata"]["labels"]["refleet.dev/region"]
            env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            assert env["REFLEET_REPORT_TOKEN"] == report_credential(key, name, region), name
    except (AssertionError, KeyError) as e:
        problems.append(f"report key Secret {secret} or the pods' credentials: {e!r}")
    assert "forbidden" not in log.read_text().lower(), log.read_text()[-4000:]
    assert problems == [], f"{problems}\n{log.read_text()[-3000:]}"


def report_credential(key: bytes, reflector: str, region: str) -> str:
    """What api/src/report_credential.rs mints, written again from its description."""
    mac = hmac.new(key, b"refleet-report-v1\0" + reflector.encode() + b"\0" + region.encode(), hashlib.sha256)
    return f"{reflector}.{region}." + base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def _connects(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_operator_stops_cleanly_on_sigterm(kube, operator):
    code = sandbox.stop(operator["proc"], operator["pid"])
    assert code == 0, operator["log"].read_text()[-3000:]
    assert "forbidden" not in operator["log"].read_text().lower()


def test_a_bad_value_fails_before_anything_is_created(kube):
    out = kube.helm("install", "rf-bad", CHART, "-n", NS, "--set", "operator.replicas=two", check=False)
    assert out.returncode != 0
    assert "at '/operator/replicas': got string, want integer" in out.stderr, out.stderr
    assert kube.get(f"/apis/apps/v1/namespaces/{NS}/deployments/rf-bad-operator").status_code == 404
    out = kube.helm("install", "rf-bad", CHART, "-n", NS, "--set", "rbac.namespaced=true", check=False)
    assert out.returncode != 0 and "rbac.namespaced=true needs operator.watchNamespaces" in out.stderr, out.stderr
    assert kube.helm("status", "rf-bad", "-n", NS, check=False).returncode != 0


def test_namespaced_rbac_release_with_the_toggles_this_apiserver_knows(kube, tmp_path):
    """A second release: Roles per watched namespace, an Ingress, dashboards, API keys; the
    CRDs stay with the first release."""
    ns, games = "refleet-chart-ns", "games"
    kube.namespace(ns, RESTRICTED)
    kube.namespace(games, RESTRICTED)
    values = {"rbac": {"namespaced": True}, "operator": {"watchNamespaces": [games, ns]}, "crds": {"enabled": False},
              "router": {"ingress": {"enabled": True, "host": "route.example.com"}},
              "dashboards": {"enabled": True}, "apiKeys": {"enabled": True, "keys": {"com.example.app": "k1"}}}
    f = tmp_path / "values.yaml"
    f.write_text(json.dumps(values))
    out = kube.helm("install", "rf-ns", CHART, "-n", ns, "-f", str(f))
    no_warnings(out)
    objects = manifest(kube, "rf-ns", ns)
    kinds = {o["kind"] for o in objects}
    assert {"Ingress", "ConfigMap", "Role", "RoleBinding"} <= kinds
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for obj in objects:
        assert kube.get(kube.object_path(obj, ns)).status_code == 200, obj["metadata"]
    role = kube.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{games}/roles/rf-ns-operator").json()
    cluster_role = kube.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{RELEASE}-operator").json()
    assert role["rules"] == cluster_role["rules"]
    out = kube.helm("uninstall", "rf-ns", "-n", ns)
    no_warnings(out)
    for obj in objects:
        assert kube.get(kube.object_path(obj, ns)).status_code == 404, obj["metadata"]


def test_upgrade_changes_a_value_and_keeps_the_report_key(kube):
    path = f"/api/v1/namespaces/{NS}/secrets/{RELEASE}-report-key"
    before = kube.get(path).json()["data"]["token"]
    out = kube.helm("upgrade", RELEASE, CHART, "-n", NS, "--set", "operator.replicas=3",
                    "--set", "operator.logLevel=debug")
    no_warnings(out)
    assert "REVISION: 2" in out.stdout
    dep = kube.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{RELEASE}-operator").json()
    assert dep["spec"]["replicas"] == 3
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RUST_LOG"] == "debug"
    assert kube.get(path).json()["data"]["token"] == before, "the report key must survive upgrades"
    for crd in ("reflectorpools.refleet.dev", "sessions.refleet.dev"):
        assert established(kube, crd)


def test_uninstall_removes_the_release_and_keeps_the_crds(kube):
    objects = manifest(kube, RELEASE, NS)
    out = kube.helm("uninstall", RELEASE, "-n", NS)
    no_warnings(out)
    for obj in objects:
        status = kube.get(kube.object_path(obj, NS)).status_code
        if obj["kind"] == "CustomResourceDefinition":
            assert status == 200, "crds.keep: the CRDs stay"
        else:
            assert status == 404, f"{obj['kind']} {obj['metadata']['name']} left behind"
    # The custom resources survive with their CRDs.
    assert kube.get(f"/apis/refleet.dev/v1alpha1/namespaces/{NS}/reflectorpools/arena").status_code == 200
