"""The shared store: one S3-compatible bucket behind every cache node of a cluster.

Blobs (layers, configs and manifests alike) are content-addressed objects
`<prefix>blobs/sha256/<hex>`; tag answers are small JSON objects under `<prefix>tags/`.
A blob goes in only from a node's committed local file (verified when it was fetched),
and its bytes are hashed again on the way out: a multipart upload is completed only once
they match the digest, and aborted on any error, so no object ever stands under a digest
whose bytes are not its own (a reader checks the digest all the same).

The bucket may go away. Every call fails fast (a short connect timeout, no retries) and
a failure opens a circuit for a while: calls then fail at once with BucketUnavailable,
and the node serves from its own disk and from upstream meanwhile (shared_tier.py).

The client is aiobotocore (botocore on aiohttp): see README "Cluster" for the figures
that chose it. Its answer to a GetObject is an aiohttp response, whose StreamReader the
blob cache reads like a registry's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from aiobotocore.session import get_session
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from .blobs import SHA256_DIGEST, hex_of
from .config import StoreConfig
from .index import TagEntry

log = logging.getLogger(__name__)

PART_SIZE = 8 << 20  # multipart part size; a blob up to this size is one PutObject
CONNECT_TIMEOUT = 2.0  # seconds: an unreachable bucket must not hold a client's miss
READ_TIMEOUT = 30.0
# How long the circuit stays open after a failure: doubled on each failure in a row.
RETRY_FIRST, RETRY_MAX = 2.0, 60.0
# An answer that says "try again" (S3's InternalError, SlowDown, a 503 from a gateway in
# front of the store) is tried again after these pauses before the circuit opens: AWS
# documents such answers as part of normal operation. One that keeps coming (SeaweedFS
# with no free volume answers every write so) opens the circuit at the third. A store
# that cannot be reached fails at once (CONNECT_TIMEOUT).
TRANSIENT_PAUSES = (0.1, 0.5)
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})
MAX_TAG_OBJECT = 64 << 10


class BucketUnavailable(Exception):
    """The bucket cannot be reached or refuses us (the circuit is open)."""


class UploadMismatch(Exception):
    """The local file's bytes do not hash to its digest: nothing was stored in the bucket."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object is not (or no longer) as the writer saw it."""


class BucketObject:
    """A GetObject answer, shaped as blob_sources.SourceAnswer (aiohttp's response)."""

    def __init__(self, response: aiohttp.ClientResponse, length: int | None) -> None:
        self._response = response
        self.status = 200
        self.content: aiohttp.StreamReader = response.content
        self.content_length = length
        # Only what the blob cache reads: the bucket's own headers (an object's stored
        # Content-Encoding, say) are not the registry's.
        self.headers: Mapping[str, str] = (
            {"Content-Length": str(length)} if length is not None else {}
        )

    def release(self) -> None:
        self._response.release()


