"""Content codings (`Content-Encoding`) of the upstream bodies the cache hashes or stores.

A manifest's or blob's name is the digest of its exact bytes, so whatever the cache
hashes it asks for as `Accept-Encoding: identity` (`EXACT_BYTES`), never with the
client's `gzip`: a front end that gzips JSON (nginx `gzip_proxied any`, CDNs) then sends
the registry's bytes. Some compress anyway. Such a body is decoded here before it is
hashed, stored or served, so the store only ever holds the document whose digest is its
name, and clients get it without a coding. A coding the cache cannot decode (br, zstd,
compress) or a corrupt body is refused with an error that names it: nothing that cannot
be verified is stored or served.

Answers the cache only relays (tag lists, tokens, errors) are not touched: their coding
and headers go to the client as the registry sent them.

Decoding is incremental and bounded: each piece handed out is at most `PIECE` bytes
however well the input compresses, and `limit` caps the total (a 4 MiB manifest cap must
hold for the decoded document, not the few KiB of gzip it came in).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

# Request headers for an answer the cache will hash: the registry's exact bytes.
EXACT_BYTES = {"Accept-Encoding": "identity"}
PIECE = 1 << 20  # most bytes one step of decoding hands out


class ContentCodingError(Exception):
    """A body whose coding the cache cannot undo, or that does not decode."""


def codings(headers: Mapping[str, str]) -> list[str]:
    """The codings applied to a body, in the order they were applied (`identity` and
    empty entries dropped). Several `Content-Encoding` headers count as one list."""
    values = [v for k, v in headers.items() if k.lower() == "content-encoding"]
    found = [c.strip().lower() for value in values for c in value.split(",")]
    return [c for c in found if c and c != "identity"]


class _ZlibLayer:
    """One gzip or deflate layer. gzip may have several members (`cat a.gz b.gz`), which
    decode to the members' contents one after the other, as gunzip and Go do."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._obj: zlib._Decompress | None = None
        self._pending = b""  # deflate: bytes held until the zlib header can be told apart

    def _new(self, first: bytes) -> zlib._Decompress:
        if self.coding in ("gzip", "x-gzip"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # HTTP's `deflate` is the zlib format (RFC 1950), but servers have long sent raw
        # deflate (RFC 1951) under that name too; the first two bytes tell them apart.
        zlib_header = first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._obj is None:
            data = self._pending + data
            if self.coding == "deflate" and len(data) < 2:
                self._pending = data
                return
            if not data:
                return
            self._pending = b""
            self._obj = self._new(data)
        try:
            while data:
                obj = self._obj
                while True:
                    out = obj.decompress(data, PIECE)
                    data = obj.unconsumed_tail
                    if out:
                        yield out
                    if not data and len(out) < PIECE:
                        break
                if not obj.eof:
                    return
                data = obj.unused_data
                if data and self.coding in ("gzip", "x-gzip"):
                    self._obj = self._new(data)  # the next gzip member
                elif data:
                    raise ContentCodingError(f"{len(data)} bytes after the end of deflate data")
        except zlib.error as e:
            raise ContentCodingError(f"corrupt {self.coding} data: {e}") from e

    def finish(self) -> None:
        if self._obj is None and not self._pending:
            return  # an empty body: nothing was coded
        if self._obj is None or not self._obj.eof:
            raise ContentCodingError(f"{self.coding} data ends before its end marker")


class Decoder:
    """Undoes a body's content codings, piece by piece, up to `limit` decoded bytes."""

    def __init__(self, applied: list[str], limit: int | None = None) -> None:
        unknown = [c for c in applied if c not in ("gzip", "x-gzip", "deflate")]
        if unknown:
            raise ContentCodingError(
                f"Content-Encoding {', '.join(unknown)} is not one the registry cache can "
                "decode (it decodes gzip and deflate, and asks for identity)"
            )
        self.applied = applied
        # The last coding applied is the first one to undo.
        self._layers = [_ZlibLayer(c) for c in reversed(applied)]
        self._limit = limit
        self.decoded = 0

    def _through(self, layers: list[_ZlibLayer], data: bytes) -> Iterator[bytes]:
        if not layers:
            yield data
            return
        for piece in layers[0].feed(data):
            yield from self._through(layers[1:], piece)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of the next part of the body, in pieces of at most PIECE."""
        for piece in self._through(self._layers, data):
            self.decoded += len(piece)
            if self._limit is not None and self.decoded > self._limit:
                raise ContentCodingError(f"decodes to more than {self._limit} bytes")
            yield piece

    def finish(self) -> None:
        """Raises when the body ended in the middle of a coded stream (truncated)."""
        # feed() drains every layer, so nothing decoded is left to hand out here.
        for layer in self._layers:
            layer.finish()

    @property
    def description(self) -> str:
        return ", ".join(self.applied)


def decoder_for(headers: Mapping[str, str], limit: int | None = None) -> Decoder | None:
    """A decoder for a response's body, or None when it came as it is (identity)."""
    applied = codings(headers)
    return Decoder(applied, limit) if applied else None


def decode_body(body: bytes, headers: Mapping[str, str], limit: int | None = None) -> bytes:
    """A whole body without its content codings."""
    decoder = decoder_for(headers, limit)
    if decoder is None:
        return body
    out = b"".join(decoder.feed(body))
    decoder.finish()
    return out
