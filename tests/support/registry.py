"""Debian's docker-registry (distribution 2.8) as a real upstream, over TLS."""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .net import free_port, stop_process, wait_for_port
from .pki import Issued

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
# The combined-format access log line distribution writes for every request.
ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')


@dataclass
class LogRequest:
    method: str
    uri: str
    status: int


class Registry:
    """One docker-registry process with its own storage, config and log file."""

    def __init__(
        self,
        workdir: Path,
        hostname: str,
        cert: Issued,
        *,
        htpasswd: tuple[str, str] | None = None,
        token: dict[str, Any] | None = None,
        port: int | None = None,
        proxy_remote: str | None = None,
        env: dict[str, str] | None = None,
        tls: bool = True,
    ) -> None:
        self.dir = workdir
        self.tls = tls
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hostname = hostname
        self.port = port or free_port()
        self.storage = self.dir / "storage"
        self.log_path = self.dir / "registry.log"
        self.config_path = self.dir / "config.yml"
        self.htpasswd = htpasswd
        self.ca_path = cert.cert_path.parent / "ca.crt"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                "secret": secrets.token_hex(16),
                "tls": {"certificate": str(cert.cert_path), "key": str(cert.key_path)},
            },
        }
        if not tls:  # a plain-HTTP registry, reached by absolute-form requests
            del config["http"]["tls"]
        if htpasswd:
            user, password = htpasswd
            line = subprocess.run(
                ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
            ).stdout.strip()
            (self.dir / "htpasswd").write_text(line + "\n")
            config["auth"] = {"htpasswd": {"realm": "rc-test", "path": str(self.dir / "htpasswd")}}
        if token:
            config["auth"] = {"token": token}
        if proxy_remote:
            # distribution's pull-through cache mode in front of `proxy_remote`
            config["proxy"] = {"remoteurl": proxy_remote}
        self.env = env  # extra environment for the process (e.g. SSL_CERT_FILE)
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def netloc(self) -> str:
        return f"{self.hostname}:{self.port}"

    def start(self) -> Registry:
        assert self.proc is None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout=15)
        except TimeoutError as e:
            self.stop()
            raise RuntimeError(
                "docker-registry did not start:\n" + self.log_path.read_text()
            ) from e
        return self

    def stop(self) -> None:
        stop_process(self.proc, grace=5)
        self.proc = None

    # -- its log ----------------------------------------------------------------
    def requests(self) -> list[LogRequest]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = ACCESS_RE.search(line)
            if m:
                out.append(LogRequest(m["method"], m["uri"], int(m["status"])))
        return out

    def blob_requests(self, needle: str = "", method: str | None = "GET") -> list[LogRequest]:
        return [
            r
            for r in self.requests()
            if "/blobs/sha256:" in r.uri
            and needle in r.uri
            and (method is None or r.method == method)
        ]

    # -- its storage ------------------------------------------------------------
    def blob_data_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    # -- direct API access (not through the proxy) ---------------------------------
    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def api(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """A request straight to the registry (or to `port`, e.g. a relay in front)."""
        netloc = f"{self.hostname}:{port or self.port}"
        url = path if path.startswith("https://") else f"https://{netloc}{path}"
        h = dict(headers or {})
        if self.htpasswd:
            raw = f"{self.htpasswd[0]}:{self.htpasswd[1]}".encode()
            h["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        req = urllib.request.Request(url, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, context=self._ctx(), timeout=120) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers.items()), e.read()

    def upload_blob(self, repo: str, data: bytes, digest: str) -> None:
        status, headers, body = self.api("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, (status, body)
        location = headers["Location"]
        if location.startswith("/"):
            location = f"https://{self.netloc}{location}"
        sep = "&" if "?" in location else "?"
        status, _, body = self.api(
            "PUT",
            f"{location}{sep}digest={digest}",
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert status == 201, (status, body)

    def manifest_digest(self, repo: str, ref: str) -> str:
        status, headers, body = self.api(
            "HEAD",
            f"/v2/{repo}/manifests/{ref}",
            headers={
                "Accept": "application/vnd.oci.image.manifest.v1+json, "
                "application/vnd.docker.distribution.manifest.v2+json"
            },
        )
        assert status == 200, (status, body)
        return headers["Docker-Content-Digest"]


def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)
