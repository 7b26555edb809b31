"""What the benchmark runs: upstream, nginx, distribution's pull-through cache, proxies.

The generated image and the upstream registry's storage holding it are made once and
kept in a cache directory (default /var/tmp/registry-cache-bench, `BENCH_CACHE`);
everything else lives in a fresh run directory that is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.images import Image, make_image, push
from tests.support.net import (
    HOSTNAMES,
    ensure_hosts_entries,
    free_port,
    stop_process,
    wait_for_port,
)
from tests.support.pki import Issued, TestCA
from tests.support.proxy import Proxy
from tests.support.registry import Registry

UPSTREAM_HOST = "registry.rc.test"  # in /etc/hosts (tests/support/net.py)
REPO = "bench/image"
TAG = "latest"


@dataclass
class ImageInfo:
    """The generated image as pushed upstream: digests and sizes."""

    manifest_digest: str
    manifest_size: int
    config_digest: str
    layer_digests: list[str]
    sizes: dict[str, int]  # config and layers
    layout: str  # the OCI layout, whose blobs/sha256/<hex> files nginx serves

    @property
    def blob_digests(self) -> list[str]:
        return [self.config_digest, *self.layer_digests]

    @property
    def layer_bytes(self) -> int:
        return sum(self.sizes[d] for d in self.layer_digests)

    @property
    def total_bytes(self) -> int:
        """Manifest, config and layers: everything a pull transfers."""
        return self.manifest_size + sum(self.sizes.values())

    def blob_file(self, digest: str) -> Path:
        return Path(self.layout) / "blobs" / "sha256" / digest.split(":", 1)[1]


class ImageCache:
    """The generated image and an upstream storage holding it, reused between runs."""

    def __init__(self, root: Path, layers: int, layer_size: int) -> None:
        self.dir = root / f"image-{layers}x{layer_size}"
        self.layers = layers
        self.layer_size = layer_size
        self.stamp = self.dir / "image.json"

    @property
    def registry_dir(self) -> Path:
        """docker-registry's workdir; its storage/ holds the pushed image."""
        return self.dir / "upstream"

    def load(self) -> ImageInfo | None:
        if not self.stamp.exists():
            return None
        info = ImageInfo(**json.loads(self.stamp.read_text()))
        if not all(info.blob_file(d).exists() for d in info.blob_digests):
            return None
        return info

    def ensure(self, pki: Pki, log: Any) -> ImageInfo:
        info = self.load()
        if info is not None:
            return info
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        log(f"generating the image: {self.layers} layers x {self.layer_size} bytes (once)")
        image: Image = make_image(self.dir / "layout", [self.layer_size] * self.layers, TAG)
        manifest = (image.layout / "blobs/sha256" / image.manifest_digest.split(":")[1]).stat()
        reg = Registry(self.registry_dir, UPSTREAM_HOST, pki.server).start()
        try:
            log(f"pushing it to the upstream storage in {self.registry_dir}")
            push(image, f"{reg.netloc}/{REPO}:{TAG}", pki.cert_dir, tag=TAG)
        finally:
            reg.stop()
        info = ImageInfo(
            image.manifest_digest,
            manifest.st_size,
            image.config_digest,
            image.layer_digests,
            image.sizes,
            str(image.layout),
        )
        self.stamp.write_text(json.dumps(asdict(info), indent=1))
        return info


@dataclass
class Pki:
    ca: TestCA
    server: Issued  # one certificate for every test name and 127.0.0.1 (EC P-256)
    cert_dir: Path  # only ca.crt: skopeo --src-cert-dir

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path

    @classmethod
    def make(cls, directory: Path) -> Pki:
        ca = TestCA(directory)
        server = ca.issue("server", [*HOSTNAMES, "127.0.0.1"])
        cert_dir = directory / "certs.d"
        cert_dir.mkdir()
        (cert_dir / "ca.crt").write_bytes(ca.cert_path.read_bytes())
        return cls(ca, server, cert_dir)


