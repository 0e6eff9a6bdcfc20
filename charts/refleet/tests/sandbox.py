"""Runs a binary the way the chart's pods run it: as UID/GID 65532 with no capabilities and
no_new_privs, the whole filesystem read-only except fresh tmpfs directories (the pods'
emptyDirs). A private mount namespace (unshare) keeps the read-only remount to the child."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

UID = 65532

# In the new mount namespace (as root): tmpfs on each writable dir, every other mount
# read-only, then drop to the pods' user for good.
SCRIPT = r"""
set -e
uid="$1"; shift
while [ "$1" != "--" ]; do
  mount -t tmpfs -o "mode=0700,uid=$uid,gid=$uid,size=64m" tmpfs "$1"; shift
done
shift
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$m" in /proc*|/sys*|/dev|/dev/pts) continue;; esac
  case " $RW_DIRS " in *" $m "*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
exec setpriv --reuid "$uid" --regid "$uid" --clear-groups --no-new-privs \
  --inh-caps=-all --bounding-set=-all -- "$@"
"""


def require_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the non-root start checks need root (unshare + setpriv) to build their sandbox")


def workdir() -> Path:
    """A directory the sandboxed user can read (inputs) and that holds the tmpfs mount points."""
    d = Path(tempfile.mkdtemp(prefix="refleet-chart-"))
    d.chmod(0o755)
    for sub in ("in", "data", "tmp"):
        (d / sub).mkdir(mode=0o755)
    return d


def start(argv: list[str], env: dict[str, str], rw_dirs: list[Path], log: Path) -> subprocess.Popen:
    require_root()
    rw = [str(p) for p in rw_dirs]
    full_env = {"PATH": "/usr/bin:/bin", "RW_DIRS": " ".join(rw), **env}
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", str(UID), *rw, "--", *argv],
            env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd="/", start_new_session=True)


def process_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status of the binary (the exec'd child of setpriv keeps the pid)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before answering {url}:\n{log.read_text()[-4000:]}")
        try:
            return http_get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)


def the_binary(proc: subprocess.Popen, name: str) -> int:
    """unshare, sh and setpriv each exec the next, so the binary keeps the sandbox's pid;
    returns it once the binary runs."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{proc.pid}/comm").read_text().strip() == name[:15]:
                return proc.pid
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{name} did not start")


def stop(proc: subprocess.Popen, pid: int, timeout: float = 20.0) -> int:
    """SIGTERM to the binary (what the kubelet sends), then the exit code of the sandbox."""
    os.kill(pid, 15)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise AssertionError(f"did not exit within {timeout}s of SIGTERM")
