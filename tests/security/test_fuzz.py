"""Issue 6, Must show 5 (fuzz part): hypothesis against the request and route parsing.

`parse_route` may only fail with BadRoute, and whatever it accepts is safe to use as a
store key or an upstream path: a name that follows the distribution grammar, a digest
without '/', '%' or '..', an ASCII tag. The CONNECT head parser and its target pattern
never raise, and a host they accept has nothing but host-name characters.

Pure Python, no proxy: not marked `integration`, so `make unit` runs it too.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy_app.connect_door import CONNECT_TARGET
from proxy_app.connections import parse_head
from proxy_app.routes import DIGEST, NAME, SHA256, BadRoute, RouteKind, parse_route

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Distribution's tag grammar; Go's \w is ASCII-only.
ASCII_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ERROR_CODES = {"NAME_INVALID", "DIGEST_INVALID", "TAG_INVALID", "UNSUPPORTED"}
HEX = "0123456789abcdef"

# Characters that matter to the parser: separators, encodings, traversal, case, odd bytes.
TRICKY = "abcz09._-/%:2eEfF?#\\ \t\x00@+=~é٣\u017f\u212a"
tricky_text = st.text(alphabet=TRICKY, max_size=40)
traversal = st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        ".%2e",
        "%2e.",
        "..%2f..",
        "%2e%2e%2f",
        "%252e%252e",
        "..\\..",
        "%c0%ae%c0%ae",
        "a/../b",
        "a/./b",
        "a//b",
        "",
    ]
)
name_part = st.one_of(
    st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+){0,2}", fullmatch=True), traversal, tricky_text
)
names = st.lists(name_part, min_size=1, max_size=4).map("/".join)
digests = st.builds(
    lambda algo, body: f"{algo}:{body}",
    st.sampled_from(["sha256", "sha512", "md5", "SHA256", "sha256+x", "", "sha256%3a"]),
    st.one_of(
        st.text(alphabet=HEX, min_size=60, max_size=66),
        st.text(alphabet=HEX + "ABCDEF./%2ez", max_size=70),
        traversal,
    ),
)
references = st.one_of(digests, tricky_text, traversal, st.from_regex(ASCII_TAG, fullmatch=True))
structured = st.builds(
    lambda name, what, ref, query: f"/v2/{name}/{what}/{ref}{query}",
    names,
    st.sampled_from(["blobs", "manifests", "tags/list", "blobs/uploads", "referrers", "x"]),
    references,
    st.sampled_from(["", "?n=1", "?a=../../x", "?"]),
)
paths = st.one_of(
    structured,
    st.text(max_size=120).map(lambda s: "/" + s),
    st.text(alphabet=TRICKY, max_size=120),
)


def check_route(raw: str) -> None:
    try:
        route = parse_route(raw)
    except BadRoute as e:
        assert e.code in ERROR_CODES, e.code
        assert e.message
        return
    name, ref = route.name, route.reference
    assert name == "" or NAME.fullmatch(name), f"accepted name {name!r}"
    assert ".." not in name and "%" not in name and not name.startswith("/"), name
    assert "//" not in name and not name.endswith("/"), name
    if route.kind in (RouteKind.BLOB, RouteKind.MANIFEST):
        assert name, raw
        assert len(name) <= 255, name
        assert DIGEST.fullmatch(ref), f"accepted digest {ref!r}"
        assert "/" not in ref and "%" not in ref and ".." not in ref, ref
        assert not route.cacheable or SHA256.fullmatch(ref), ref
    elif route.kind is RouteKind.TAG:
        assert name, raw
        assert ASCII_TAG.fullmatch(ref), f"accepted tag {ref!r} in {raw!r}"
        assert "/" not in ref and "%" not in ref, ref
    else:
        assert ref == "" and not route.cacheable, route
    if "?" not in raw:  # a query never changes what a path means
        assert parse_route(raw + "?x=../../y") == route


@FUZZ
@given(paths)
@example("/v2/a/manifests/é")
@example("/v2/a/manifests/٣")
@example("/v2/a/blobs/sha256:" + "a" * 64)
@example("/v2/a/../../b/blobs/sha256:" + "a" * 64)
@example("/v2/a%2f..%2fb/manifests/latest")
def test_parse_route_accepts_only_safe_routes(raw: str) -> None:
    check_route(raw)


HOST_CHARS = re.compile(r"[A-Za-z0-9.-]+")
target_chars = "az09.-:[]%@/\\ \t\x00éfF_*"
targets = st.one_of(
    st.text(alphabet=target_chars, max_size=60),
    st.builds(
        lambda h, p: f"{h}:{p}",
        st.one_of(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True), tricky_text),
        st.one_of(
            st.integers(-5, 100_000).map(str), st.text(alphabet="0123456789x-+ ", max_size=7)
        ),
    ),
    st.builds(
        lambda h, p: f"[{h}]:{p}",
        st.text(alphabet="0123456789abcdef:.%z", max_size=45),
        st.integers(0, 99999),
    ),
)
header_lines = st.lists(
    st.one_of(
        st.builds(
            lambda k, v: f"{k}: {v}",
            st.sampled_from(["Host", "Proxy-Authorization", "X"]),
            tricky_text,
        ),
        st.text(alphabet=TRICKY + ":\r\n", max_size=30),
    ),
    max_size=4,
)
connect_heads = st.one_of(
    st.builds(
        lambda method, target, version, lines: "\r\n".join(
            [f"{method} {target} {version}", *lines]
        ).encode("utf-8", "surrogatepass"),
        st.sampled_from(["CONNECT", "CONNECT ", "connect"]),
        targets,
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "HTTP/1.1 x"]),
        header_lines,
    ),
    st.binary(max_size=300).map(lambda b: b"CONNECT " + b),
)


@FUZZ
@given(connect_heads)
@example(b"CONNECT [::1]:443 HTTP/1.1")
@example(b"CONNECT a:1\r\n: x")
@example(b"CONNECT a:1 HTTP/1.1\r\n Host: x")
def test_connect_head_parser(head: bytes) -> None:
    parsed = parse_head(head)
    if parsed is None:
        return
    request_line, headers = parsed
    assert isinstance(request_line, list) and all(isinstance(p, str) for p in request_line)
    for key, value in headers.items():
        assert key and key == key.strip().lower(), key
        assert value == value.strip()
    if len(request_line) != 3:
        return
    m = CONNECT_TARGET.fullmatch(request_line[1])
    if m is None:
        return
    port = m.group("port")
    assert port.isdigit() and len(port) <= 5, port
    if m.group("v6") is not None:
        assert re.fullmatch(r"[0-9a-fA-F:.]+", m.group("v6")), m.group("v6")
    else:
        host = m.group("host")
        assert HOST_CHARS.fullmatch(host), f"accepted host {host!r}"
        assert not host.startswith(("-", ".")) and not host.endswith(("-", ".")), host