class Nginx:
    """nginx serving a directory over TLS (sendfile on, one worker, same key type)."""

    def __init__(self, workdir: Path, root: Path, cert: Issued, extra: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.root = root
        temp = self.dir / "temp"
        temp.mkdir()
        self.config_path = self.dir / "nginx.conf"
        self.config_path.write_text(
            f"""
user root;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    {extra}
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        server_name {UPSTREAM_HOST};
        ssl_certificate {cert.cert_path};
        ssl_certificate_key {cert.key_path};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
        location / {{ }}
    }}
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(self.config_path), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr.log").open("ab"),
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, timeout=10)
        except TimeoutError as e:
            self.stop()
            raise RuntimeError("nginx did not start: " + self.errors()) from e
        return self

    def errors(self) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            p = self.dir / name
            if p.exists():
                text += p.read_text(errors="replace")
        return text

    def url(self, path: str) -> str:
        return f"https://{UPSTREAM_HOST}:{self.port}{path}"

    def stop(self) -> None:
        stop_process(self.proc, grace=10, sig=signal.SIGQUIT)
        self.proc = None


class Bench:
    """The whole set-up of one benchmark run; a context manager that stops everything."""

    def __init__(self, cache_root: Path, layers: int, layer_size: int, log: Any) -> None:
        self.cache_root = cache_root
        self.cache_root.mkdir(parents=True, exist_ok=True)
        self.images = ImageCache(cache_root, layers, layer_size)
        self.log = log
        self.run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=cache_root))
        self.keep = False
        self._stack = contextlib.ExitStack()
        self._proxies = 0
        self.pki: Pki
        self.image: ImageInfo
        self.upstream: Registry
        self.nginx: Nginx
        self.mirror: Registry

    def __enter__(self) -> Bench:
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup(self) -> None:
        ensure_hosts_entries()
        self.pki = Pki.make(self.run_dir / "pki")
        self.image = self.images.ensure(self.pki, self.log)
        self.upstream = Registry(self.images.registry_dir, UPSTREAM_HOST, self.pki.server)
        self.upstream.log_path = self.run_dir / "upstream.log"  # this run's requests only
        self._start(self.upstream, self.upstream.stop)
        self.nginx = Nginx(self.run_dir / "nginx", Path(self.image.layout), self.pki.server).start()
        self._stack.callback(self.nginx.stop)
        self.mirror = Registry(
            self.run_dir / "distribution-cache",
            "127.0.0.1",
            self.pki.server,
            proxy_remote=f"https://{self.upstream.netloc}",
            env={"SSL_CERT_FILE": str(self.pki.ca_path)},
        )
        self._start(self.mirror, self.mirror.stop)

    def _start(self, reg: Registry, stop: Any) -> None:
        reg.start()
        self._stack.callback(stop)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if not self.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- the proxy ---------------------------------------------------------------------

    def proxy(self, workdir: Path | None = None) -> Proxy:
        """A started proxy; a fresh cache dir unless `workdir` (of an earlier one) is given."""
        if workdir is None:
            self._proxies += 1
            workdir = self.run_dir / f"proxy-{self._proxies}"
        proxy = Proxy(workdir, self.proxy_config())
        proxy.start()
        self._stack.callback(proxy.stop)
        return proxy

    def proxy_config(self) -> dict[str, Any]:
        """Every proxy's configuration (one CA directory for all: the cluster's one CA)."""
        return {
            "ca_dir": str(self.run_dir / "proxy-ca"),
            "upstream_ca_bundle": str(self.pki.ca_path),
            # named, not "*": the proxy connects to loopback only for named hosts
            "intercept": [UPSTREAM_HOST],
            "allowed_ports": [443, self.upstream.port],
            "tag_ttl": "5m",
            "log_format": "text",
            # the mirror front door's registry for names without one (figure 2b)
            "mirror_default_registry": self.upstream.netloc,
        }

    def drop_proxy(self, proxy: Proxy, keep_cache: bool = False) -> None:
        proxy.stop()
        if not keep_cache:
            shutil.rmtree(proxy.dir, ignore_errors=True)

    # --- references ----------------------------------------------------------------------

    def upstream_ref(self) -> str:
        return f"{self.upstream.netloc}/{REPO}:{TAG}"

    def own_mirror_ref(self, proxy: Proxy) -> str:
        """The image through the proxy's own mirror front door (its default registry)."""
        return f"127.0.0.1:{proxy.port}/{REPO}:{TAG}"

    def mirror_ref(self) -> str:
        return f"{self.mirror.netloc}/{REPO}:{TAG}"

    def blob_url(self, digest: str) -> str:
        """A blob at the upstream (through the proxy when curl is given --proxy)."""
        return f"https://{self.upstream.netloc}/v2/{REPO}/blobs/{digest}"

    def manifest_url(self) -> str:
        return f"https://{self.upstream.netloc}/v2/{REPO}/manifests/{TAG}"

    def nginx_url(self, digest: str) -> str:
        return self.nginx.url("/blobs/sha256/" + digest.split(":", 1)[1])

    def upstream_log_mark(self) -> int:
        return len(self.upstream.requests())

    def wait_quiet(self, seconds: float = 0.3) -> None:
        time.sleep(seconds)
