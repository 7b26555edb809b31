"""Ports, waiting for listeners and the test host names in /etc/hosts."""

from __future__ import annotations

import contextlib
import fcntl
import signal
import socket
import subprocess
import time
from pathlib import Path

# Every upstream gets a name: Go clients (skopeo, docker) never send loopback
# addresses or `localhost` through HTTPS_PROXY, so the tests use these.
DOMAIN = "rc.test"
HOSTNAMES = (
    "registry.rc.test",
    "private.rc.test",
    "tokenreg.rc.test",
    "auth.rc.test",
    "redir.rc.test",
    "cdn.rc.test",
    "slow.rc.test",
    "scratch.rc.test",
    "gzip.rc.test",
    "gzforce.rc.test",
)
HOSTS_MARK = "# registry-cache integration tests"


def ensure_hosts_entries(hosts_file: Path = Path("/etc/hosts")) -> None:
    """Map the test names to 127.0.0.1 (idempotent; one line, marked)."""
    line = "127.0.0.1 " + " ".join(HOSTNAMES) + " " + HOSTS_MARK
    with hosts_file.open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        if line in text.splitlines():
            return
        kept = [ln for ln in text.splitlines() if not ln.endswith(HOSTS_MARK)]
        f.seek(0)
        f.truncate()
        f.write("\n".join([*kept, line]) + "\n")
    for name in HOSTNAMES:
        assert socket.gethostbyname(name) == "127.0.0.1", name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def stop_process(
    proc: subprocess.Popen[bytes] | None, grace: float = 10, sig: int = signal.SIGTERM
) -> None:
    """Asks a process to stop (`sig`), kills it after `grace` seconds, and reaps it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
