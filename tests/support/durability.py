"""Helpers for the durability tests (issue 5): random blobs in a registry, the store as
it lies on disk, a client that pauses in the middle of a body, a multi-platform image,
and the `registry-cache` command line."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .client import Response, fetch
from .images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, _layer, sha256, skopeo
from .proxy import Proxy, proxy_python
from .registry import Registry, wait_until

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


# --- blobs ------------------------------------------------------------------------------


def random_blob(registry: Registry, repo: str, size: int) -> str:
    """Uploads `size` random bytes to `repo` (straight to the registry); returns the digest."""
    data = os.urandom(size)
    digest = sha256(data)
    registry.upload_blob(repo, data, digest)
    return digest


def get_blob(
    proxy: Proxy,
    host: str,
    port: int,
    repo: str,
    digest: str,
    method: str = "GET",
    timeout: float = 120,
) -> Response:
    """One blob request through the proxy, in a tunnel of its own."""
    return fetch(
        proxy.port,
        str(proxy.ca_path),
        host,
        port,
        method,
        f"/v2/{repo}/blobs/{digest}",
        timeout=timeout,
    )


def stored_blobs(cache_dir: Path) -> dict[str, int]:
    """What the store holds on disk: digest -> file size (the files under blobs/)."""
    root = cache_dir / "blobs" / "sha256"
    if not root.exists():
        return {}
    return {"sha256:" + p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def store_bytes(cache_dir: Path) -> int:
    """The sum of the sizes of every file under cache_dir/blobs."""
    d = cache_dir / "blobs"
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def wait_stored(proxy: Proxy, *digests: str, timeout: float = 30) -> bool:
    """Waits until the blobs are in the store and counted in its size. A client gets a
    MISS's last byte as soon as the blob is verified, before the proxy has flushed and
    renamed it into the store and indexed it (the client need not wait for the disk), so
    a test that looks at the store right after a MISS must wait for that first."""

    def settled() -> bool:
        held = stored_blobs(proxy.cache_dir)
        return all(d in held for d in digests) and proxy.metric(
            "registry_cache_size_bytes"
        ) == store_bytes(proxy.cache_dir)

    return bool(wait_until(settled, timeout=timeout))


def blob_path(cache_dir: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return cache_dir / "blobs" / "sha256" / hexd[:2] / hexd


def tmp_files(cache_dir: Path) -> list[Path]:
    d = cache_dir / "tmp"
    return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []


def kill9(proxy: Proxy) -> None:
    """SIGKILL: no clean-up of any kind in the proxy."""
    assert proxy.proc is not None
    proxy.proc.kill()
    proxy.proc.wait(10)
    proxy.proc = None


# --- a client that reads part of a body, then stops reading until told ------------------


def _recv_head(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    """Reads until the end of a response head; returns (head, body bytes read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed inside the response head: {buf[:200]!r}")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


class PausingReader:
    """GETs `path` through the proxy in its own thread with a small receive buffer, reads
    `pause_after` bytes of the body, then stops reading until `resume()`: a slow client
    that keeps the proxy in the middle of sending a blob for as long as a test needs."""

    def __init__(
        self,
        proxy: Proxy,
        host: str,
        port: int,
        path: str,
        pause_after: int = 128 << 10,
        rcvbuf: int = 16 << 10,
    ) -> None:
        self.proxy = proxy
        self.host, self.port, self.path = host, port, path
        self.pause_after = pause_after
        self.rcvbuf = rcvbuf
        self.status = 0
        self.headers: dict[str, str] = {}
        self.length: int | None = None
        self.received = 0
        self.error: str | None = None
        self._hash = hashlib.sha256()
        self.paused = threading.Event()
        self._resume = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def sha256(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    @property
    def complete(self) -> bool:
        return self.error is None and self.length is not None and self.received == self.length

    def start(self, timeout: float = 30) -> PausingReader:
        self._thread.start()
        assert self.paused.wait(timeout), "the reader never got its first bytes"
        assert self.error is None, self.error
        return self

    def resume(self, timeout: float = 120) -> PausingReader:
        self._resume.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the reader did not finish"
        return self

    def _take(self, data: bytes) -> None:
        self._hash.update(data)
        self.received += len(data)

    def _run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Set before connect so that the window stays small: the proxy cannot park
            # the whole blob in kernel buffers and be done with it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.settimeout(150)
            sock.connect(("127.0.0.1", self.proxy.port))
            target = f"{self.host}:{self.port}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head, _ = _recv_head(sock)
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"CONNECT answered {head[:100]!r}")
            ctx = ssl.create_default_context(cafile=str(self.proxy.ca_path))
            tls = ctx.wrap_socket(sock, server_hostname=self.host)
            tls.sendall(
                f"GET {self.path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()
            )
            head, rest = _recv_head(tls)
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ")[1])
            for line in lines[1:]:
                k, _, v = line.partition(":")
                self.headers[k.strip().lower()] = v.strip()
            self.length = int(self.headers["content-length"])
            self._take(rest)
            while self.received < min(self.pause_after, self.length):
                data = tls.recv(4096)
                if not data:
                    raise ConnectionError("closed before the pause")
                self._take(data)
            self.paused.set()
            self._resume.wait(150)
            while self.received < self.length:
                data = tls.recv(65536)
                if not data:
                    raise ConnectionError(f"closed after {self.received} of {self.length} bytes")
                self._take(data)
        except Exception as e:  # reported through .error, asserted by the test
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.paused.set()
            sock.close()


# --- a multi-platform image -------------------------------------------------------------


@dataclass
class PlatformImage:
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]

    @property
    def blob_digests(self) -> list[str]:
        return [self.config_digest, *self.layer_digests]


