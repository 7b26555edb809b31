"""The proxy under test, `python -m proxy_app serve`, as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .client import Response, basic, fetch
from .net import free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = ("HIT", "MISS", "STALE", "PASS")


def proxy_python() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Proxy:
    """One proxy process with its own config, cache_dir and log file."""

    def __init__(
        self, workdir: Path, config: dict[str, Any], command_prefix: tuple[str, ...] = ()
    ) -> None:
        self.dir = workdir
        # What the proxy's command runs under (`unshare ...`): it must exec the command,
        # so that the process stopped is the proxy itself.
        self.command_prefix = command_prefix
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "cache_dir": str(self.dir / "cache"),
            "log_format": "text",
            **config,
        }
        self.cache_dir = Path(self.config["cache_dir"])
        self.config_path = self.dir / "config.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.stdout_path = self.dir / "proxy.stdout"
        self.stderr_path = self.dir / "proxy.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        # skopeo --src-cert-dir wants a directory whose *.crt files are CAs
        self.cert_dir = self.dir / "certs.d"

    @property
    def ca_path(self) -> Path:
        return Path(self.config.get("ca_dir", self.cache_dir / "ca")) / "ca.crt"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Proxy:
        out = self.stdout_path.open("ab")
        err = self.stderr_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_CACHE_")}
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            [
                *self.command_prefix,
                proxy_python(),
                "-m",
                "proxy_app",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=self.dir,
            env=env,
        )
        out.close()
        err.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"proxy not healthy after {timeout}s:\n{self.output()}")
            time.sleep(0.1)
        self.cert_dir.mkdir(exist_ok=True)
        (self.cert_dir / "ca.crt").write_bytes(self.ca_path.read_bytes())
        return self

    def stop(self) -> None:
        stop_process(self.proc, grace=10)
        self.proc = None

    def output(self) -> str:
        text = ""
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                text += p.read_text(errors="replace")
        return text

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def get(
        self,
        netloc: str,
        path: str,
        headers: dict[str, str] | None = None,
        user: tuple[str, str] | None = None,
    ) -> Response:
        """One GET of https://netloc/path through the proxy, in a tunnel of its own
        (as proxy user `user` when given)."""
        host, port = netloc.rsplit(":", 1)
        proxy_headers = {"Proxy-Authorization": basic(*user)} if user else None
        return fetch(
            self.port,
            str(self.ca_path),
            host,
            int(port),
            "GET",
            path,
            headers,
            proxy_headers=proxy_headers,
        )

    # -- what it says about itself -------------------------------------------------
    def log_lines(self, needle: str = "") -> list[str]:
        """Access-log lines (stdout and stderr) that contain `needle`."""
        return [ln for ln in self.output().splitlines() if needle in ln]

    def results_for(self, needle: str, method: str = "GET") -> list[str]:
        """HIT/MISS/STALE/PASS of each access-log line about `needle` (e.g. a digest)."""
        out = []
        for line in self.log_lines(needle):
            if method and not re.search(rf"\b{method}\b", line):
                continue
            found = re.findall(r"\b(HIT|MISS|STALE|PASS)\b", line)
            if not found and line.lstrip().startswith("{"):
                try:
                    rec = json.loads(line)
                    found = [v for v in rec.values() if isinstance(v, str) and v in RESULTS]
                except ValueError:
                    pass
            if found:
                out.append(found[0])
        return out

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            m = re.match(r"([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)", line)
            if not m or m[1] != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
            if all(got.get(k, "").lower() == v.lower() for k, v in labels.items()):
                total += float(m[3])
        return total

    def files_in_cache_blobs(self) -> list[Path]:
        d = self.cache_dir / "blobs"
        return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []
