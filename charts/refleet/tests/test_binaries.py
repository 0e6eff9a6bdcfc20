"""What the chart and the image recipe assume of the binaries, checked against the binaries:
names, paths, ports, probe paths, flags and environment variables (`--help`), the shared
libraries the distroless runtime has, and a real start of the reflector as the pods' non-root
user with only its data and temp directories writable. (The operator's real start needs an
apiserver: test_install.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib

import pytest

import chartlib
import sandbox
from chartlib import one, render

REPO = chartlib.REPO
BIN, REFLECTOR_BIN = chartlib.BIN, chartlib.REFLECTOR_BIN

# Every flag of `refleet operator` and its environment variable, as `refleet operator --help`
# shows them (operator/README.md describes the controller, routing-limit and report flags). The
# chart sets the variables; the binary must accept each one.
OPERATOR_FLAGS = {
    "--namespaces": "REFLEET_NAMESPACES",
    "--lease-name": "REFLEET_LEASE_NAME",
    "--lease-namespace": "REFLEET_LEASE_NAMESPACE",
    "--lease-duration": "REFLEET_LEASE_DURATION",
    "--lease-renew-before": "REFLEET_LEASE_RENEW_BEFORE",
    "--resync": "REFLEET_RESYNC",
    "--status-counts-every": "REFLEET_STATUS_COUNTS_EVERY",
    "--min-sync-interval": "REFLEET_MIN_SYNC_INTERVAL",
    "--log-format": "REFLEET_LOG_FORMAT",
    "--metrics-listen": "REFLEET_METRICS_LISTEN",
    "--router-listen": "REFLEET_ROUTER_LISTEN",
    "--report-listen": "REFLEET_REPORT_LISTEN",
    "--report-secret": "REFLEET_REPORT_SECRET",
    "--report-grace": "REFLEET_REPORT_GRACE",
    "--join-tokens": "REFLEET_JOIN_TOKENS",
    "--token-secret": "REFLEET_TOKEN_SECRET",
    "--token-ttl": "REFLEET_TOKEN_TTL",
    "--api-keys-dir": "REFLEET_API_KEYS_DIR",
    "--allowed-origins": "REFLEET_ALLOWED_ORIGINS",
    "--route-rate-limit": "REFLEET_ROUTE_RATE_LIMIT",
    "--trusted-proxies": "REFLEET_TRUSTED_PROXIES",
    "--reservation-claim-window": "REFLEET_RESERVATION_CLAIM_WINDOW",
    "--max-reservations-per-client": "REFLEET_MAX_RESERVATIONS_PER_CLIENT",
    "--anonymous-reservation-share": "REFLEET_ANONYMOUS_RESERVATION_SHARE",
    "--pod-name": "REFLEET_POD_NAME",
    "--pod-namespace": "REFLEET_POD_NAMESPACE",
    "--reflector-report-url": "REFLEET_REFLECTOR_REPORT_URL",
}
# The listen flags' defaults are the ports the chart's containers and Services use.
OPERATOR_LISTEN_DEFAULTS = {"--metrics-listen": 9090, "--router-listen": 8080, "--report-listen": 8081}
# Distroless cc-debian12 ships glibc, libgcc_s and libm, nothing more (no OpenSSL, no libz).
DISTROLESS_CC_LIBS = {"linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0",
                      "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2"}


def help_flags(argv: list[str]) -> dict[str, dict[str, str | None]]:
    """flag -> {env, default} from clap's long help."""
    out = subprocess.run(argv + ["--help"], capture_output=True, text=True, check=True).stdout
    flags: dict[str, dict[str, str | None]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", line)
        if m:
            current = flags.setdefault(m.group(1), {"env": None, "default": None})
            continue
        if current is None:
            continue
        if m := re.search(r"\[env: ([A-Z0-9_]+)=", line):
            current["env"] = m.group(1)
        if m := re.search(r"\[default: ([^\]]+)\]", line):
            current["default"] = m.group(1)
    return flags


def deployment_env(values=None) -> dict[str, dict]:
    objects, _ = render(values or {})
    [container] = one(objects, "Deployment", "rf-operator")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_binaries_are_built():
    for b in (BIN, REFLECTOR_BIN):
        assert b.exists(), f"{b} is missing: cargo build -p refleet-operator -p refleet-reflector"


def test_operator_accepts_every_flag_and_variable_the_chart_sets():
    flags = help_flags([str(BIN), "operator"])
    missing = sorted(f for f in OPERATOR_FLAGS if f not in flags)
    wrong_env = sorted(f"{f}: {flags[f]['env']} (want {e})" for f, e in OPERATOR_FLAGS.items()
                       if f in flags and flags[f]["env"] != e)
    accepted = {v["env"] for v in flags.values()}
    everything = chartlib.deep_merge({"apiKeys": {"enabled": True, "existingSecret": "k"}},
                                     {"operator": {"watchNamespaces": ["a"]},
                                      "router": {"trustedProxies": ["10.0.0.0/8"]}})
    chart_vars = {n for n in deployment_env(everything) if n.startswith("REFLEET_")}
    unaccepted = sorted(chart_vars - accepted)
    assert not (missing or wrong_env or unaccepted), (
        f"`refleet operator --help` lacks flags {missing}; env mismatches {wrong_env}; "
        f"the chart sets variables the operator does not read: {unaccepted}")


def test_gateway_accepts_every_variable_the_chart_sets():
    flags = help_flags([str(BIN), "gateway"])
    accepted = {v["env"] for v in flags.values()}
    objects, _ = render({"gateways": {"enabled": True, "regions": [{"name": "eu"}],
                                      "filesURL": "http://files.games.svc:7070/files"}})
    [container] = one(objects, "Deployment", "rf-gateway-eu")["spec"]["template"]["spec"]["containers"]
    chart_vars = {e["name"] for e in container["env"] if e["name"].startswith("REFLEET_")}
    assert chart_vars <= accepted, f"`refleet gateway --help` lacks {sorted(chart_vars - accepted)}"
    # The chart's ports are the gateway's listen defaults.
    assert flags["--listen"]["default"] == "0.0.0.0:8080"
    assert flags["--metrics-listen"]["default"] == "0.0.0.0:9090"


def test_operator_listen_defaults_are_the_chart_ports():
    flags = help_flags([str(BIN), "operator"])
    env = deployment_env()
    for flag, port in OPERATOR_LISTEN_DEFAULTS.items():
        assert flag in flags, f"`refleet operator --help` lacks {flag}"
        assert flags[flag]["default"] == f"0.0.0.0:{port}", flag
        assert env[OPERATOR_FLAGS[flag]]["value"] == f"0.0.0.0:{port}"


# The variables the operator gives the reflector pods are named from the reflector's own
# clap `Config` (refleet_reflector::launch::LaunchSpec), and the pod test
# `the_reflector_reads_the_pods_environment_as_intended` (operator/src/controller/pod.rs)
# parses a pod's whole environment with that `Config`. What is left to check here: the image.
def test_reflector_accepts_what_the_image_gives_it():
    flags = help_flags([str(REFLECTOR_BIN)])
    accepted = {v["env"] for v in flags.values()}
    given = set(re.findall(r"\b(REFLEET_[A-Z0-9_]+)=", dockerfile_text()))
    assert "REFLEET_STORAGE" in given
    assert sorted(given - accepted) == [], "refleet-reflector does not read these variables"
    assert flags["--listen"]["default"] == "0.0.0.0:7070"


def test_pod_rs_reflector_port_probes_and_user_match_the_image():
    text = (REPO / "operator/src/controller/pod.rs").read_text()
    assert "pub const REFLECTOR_PORT: u16 = 7070;" in text
    assert "pub const RUN_AS_USER: i64 = 65532;" in text
    assert 'probe("/readyz"' in text and 'probe("/healthz"' in text
    assert 'name: Some("http".to_owned())' in text  # the PodMonitor's port name


# ---------------------------------------------------------------- the image recipe


def dockerfile_text() -> str:
    return (REPO / "Dockerfile").read_text()


def dockerfile_stages() -> list[dict]:
    stages: list[dict] = []
    for raw in re.sub(r"\\\n", " ", dockerfile_text()).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?: AS (\S+))?", rest, re.I)
            stages.append({"from": m.group(1), "name": m.group(2), "lines": []})
        stages[-1]["lines"].append((instr, rest.strip()))
    return stages


