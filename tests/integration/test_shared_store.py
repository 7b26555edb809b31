"""shared_store.py against a real S3 service (SeaweedFS): what each call leaves in the
bucket, uploads that must leave nothing, the clean-up of abandoned uploads, and a
bucket that goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.seaweed import Seaweed

from proxy_app.config import StoreConfig
from proxy_app.index import TagEntry
from proxy_app.shared_store import (
    PART_SIZE,
    BucketUnavailable,
    SharedStore,
    UploadMismatch,
)

pytestmark = pytest.mark.integration


def store_config(seaweed: Seaweed, bucket: str, prefix: str = "node-tests/") -> StoreConfig:
    return StoreConfig(
        type="s3",
        endpoint=seaweed.endpoint,
        bucket=bucket,
        prefix=prefix,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    )


def blob_file(tmp_path: Path, size: int) -> tuple[Path, str, bytes]:
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / digest[7:]
    path.write_bytes(data)
    return path, digest, data


async def opened(seaweed: Seaweed, bucket: str) -> SharedStore:
    shared = SharedStore(store_config(seaweed, bucket))
    await shared.start()
    return shared


def test_blobs_in_the_bucket(seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    small = blob_file(tmp_path, 100_000)
    large = blob_file(tmp_path, 2 * PART_SIZE + 12345)  # three parts

    async def run() -> None:
        shared = await opened(seaweed, bucket)
        try:
            for path, digest, data in (small, large):
                assert await shared.size(digest) is None
                assert await shared.open(digest) is None
                assert await shared.upload(digest, path) is True
                assert await shared.upload(digest, path) is False  # there already
                assert await shared.size(digest) == len(data)
                answer = await shared.open(digest)
                assert answer is not None and answer.status == 200
                assert answer.content_length == len(data)
                got = bytearray()
                while chunk := await answer.content.readany():
                    got += chunk
                answer.release()
                assert bytes(got) == data
                part = await shared.open(digest, 10, 20)
                assert part is not None and await part.content.read() == data[10:20]
                part.release()
            listed = {d: s async for d, s in shared.list()}
            assert listed == {small[1]: len(small[2]), large[1]: len(large[2])}
            await shared.delete(small[1])
            assert not await shared.has(small[1])
            assert await shared.read_small(large[1], 100) is None  # too large for that
        finally:
            await shared.close()

    asyncio.run(run())
    keys = seaweed.keys(bucket)
    assert set(keys) == {f"node-tests/blobs/sha256/{large[1][7:]}"}
    assert seaweed.multipart_uploads(bucket) == []


@pytest.mark.parametrize("size", [50_000, 2 * PART_SIZE + 1])
def test_mismatching_upload_leaves_nothing(
    seaweed: Seaweed, bucket: str, tmp_path: Path, size: int
) -> None:
    """A local file whose bytes are not its digest's: no object, no incomplete upload."""
    path, digest, data = blob_file(tmp_path, size)
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF  # the last byte: a multipart upload has sent every other part
    path.write_bytes(damaged)

    async def run() -> None:
        shared = await opened(seaweed, bucket)
        try:
            with pytest.raises(UploadMismatch):
                await shared.upload(digest, path)
        finally:
            await shared.close()

    asyncio.run(run())
    assert seaweed.keys(bucket) == {}
    assert seaweed.multipart_uploads(bucket) == []


def test_abandoned_uploads_are_aborted_but_running_ones_kept(seaweed: Seaweed, bucket: str) -> None:
    client = seaweed.client()
    mine = client.create_multipart_upload(Bucket=bucket, Key="node-tests/blobs/sha256/" + "a" * 64)
    client.upload_part(
        Bucket=bucket,
        Key=mine["Key"],
        UploadId=mine["UploadId"],
        PartNumber=1,
        Body=b"x" * 1000,
    )
    other = client.create_multipart_upload(Bucket=bucket, Key="another-prefix/object")
    time.sleep(1.5)

    async def run() -> tuple[int, int]:
        shared = await opened(seaweed, bucket)
        try:
            # A node starting now: the upload is a second old, another node's running one.
            kept = await shared.abort_abandoned_uploads()
            # Once it is older than the age given, it is a crashed node's.
            aborted = await shared.abort_abandoned_uploads(older_than=1.0)
        finally:
            await shared.close()
        return kept, aborted

    assert asyncio.run(run()) == (0, 1)
    remaining = [u["Key"] for u in seaweed.multipart_uploads(bucket)]
    assert remaining == ["another-prefix/object"], "only the prefix's own uploads go"
    assert seaweed.keys(bucket) == {}
    client.abort_multipart_upload(Bucket=bucket, Key=other["Key"], UploadId=other["UploadId"])


