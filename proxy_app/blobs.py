"""The content-addressed blob store.

Blobs (layers, configs and manifests alike) are stored under their sha256 digest.
A write goes to a temporary file and becomes visible only when `commit()` has checked
its digest, so a half-written or corrupted blob can never be served. The interface is
small (has, size, open, begin a write, delete, list) so that another backend, an S3-style
object store, can stand in for the local filesystem.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

SHA256_DIGEST = re.compile(r"sha256:([a-f0-9]{64})")
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
_IOV_MAX = 1024  # the most buffers one writev takes (Linux's UIO_MAXIOV)


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were fetched under."""


def hex_of(digest: str) -> str:
    """The hex part of a validated `sha256:<hex>` digest; anything else is refused."""
    m = SHA256_DIGEST.fullmatch(digest)
    if not m:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return m.group(1)


class BlobReader(Protocol):
    def pread(self, size: int, offset: int) -> bytes: ...
    def pread_cached(self, size: int, offset: int) -> bytearray | None: ...
    def close(self) -> None: ...


class BlobWriter(Protocol):
    digest: str
    written: int

    def write(self, data: bytes | bytearray) -> None: ...
    def write_chunks(self, chunks: Sequence[bytes | bytearray]) -> None: ...
    def reader(self) -> BlobReader: ...
    def verify(self, expected_size: int | None) -> int: ...
    def commit(self, expected_size: int | None) -> int: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    def has(self, digest: str) -> bool: ...
    def size(self, digest: str) -> int | None: ...
    def open(self, digest: str) -> BlobReader: ...
    def begin_write(self, digest: str) -> BlobWriter: ...
    def delete(self, digest: str) -> bool: ...
    def digests(self) -> set[str]: ...
    def list(self) -> Iterator[tuple[str, int]]: ...


class FileReader:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def pread_cached(self, size: int, offset: int) -> bytearray | None:
        """What of the range is in the page cache, without waiting for the disk; None
        when nothing is (RWF_NOWAIT: the read then belongs in an I/O thread)."""
        if _RWF_NOWAIT is None:
            return None
        buffer = bytearray(size)
        try:
            n = os.preadv(self._fd, [buffer], offset, _RWF_NOWAIT)
        except (BlockingIOError, OSError):
            return None
        del buffer[n:]
        return buffer

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileWriter:
    """A blob being written to `tmp/`; `commit` verifies it and moves it into the store."""

    def __init__(self, store: FilesystemBlobStore, digest: str) -> None:
        self.digest = digest
        self.written = 0
        self._store = store
        self._hash = hashlib.sha256()
        self.tmp_path = store.tmp_dir / f"{hex_of(digest)}.{uuid.uuid4().hex}"
        self._fd = os.open(
            self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640
        )

    def write(self, data: bytes | bytearray) -> None:
        self.write_chunks([data])

    def write_chunks(self, chunks: Sequence[bytes | bytearray]) -> None:
        """Appends the chunks in order with as few writev calls as the kernel allows."""
        pending = [memoryview(c) for c in chunks if c]
        while pending:
            n = os.writev(self._fd, pending[:_IOV_MAX])
            while n and n >= len(pending[0]):
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]
        for chunk in chunks:
            self._hash.update(chunk)
            self.written += len(chunk)

    def reader(self) -> FileReader:
        return FileReader(self.tmp_path)

    def verify(self, expected_size: int | None) -> int:
        """Checks what was written against the digest (and size); on a mismatch the file
        goes and DigestMismatch is raised. Cheap: the hash was kept up as bytes came."""
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest or (expected_size is not None and expected_size != self.written):
            self.abort()
            raise DigestMismatch(
                f"upstream sent {self.written} bytes hashing to {actual}, expected {self.digest}"
                + (f" ({expected_size} bytes)" if expected_size is not None else "")
            )
        return self.written

    def commit(self, expected_size: int | None) -> int:
        """Verifies, then makes the blob durable and visible: fsync, rename, fsync dir."""
        self.verify(expected_size)
        os.fsync(self._fd)
        # Forgotten before closing: a close that fails has still released the number,
        # which abort() must not close again (another thread may own it by then).
        fd, self._fd = self._fd, -1
        os.close(fd)
        final = self._store.path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp_path, final)
        # From here the blob is in the store (served, and found by the start-up recount):
        # it must count as stored, or the index would not know a file that is there.
        try:
            _fsync_dir(final.parent)
        except OSError as e:
            # Its bytes are flushed; only the new name may be lost in a crash, and a
            # lost name is a blob the index drops at the next start and fetches again.
            log.warning("stored %s, but flushing its directory failed: %s", self.digest, e)
        return self.written

    def abort(self) -> None:
        """Drops the temporary file; never raises, so that a failure can always be reported."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as e:
                log.warning("closing the temporary file of %s failed: %s", self.digest, e)
        try:
            self.tmp_path.unlink(missing_ok=True)
        except OSError as e:
            # A read-only or failing disk: the file is removed with tmp/ at the next start.
            log.warning("cannot remove %s: %s", self.tmp_path, e)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemBlobStore:
    """`<cache_dir>/blobs/sha256/<2 hex>/<hex>`, with temporary files in `<cache_dir>/tmp`."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / "blobs" / "sha256"
        self.tmp_dir = cache_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def empty_tmp(self) -> int:
        """Removes what a previous run left half-written; returns how many files went."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                removed += 1
        return removed

    def path(self, digest: str) -> Path:
        hex_digest = hex_of(digest)
        return self.root / hex_digest[:2] / hex_digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: str) -> FileReader:
        return FileReader(self.path(digest))

    def begin_write(self, digest: str) -> FileWriter:
        return FileWriter(self, digest)

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def digests(self) -> set[str]:
        """Every stored digest, from directory listings alone (no stat per file)."""
        found = set()
        with os.scandir(self.root) as shards:
            for shard in shards:
                if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        if entry.name[:2] == shard.name and SHA256_DIGEST.fullmatch(
                            "sha256:" + entry.name
                        ):
                            found.add("sha256:" + entry.name)
        return found

    def list(self) -> Iterator[tuple[str, int]]:
        for shard in self.root.iterdir():
            if not shard.is_dir():
                continue
            for entry in shard.iterdir():
                if SHA256_DIGEST.fullmatch("sha256:" + entry.name) and entry.name[:2] == shard.name:
                    try:
                        yield "sha256:" + entry.name, entry.stat().st_size
                    except FileNotFoundError:
                        continue
