import asyncio
import hashlib
from pathlib import Path

import pytest

from proxy_app.blobs import DigestMismatch, FilesystemBlobStore
from proxy_app.inflight import FetchFailed, InflightFetches, StoreUnavailable
from proxy_app.responses import parse_range


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_commit_verifies_and_places_by_digest(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    data = b"layer bytes" * 1000
    writer = store.begin_write(digest_of(data))
    writer.write(data[:5000])
    assert not store.has(digest_of(data))  # invisible until committed
    writer.write(data[5000:])
    writer.commit(len(data))
    hexd = digest_of(data).split(":")[1]
    assert (tmp_path / "blobs" / "sha256" / hexd[:2] / hexd).read_bytes() == data
    assert list(store.list()) == [(digest_of(data), len(data))]
    assert not any((tmp_path / "tmp").iterdir())


def test_mismatch_is_never_stored(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    claimed = digest_of(b"what the manifest says")
    writer = store.begin_write(claimed)
    writer.write(b"what upstream sent")
    with pytest.raises(DigestMismatch):
        writer.commit(None)
    assert not store.has(claimed)
    assert not any((tmp_path / "tmp").iterdir())


def test_store_refuses_non_digests(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    with pytest.raises(ValueError):
        store.path("sha256:../../etc/passwd")


def test_ranges() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=95-200", 100) == (95, 100)
    assert parse_range("bytes=100-", 100) is False
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole body
    assert parse_range("bytes=5-3", 100) is None  # last < first: invalid, so ignored
    assert parse_range("bytes=0-" + "9" * 5000, 100) is None  # no 500 from int()
    assert parse_range("bytes=" + "9" * 30 + "-", 100) is False


def test_readers_never_get_the_last_byte_before_verification(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FilesystemBlobStore(tmp_path)
        fetches = InflightFetches()
        data = b"x" * 100
        fetch, mine = fetches.claim(digest_of(data), "reg.example")
        assert mine and fetches.claim(digest_of(data), "reg.example") == (fetch, False)
        writer = store.begin_write(fetch.digest)
        fetch.begin(writer, len(data))
        writer.write(data)
        fetch.progressed()
        assert await fetch.wait_beyond(0) == 99  # held back until verified
        waiter = asyncio.ensure_future(fetch.wait_beyond(99))
        await asyncio.sleep(0)
        assert not waiter.done()
        writer.verify(len(data))
        fetch.verify()
        # released on the hash alone: the disk flush and the rename come after
        assert await waiter == 100
        assert not store.has(fetch.digest)
        writer.commit(len(data))
        fetch.finish()
        assert store.has(fetch.digest) and await fetch.wait_beyond(99) == 100

    asyncio.run(scenario())


def test_a_store_failure_after_verification_does_not_cut_readers(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FilesystemBlobStore(tmp_path)
        data = b"y" * 10
        fetch, _ = InflightFetches().claim(digest_of(data), "reg.example")
        writer = store.begin_write(fetch.digest)
        fetch.begin(writer, len(data))
        writer.write(data)
        reader = fetch.open_reader(store)  # a client already reading the growing file
        writer.verify(len(data))
        fetch.verify()
        writer.abort()  # say the flush failed: the file is gone from the directory
        fetch.fail("cannot store: disk full", StoreUnavailable)
        assert await fetch.wait_beyond(5) == len(data)
        assert reader.pread(len(data), 0) == data
        with pytest.raises(StoreUnavailable):  # a newcomer reads from upstream instead
            fetch.open_reader(store)

    asyncio.run(scenario())


def test_failed_fetch_wakes_readers_with_an_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FilesystemBlobStore(tmp_path)
        fetch, _ = InflightFetches().claim(digest_of(b"abc"), "reg.example")
        fetch.begin(store.begin_write(fetch.digest), 3)
        waiter = asyncio.ensure_future(fetch.wait_beyond(0))
        await asyncio.sleep(0)
        fetch.fail("digest mismatch")
        with pytest.raises(FetchFailed):
            await waiter

    asyncio.run(scenario())


def test_send_chunks_shrink_as_streams_add_up() -> None:
    from proxy_app.responses import CHUNK, MIN_CHUNK, SendBudget

    budget = SendBudget(total=32 << 20)
    assert budget.chunk() == CHUNK
    budget.active = 32
    assert budget.chunk() == CHUNK
    budget.active = 200
    assert budget.chunk() == 128 << 10
    budget.active = 10_000
    assert budget.chunk() == MIN_CHUNK


def test_chunks_are_written_in_order_past_the_writev_limit(tmp_path: Path) -> None:
    # More buffers than one writev takes (a slow upstream trickling bytes), an empty one,
    # and a large one: the file and the digest must come out as if written in one piece.
    store = FilesystemBlobStore(tmp_path)
    chunks = [bytes([i % 251]) for i in range(3000)] + [b"", b"z" * 70_000, b"tail"]
    data = b"".join(chunks)
    writer = store.begin_write(digest_of(data))
    writer.write_chunks(chunks)
    assert writer.commit(len(data)) == len(data)
    assert store.open(digest_of(data)).pread(len(data) + 1, 0) == data


def test_abort_never_raises_so_that_a_failure_can_still_be_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A temporary file that cannot be removed (here: a directory stands in its place; on
    # a disk remounted read-only, EROFS) is left for the start-up clean-up, and logged.
    store = FilesystemBlobStore(tmp_path)
    writer = store.begin_write(digest_of(b"abc"))
    writer.write(b"ab")
    writer.tmp_path.unlink()
    writer.tmp_path.mkdir()
    writer.abort()
    assert "cannot remove" in caplog.text
    writer.abort()  # twice is harmless: the descriptor is not closed again


def test_a_range_short_of_the_end_gets_its_last_byte_only_once_verified(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FilesystemBlobStore(tmp_path)
        data = b"r" * 100
        fetch, _ = InflightFetches().claim(digest_of(data), "reg.example")
        writer = store.begin_write(fetch.digest)
        fetch.begin(writer, len(data))
        writer.write(data[:60])
        fetch.progressed()
        assert await fetch.wait_beyond(0, end=10) == 9  # bytes 0-9 asked: 9 go at once
        waiter = asyncio.ensure_future(fetch.wait_beyond(9, end=10))
        writer.write(data[60:])
        fetch.progressed()
        await asyncio.sleep(0)
        assert not waiter.done()  # all of it is here, but not verified yet
        writer.verify(len(data))
        fetch.verify()
        assert await waiter == 100

    asyncio.run(scenario())
