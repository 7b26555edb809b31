"""One client must not stall another (issue 13): request framing, bounded upstream waits,
each client's fair share of a registry's connections.

Against the real registry behind the test `Front`, which can hold answers back (`stall`)
or send their bodies a byte a second (`trickle`). The second client comes from another
loopback address (127.0.0.2), as another host of the fleet would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.client import Response, Tunnel, afetch, read_response
from support.images import Image
from support.proxy import Proxy
from support.registry import Registry, wait_until
from support.servers import AioThread, Front
from support.topology import Pki

from proxy_app.upstream_share import CLIENT_SHARE

pytestmark = pytest.mark.integration

OTHER_CLIENT = "127.0.0.2"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def front(
    aio: AioThread, pki: Pki, registry: Registry, upstream_ports: set[int]
) -> Iterator[Front]:
    front = Front(
        aio,
        "slow.rc.test",
        pki.server,
        registry.netloc,
        pki.ca_path,
        stall="/stall/",
        stall_seconds=20,
        trickle="/trickle/",
    ).start()
    upstream_ports.add(front.port)
    yield front
    front.stop()


async def timed(coro: asyncio.Future[Response] | asyncio.Task[Response]) -> tuple[Response, float]:
    start = time.monotonic()
    res = await coro
    return res, time.monotonic() - start


def manifest_request(
    proxy: Proxy, netloc: str, path: str, source: str | None = None, timeout: float = 30
) -> asyncio.Task[Response]:
    host, port = netloc.split(":")
    return asyncio.ensure_future(
        afetch(
            proxy.port,
            str(proxy.ca_path),
            host,
            int(port),
            "GET",
            path,
            {"Accept": MANIFEST_TYPES},
            timeout=timeout,
            source=source,
        )
    )


def test_a_get_with_a_body_is_refused_and_stalls_nobody(
    registry: Registry, image_factory: Callable[..., Image], proxy_factory: Callable[..., Proxy]
) -> None:
    image_factory(f"{registry.netloc}/iso/body:1")
    proxy = proxy_factory()
    host, port = registry.netloc.split(":")
    path = "/v2/iso/body/manifests/1"

    async def run() -> None:
        async with Tunnel(proxy.port, host, int(port), str(proxy.ca_path)) as hostile:
            with_body = asyncio.ensure_future(
                timed(hostile.request("GET", path, {"Accept": MANIFEST_TYPES}, b"0123456789"))
            )
            other, other_took = await timed(
                manifest_request(proxy, registry.netloc, path, OTHER_CLIENT)
            )
            refused, refused_took = await asyncio.wait_for(with_body, 10)
        assert other.status == 200 and other_took < 5, (other.status, other_took)
        assert refused.status == 400 and refused_took < 5
        assert "must not carry a body" in refused.text()
        # The same for HEAD, and for a body sent chunked.
        async with Tunnel(proxy.port, host, int(port), str(proxy.ca_path)) as hostile:
            head = await asyncio.wait_for(hostile.request("HEAD", path, body=b"x"), 10)
            assert head.status == 400
        async with Tunnel(proxy.port, host, int(port), str(proxy.ca_path)) as hostile:
            assert hostile.writer is not None and hostile.reader is not None
            hostile.writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {registry.netloc}\r\n"
                "Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n".encode()
            )
            chunked = await asyncio.wait_for(read_response(hostile.reader, "GET"), 10)
            assert chunked.status == 400

    asyncio.run(run())


def test_one_clients_slow_requests_leave_the_others_their_connections(
    front: Front,
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
) -> None:
    image = image_factory(f"{registry.netloc}/iso/fair:1")
    proxy = proxy_factory()
    host, port = front.netloc.split(":")

    async def run() -> None:
        # 64 requests of one client that the registry holds for 20 s each.
        hostile = [
            asyncio.ensure_future(
                afetch(
                    proxy.port,
                    str(proxy.ca_path),
                    host,
                    int(port),
                    "GET",
                    f"/v2/stall/r{i}/tags/list",
                    timeout=60,
                )
            )
            for i in range(64)
        ]
        try:
            await asyncio.sleep(2)
            # Only the client's share reached the registry; the rest wait on the client.
            assert front.in_flight == CLIENT_SHARE, front.in_flight
            other, took = await timed(
                manifest_request(proxy, front.netloc, "/v2/iso/fair/manifests/1", OTHER_CLIENT)
            )
            assert other.status == 200 and took < 5, (other.status, took)
            blob, took = await timed(
                asyncio.ensure_future(
                    afetch(
                        proxy.port,
                        str(proxy.ca_path),
                        host,
                        int(port),
                        "GET",
                        f"/v2/iso/fair/blobs/{image.layer_digests[0]}",
                        timeout=30,
                        source=OTHER_CLIENT,
                    )
                )
            )
            assert blob.status == 200 and blob.sha256 == image.layer_digests[0] and took < 5
        finally:
            for task in hostile:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*hostile, return_exceptions=True)

    asyncio.run(run())


def test_a_manifest_sent_a_byte_a_second_is_given_up_at_the_bound(
    front: Front,
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
) -> None:
    image_factory(f"{registry.netloc}/trickle/img:1")
    proxy = proxy_factory(upstream_timeout="3s")
    path = "/v2/trickle/img/manifests/1"

    async def run() -> None:
        first = manifest_request(proxy, front.netloc, path)
        await asyncio.sleep(0.5)
        second = manifest_request(proxy, front.netloc, path, OTHER_CLIENT)
        (a, a_took), (b, b_took) = await asyncio.gather(timed(first), timed(second))
        for res, took in ((a, a_took), (b, b_took)):
            assert res.status == 504, res.status
            assert "upstream_timeout" in res.text()
            assert took < 5, took  # the second waited for the first's turn, not after it

    asyncio.run(run())
    assert proxy.files_in_cache_blobs() == []
    assert wait_until(lambda: front.in_flight == 0, timeout=60)


def test_a_stale_tag_is_served_when_upstream_trickles_past_the_bound(
    front: Front,
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    first = image_factory(f"{registry.netloc}/iso/stale:1")
    proxy = proxy_factory(upstream_timeout="3s", tag_ttl="1s")
    path = "/v2/iso/stale/manifests/1"

    async def get() -> Response:
        return await manifest_request(proxy, front.netloc, path)

    assert asyncio.run(get()).cache == "MISS"
    image_factory(f"{registry.netloc}/iso/stale:1")  # the tag moves upstream
    front.trickle = "/iso/stale/"
    time.sleep(1.2)
    res = asyncio.run(get())
    assert res.status == 200 and res.cache == "STALE", (res.status, res.cache)
    assert res.headers["docker-content-digest"] == first.manifest_digest


def test_a_registry_trickling_a_digest_holds_up_no_other_registrys_clients(
    front: Front,
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
) -> None:
    """Issue 15: `front` (another registry name, serving the same digest a byte a second)
    is asked first; a client of the real registry then gets the blob at once, and only
    the real registry's bytes."""
    image = image_factory(f"{registry.netloc}/trickle/shared:1", [40_000])
    layer = image.layer_digests[0]
    proxy = proxy_factory()
    path = f"/v2/trickle/shared/blobs/{layer}"

    async def run() -> None:
        slow = asyncio.ensure_future(
            afetch(
                proxy.port,
                str(proxy.ca_path),
                *front.netloc.split(":")[:1],
                int(front.netloc.split(":")[1]),
                "GET",
                path,
                timeout=3,
            )
        )
        await asyncio.sleep(1)  # the trickling fetch is under way
        host, port = registry.netloc.split(":")
        res, took = await timed(
            asyncio.ensure_future(
                afetch(
                    proxy.port,
                    str(proxy.ca_path),
                    host,
                    int(port),
                    "GET",
                    path,
                    timeout=20,
                    source=OTHER_CLIENT,
                )
            )
        )
        assert res.status == 200 and res.sha256 == layer, (res.status, res.sha256)
        assert took < 5, took
        with contextlib.suppress(TimeoutError):
            await slow

    asyncio.run(run())


