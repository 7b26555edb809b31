"""A cluster of cache nodes that fetch each blob once between them.

Every node is configured with the same `peers` list, and picks the node that fetches a
digest by rendezvous (highest random weight) hashing: each node's weight for the digest
is a hash of the two, and the heaviest node owns it. Every node computes the same owner
without asking anyone, and when a node leaves the list only the digests it owned move.

A node that does not own a missing blob asks the owner first (PeerSource, a BlobSource:
blob_sources.py), with a signed request (peer_auth.py) to the owner's listener over TLS,
checked against the shared CA; the owner serves it through its own blob cache, so all
nodes' misses of one blob, and its own clients', make one download, streamed to everyone
while it is written. An owner that cannot be reached is remembered as down for a short
while and the node fetches from the registry itself. A stream from it that breaks (the
owner died mid-fetch) is carried on from the owner among the nodes left, which every
asking node works out alike: the new owner fetches the rest from the registry once, and
the others take the blob from it. The digest is checked either way.

A fetch the owner runs for a peer never asks a peer itself (`serving_peer`), so nodes
whose lists disagree cannot send a request round in a circle.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import cast
from urllib.parse import quote

import aiohttp
from yarl import URL

from . import peer_auth
from .blob_sources import SourceAnswer
from .ca import trust_bundle
from .config import Config, ConfigError
from .upstream import UPSTREAM_ERRORS, Origin, describe

log = logging.getLogger(__name__)

PEER_PREFIX = "/_peer"  # a peer request's target: /_peer/v2/<name>/blobs/<digest>?registry=
CONNECT_TIMEOUT = 2.0  # seconds to reach an owner before fetching from the registry instead
DOWN_FOR = 30.0  # seconds an owner that could not be reached is not asked again
ASKED_KEPT = 4096  # digests whose last asked node is remembered (for refute)

# Set while a node serves a peer's request: the fetch it starts goes to the registry.
serving_peer: contextvars.ContextVar[bool] = contextvars.ContextVar("serving_peer", default=False)


def weight(node: str, digest: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{node}\0{digest}".encode()).digest()[:8], "big")


def owner(nodes: Iterable[str], digest: str) -> str:
    """The node that fetches `digest`: the one of highest weight (ties: the greater name)."""
    return max(nodes, key=lambda node: (weight(node, digest), node))


def _split(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)


def _local_address(address: str) -> bool:
    """Whether this host has `address` (it can bind a socket to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


def _addresses(host: str) -> set[str]:
    try:
        ipaddress.ip_address(host)
        return {host}
    except ValueError:
        pass
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def find_self(config: Config) -> str:
    """This node's entry in `peers`: `peer_self`, else the one entry on a port this node
    listens on whose host is one of its listen addresses or, for a wildcard listener,
    one of this host's addresses. Raises ConfigError when none or several are."""
    if config.peer_self is not None:
        return config.peer_self
    mine = []
    for node in config.peers:
        host, port = _split(node)
        for listen in config.listen:
            if listen.port != port:
                continue
            wildcard = listen.host in ("0.0.0.0", "::", "")
            addresses = _addresses(host)
            if (not wildcard and (host == listen.host.lower() or listen.host in addresses)) or (
                wildcard and any(_local_address(a) for a in addresses)
            ):
                mine.append(node)
                break
    if len(mine) == 1:
        return mine[0]
    listening = ", ".join(str(a) for a in config.listen)
    if not mine:
        raise ConfigError(
            f"config key 'peers': none of {', '.join(config.peers)} is this node (it listens "
            f"on {listening}); list this node too, or name it with peer_self"
        )
    raise ConfigError(
        f"config key 'peers': {', '.join(mine)} all look like this node (it listens on "
        f"{listening}); name it with peer_self"
    )


class Cluster:
    """The nodes, this one among them, and who owns a digest."""

    def __init__(self, config: Config) -> None:
        self.nodes = config.peers
        self.me = find_self(config)

    def owner(self, digest: str) -> str:
        return owner(self.nodes, digest)


def peer_ssl(ca_dir: Path) -> ssl.SSLContext:
    """TLS to another node: its certificate must chain to the cluster's CA (current, next
    or previous: a rotation under way). Its name is not checked: only nodes hold keys of
    certificates the CA signed (a leaf's key never leaves the node that made it), and a
    node is named by address in `peers`, which its certificate need not carry."""
    ctx = ssl.create_default_context(cadata=trust_bundle(ca_dir).decode())
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class PeerSource:
    """The owner of a digest, asked before the registry by the nodes that do not own it."""

    def __init__(self, config: Config, cluster: Cluster, key: bytes) -> None:
        self.config = config
        self.cluster = cluster
        self.key = key
        self.name = "owner peer"
        self._down: dict[str, float] = {}  # node -> until when it is not asked
        self._asked: dict[str, str] = {}  # digest -> the node last asked for it
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=peer_ssl(self.config.ca_dir), limit=0),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT, sock_read=self.config.upstream_timeout
            ),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def refute(self, digest: str) -> None:
        """The owner sent bytes that are not the blob's: a broken or hostile node. It is
        not asked for anything for a while, so the clients' next try reaches the
        registry, and the operator is told."""
        # The node asked last for it: the owner, or the one that took over from it.
        node = self._asked.pop(digest, None) or self.cluster.owner(digest)
        self._down[node] = time.monotonic() + DOWN_FOR
        log.error(
            "peer %s sent wrong bytes for %s: not asking it for %g s; check that node",
            node,
            digest,
            DOWN_FOR,
        )

    def down(self, node: str) -> bool:
        return self._down.get(node, 0.0) > time.monotonic()

    async def open(self, digest: str, origin: Origin, repository: str) -> SourceAnswer | None:
        if serving_peer.get() or self._session is None:
            return None
        node = self.cluster.owner(digest)
        if node == self.cluster.me or self.down(node):
            return None
        return await self._ask(node, digest, origin, repository)

    async def instead(self, digest: str, origin: Origin, repository: str) -> SourceAnswer | None:
        """The owner's stream broke off (it died, say): it is not asked again for a while,
        and the owner among the nodes left takes over. Every node that was asking agrees
        on it, so the rest is fetched once: by this node when it is the new owner (None:
        from the registry), else by the new owner, which this node asks for the blob."""
        broken = self.cluster.owner(digest)
        self._down[broken] = time.monotonic() + DOWN_FOR
        left = [n for n in self.cluster.nodes if not self.down(n) or n == self.cluster.me]
        node = owner(left, digest)
        if node == self.cluster.me or self._session is None:
            return None
        return await self._ask(node, digest, origin, repository)

    async def _ask(
        self, node: str, digest: str, origin: Origin, repository: str
    ) -> SourceAnswer | None:
        """`node`'s answer for the blob: a 200, or None (it cannot be reached: not asked
        again for DOWN_FOR; or it answered otherwise)."""
        if self._session is None:
            return None
        if len(self._asked) >= ASKED_KEPT:
            self._asked.clear()  # only the fetches under way need theirs
        self._asked[digest] = node
        target = f"{PEER_PREFIX}/v2/{repository}/blobs/{digest}?registry={quote(origin.key, '')}"
        headers = {peer_auth.HEADER: peer_auth.sign(self.key, "GET", target)}
        try:
            # The owner answers once its registry has: as long as a registry may take.
            async with asyncio.timeout(self.config.upstream_timeout + CONNECT_TIMEOUT):
                response = await self._session.get(
                    # as signed: not re-quoted
                    URL(f"https://{node}{target}", encoded=True),
                    headers=headers,
                    allow_redirects=False,
                )
        except (aiohttp.ClientConnectionError, *UPSTREAM_ERRORS) as e:
            self._down[node] = time.monotonic() + DOWN_FOR
            log.warning(
                "peer %s (owner of %s) cannot be asked: %s; fetching from %s, and not asking "
                "it again for %g s",
                node,
                digest,
                describe(e),
                origin.netloc,
                DOWN_FOR,
            )
            return None
        if response.status != 200:
            log.info(
                "peer %s answered %d for %s; fetching from %s",
                node,
                response.status,
                digest,
                origin.netloc,
            )
            response.release()
            return None
        # A ClientResponse is a SourceAnswer (its attributes are read-only properties,
        # which the protocol's plain attributes do not say).
        return cast(SourceAnswer, response)