def test_tag_answers(seaweed: Seaweed, bucket: str) -> None:
    async def run() -> None:
        shared = await opened(seaweed, bucket)
        try:
            a = TagEntry("sha256:" + "1" * 64, "application/vnd.oci.image.index.v1+json", 100.0)
            b = TagEntry(
                "sha256:" + "2" * 64, "application/vnd.docker.distribution.manifest.v2+json", 200.0
            )
            await shared.put_tag("reg.example:5000", "team/app", "v1", "x,y", a)
            await shared.put_tag("reg.example:5000", "team/app", "v1", "", b)
            await shared.put_tag("reg.example:5000", "team/app/v1", "v2", "", b)
            got = await shared.tag_variants("reg.example:5000", "team/app", "v1")
            assert got == {"x,y": a, "": b}
            assert await shared.tag_variants("reg.example:5000", "team/app", "v2") == {}

            # purge: a tag's objects go, one that does not parse too; "v10" is another
            # tag, and "team/app/v1" another repository
            await shared.put_tag("reg.example:5000", "team/app", "v10", "", b)
            junk = "node-tests/tags/reg.example:5000/team/app:v1/not-an-answer"
            seaweed.client().put_object(Bucket=bucket, Key=junk, Body=b"{")
            assert await shared.drop_tags("reg.example:5000", "team/app", "v1", None) == 3
            assert await shared.tag_variants("reg.example:5000", "team/app", "v1") == {}
            assert junk not in seaweed.keys(bucket)
            assert await shared.tag_variants("reg.example:5000", "team/app", "v10") == {"": b}
            # by digest: the repository's answers naming it, no other repository's
            assert await shared.drop_tags("reg.example:5000", "team/app", None, a.digest) == 0
            assert await shared.drop_tags("reg.example:5000", "team/app", None, b.digest) == 1
            assert await shared.tag_variants("reg.example:5000", "team/app", "v10") == {}
            assert await shared.tag_variants("reg.example:5000", "team/app/v1", "v2") == {"": b}
        finally:
            await shared.close()

    asyncio.run(run())


def test_unreachable_bucket_fails_fast(make_seaweed, tmp_path: Path) -> None:
    server = make_seaweed()
    bucket = server.make_bucket()
    path, digest, _ = blob_file(tmp_path, 1000)
    server.stop()

    async def run() -> None:
        shared = await opened(server, bucket)
        try:
            started = time.monotonic()
            with pytest.raises(BucketUnavailable):
                await shared.size(digest)
            assert not shared.healthy and not shared.available
            # the circuit is open: the next call does not even try
            with pytest.raises(BucketUnavailable):
                await shared.upload(digest, path)
            assert time.monotonic() - started < 5
            assert server.secret_key not in (shared.problem or "")
            assert not await shared.probe()
        finally:
            await shared.close()

    asyncio.run(run())
    server.start()

    async def back() -> None:
        shared = await opened(server, bucket)
        try:
            assert await shared.probe()
            assert shared.healthy
            assert await shared.upload(digest, path)
        finally:
            await shared.close()

    asyncio.run(back())


class FaultyFront:
    """A real HTTP front of SeaweedFS (as a load balancer or gateway before a store is)
    that answers the next PUTs with the errors in `faults` instead of passing them on,
    as S3 itself answers now and then ("InternalError ... please try again")."""

    def __init__(self, seaweed: Seaweed) -> None:
        self.target = seaweed.endpoint
        self.faults: list[tuple[int, str]] = []
        self.puts = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.endpoint = ""

    async def start(self) -> FaultyFront:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        # An Application, not a bare Server: its router answers "Expect: 100-continue",
        # which botocore sends with every PUT body.
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "PUT":
            self.puts += 1
            if self.faults:
                status, code = self.faults.pop(0)
                xml = f"<Error><Code>{code}</Code><Message>please try again</Message></Error>"
                return web.Response(status=status, text=xml, content_type="application/xml")
        assert self._session is not None
        # The Host header goes on as it came: the request is signed for it. The framing
        # and Expect headers are this hop's (the body is read whole already).
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("expect", "content-length", "transfer-encoding", "connection")
        }
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            headers = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return web.Response(status=answer.status, body=payload, headers=headers)


def test_an_answer_that_says_try_again_is_tried_again(seaweed: Seaweed, bucket: str) -> None:
    """S3's InternalError and SlowDown are tried again (twice, after a short pause) and
    the call succeeds with nothing shown as wrong; a third in a row opens the circuit."""

    async def run() -> None:
        front = await FaultyFront(seaweed).start()
        config = store_config(seaweed, bucket, prefix="retries/")
        shared = SharedStore(dataclasses.replace(config, endpoint=front.endpoint))
        await shared.start()
        entry = TagEntry("sha256:" + "3" * 64, "application/vnd.oci.image.index.v1+json", 1.0)
        try:
            front.faults = [(500, "InternalError"), (503, "SlowDown")]
            await shared.put_tag("reg.example:5000", "team/app", "v1", "", entry)
            assert front.puts == 3 and not front.faults
            assert shared.healthy and shared.available
            assert await shared.tag_variants("reg.example:5000", "team/app", "v1") == {"": entry}

            front.puts = 0
            front.faults = [(500, "InternalError")] * 3
            with pytest.raises(BucketUnavailable, match="InternalError"):
                await shared.put_tag("reg.example:5000", "team/app", "v2", "", entry)
            assert front.puts == 3, "tried more than twice again, or not at all"
            assert not shared.healthy and not shared.available
        finally:
            await shared.close()
            await front.close()

    asyncio.run(run())