def test_a_blob_without_end_stops_at_max_size(
    aio: AioThread,
    pki: Pki,
    registry: Registry,
    upstream_ports: set[int],
    proxy_factory: Callable[..., Proxy],
) -> None:
    """Issue 15: a chunked blob that never ends, against max_size 20m: the cache directory
    stays under the bound while it comes and after, the client is cut off, the log says
    why, and /healthz stays ok."""
    endless = Front(
        aio, "scratch.rc.test", pki.server, registry.netloc, pki.ca_path, endless="/endless/"
    ).start()
    upstream_ports.add(endless.port)
    try:
        proxy = proxy_factory(max_size="20m")
        digest = "sha256:" + "ab" * 32
        peak = 0

        def on_disk() -> int:
            return sum(p.stat().st_size for p in proxy.cache_dir.rglob("*") if p.is_file())

        async def run() -> Response:
            nonlocal peak
            host, port = endless.netloc.split(":")
            getting = asyncio.ensure_future(
                afetch(
                    proxy.port,
                    str(proxy.ca_path),
                    host,
                    int(port),
                    "GET",
                    f"/v2/endless/x/blobs/{digest}",
                    timeout=60,
                    keep_body=False,
                )
            )
            while not getting.done():
                peak = max(peak, on_disk())
                await asyncio.sleep(0.05)
            return await getting

        res = asyncio.run(run())
        assert not res.complete
        assert peak < 21 << 20, peak
        assert on_disk() < 1 << 20  # the space given back at once (the CA and index stay)
        assert proxy.log_lines("past max_size")
        with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        endless.stop()


