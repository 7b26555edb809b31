"""Clients and process probes the figures use: curl, skopeo, /proc readings."""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import skopeo

PROXY_VARS = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
# Seconds any one client (curl, skopeo) may take; `--quick` lowers it.
TIMEOUT = 300.0
# Where skopeo writes its copies: tmpfs, so that the destination disk is not measured.
SHM = Path("/dev/shm")  # noqa: S108


def clean_env() -> dict[str, str]:
    """This process's environment without any proxy variable."""
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- curl ------------------------------------------------------------------------------


@dataclass
class CurlResult:
    seconds: float  # wall clock of the whole curl process
    bytes: int  # bytes of every body received
    codes: list[int]

    @property
    def ok(self) -> bool:
        return all(c in (200, 206) for c in self.codes)


def curl_argv(
    urls: Sequence[str],
    cacert: Path,
    *,
    proxy_port: int | None = None,
    headers: Sequence[str] = (),
    parallel: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = [
        "curl",
        "-sS",
        "--no-progress-meter",
        "--cacert",
        str(cacert),
        "--max-time",
        str(int(TIMEOUT)),
        *extra,
    ]
    argv += ["--proxy", f"http://127.0.0.1:{proxy_port}"] if proxy_port else ["--noproxy", "*"]
    for h in headers:
        argv += ["-H", h]
    if parallel:
        argv += ["--parallel", "--parallel-max", str(parallel)]
    argv += ["-w", r"%{http_code} %{size_download}\n"]
    for url in urls:
        argv += ["-o", "/dev/null", url]
    return argv


def parse_curl(stdout: str) -> tuple[list[int], int]:
    codes, total = [], 0
    for line in stdout.splitlines():
        m = re.fullmatch(r"(\d{3}) (\d+)", line.strip())
        if m:
            codes.append(int(m[1]))
            total += int(m[2])
    return codes, total


def curl(
    urls: Sequence[str],
    cacert: Path,
    *,
    proxy_port: int | None = None,
    headers: Sequence[str] = (),
    parallel: int = 0,
    timeout: float | None = None,
) -> CurlResult:
    argv = curl_argv(urls, cacert, proxy_port=proxy_port, headers=headers, parallel=parallel)
    t0 = time.perf_counter()
    res = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=timeout or TIMEOUT + 10,
        check=False,
    )
    seconds = time.perf_counter() - t0
    codes, total = parse_curl(res.stdout)
    if res.returncode != 0 or len(codes) != len(urls):
        raise RuntimeError(f"curl failed ({res.returncode}): {res.stderr.strip()[:500]}")
    return CurlResult(seconds, total, codes)


@dataclass
class ClientRun:
    """One of many concurrent curl clients: its wall time from the common start."""

    seconds: float
    bytes: int
    codes: list[int]
    returncode: int
    stderr: str


def curl_many(
    argvs: Sequence[list[str]], timeout: float | None = None, poll: float = 0.005
) -> tuple[list[ClientRun], float]:
    """Starts every argv at once; returns each client's time and the time to start them."""
    env = clean_env()
    procs: list[subprocess.Popen[str]] = []
    t0 = time.perf_counter()
    try:
        for argv in argvs:
            procs.append(
                subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    env=env,
                )
            )
        spawned = time.perf_counter() - t0
        ended: dict[int, float] = {}
        outputs: dict[int, tuple[str, str]] = {}
        deadline = t0 + (timeout or TIMEOUT + 10)
        while len(ended) < len(procs):
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.perf_counter() - t0
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(procs) - len(ended)} curl clients still running")
            time.sleep(poll)
        for i, p in enumerate(procs):
            outputs[i] = p.communicate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    runs = []
    for i, p in enumerate(procs):
        out, err = outputs[i]
        codes, total = parse_curl(out)
        runs.append(ClientRun(ended[i], total, codes, p.returncode, err.strip()[:300]))
    return runs, spawned


# --- skopeo ----------------------------------------------------------------------------


def skopeo_pull(
    src: str, cert_dir: Path, *, proxy_port: int | None = None, timeout: float | None = None
) -> float:
    """Seconds `skopeo copy docker://src dir:<tmpfs>` takes; the copy is removed after."""
    dest = Path(
        subprocess.run(
            ["mktemp", "-d", "-p", str(SHM), "rc-bench-pull.XXXXXX"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    try:
        t0 = time.perf_counter()
        res = skopeo(
            "copy",
            "--src-cert-dir",
            str(cert_dir),
            f"docker://{src}",
            f"dir:{dest}",
            proxy_port=proxy_port,
            timeout=timeout or TIMEOUT,
        )
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            via = f" through the proxy on {proxy_port}" if proxy_port else ""
            raise RuntimeError(f"skopeo copy {src}{via} failed:\n{res.stderr.strip()[-1500:]}")
        return seconds
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# --- /proc -----------------------------------------------------------------------------


def children_cpu_seconds() -> float:
    """utime + stime of this process's children that have ended (the clients it ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # after "pid (comm) ": state is field 3, so utime (14) and stime (15) are [11], [12]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Samples VmRSS of a process in a thread; `peak` is the largest sample in KiB."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