def test_dockerfile_builds_both_binaries_into_a_non_root_distroless_image():
    build, runtime = dockerfile_stages()
    toolchain = tomllib.loads((REPO / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    # The builder is the pinned toolchain on the runtime's Debian release (same glibc).
    assert build["from"] == f"docker.io/library/rust:{toolchain}-bookworm"
    assert runtime["from"].startswith("gcr.io/distroless/cc-debian12") and runtime["from"].endswith(":nonroot")
    run = " ".join(rest for instr, rest in build["lines"] if instr == "RUN")
    packages = set(re.findall(r"-p (\S+)", run))
    assert packages == {"refleet-operator", "refleet-reflector"}
    assert "--locked" in run and "--release" in run
    bins = {tomllib.loads((REPO / d / "Cargo.toml").read_text())["bin"][0]["name"] for d in ("operator", "reflector")}
    assert bins == {"refleet", "refleet-reflector"}
    for b in bins:
        assert f"target/release/{b} /out/{b}" in run
    copies = [rest for instr, rest in runtime["lines"] if instr == "COPY"]
    assert any(c == "--from=build /out/refleet /out/refleet-reflector /usr/local/bin/" for c in copies)
    user = [rest for instr, rest in runtime["lines"] if instr == "USER"]
    assert user == ["65532:65532"]
    entry = [rest for instr, rest in runtime["lines"] if instr == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/refleet-reflector"]'], "the reflector pods set no command"
    exposed = {int(p) for instr, rest in runtime["lines"] if instr == "EXPOSE" for p in rest.split()}
    assert exposed == {7070, 8080, 8081, 9090}
    workdir = [rest for instr, rest in runtime["lines"] if instr == "WORKDIR"]
    assert workdir == ["/data"], "pod.rs runs the reflector in /data"


def test_chart_runs_the_image_the_dockerfile_builds():
    objects, _ = render({})
    pod = one(objects, "Deployment", "rf-operator")["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"][0] == "/usr/local/bin/refleet" and c["command"][1:] == ["operator"]
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsGroup"] == 65532
    assert {p["containerPort"] for p in c["ports"]} <= {7070, 8080, 8081, 9090}


def test_dockerignore_keeps_every_workspace_member():
    ignored = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    assert "target" in ignored and ".git" in ignored
    members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
    for path in members + ["Cargo.lock", "Cargo.toml", "rust-toolchain.toml", "proto", "crds"]:
        assert path not in ignored, f".dockerignore drops {path}, which the build needs"


@pytest.mark.parametrize("binary", ["refleet", "refleet-reflector"])
def test_binaries_need_only_what_distroless_cc_has(binary):
    path = BIN if binary == "refleet" else REFLECTOR_BIN
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    libs = {line.split()[0].rsplit("/", 1)[-1] for line in out.splitlines() if line.strip()}
    assert libs <= DISTROLESS_CC_LIBS, f"{binary} links {sorted(libs - DISTROLESS_CC_LIBS)}"


# ---------------------------------------------------------------- a real start, non-root


def test_reflector_runs_as_non_root_with_a_read_only_root_filesystem():
    work = sandbox.workdir()
    port = sandbox.free_port()
    log = work / "reflector.log"
    # What pod.rs gives the container (addresses on loopback), plus the pods' /tmp emptyDir.
    env = {
        "REFLEET_LISTEN": f"127.0.0.1:{port}",
        "REFLEET_REGION": "eu",
        "REFLEET_REFLECTOR_NAME": "arena-eu-0",
        "REFLEET_PUBLIC_URL": f"http://127.0.0.1:{port}/",
        "REFLEET_FILES_URL": f"http://127.0.0.1:{port}/files",
        "REFLEET_STORAGE": f"file://{work / 'data'}",
        "REFLEET_DRAIN_TIMEOUT": "2s",
        "TMPDIR": str(work / "tmp"),
    }
    proc = sandbox.start([str(REFLECTOR_BIN)], env, [work / "data", work / "tmp"], log)
    try:
        pid = sandbox.the_binary(proc, "refleet-reflector")
        status, body = sandbox.wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        assert status == 200
        assert sandbox.http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        status, metrics = sandbox.http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and 'refleet_build_info{component="reflector"' in metrics
        st = sandbox.process_status(pid)
        assert st["Uid"].split() == ["65532"] * 4 and st["Gid"].split() == ["65532"] * 4
        assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
        code = sandbox.stop(proc, pid)
        assert code == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def test_the_sandbox_leaves_only_its_tmpfs_dirs_writable():
    work = sandbox.workdir()
    log = work / "sh.log"
    script = (f"touch {work / 'data'}/ok && touch {work / 'tmp'}/ok && echo writable; "
              "touch /tmp/refleet-chart-sandbox-probe 2>/dev/null && echo ROOT-WRITABLE; "
              f"touch {work}/probe 2>/dev/null && echo WORK-WRITABLE; id -u")
    proc = sandbox.start(["sh", "-c", script], {}, [work / "data", work / "tmp"], log)
    try:
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert log.read_text().split() == ["writable", "65532"], log.read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
