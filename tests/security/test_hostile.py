"""Issue 6, Must show 5: hostile input against one running proxy.

Malformed request lines, heads over the size limits, slowloris clients, garbage where a
TLS client hello belongs, invalid and traversal digests and names (plain and
percent-encoded), more connections than max_connections_per_client. The tests run in
file order against the same proxy; the last one checks that after all of it the proxy
still serves a normal pull, logged no traceback and wrote nothing outside cache_dir.

The proxy runs with head_timeout 3s (default 30s) and max_connections_per_client 12
(default 256), so that the timeouts and the bound show within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from security.secsupport import (
    EVIL,
    aexchange,
    connect_head,
    exchange,
    pull_args,
    skopeo_via,
    snapshot,
)
from support.client import Response, Tunnel, read_response
from support.images import Image, layout_blobs, make_image, push
from support.proxy import Proxy
from support.registry import Registry
from support.topology import Pki

pytestmark = pytest.mark.integration

HEAD_TIMEOUT = 3.0
MARGIN = 2.5  # scheduling slack on a busy CI machine
MAX_CONNECTIONS = 12
REPO = "pub/hostile"


@dataclass
class Setup:
    proxy: Proxy
    registry: Registry
    image: Image
    ref: str
    canary: Path  # cache_dir lives at canary/a/b/cache: `../` escapes land in here
    before: dict[str, tuple[int, int]]
    workdir_before: set[str]

    @property
    def ca(self) -> str:
        return str(self.proxy.ca_path)

    def tunnel(self) -> Tunnel:
        return Tunnel(self.proxy.port, self.registry.hostname, self.registry.port, self.ca)

    def healthy(self) -> bool:
        resp = exchange("127.0.0.1", self.proxy.port, b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
        return resp.status == 200


@pytest.fixture(scope="module")
def setup(
    module_proxy, registry: Registry, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Setup:
    canary = tmp_path_factory.mktemp("canary")
    cache_dir = canary / "a" / "b" / "cache"
    (canary / "a" / "keep.txt").parent.mkdir(parents=True)
    (canary / "a" / "keep.txt").write_text("canary\n")
    work = tmp_path_factory.mktemp("hostile-image")
    image = make_image(work / "layout", [40_000, 9_000])
    ref = f"{registry.netloc}/{REPO}:latest"
    push(image, ref, pki.cert_dir)
    proxy = module_proxy(
        cache_dir=str(cache_dir),
        head_timeout=f"{HEAD_TIMEOUT:g}s",
        max_connections_per_client=MAX_CONNECTIONS,
    )
    return Setup(
        proxy,
        registry,
        image,
        ref,
        canary,
        snapshot(canary, skip=cache_dir),
        set(snapshot(proxy.dir)),
    )


# --- malformed request lines and heads ------------------------------------------------------

MALFORMED = [
    b"\x00\x01\x02\x03\r\n\r\n",
    b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET  /  HTTP/1.1\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: c\r\n\r\n",
    b"G\xffT / HTTP/1.1\r\nHost: c\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: c\r\nbad header line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: c\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: c\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"0\r\n\r\n",
    b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http:///v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET ftp://registry.rc.test/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://registry.rc.test:99999/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://registry.rc.test:-1/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET //registry.rc.test/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT registry.rc.test:443 HTTP/1.1\r\nbad header line\r\n\r\n",
    b"CONNECT registry.rc.test:443 HTTP/1.1\r\n Host: folded\r\n\r\n",
    b"CONNECT registry.rc.test:443\r\n\r\n",
    b"CONNECT registry.rc.test:443 SIP/2.0\r\n\r\n",
    b"CONNECT registry.rc.test:443 HTTP/1.1 extra\r\n\r\n",
    b"CONNECT r\xe9gistry.rc.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT registry.rc.test:0 HTTP/1.1\r\n\r\n",
    b"CONNECT [zz::1]:443 HTTP/1.1\r\n\r\n",
    b"CONNECT [1:2:3:4:5:6:7:8:9]:443 HTTP/1.1\r\n\r\n",
    b"CONNECT user@registry.rc.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT registry.rc.test:443/x HTTP/1.1\r\n\r\n",
    b"CONNECT %72egistry.rc.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT http://registry.rc.test:443 HTTP/1.1\r\n\r\n",
    # names the resolver refuses with UnicodeError (an empty or a 64-character label)
    b"CONNECT registry..rc.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT " + b"r" * 64 + b".rc.test:443 HTTP/1.1\r\n\r\n",
    b"GET http://registry..rc.test/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=lambda b: repr(b.split(b"\r\n")[0])[2:-1][:50])
def test_malformed_request_lines(setup: Setup, raw: bytes):
    t0 = time.monotonic()
    resp = exchange("127.0.0.1", setup.proxy.port, raw, timeout=GIVE_UP)
    took = time.monotonic() - t0
    text = resp.text()
    if resp.status == 0:  # closed without an answer: acceptable, not left hanging
        assert took < HEAD_TIMEOUT + MARGIN, f"no answer, still open after {took:.1f}s"
    else:
        assert 400 <= resp.status < 500 or resp.status == 505, (resp.status, text)
    assert "Traceback" not in text
    assert setup.healthy()


def test_heads_over_the_size_limits(setup: Setup):
    port = setup.proxy.port
    big = "x" * 20_000
    cases = [
        # the proxy's own CONNECT head bound (16 KiB), with and without an end
        (connect_head("registry.rc.test:443", {"X-Big": big}), {431}),
        (b"CONNECT registry.rc.test:443 HTTP/1.1\r\nX-Big: " + big.encode(), {431}),
        # aiohttp's line and field limits (8190 bytes) and header count (128)
        (f"GET /healthz HTTP/1.1\r\nHost: c\r\nX-Big: {big[:9000]}\r\n\r\n".encode(), {400, 431}),
        (f"GET /{big[:9000]} HTTP/1.1\r\nHost: c\r\n\r\n".encode(), {400, 414}),
        (
            b"GET /healthz HTTP/1.1\r\nHost: c\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(300))
            + b"\r\n",
            {400, 431},
        ),
    ]
    for data, expected in cases:
        resp = exchange("127.0.0.1", port, data)
        assert resp.status in expected, (data[:60], resp.status, resp.error, resp.text()[:200])
        assert "Traceback" not in resp.text()

    async def inside() -> list[Response]:
        out = []
        for path, headers in [
            ("/v2/", {"X-Big": big[:9000]}),
            ("/v2/" + "a" * 9000 + "/manifests/latest", {}),
            ("/v2/", {f"X-{i}": "v" for i in range(300)}),
        ]:
            async with setup.tunnel() as t:
                out.append(await t.request("GET", path, headers))
        return out

    for resp in asyncio.run(asyncio.wait_for(inside(), 60)):
        assert resp.status in {400, 414, 431}, (resp.status, resp.text()[:200])
    assert setup.healthy()


# --- slow clients -----------------------------------------------------------------------------


GIVE_UP = HEAD_TIMEOUT + MARGIN + 0.5  # a slow client still open then has not been cut


async def dribble_on(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    data: bytes,
    interval: float = 1.0,
) -> tuple[float, bytes]:
    """Sends `data` a byte every `interval` seconds until the proxy answers or closes, or
    GIVE_UP seconds pass; returns (seconds it took, what came back)."""
    t0 = time.monotonic()
    got = b""
    for byte in data:
        if time.monotonic() - t0 > GIVE_UP:
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            got = await asyncio.wait_for(reader.read(4096), interval)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            pass
        break  # an answer, EOF or a reset
    return time.monotonic() - t0, got


async def dribble(port: int, data: bytes, interval: float = 1.0) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await dribble_on(reader, writer, data, interval)
    finally:
        writer.close()


async def tls_dribble(setup: Setup, data: bytes) -> tuple[float, bytes]:
    """The same inside an intercepted TLS connection, after a CONNECT and a handshake."""
    async with setup.tunnel() as t:
        assert t.reader is not None and t.writer is not None
        return await dribble_on(t.reader, t.writer, data)


async def second_request_dribble(setup: Setup, data: bytes) -> tuple[float, bytes]:
    """A plain keep-alive connection: one request answered, then the next one dribbled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.proxy.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
        await writer.drain()
        resp = await read_response(reader, "GET")
        assert resp.status == 200
        return await dribble_on(reader, writer, data)
    finally:
        writer.close()