class SharedStore:
    def __init__(self, config: StoreConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.executor = executor
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._retry_at = 0.0
        self._backoff = RETRY_FIRST
        self.problem: str | None = None  # why the bucket is unusable, for /healthz

    def __repr__(self) -> str:
        return f"SharedStore({self.config.endpoint}/{self.bucket}/{self.prefix})"

    async def start(self) -> None:
        cfg = self.config
        options: dict[str, Any] = {
            "s3": {"addressing_style": "path", "payload_signing_enabled": False},
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": 32,
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "user_agent_extra": "registry-cache",
        }
        credentials: dict[str, str] = {}
        if cfg.access_key_id:
            credentials = {
                "aws_access_key_id": cfg.access_key_id,
                "aws_secret_access_key": cfg.secret_access_key,
            }
        else:
            options["signature_version"] = UNSIGNED  # anonymous: never the host's own keys
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=cfg.endpoint,
                region_name=cfg.region,
                config=BotoConfig(**options),
                **credentials,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    # --- the circuit --------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the circuit is open: calls fail at once, nobody waits for them."""
        return time.monotonic() >= self._retry_at

    @property
    def healthy(self) -> bool:
        return self.problem is None

    def _failed(self, error: BaseException) -> BucketUnavailable:
        why = _describe(error)
        if self.problem is None:
            log.error(
                "shared store %s/%s unusable: %s; serving from local disk and upstream",
                self.config.endpoint,
                self.bucket,
                why,
            )
        self.problem = why
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)
        return BucketUnavailable(why)

    def _ok(self) -> None:
        if self.problem is not None:
            log.info("shared store %s/%s is back", self.config.endpoint, self.bucket)
        self.problem = None
        self._backoff = RETRY_FIRST

    async def _call(self, operation: str, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One S3 call on the bucket. A missing key (404) is None with `missing_ok`; an
        answer that says "try again" is tried again (TRANSIENT_PAUSES: every body the
        node sends is bytes, so a call can be repeated whole); anything else that says
        the bucket cannot serve us opens the circuit."""
        if not self.available:
            raise BucketUnavailable(self.problem or "circuit open")
        pauses = iter(TRANSIENT_PAUSES)
        while True:
            try:
                answer = await getattr(self._client, operation)(Bucket=self.bucket, **kwargs)
                break
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                code = e.response.get("Error", {}).get("Code", "")
                if missing_ok and (status == 404 or code in ("NoSuchKey", "NotFound", "404")):
                    self._ok()
                    return None
                if code == "NoSuchUpload":
                    raise
                if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    self._ok()  # the bucket answered: another writer came first
                    raise PreconditionFailed(code or str(status)) from e
                if code in TRANSIENT_CODES or status in (500, 502, 503, 504):
                    pause = next(pauses, None)
                    if pause is not None:
                        log.info("shared store: %s: %s; trying again", operation, _describe(e))
                        await asyncio.sleep(pause)
                        continue
                raise self._failed(e) from e
            except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as e:
                raise self._failed(e) from e
        self._ok()
        return answer

    async def probe(self) -> bool:
        """Asks the bucket whether it is there (HeadBucket), circuit or not."""
        self._retry_at = 0.0
        try:
            await self._call("head_bucket")
        except BucketUnavailable:
            return False
        return True

    # --- blobs --------------------------------------------------------------------------

    def key(self, digest: str) -> str:
        return f"{self.prefix}blobs/sha256/{hex_of(digest)}"

    async def size(self, digest: str) -> int | None:
        answer = await self._call("head_object", missing_ok=True, Key=self.key(digest))
        return None if answer is None else int(answer["ContentLength"])

    async def has(self, digest: str) -> bool:
        return await self.size(digest) is not None

    async def open(
        self, digest: str, start: int = 0, end: int | None = None
    ) -> BucketObject | None:
        """The blob's bytes start..end (end exclusive; None: to its end), streamed; None
        when the bucket does not have it."""
        kwargs: dict[str, Any] = {"Key": self.key(digest)}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        answer = await self._call("get_object", missing_ok=True, **kwargs)
        if answer is None:
            return None
        return BucketObject(answer["Body"].raw_stream, answer.get("ContentLength"))

    async def upload(
        self,
        digest: str,
        path: Path,
        before_part: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Puts a committed local blob into the bucket: False when it is there already.
        Its bytes are hashed as they are sent; UploadMismatch (and nothing stored) when
        they are not the digest's. Multipart for large blobs, aborted on any error.
        `before_part` is awaited before each part is read (the caller's pace)."""
        if before_part is not None:
            await before_part()
        if await self.size(digest) is not None:
            return False
        loop = asyncio.get_running_loop()
        key = self.key(digest)
        size = (await loop.run_in_executor(self.executor, os.stat, path)).st_size
        if size <= PART_SIZE:
            body = await loop.run_in_executor(self.executor, _read_verified, path, digest)
            await self._call(
                "put_object", Key=key, Body=body, ContentType="application/octet-stream"
            )
            return True
        created = await self._call(
            "create_multipart_upload", Key=key, ContentType="application/octet-stream"
        )
        upload_id = created["UploadId"]
        completed = False
        try:
            hasher = hashlib.sha256()
            parts = []
            with await loop.run_in_executor(self.executor, path.open, "rb") as f:
                for number in range(1, (size + PART_SIZE - 1) // PART_SIZE + 1):
                    if before_part is not None and number > 1:
                        await before_part()
                    body = await loop.run_in_executor(self.executor, _read_part, f, hasher)
                    if not body:
                        raise UploadMismatch(f"{path} ended early")
                    answer = await self._call(
                        "upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=body
                    )
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                if await loop.run_in_executor(self.executor, f.read, 1):
                    raise UploadMismatch(f"{path} grew while it was read")
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise UploadMismatch(f"{path} hashes to {actual}, not {digest}")
            await self._call(
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            completed = True
            return True
        finally:
            if not completed:
                # Shielded: a cancelled upload (the node stopping) is aborted too.
                await asyncio.shield(self._abort(key, upload_id))

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except Exception as e:
            # Left for the start-up clean-up of abandoned uploads (this node's or another's).
            log.warning("aborting the upload of %s failed: %s", key, _describe(e))

    async def delete(self, digest: str) -> None:
        await self._call("delete_object", Key=self.key(digest))

    async def list(self) -> AsyncIterator[tuple[str, int]]:
        """Every blob in the bucket: (digest, size)."""
        prefix = f"{self.prefix}blobs/sha256/"
        async for item in self._objects(prefix):
            digest = "sha256:" + item["Key"][len(prefix) :]
            if SHA256_DIGEST.fullmatch(digest):
                yield digest, int(item["Size"])

    async def _objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list_objects_v2", **kwargs)
            for item in page.get("Contents", []):
                yield item
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def list_detailed(self) -> AsyncIterator[tuple[str, int, float]]:
        """Every blob in the bucket: (digest, size, LastModified as a Unix time)."""
        prefix = f"{self.prefix}blobs/sha256/"
        async for item in self._objects(prefix):
            digest = "sha256:" + item["Key"][len(prefix) :]
            if SHA256_DIGEST.fullmatch(digest):
                modified = item.get("LastModified")
                at = modified.timestamp() if modified is not None else 0.0
                yield digest, int(item["Size"]), at

    # --- small JSON documents: access maps, the trim lease (shared_trim.py) --------------

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """Every object under `<prefix><prefix argument>`: (key, size)."""
        async for item in self._objects(self.prefix + prefix):
            yield item["Key"], int(item.get("Size", 0))

    async def get_document(self, key: str, limit: int) -> tuple[Any, str] | None:
        """A JSON object's value and ETag; None when it is missing, too large or not JSON."""
        answer = await self._call("get_object", missing_ok=True, Key=key)
        if answer is None:
            return None
        async with answer["Body"] as body:
            if int(answer.get("ContentLength") or 0) > limit:
                return None
            raw = await body.read()
        if len(raw) > limit:
            return None
        try:
            return json.loads(raw), str(answer.get("ETag", ""))
        except ValueError:
            return None

    async def put_document(
        self, key: str, document: Any, if_match: str | None = None, if_absent: bool = False
    ) -> str:
        """Writes a JSON object; its new ETag. With `if_match` (an ETag) or `if_absent` the
        write is conditional (If-Match, If-None-Match: *): PreconditionFailed when the
        object changed meanwhile, or is there already."""
        kwargs: dict[str, Any] = {}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        elif if_absent:
            kwargs["IfNoneMatch"] = "*"
        answer = await self._call(
            "put_object",
            Key=key,
            Body=json.dumps(document, separators=(",", ":")).encode(),
            ContentType="application/json",
            **kwargs,
        )
        return str(answer.get("ETag", ""))

    async def delete_key(self, key: str) -> None:
        await self._call("delete_object", Key=key)

    async def abort_abandoned_uploads(self, older_than: float | None = None) -> int:
        """Aborts the incomplete multipart uploads under the prefix started more than
        `older_than` seconds ago (default: the store's abandoned_upload_age, 30 minutes):
        a node that crashed mid-upload, not another node's upload under way; how many
        went."""
        if older_than is None:
            older_than = self.config.abandoned_upload_age
        aborted = 0
        kwargs: dict[str, Any] = {"Prefix": self.prefix}
        now = time.time()
        while True:
            page = await self._call("list_multipart_uploads", **kwargs)
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                started = initiated.timestamp() if initiated is not None else 0.0
                if now - started < older_than:
                    continue  # another node's upload under way
                await self._abort(upload["Key"], upload["UploadId"])
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    # --- tag answers --------------------------------------------------------------------

    def _repository_tags_prefix(self, host: str, name: str) -> str:
        # ':' is in neither a repository name nor a tag: name "a/b" tag "c" and name
        # "a/b/c" stay apart.
        return f"{self.prefix}tags/{host}/{name}:"

    def _tag_prefix(self, host: str, name: str, tag: str) -> str:
        return f"{self._repository_tags_prefix(host, name)}{tag}/"

    async def put_tag(self, host: str, name: str, tag: str, variant: str, entry: TagEntry) -> None:
        document = {
            "variant": variant,
            "digest": entry.digest,
            "media_type": entry.media_type,
            "checked_at": entry.checked_at,
        }
        key = self._tag_prefix(host, name, tag) + hashlib.sha256(variant.encode()).hexdigest()
        await self._call(
            "put_object",
            Key=key,
            Body=json.dumps(document).encode(),
            ContentType="application/json",
        )

    async def knows_host(self, host: str) -> bool:
        # Not MaxKeys=1: SeaweedFS counts the folders it keeps toward it, and may then
        # answer a truncated page with no object in it.
        page = await self._call("list_objects_v2", Prefix=f"{self.prefix}tags/{host}/")
        return bool(page.get("Contents"))

    async def tag_variants(self, host: str, name: str, tag: str) -> dict[str, TagEntry]:
        """Every node's answers for a tag (per Accept variant) the bucket holds."""
        return {
            variant: entry
            async for _, variant, entry in self._tag_answers(self._tag_prefix(host, name, tag))
        }

    async def drop_tags(self, host: str, name: str, tag: str | None, digest: str | None) -> int:
        """Deletes the bucket's answers of a tag (every variant, every node's), or those
        naming `digest` in a repository (tag None), as Index.drop_tags does for one node;
        how many went. A purged tag must not come back from the bucket while upstream
        is down."""
        if tag is not None:
            # Every object of the tag goes, one that does not parse too: the listing
            # names them, so no document needs reading.
            keys = [item["Key"] async for item in self._objects(self._tag_prefix(host, name, tag))]
        else:
            prefix = self._repository_tags_prefix(host, name)
            keys = [
                key async for key, _, entry in self._tag_answers(prefix) if entry.digest == digest
            ]
        for key in keys:
            await self.delete_key(key)
        return len(keys)

    async def _tag_answers(self, prefix: str) -> AsyncIterator[tuple[str, str, TagEntry]]:
        """(key, variant, answer) of the tag objects under prefix that parse."""
        async for item in self._objects(prefix):
            if int(item.get("Size", 0)) > MAX_TAG_OBJECT:
                continue
            answer = await self._call("get_object", missing_ok=True, Key=item["Key"])
            if answer is None:
                continue
            async with answer["Body"] as body:
                raw = await body.read()
            try:
                doc = json.loads(raw)
                entry = TagEntry(
                    str(doc["digest"]), str(doc["media_type"]), float(doc["checked_at"])
                )
                variant = str(doc["variant"])
            except (ValueError, KeyError, TypeError):
                continue
            if SHA256_DIGEST.fullmatch(entry.digest):
                yield item["Key"], variant, entry

    async def read_small(self, digest: str, limit: int) -> bytes | None:
        """A small blob (a manifest) whole, verified against its digest; None when the
        bucket does not have it, or has other bytes under its name."""
        answer = await self.open(digest)
        if answer is None:
            return None
        try:
            if answer.content_length is not None and answer.content_length > limit:
                return None
            body = await answer.content.read(limit + 1)
            while len(body) <= limit and not answer.content.at_eof():
                more = await answer.content.read(limit + 1 - len(body))
                if not more:
                    break
                body += more
        finally:
            answer.release()
        if len(body) > limit or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return None
        return body


def _read_verified(path: Path, digest: str) -> bytes:
    body = path.read_bytes()
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if actual != digest:
        raise UploadMismatch(f"{path} hashes to {actual}, not {digest}")
    return body


def _read_part(f: BinaryIO, hasher: Any) -> bytes:
    body = f.read(PART_SIZE)
    hasher.update(body)
    return body


def _describe(error: BaseException) -> str:
    """One line for a log or /healthz; never a credential (botocore's messages carry
    none: the signature is not the secret)."""
    if isinstance(error, ClientError):
        err = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"{err.get('Code', 'error')} ({status}): {err.get('Message', '')}".strip()
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
