"""The cluster's parts that need no network: its config, who owns a digest, the request
signatures, and how a fetch carries on after a source broke off (skipping what it has)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy_app import peer_auth
from proxy_app.blob_cache import _skipping
from proxy_app.config import ConfigError, load_config
from proxy_app.peers import find_self, owner


def config(tmp_path: Path, text: str):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return load_config(path, environ={})


def digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def test_peers_config(tmp_path: Path) -> None:
    cfg = config(tmp_path, 'peers: ["10.0.0.11:3128", "[fd00::12]:3128", "Cache3.lan:3128"]\n')
    assert cfg.peers == ("10.0.0.11:3128", "[fd00::12]:3128", "cache3.lan:3128")
    env = load_config(None, environ={"REGISTRY_CACHE_PEERS": "10.0.0.11:3128,10.0.0.12:3128"})
    assert env.peers == ("10.0.0.11:3128", "10.0.0.12:3128")
    for bad in ('["10.0.0.11"]', '["10.0.0.11:0"]', '["a:1", "a:1"]', '["[zz::1]:3128"]'):
        with pytest.raises(ConfigError, match="peers"):
            config(tmp_path, f"peers: {bad}\n")
    with pytest.raises(ConfigError, match=r"peer_self.*not one of peers"):
        config(tmp_path, 'peers: ["10.0.0.11:3128"]\npeer_self: "10.0.0.12:3128"\n')


def test_a_node_finds_itself_by_its_listen_address_and_port(tmp_path: Path) -> None:
    peers = 'peers: ["127.0.0.1:4001", "127.0.0.1:4002", "192.0.2.7:4001"]\n'
    assert find_self(config(tmp_path, peers + 'listen: "127.0.0.1:4002"\n')) == "127.0.0.1:4002"
    # a wildcard listener: the entries on its port whose address is this host's
    assert find_self(config(tmp_path, peers + 'listen: "0.0.0.0:4001"\n')) == "127.0.0.1:4001"
    with pytest.raises(ConfigError, match=r"none of .* is this node.*peer_self"):
        find_self(config(tmp_path, peers + 'listen: "127.0.0.1:4003"\n'))
    two = 'peers: ["127.0.0.1:4001", "localhost:4001"]\nlisten: "0.0.0.0:4001"\n'
    with pytest.raises(ConfigError, match=r"all look like this node.*peer_self"):
        find_self(config(tmp_path, two))
    named = two + 'peer_self: "localhost:4001"\n'
    assert find_self(config(tmp_path, named)) == "localhost:4001"


def test_rendezvous_spreads_digests_and_moves_only_a_gone_nodes_share() -> None:
    nodes = ["10.0.0.11:3128", "10.0.0.12:3128", "10.0.0.13:3128"]
    owners = {digest(i): owner(nodes, digest(i)) for i in range(3000)}
    counts = collections.Counter(owners.values())
    assert set(counts) == set(nodes)
    assert all(800 < n < 1200 for n in counts.values()), counts
    # the same answer whatever the order of the list (every node computes it alone)
    assert all(owner(list(reversed(nodes)), d) == o for d, o in owners.items())
    # a node leaves: only the digests it owned change owner
    left = nodes[:2]
    moved = [d for d, o in owners.items() if owner(left, d) != o]
    assert all(owners[d] == nodes[2] for d in moved)


def test_signatures() -> None:
    key = peer_auth.peer_key(ec.generate_private_key(ec.SECP256R1()))
    other = peer_auth.peer_key(ec.generate_private_key(ec.SECP256R1()))
    assert len(key) == 32 and key != other
    target = "/_peer/v2/pub/a/blobs/sha256:00?registry=ghcr.io"
    value = peer_auth.sign(key, "GET", target, now=1000)
    assert peer_auth.check(key, "GET", target, value, now=1000) == ""
    assert peer_auth.check(key, "GET", target, value, now=1000 + peer_auth.SKEW) == ""
    assert "more than" in peer_auth.check(key, "GET", target, value, now=1061)
    assert "wrong" in peer_auth.check(other, "GET", target, value, now=1000)
    assert "wrong" in peer_auth.check(key, "GET", target + "x", value, now=1000)
    assert "wrong" in peer_auth.check(key, "HEAD", target, value, now=1000)
    assert "no " in peer_auth.check(key, "GET", target, None)
    for junk in ("v1", "v2 1000 ab", "v1 x ab", "v1 1000 ab cd", "v1 1000 \u00e9"):
        assert peer_auth.check(key, "GET", target, junk, now=1000)


def test_skipping_drops_the_bytes_already_stored() -> None:
    async def batches() -> AsyncIterator[list[bytes]]:
        for batch in ([b"abc", b"de"], [b"f"], [b"ghij", b"k"]):
            yield list(batch)

    async def run(skip: int) -> bytes:
        return b"".join([b"".join(b) async for b in _skipping(batches(), skip)])

    for skip in range(12):
        assert asyncio.run(run(skip)) == b"abcdefghijk"[skip:]