async def served_meanwhile(setup: Setup, seconds: float) -> list[float]:
    """Normal requests (the proxy's page and a blob through a tunnel) during `seconds`:
    how long each took."""
    took = []
    deadline = time.monotonic() + seconds
    blob = setup.image.layer_digests[0]
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        resp = await aexchange(
            "127.0.0.1", setup.proxy.port, b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n"
        )
        assert resp.status == 200, resp
        async with setup.tunnel() as t:
            resp = await t.request("GET", f"/v2/{REPO}/blobs/{blob}")
        assert resp.status == 200 and resp.sha256 == blob, (resp.status, resp.text()[:200])
        took.append(time.monotonic() - t0)
        await asyncio.sleep(0.3)
    return took


def test_slowloris_is_cut_at_the_head_timeout(setup: Setup):
    """Request heads dribbled a byte a second (plain and CONNECT) and a client that sends
    one byte and then nothing get 408 at head_timeout, while others are served as usual."""
    slow_get = b"GET /healthz HTTP/1.1\r\nHost: c\r\nX-Slow: " + b"a" * 100
    slow_connect = connect_head(setup.registry.netloc)[:-2] + b"X-Slow: " + b"a" * 100

    async def run():
        return await asyncio.gather(
            dribble(setup.proxy.port, slow_get),
            dribble(setup.proxy.port, slow_connect),
            dribble(setup.proxy.port, b"\x00" * 100, interval=GIVE_UP + 1),
            served_meanwhile(setup, HEAD_TIMEOUT + 1),
        )

    *slow, took = asyncio.run(asyncio.wait_for(run(), 60))
    for seconds, got in slow:
        assert seconds < HEAD_TIMEOUT + MARGIN, f"a slow client was not cut: {seconds:.1f}s"
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert took and max(took) < 2, f"normal requests were slow meanwhile: {took}"


