"""Building responses: registry-style errors, relayed upstream answers, stored bytes.

Every response carries `X-Registry-Cache` with HIT, MISS, STALE or PASS.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Literal

import aiohttp
from aiohttp import web

from .blobs import BlobReader
from .content_coding import Decoder
from .inflight import StoreUnavailable
from .upstream import forwardable

CACHE_HEADER = "X-Registry-Cache"
# 512 KiB writes. Small writes cost more CPU per byte over TLS. Past 512 KiB, each write
# (read, encrypt, send) holds the CPU in one long burst: a skopeo pull sharing the machine
# was 4-6 % slower with 1 MiB writes (interleaved A/B runs), and curl was no faster.
CHUNK = 512 << 10
MIN_CHUNK = 64 << 10
YIELD_EVERY = 4  # chunks sent without waiting before other streams get a turn
SEND_BUDGET = 16 << 20


class SendBudget:
    """How big each blob write may be. Writes of CHUNK are cheapest over TLS, but each stream
    holds about two writes' worth in memory (the plain and the encrypted copy), so as
    more streams run at once each gets a smaller share of a fixed budget: 200 downloads
    then cost tens of MB, not a GB."""

    def __init__(self, total: int = SEND_BUDGET) -> None:
        self.total = total
        self.active = 0

    def chunk(self) -> int:
        share = self.total // max(self.active, 1)
        size = MIN_CHUNK
        while size * 2 <= min(share, CHUNK):
            size *= 2
        return size


API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def error_response(
    status: int,
    code: str,
    message: str,
    result: str = "PASS",
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(
        status=status,
        text=body,
        content_type="application/json",
        headers={CACHE_HEADER: result, **API_VERSION, **(headers or {})},
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal[False] | None:
    """(start, end exclusive) for one satisfiable byte range, None for none or several
    (the whole body is sent), False when unsatisfiable (416)."""
    if not header:
        return None
    # Numbers past 30 digits exceed any size (and int() refuses past 4300 digits).
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d{0,30})\s*-\s*(\d{0,30})\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # not one range we serve: the whole body (RFC 9110 lets us ignore it)
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        return (max(size - n, 0), size) if n > 0 and size > 0 else False
    start = int(m.group(1))
    if m.group(2) and int(m.group(2)) < start:
        return None  # last < first: an invalid range-spec, so the header is ignored
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or end <= start:
        return False
    return start, end


OnPrepared = Callable[[web.StreamResponse], None]


async def read_body(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first `limit` + 1 bytes when it is longer (so callers can
    tell). `content.read(n)` alone returns whatever has arrived so far."""
    body = bytearray()
    async for data in upstream.content.iter_chunked(64 << 10):
        body += data
        if len(body) > limit:
            break
    return bytes(body[: limit + 1])


async def relay(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    result: str,
    on_prepared: OnPrepared | None = None,
    decoder: Decoder | None = None,
) -> tuple[web.StreamResponse, int]:
    """Streams an upstream answer to the client unchanged (or, given a `decoder`, without
    its content coding); returns it and the bytes sent."""
    headers = forwardable(upstream.headers)
    headers[CACHE_HEADER] = result
    length = upstream.headers.get("Content-Length")
    if decoder is not None:
        # The decoded length is not known before the end: sent chunked.
        headers.popall("Content-Encoding", None)
        headers.popall("Content-Length", None)
        length = None
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if length is not None and length.isdigit():
        response.content_length = int(length)
    await response.prepare(request)
    if on_prepared:
        on_prepared(response)
    sent = 0
    if request.method != "HEAD":
        async for data in upstream.content.iter_chunked(CHUNK):
            for piece in decoder.feed(data) if decoder is not None else (data,):
                await response.write(piece)
                sent += len(piece)
        if decoder is not None:
            decoder.finish()
    await response.write_eof()
    return response, sent


ReadMore = Callable[[int], Awaitable[int]]
# Sends the rest of a blob from elsewhere: (response, offset, end) -> bytes sent.
Fallback = Callable[[web.StreamResponse, int, int | None], Awaitable[int]]


async def stream_blob(
    request: web.BaseRequest,
    reader: BlobReader,
    *,
    headers: dict[str, Any],
    size: int | None,
    byte_range: tuple[int, int] | None,
    executor: Executor,
    available: ReadMore | None = None,
    on_prepared: OnPrepared | None = None,
    fallback: Fallback | None = None,
    budget: SendBudget | None = None,
) -> tuple[web.StreamResponse, int]:
    """Sends a blob (or one range of it) from a reader.

    `available(offset)` is given for a blob still being fetched: it waits until bytes
    past `offset` may be read and returns how many may, or raises when the fetch failed,
    which cuts the connection so the client never takes a truncated blob for a whole one.
    When the blob cannot be stored, `fallback` sends the rest straight from upstream.
    """
    start, end = byte_range if byte_range else (0, size)
    status = 206 if byte_range else 200
    response = web.StreamResponse(status=status, headers=headers)
    response.headers["Accept-Ranges"] = "bytes"
    if byte_range and size is not None and end is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if end is not None:
        response.content_length = end - start
    await response.prepare(request)
    if on_prepared:
        on_prepared(response)
    if request.method == "HEAD":
        await response.write_eof()
        return response, 0
    loop = asyncio.get_running_loop()
    offset = start
    since_yield = 0
    if budget is not None:
        budget.active += 1
    try:
        while end is None or offset < end:
            try:
                limit = await available(offset) if available else end
            except StoreUnavailable:
                if fallback is None:
                    raise
                offset += await fallback(response, offset, end)
                break
            if limit is None:
                break
            if end is not None:
                limit = min(limit, end)
            if limit <= offset:
                break  # a blob of unknown size ended
            n = min(budget.chunk() if budget else CHUNK, limit - offset)
            # Bytes in the page cache are read right here; only a read that would wait
            # for the disk goes to an I/O thread.
            data: bytes | bytearray | None = reader.pread_cached(n, offset)
            if data is None:
                data = await loop.run_in_executor(executor, reader.pread, n, offset)
                since_yield = 0
            if not data:
                raise OSError(f"blob file ended at {offset} of {limit} bytes")
            await response.write(data)
            offset += len(data)
            since_yield += 1
            if since_yield >= YIELD_EVERY:
                # A fast client and a cached blob need never wait: let the others run.
                await asyncio.sleep(0)
                since_yield = 0
    finally:
        if budget is not None:
            budget.active -= 1
    await response.write_eof()
    return response, offset - start
