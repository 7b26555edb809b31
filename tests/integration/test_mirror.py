"""The mirror front door (issue 14): origin-form /v2/ requests to the cache itself.

Real clients over plain HTTP: skopeo (the default registry, as Docker's registry-mirrors
uses it, and a path prefix), containerd's own `ctr images pull --hosts-dir` (`?ns=`),
against the real registries (open, htpasswd, token auth with its realm on another host).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from security.secsupport import hash_password
from support.client import Response, basic, raw_exchange
from support.durability import MultiPlatformImage, make_multiplatform_image, push_all
from support.images import Image, layout_blobs, pull, skopeo
from support.net import stop_process
from support.proxy import Proxy
from support.registry import Registry
from support.servers import AioThread, Front
from support.topology import PRIVATE_CREDS, TOKEN_CREDS, Pki, TokenSetup

pytestmark = pytest.mark.integration

OCI = "application/vnd.oci.image.manifest.v1+json"


def mirror_pull(ref: str, dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """skopeo copy from the cache as a registry (no proxy, plain HTTP)."""
    return skopeo("copy", "--src-tls-verify=false", *extra, f"docker://{ref}", f"oci:{dest}:latest")


def mirror_get(proxy: Proxy, path: str, headers: dict[str, str] | None = None) -> Response:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{proxy.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw_exchange(proxy.port, ("\r\n".join(lines) + "\r\n\r\n").encode(), timeout=30)


def mirror_lines(proxy: Proxy, needle: str, since: int = 0) -> list[str]:
    return [
        ln for ln in proxy.log_lines()[since:] if needle in ln and "registry_cache.access" in ln
    ]


def test_default_registry_as_dockers_registry_mirrors_uses_it(
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{registry.netloc}/mirror/app:1", [20_000, 5_000])
    proxy = proxy_factory(mirror_default_registry=registry.netloc)
    ref = f"127.0.0.1:{proxy.port}/mirror/app:1"
    res = mirror_pull(ref, tmp_path / "one")
    assert res.returncode == 0, res.stderr
    assert set(image.blob_digests) <= layout_blobs(tmp_path / "one")
    before = len(proxy.log_lines())
    gets = len(registry.blob_requests())
    res = mirror_pull(ref, tmp_path / "two")
    assert res.returncode == 0, res.stderr
    served = mirror_lines(proxy, "/mirror/app/", before)
    assert served and all(" HIT " in ln and " mirror" in ln for ln in served), served
    assert len(registry.blob_requests()) == gets
    assert proxy.metric("registry_cache_requests_total", door="mirror", result="hit") >= 3


def test_connect_and_mirror_share_one_store(
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image_factory(f"{registry.netloc}/mirror/shared:1")
    proxy = proxy_factory(mirror_default_registry=registry.netloc)
    assert pull(proxy, f"{registry.netloc}/mirror/shared:1", tmp_path / "c").returncode == 0
    before = len(proxy.log_lines())
    res = mirror_pull(f"127.0.0.1:{proxy.port}/mirror/shared:1", tmp_path / "m")
    assert res.returncode == 0, res.stderr
    served = mirror_lines(proxy, "/mirror/shared/", before)
    assert served and all(" HIT " in ln for ln in served), served


@pytest.fixture
def front443(
    aio: AioThread, pki: Pki, registry: Registry, upstream_ports: set[int]
) -> Iterator[Front]:
    """The registry on port 443 (as scratch.rc.test): image names cannot carry a port in
    a path component, so a path-prefix mirror reaches registries on the default port."""
    front = Front(aio, "scratch.rc.test", pki.server, registry.netloc, pki.ca_path)
    front.port = 443
    front.start()
    yield front
    front.stop()


def test_path_prefix_names_the_registry(
    front443: Front,
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{registry.netloc}/mirror/prefixed:1")
    proxy = proxy_factory()
    ref = f"127.0.0.1:{proxy.port}/scratch.rc.test/mirror/prefixed:1"
    # Over TLS, trusting the cache's CA for the cache's own address only.
    res = skopeo(
        "copy", "--src-cert-dir", str(proxy.cert_dir), f"docker://{ref}", f"oci:{tmp_path / 'p'}"
    )
    assert res.returncode == 0, res.stderr
    assert set(image.blob_digests) <= layout_blobs(tmp_path / "p")
    assert any("/v2/mirror/prefixed/manifests/1" in s.path for s in front443.seen)


# --- containerd ---------------------------------------------------------------------------


class Containerd:
    """A containerd daemon of its own (root, state, socket), for `ctr` to pull into."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "containerd.sock"
        config = self.dir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.dir / "root"}"\n'
            f'state = "{self.dir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.dir / "ttrpc.sock"}"\n'
        )
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "containerd.log").open("ab"),
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((self.dir / "containerd.log").read_text()[-2000:])
            time.sleep(0.1)

    def pull(self, ref: str, hosts_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        # Direct access to the registry fails (an unreachable proxy), so a pull that works
        # came through the mirror, which is in NO_PROXY.
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
        env["NO_PROXY"] = "127.0.0.1"
        return subprocess.run(
            [
                "ctr",
                "--address",
                str(self.socket),
                "images",
                "pull",
                "--hosts-dir",
                str(hosts_dir),
                *extra,
                ref,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


@pytest.fixture
def containerd_factory(tmp_path: Path) -> Iterator[Callable[[], Containerd]]:
    made: list[Containerd] = []

    def make() -> Containerd:
        made.append(Containerd(tmp_path / f"containerd-{len(made)}"))
        return made[-1]

    yield make
    for daemon in made:
        daemon.stop()


def hosts_dir(root: Path, registry: str, mirror_port: int) -> Path:
    d = root / "certs.d" / registry
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(
        f'server = "https://{registry}"\n'
        f'[host."http://127.0.0.1:{mirror_port}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return root / "certs.d"


@pytest.fixture
def multi(workroot: Path, pki: Pki, registry: Registry) -> MultiPlatformImage:
    image = make_multiplatform_image(
        workroot / f"mirror-multi-{time.monotonic_ns()}",
        {"linux/amd64": [30_000, 4000], "linux/arm64": [20_000]},
    )
    push_all(image.layout, f"{registry.netloc}/mirror/multi:1", pki.cert_dir)
    return image


def test_containerd_pulls_through_the_mirror_with_ns(
    registry: Registry,
    multi: MultiPlatformImage,
    proxy_factory: Callable[..., Proxy],
    containerd_factory: Callable[[], Containerd],
    tmp_path: Path,
) -> None:
    proxy = proxy_factory()
    hosts = hosts_dir(tmp_path, registry.netloc, proxy.port)
    ref = f"{registry.netloc}/mirror/multi:1"
    first = containerd_factory().pull(ref, hosts, "--all-platforms")
    assert first.returncode == 0, first.stdout + first.stderr
    asked = mirror_lines(proxy, "/mirror/multi/")
    assert asked and all(" mirror" in ln for ln in asked)
    assert any("?ns=" not in ln for ln in asked)  # never logged: the query is cut
    gets = len(registry.blob_requests())
    # A fresh containerd (its own content store): every blob from the cache.
    before = len(proxy.log_lines())
    second = containerd_factory().pull(ref, hosts, "--all-platforms")
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(registry.blob_requests()) == gets
    blobs = mirror_lines(proxy, "/blobs/", before)
    assert len(blobs) >= len(multi.digests()) - 2 and all(" HIT " in ln for ln in blobs), blobs


def test_image_pulled_through_connect_is_a_hit_for_containerd(
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    containerd_factory: Callable[[], Containerd],
    tmp_path: Path,
) -> None:
    image_factory(f"{registry.netloc}/mirror/both:1")
    proxy = proxy_factory()
    assert pull(proxy, f"{registry.netloc}/mirror/both:1", tmp_path / "c").returncode == 0
    before = len(proxy.log_lines())
    hosts = hosts_dir(tmp_path, registry.netloc, proxy.port)
    res = containerd_factory().pull(f"{registry.netloc}/mirror/both:1", hosts)
    assert res.returncode == 0, res.stdout + res.stderr
    served = mirror_lines(proxy, "/mirror/both/", before)
    assert served and all(" HIT " in ln for ln in served), served


# --- private upstreams: the cache authenticates itself -----------------------------------


def test_basic_auth_upstream_through_the_mirror(
    private_registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{private_registry.netloc}/secret/mirror:1", creds=PRIVATE_CREDS)
    path = f"/v2/secret/mirror/manifests/1?ns={private_registry.netloc}"
    # Without credentials for it the client gets a clear refusal, never a challenge.
    bare = proxy_factory()
    res = mirror_get(bare, path)
    assert res.status == 404 and "www-authenticate" not in res.headers, res.headers
    assert "auth_registries" in res.text()
    auth = [
        {
            "host": private_registry.netloc,
            "username": PRIVATE_CREDS[0],
            "password": PRIVATE_CREDS[1],
        }
    ]
    proxy = proxy_factory(auth_registries=auth, mirror_default_registry=private_registry.netloc)
    res = mirror_pull(f"127.0.0.1:{proxy.port}/secret/mirror:1", tmp_path / "s")
    assert res.returncode == 0, res.stderr
    assert set(image.blob_digests) <= layout_blobs(tmp_path / "s")
    assert PRIVATE_CREDS[1] not in proxy.output()


def test_token_auth_upstream_through_the_mirror(
    token_setup: TokenSetup,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(
        f"{token_setup.registry.netloc}/tok/mirror:1", [30_000, 8_000], creds=TOKEN_CREDS
    )
    issuer = token_setup.issuer
    netloc = token_setup.netloc
    bare = proxy_factory()
    res = mirror_get(bare, f"/v2/tok/mirror/manifests/1?ns={netloc}")
    assert res.status in (403, 404) and "www-authenticate" not in res.headers, res.headers
    issuer.seen.clear()
    proxy = proxy_factory(
        auth_registries=f"{issuer.hostname}:{TOKEN_CREDS[0]}:{TOKEN_CREDS[1]}",
        mirror_default_registry=netloc,
    )
    ref = f"127.0.0.1:{proxy.port}/tok/mirror:1"
    res = mirror_pull(ref, tmp_path / "t")
    assert res.returncode == 0, res.stderr
    assert set(image.blob_digests) <= layout_blobs(tmp_path / "t")
    # One token for the repository's scope, reused for the manifest and every blob.
    assert len(issuer.seen) == 1, [s.path for s in issuer.seen]
    tokens = "registry_cache_token_requests_total"
    assert proxy.metric(tokens, registry=netloc, result="fetched") == 1
    assert proxy.metric(tokens, registry=netloc, result="cached") >= len(image.blob_digests)
    assert proxy.metric("registry_cache_upstream_responses_total", registry=netloc) > 0
    assert TOKEN_CREDS[1] not in proxy.output()
    # The registry saw only Bearer tokens (and an anonymous first try), never the password.
    assert all(
        s.authorization is None or s.authorization.startswith("Bearer ")
        for s in token_setup.front.seen
    )


# --- hostile requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/x/manifests/1?ns=", 400),
        ("/v2/x/manifests/1?ns=" + "a" * 300, 400),
        ("/v2/x/manifests/1?ns=a..b", 400),
        ("/v2/x/manifests/1?ns=user@host.example", 400),
        ("/v2/x/manifests/1?ns=host.example%252f", 400),
        ("/v2/x/manifests/1?ns=host.example:0", 400),
        ("/v2/x/manifests/1?ns=host.example:70000", 400),
        ("/v2/x/manifests/1?ns=a.example&ns=b.example", 400),
        ("/v2/x/manifests/1?ns=127.0.0.1:22", 403),
        ("/v2/x/manifests/1?ns=169.254.169.254", 403),
        ("/v2/x/manifests/1?ns=[::1]:443", 403),
        ("/v2/host%2eexample/x/manifests/1", 400),
    ],
)
def test_hostile_registry_names(
    path: str, status: int, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory(mirror_default_registry="registry.rc.test")
    res = mirror_get(proxy, path)
    assert res.status == status, (path, res.status, res.text()[:300])
    assert "errors" in res.text()


def test_ping_pushes_and_clients(registry: Registry, proxy_factory: Callable[..., Proxy]) -> None:
    proxy = proxy_factory(mirror_default_registry=registry.netloc)
    ping = mirror_get(proxy, "/v2/")
    assert ping.status == 200 and ping.headers.get("docker-distribution-api-version")
    push = raw_exchange(
        proxy.port,
        f"POST /v2/x/blobs/uploads/?ns={registry.netloc} HTTP/1.1\r\nHost: c\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    assert push.status == 405 and "read-only" in push.text()
    pushing = proxy_factory(mirror_default_registry=registry.netloc, allow_push=True)
    push = raw_exchange(
        pushing.port,
        b"PUT /v2/x/manifests/1 HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
    )
    assert push.status == 405 and "read-only" in push.text()
    closed = proxy_factory(allowed_clients=["10.0.0.0/8"], mirror_default_registry=registry.netloc)
    res = mirror_get(closed, "/v2/mirror/app/manifests/1")
    assert res.status == 403 and "allowed_clients" in res.text()


def test_proxy_users_and_their_allow_lists(
    registry: Registry, image_factory: Callable[..., Image], proxy_factory: Callable[..., Proxy]
) -> None:
    image_factory(f"{registry.netloc}/pub/open:1")
    image_factory(f"{registry.netloc}/team/closed:1")
    proxy = proxy_factory(
        mirror_default_registry=registry.netloc,
        users=[
            {
                "name": "bob",
                "password_hash": hash_password("b0b-pass"),
                "allow": [f"{registry.hostname}:*/pub/*"],
            }
        ],
    )
    anonymous = mirror_get(proxy, "/v2/pub/open/manifests/1")
    assert anonymous.status == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic")
    bob = {"Authorization": basic("bob", "b0b-pass"), "Accept": OCI}
    assert mirror_get(proxy, "/v2/pub/open/manifests/1", bob).status == 200
    closed = mirror_get(proxy, "/v2/team/closed/manifests/1", bob)
    assert closed.status == 403 and "allow list" in closed.text()
    wrong = {"Authorization": basic("bob", "not-it"), "Accept": OCI}
    assert mirror_get(proxy, "/v2/pub/open/manifests/1", wrong).status == 401
    # bob's password went nowhere upstream.
    assert all("b0b-pass" not in line for line in proxy.log_lines())


def test_tls_on_the_same_port_for_the_caches_own_names_only(
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{registry.netloc}/mirror/tls:1")
    proxy = proxy_factory(mirror_default_registry=registry.netloc)
    # skopeo over TLS, trusting the cache's CA for the cache's own address and nothing else.
    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(proxy.cert_dir),
        f"docker://127.0.0.1:{proxy.port}/mirror/tls:1",
        f"oci:{tmp_path / 'tls'}:latest",
    )
    assert res.returncode == 0, res.stderr
    assert set(image.blob_digests) <= layout_blobs(tmp_path / "tls")
    # Whatever name the client asks for, the answer is the cache's own certificate: a
    # client that trusts the CA is never answered as ghcr.io on a direct connection.
    ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        names = [v for _, v in tls.getpeercert()["subjectAltName"]]
        assert "127.0.0.1" in names and "localhost" in names
        assert "ghcr.io" not in names
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="ghcr.io")
    # Plain HTTP stays: the same port answers both.
    assert mirror_get(proxy, "/v2/").status == 200


def test_a_broken_or_silent_tls_start_costs_nothing(proxy_factory: Callable[..., Proxy]) -> None:
    proxy = proxy_factory(head_timeout="2s")
    junk = raw_exchange(proxy.port, b"\x16\x03\x01\x00\x05junkjunkjunk", timeout=10)
    assert not junk.complete  # no HTTP answer: the handshake failed and the line was cut
    silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    silent.sendall(b"\x16\x03\x01")
    start = time.monotonic()
    assert silent.recv(100) == b""  # closed at the handshake timeout
    assert time.monotonic() - start < 8
    silent.close()
    assert mirror_get(proxy, "/v2/").status == 200
    assert "Traceback" not in proxy.output()


# --- Docker's registry-mirrors ------------------------------------------------------------

BRIDGE = "rcmirror0"  # a bridge of its own: a second dockerd must not touch docker0


class Dockerd:
    """A Docker engine of its own (data root, exec root, socket, bridge) whose only
    `registry-mirrors` entry is the cache, over plain HTTP."""

    def __init__(self, workdir: Path, mirror: str) -> None:
        # Short paths: the engine's containerd puts sockets under the exec root, and a
        # socket path has at most 107 characters.
        self.dir = Path(tempfile.mkdtemp(prefix="rcd-", dir="/tmp"))
        self.log = workdir / "dockerd.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "docker.sock"
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode:
            for cmd in (
                ["ip", "link", "add", BRIDGE, "type", "bridge"],
                ["ip", "addr", "add", "10.213.7.1/24", "dev", BRIDGE],
                ["ip", "link", "set", BRIDGE, "up"],
            ):
                subprocess.run(cmd, check=True, capture_output=True)
        # A containerd of its own too: left to itself, dockerd uses whatever socket is at
        # /run/containerd/containerd.sock, and a stale one there (a containerd that has
        # gone) made it wait for a daemon that never answers.
        self.containerd = Containerd(self.dir / "containerd")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--containerd",
                str(self.containerd.socket),
                "--data-root",
                str(self.dir / "root"),
                "--exec-root",
                str(self.dir / "exec"),
                "--pidfile",
                str(self.dir / "dockerd.pid"),
                "-H",
                f"unix://{self.socket}",
                "--bridge",
                BRIDGE,
                "--iptables=false",
                "--ip-masq=false",
                "--ip6tables=false",
                "--registry-mirror",
                mirror,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 60
        while self.docker("info").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(0.5)

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def stop(self) -> None:
        stop_process(self.proc, grace=20)
        self.containerd.stop()
        # What the engine mounted under its data root is gone with it; then the files.
        subprocess.run(["umount", "-R", str(self.dir / "root")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def test_dockers_registry_mirrors_pulls_through_the_default_registry(
    registry: Registry,
    multi: MultiPlatformImage,
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    """A test registry stands in for Docker Hub (mirror_default_registry): Docker sends
    `mirror/multi`, which it takes for docker.io/mirror/multi, to its mirror."""
    proxy = proxy_factory(mirror_default_registry=registry.netloc)
    daemon = Dockerd(tmp_path / "dockerd", f"http://127.0.0.1:{proxy.port}")
    try:
        res = daemon.docker("pull", "mirror/multi:1")
        assert res.returncode == 0, res.stdout + res.stderr
        digest = daemon.docker(
            "image", "inspect", "-f", "{{index .RepoDigests 0}}", "mirror/multi:1"
        ).stdout.strip()
        assert digest.endswith(multi.index_digest), digest
        served = mirror_lines(proxy, "/mirror/multi/")
        amd64 = multi.platforms["linux/amd64"]
        assert all(any(d in ln for ln in served) for d in amd64.blob_digests), served
        assert all(" mirror" in ln for ln in served)
    finally:
        daemon.stop()