def test_slowloris_inside_a_tunnel_is_cut(setup: Setup):
    """The same after CONNECT and the TLS handshake, and as the second request of a plain
    keep-alive connection: a head still incomplete after head_timeout is cut."""
    slow = b"GET /v2/ HTTP/1.1\r\nHost: registry.rc.test\r\nX-Slow: " + b"a" * 100

    async def run():
        return await asyncio.gather(
            tls_dribble(setup, slow),
            second_request_dribble(setup, slow),
            served_meanwhile(setup, HEAD_TIMEOUT + 1),
        )

    (tls_s, tls_got), (plain_s, plain_got), took = asyncio.run(asyncio.wait_for(run(), 60))
    assert took and max(took) < 2, f"normal requests were slow meanwhile: {took}"
    for where, seconds, got in [("in a tunnel", tls_s, tls_got), ("plain", plain_s, plain_got)]:
        assert seconds < HEAD_TIMEOUT + MARGIN, (
            f"a slow request head {where} was still open after {seconds:.1f}s "
            f"(head_timeout {HEAD_TIMEOUT:g}s)"
        )
        assert got == b"" or got.startswith(b"HTTP/1.1 408"), got[:200]


# --- garbage instead of a TLS client hello ----------------------------------------------------


@pytest.mark.parametrize(
    "hello",
    [
        os.urandom(1500),
        b"GET /v2/ HTTP/1.1\r\nHost: registry.rc.test\r\n\r\n",  # plain HTTP in a TLS tunnel
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a handshake record with nonsense inside
        b"\x16\x03\x01\x40\x00" + os.urandom(100),  # announces 16 KiB, sends 100 bytes, stalls
    ],
    ids=["random", "plain-http", "bad-handshake", "stalled-record"],
)
def test_garbage_client_hello(setup: Setup, hello: bytes):
    async def run() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", setup.proxy.port)
        try:
            writer.write(connect_head(setup.registry.netloc))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.write(hello)
            await writer.drain()
            t0 = time.monotonic()
            got = b""
            try:
                async with asyncio.timeout(GIVE_UP):
                    while chunk := await reader.read(4096):
                        got += chunk
            except (OSError, TimeoutError):
                pass
            return time.monotonic() - t0, got
        finally:
            writer.close()

    seconds, got = asyncio.run(run())
    assert seconds < HEAD_TIMEOUT + MARGIN, (
        f"the connection was still open {seconds:.1f}s after a bad client hello "
        f"(head_timeout {HEAD_TIMEOUT:g}s)"
    )
    assert b"HTTP/" not in got and b"Traceback" not in got, got[:200]
    assert setup.healthy()


# --- invalid and traversal digests, names and tags ----------------------------------------


