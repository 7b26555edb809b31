"""Content codings of upstream bodies the cache hashes: decoded, bounded, or refused."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import pytest
from multidict import CIMultiDict

from proxy_app.content_coding import (
    PIECE,
    ContentCodingError,
    Decoder,
    codings,
    decode_body,
    decoder_for,
)

DOC = b'{"schemaVersion": 2, "layers": []}' * 50


def headers(*values: str) -> CIMultiDict[str]:
    return CIMultiDict(("Content-Encoding", v) for v in values)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def decode_in_pieces(body: bytes, hdrs: CIMultiDict[str], step: int) -> bytes:
    decoder = decoder_for(hdrs)
    assert decoder is not None
    out = b"".join(p for i in range(0, len(body), step) for p in decoder.feed(body[i : i + step]))
    decoder.finish()
    return out


def test_identity_and_no_header_leave_the_body_as_it_is() -> None:
    assert decode_body(DOC, CIMultiDict()) is DOC
    assert decode_body(DOC, headers("identity")) is DOC
    assert decoder_for(headers(" Identity ")) is None
    assert codings(headers("identity, gzip")) == ["gzip"]


@pytest.mark.parametrize("name", ["gzip", "x-gzip", "GZIP"])
def test_gzip(name: str) -> None:
    assert decode_body(gzip.compress(DOC), headers(name)) == DOC


def test_deflate_in_zlib_format_and_raw() -> None:
    assert decode_body(zlib.compress(DOC), headers("deflate")) == DOC
    assert decode_body(raw_deflate(DOC), headers("deflate")) == DOC


def test_several_codings_are_undone_last_first() -> None:
    # "gzip, deflate": gzip applied first, then deflate over it.
    body = zlib.compress(gzip.compress(DOC))
    assert decode_body(body, headers("gzip, deflate")) == DOC
    # The same list in two header lines means the same.
    assert decode_body(body, headers("gzip", "deflate")) == DOC
    # In the wrong order it does not decode, and says so.
    with pytest.raises(ContentCodingError, match="corrupt"):
        decode_body(body, headers("deflate, gzip"))


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "foo"])
def test_codings_it_cannot_decode_are_refused_by_name(coding: str) -> None:
    with pytest.raises(ContentCodingError) as e:
        decode_body(b"whatever", headers(coding))
    unknown = [c.strip() for c in coding.split(",") if c.strip() != "gzip"]
    assert f"Content-Encoding {', '.join(unknown)}" in str(e.value)
    assert "decodes gzip and deflate" in str(e.value)


def test_corrupt_gzip_is_refused() -> None:
    body = bytearray(gzip.compress(DOC))
    body[20] ^= 0xFF
    with pytest.raises(ContentCodingError, match="corrupt gzip"):
        decode_body(bytes(body), headers("gzip"))


def test_not_gzip_at_all_is_refused() -> None:
    with pytest.raises(ContentCodingError, match="corrupt gzip"):
        decode_body(DOC, headers("gzip"))


def test_truncated_gzip_is_refused_not_taken_as_shorter() -> None:
    body = gzip.compress(os.urandom(100_000))
    with pytest.raises(ContentCodingError, match="ends before its end marker"):
        decode_body(body[: len(body) // 2], headers("gzip"))
    with pytest.raises(ContentCodingError, match="ends before"):
        decode_body(body[:1], headers("deflate"))


def test_gzip_with_several_members_decodes_to_all_of_them() -> None:
    body = gzip.compress(b"first ") + gzip.compress(b"second")
    assert decode_body(body, headers("gzip")) == b"first second"
    assert decode_in_pieces(body, headers("gzip"), 3) == b"first second"


def test_bytes_after_deflate_data_are_refused() -> None:
    with pytest.raises(ContentCodingError, match="after the end"):
        decode_body(zlib.compress(DOC) + b"junk", headers("deflate"))


def test_empty_body_with_a_coding_is_empty() -> None:
    assert decode_body(b"", headers("gzip")) == b""


def test_feeding_byte_by_byte_gives_the_same_bytes() -> None:
    data = os.urandom(5000) + DOC
    for hdrs, body in (
        (headers("gzip"), gzip.compress(data)),
        (headers("deflate"), raw_deflate(data)),
        (headers("deflate"), zlib.compress(data)),
        (headers("gzip, deflate"), zlib.compress(gzip.compress(data))),
    ):
        assert decode_in_pieces(body, hdrs, 1) == data
        assert decode_in_pieces(body, hdrs, 777) == data


def test_a_decompression_bomb_is_bounded_by_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in about 64 KiB
    assert len(bomb) < 1 << 17
    with pytest.raises(ContentCodingError, match="more than 4194304 bytes"):
        decode_body(bomb, headers("gzip"), limit=4 << 20)


def test_pieces_stay_small_however_well_the_input_compresses() -> None:
    data = b"\0" * (8 * PIECE + 5)
    decoder = Decoder(["gzip", "gzip"])  # twice: the inner layer's pieces are bounded too
    pieces = list(decoder.feed(gzip.compress(gzip.compress(data))))
    decoder.finish()
    assert max(len(p) for p in pieces) <= PIECE
    assert hashlib.sha256(b"".join(pieces)).digest() == hashlib.sha256(data).digest()
    assert decoder.decoded == len(data)