def test_a_flood_of_silent_connections_locks_nobody_out(
    registry: Registry, image_factory: Callable[..., Image], proxy_factory: Callable[..., Proxy]
) -> None:
    """Issue 15: 40 loopback addresses open 600 silent connections against
    max_connections 200 (each address under max_connections_per_client): a client that
    sends its request still gets its answer, /healthz answers, the silent ones are closed
    oldest first, and each address's refusals are logged once."""
    image_factory(f"{registry.netloc}/iso/flood:1")
    proxy = proxy_factory(max_connections=200, head_timeout="60s")
    sources = [f"127.0.7.{i}" for i in range(1, 41)]
    assert proxy.proc is not None
    status = Path(f"/proc/{proxy.proc.pid}/status")

    def rss_kib() -> int:
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1])

    rss_before = rss_kib()

    async def run() -> None:
        silent: list[asyncio.StreamWriter] = []
        try:
            for n in range(600):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", proxy.port, local_addr=(sources[n % len(sources)], 0)
                )
                silent.append(writer)
            await asyncio.sleep(0.5)
            # The cap holds: the oldest silent connections were closed to make room.
            held = await asyncio.to_thread(proxy.metric, "registry_cache_client_connections")
            assert held <= 200, held
            res, took = await timed(
                manifest_request(proxy, registry.netloc, "/v2/iso/flood/manifests/1", OTHER_CLIENT)
            )
            assert res.status == 200 and took < 5, (res.status, took)
        finally:
            for writer in silent:
                writer.close()

    asyncio.run(run())
    with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=5) as r:
        assert r.status == 200
    refusals = proxy.log_lines("refused a connection from 127.0.7.")
    per_address = {ln.split("refused a connection from ", 1)[1].split(":")[0] for ln in refusals}
    assert refusals and len(refusals) == len(per_address), refusals[:5]
    # Every connection of the flood is given back once it is gone, and its memory with it.
    assert wait_until(lambda: proxy.metric("registry_cache_client_connections") <= 1, timeout=10)
    assert rss_kib() - rss_before < 30 << 10, (rss_before, rss_kib())


def test_a_blob_sent_a_byte_a_second_is_given_up_on(
    front: Front,
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
) -> None:
    """Issue 15: a download must keep a floor rate after upstream_timeout: a registry that
    trickles a blob (a byte a second keeps a connection alive for ever) is given up on, and
    nothing is stored."""
    image = image_factory(f"{registry.netloc}/trickle/blob:1", [20_000])
    layer = image.layer_digests[0]
    proxy = proxy_factory(upstream_timeout="2s")
    host, port = front.netloc.split(":")

    async def run() -> tuple[Response, float]:
        return await timed(
            asyncio.ensure_future(
                afetch(
                    proxy.port,
                    str(proxy.ca_path),
                    host,
                    int(port),
                    "GET",
                    f"/v2/trickle/blob/blobs/{layer}",
                    timeout=30,
                )
            )
        )

    res, took = asyncio.run(run())
    assert not res.complete and res.sha256 != layer
    assert took < 6, took
    assert proxy.log_lines("too slowly"), proxy.output()[-2000:]
    assert proxy.files_in_cache_blobs() == []
    # The cache let go of the registry's connection.
    assert wait_until(lambda: front.in_flight == 0, timeout=10)