def hostile_paths(good: str) -> list[str]:
    hexd = good.split(":")[1]
    r = REPO
    return [
        # digests
        f"/v2/{r}/blobs/sha256:xyz",
        f"/v2/{r}/blobs/sha256:{hexd[:-1]}",
        f"/v2/{r}/blobs/sha256:{hexd}00",
        f"/v2/{r}/blobs/sha256:{hexd.upper()}",
        f"/v2/{r}/blobs/sha256:{hexd[:-2]}%41",
        f"/v2/{r}/blobs/SHA256:{hexd}",
        f"/v2/{r}/blobs/sha256%3a{hexd}",
        f"/v2/{r}/blobs/sha256:",
        f"/v2/{r}/blobs/:{hexd}",
        f"/v2/{r}/blobs/sha256:{hexd}%00",
        f"/v2/{r}/blobs/sha256:{hexd}%2f..",
        f"/v2/{r}/blobs/sha256:../../../../../{EVIL}",
        f"/v2/{r}/blobs/sha256:..%2f..%2f..%2f..%2f{EVIL}",
        f"/v2/{r}/blobs/sha256:%2e%2e%2f%2e%2e%2f%2e%2e%2f{EVIL}",
        f"/v2/{r}/blobs/sha256:%252e%252e%252f{EVIL}",
        f"/v2/{r}/blobs/sha256:..\\..\\..\\{EVIL}",
        f"/v2/{r}/blobs/sha256%3a%2e%2e%2f%2e%2e%2f{EVIL}",
        f"/v2/{r}/manifests/sha256:..%2f..%2f{EVIL}",
        f"/v2/{r}/manifests/sha256:{hexd}x",
        # names
        f"/v2/../../../{EVIL}/blobs/{good}",
        f"/v2/{r}/../../../../{EVIL}/blobs/{good}",
        f"/v2/%2e%2e/%2e%2e/{EVIL}/blobs/{good}",
        f"/v2/%2e%2e%2f%2e%2e%2f%2e%2e%2f{EVIL}/blobs/{good}",
        f"/v2/{r}%2f..%2f..%2f{EVIL}/blobs/{good}",
        f"/v2/%252e%252e%252f{EVIL}/blobs/{good}",
        f"/v2/..\\..\\{EVIL}/blobs/{good}",
        f"/v2/pub//hostile/blobs/{good}",
        f"/v2/pub/./hostile/blobs/{good}",
        f"/v2/PUB/Hostile/blobs/{good}",
        f"/v2/pub/hostile%00/blobs/{good}",
        f"/v2/-pub/hostile/blobs/{good}",
        f"/v2/{'a' * 300}/blobs/{good}",
        f"/v2/{r}%2fblobs%2f{good}/manifests/latest",
        # tags
        f"/v2/{r}/manifests/..%2f..%2f..%2f{EVIL}",
        f"/v2/{r}/manifests/../../../../{EVIL}",
        f"/v2/{r}/manifests/%2e%2e",
        f"/v2/{r}/manifests/.hidden",
        f"/v2/{r}/manifests/-dash",
        f"/v2/{r}/manifests/{'t' * 129}",
        f"/v2/{r}/manifests/lat%65st",
        f"/v2/{r}/manifests/latest%00",
        f"/v2/{r}/manifests/é",
        f"/v2/{r}/manifests/%C3%A9",
    ]


def test_invalid_and_traversal_digests_and_names(setup: Setup):
    data_digest = setup.image.layer_digests[0]
    upstream_before = len(setup.registry.requests())

    async def run() -> list[str]:
        problems = []
        for path in hostile_paths(data_digest):
            for method in ("GET", "HEAD"):
                async with setup.tunnel() as t:
                    resp = await t.request(method, path)
                text = resp.text()
                where = f"{method} {path[:90]}"
                if not 400 <= resp.status < 500:
                    problems.append(f"{where}: {resp.status} {text[:200]!r}")
                elif "Traceback" in text:
                    problems.append(f"{where}: traceback in the body")
                elif method == "GET" and "json" in resp.headers.get("content-type", ""):
                    doc = json.loads(resp.body)
                    if not doc.get("errors") or not doc["errors"][0].get("message"):
                        problems.append(f"{where}: JSON without errors[].message: {doc}")
                elif method == "GET" and not text.strip():
                    problems.append(f"{where}: {resp.status} with an empty body")
        return problems

    problems = asyncio.run(asyncio.wait_for(run(), 120))
    assert not problems, "\n".join(problems)
    leaked = [r.uri for r in setup.registry.requests()[upstream_before:] if EVIL in r.uri]
    assert not leaked, f"hostile paths went upstream: {leaked}"


# --- connections per client -------------------------------------------------------------------