@dataclass
class MultiPlatformImage:
    layout: Path
    index_digest: str
    platforms: dict[str, PlatformImage] = field(default_factory=dict)

    def digests(self, *platforms: str) -> set[str]:
        """Manifests and blobs of these platforms (all when none named), without the index."""
        out: set[str] = set()
        for name, p in self.platforms.items():
            if not platforms or name in platforms:
                out |= {p.manifest_digest, *p.blob_digests}
        return out


def make_multiplatform_image(
    layout: Path, platforms: dict[str, list[int]], tag: str = "latest"
) -> MultiPlatformImage:
    """An OCI layout whose tag names an image index with one image per platform
    (`os/arch`), each with its own random layers and a config naming its platform."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    result = MultiPlatformImage(layout, "")
    entries = []
    for n, (platform, sizes) in enumerate(platforms.items()):
        os_name, arch = platform.split("/")[:2]
        layers: list[dict[str, str | int]] = []
        layer_digests: list[str] = []
        diff_ids: list[str] = []
        for i, size in enumerate(sizes):
            raw, gz = _layer(n * 100 + i, size)
            layer_digests.append(put(gz))
            layers.append({"mediaType": OCI_LAYER, "digest": layer_digests[-1], "size": len(gz)})
            diff_ids.append(sha256(raw))
        config = json.dumps(
            {
                "architecture": arch,
                "os": os_name,
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        config_digest = put(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": layers,
            }
        ).encode()
        manifest_digest = put(manifest)
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "platform": {"architecture": arch, "os": os_name},
            }
        )
        result.platforms[platform] = PlatformImage(manifest_digest, config_digest, layer_digests)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    result.index_digest = put(index)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": OCI_INDEX,
                        "digest": result.index_digest,
                        "size": len(index),
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            }
        )
    )
    return result


def push_all(layout: Path, ref: str, cert_dir: Path, tag: str = "latest") -> None:
    """Pushes every platform of the layout's index (skopeo copy --all), not through the proxy."""
    res = skopeo(
        "copy", "--all", "--dest-cert-dir", str(cert_dir), f"oci:{layout}:{tag}", f"docker://{ref}"
    )
    assert res.returncode == 0, f"skopeo push --all {ref} failed:\n{res.stderr}"


# --- the command line -------------------------------------------------------------------


def cli(
    proxy: Proxy, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`registry-cache <args> --config <the proxy's config>` as an operator would run it."""
    proxy_vars = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REGISTRY_CACHE_") and k.lower() not in proxy_vars
    }
    command, *rest = args
    return subprocess.run(
        [proxy_python(), "-m", "proxy_app", command, "--config", str(proxy.config_path), *rest],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