def test_connections_beyond_the_per_client_bound_get_429(setup: Setup):
    port = setup.proxy.port

    async def run() -> None:
        held: list[asyncio.StreamWriter] = []
        tunnels: list[Tunnel] = []
        try:
            # half idle connections, half established TLS tunnels: all hold a slot
            for _ in range(MAX_CONNECTIONS // 2):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                held.append(w)
            for _ in range(MAX_CONNECTIONS - len(held)):
                t = setup.tunnel()
                await t.__aenter__()
                tunnels.append(t)
            await asyncio.sleep(0.2)
            extra = await aexchange("127.0.0.1", port, b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
            assert extra.status == 429, (extra.status, extra.error, extra.text())
            assert "max_connections_per_client" in extra.text()
            over = await aexchange("127.0.0.1", port, connect_head(setup.registry.netloc))
            assert over.status == 429, (over.status, over.text())
            # another client address is not affected
            other = await aexchange(
                "127.0.0.1", port, b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n", source="127.0.0.2"
            )
            assert other.status == 200, (other.status, other.error)
            # the held tunnels still work
            resp = await tunnels[0].request("GET", f"/v2/{REPO}/blobs/{setup.image.config_digest}")
            assert resp.status == 200, resp.status
        finally:
            for w in held:
                w.close()
            for t in tunnels:
                await t.__aexit__()
        await asyncio.sleep(0.3)
        again = await aexchange("127.0.0.1", port, b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
        assert again.status == 200, "slots were not given back when the connections closed"

    asyncio.run(asyncio.wait_for(run(), 60))


# --- a passthrough upstream that speaks first -----------------------------------------------


async def tunnel_to_eof(proxy_port: int, target: str) -> bytes:
    """CONNECT through the proxy and read what comes until EOF (the 200 included)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        writer.write(connect_head(target))
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def test_passthrough_upstream_that_speaks_first_and_hangs_up(module_proxy, aio, upstream_ports):
    """An upstream (named in passthrough) that sends a banner and closes at once, before
    the proxy has answered the CONNECT: the client still gets the 200 first, then the
    banner, then EOF, and the proxy logs no error."""
    banner = b"SSH-2.0-rc-security-test\r\n"

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        writer.close()

    server = aio.run(asyncio.start_server(speak, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    upstream_ports.add(port)
    try:
        proxy = module_proxy(
            passthrough=["scratch.rc.test"], allowed_ports=[443, port], log_level="info"
        )

        async def run() -> list[bytes]:
            target = f"scratch.rc.test:{port}"
            return await asyncio.gather(*(tunnel_to_eof(proxy.port, target) for _ in range(100)))

        for got in asyncio.run(run()):
            assert got.startswith(b"HTTP/1.1 200 "), got[:100]
            assert got.endswith(b"\r\n\r\n" + banner), got[-100:]
        stderr = proxy.stderr()
        assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    finally:
        server.close()


def test_finished_tunnels_give_their_connections_back(module_proxy, aio, upstream_ports):
    """A passthrough tunnel whose two ends have both finished sending (the upstream closes,
    then the client) is closed by the proxy: its sockets and the client's connection slot
    are freed, so the client can open many more than max_connections_per_client in turn."""

    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\r\n")
        writer.close()

    server = aio.run(asyncio.start_server(answer_and_close, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    upstream_ports.add(port)
    try:
        proxy = module_proxy(
            passthrough=["scratch.rc.test"], allowed_ports=[443, port], max_connections_per_client=3
        )

        for i in range(12):
            got = asyncio.run(tunnel_to_eof(proxy.port, f"scratch.rc.test:{port}"))
            assert got.startswith(b"HTTP/1.1 200 "), f"tunnel {i + 1}: {got[:200]!r}"
            time.sleep(0.05)  # the proxy sees the client's FIN
    finally:
        server.close()


# --- after all of it ------------------------------------------------------------------------


def test_after_all_of_it_the_proxy_still_serves_and_wrote_nothing_outside(
    setup: Setup, tmp_path: Path
):
    res = skopeo_via(setup.proxy.url, *pull_args(setup.proxy, setup.ref, tmp_path / "pull"))
    assert res.returncode == 0, f"a normal pull after the hostile suite:\n{res.stderr}"
    assert set(setup.image.blob_digests) <= layout_blobs(tmp_path / "pull")
    stderr = setup.proxy.stderr()
    assert "Traceback" not in stderr, stderr[stderr.index("Traceback") - 500 :][:3000]
    cache_dir = setup.proxy.cache_dir
    after = snapshot(setup.canary, skip=cache_dir)
    assert after == setup.before, (
        f"written outside cache_dir: {sorted(set(after.items()) ^ set(setup.before.items()))}"
    )
    new_in_workdir = set(snapshot(setup.proxy.dir)) - setup.workdir_before
    assert all(p.startswith(str(cache_dir)) for p in new_in_workdir), sorted(new_in_workdir)
    for root in (Path("/tmp"), Path("/"), Path("/etc"), setup.canary, setup.registry.storage):
        assert not list(root.glob(f"**/{EVIL}*") if root == setup.canary else root.glob(f"{EVIL}*"))
    assert not any(EVIL in p for p in snapshot(cache_dir)), "an escape name inside cache_dir"
