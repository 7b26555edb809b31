"""The mirror front door: registry API requests addressed to the cache itself.

containerd's hosts.toml, podman's registries.conf and Docker's `registry-mirrors` point at
a mirror, not at a proxy: they send origin-form `/v2/...` requests to the cache. The
upstream is named, in this order, by

1. `?ns=<registry>`, containerd's convention (the parameter is not sent upstream);
2. a path prefix `/v2/<registry>/<name>/...`, where the first component names a registry
   (it has a `.` or a `:`, or is `localhost`), so `cache:3128/ghcr.io/org/app:1` works as
   an image name and podman can mirror to `cache:3128/ghcr.io`;
3. neither: `mirror_default_registry` (`docker.io`), for Docker's `registry-mirrors`.

`docker.io`, `index.docker.io` and `registry-1.docker.io` all mean Docker Hub. What comes
after is the CONNECT front door's dispatch, over the same store: the same access rules
(`allowed_clients`; proxy `users`, here as `Authorization: Basic`, with their allow lists;
`intercept`; the destination policy; no pushes), and the cache authenticates upstream on
the client's behalf (`Origin.mirror`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .connections import TLS_HANDSHAKE_TIMEOUT, Holding, Slot, feed_read_bytes
from .destinations import DestinationRefused, valid_host_name
from .registry_names import DOCKER_HUB, DOCKER_HUB_NAMES
from .responses import API_VERSION, CACHE_HEADER, error_response
from .routes import PUSH_METHODS
from .upstream import Origin

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger(__name__)

CHECKED_FOR = 10.0  # seconds a registry's passed destination check is taken as it is
CHECKED_KEPT = 1024  # registries remembered so at most

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class MirrorRequestInvalid(Exception):
    """A registry name or path the mirror cannot take (400, with this message)."""


@dataclass(frozen=True)
class MirrorTarget:
    host: str
    port: int
    path: str  # what goes upstream: /v2/<name>/... and the query, less `ns`
    named_by: str  # "ns", "prefix" or "default"

    @property
    def netloc(self) -> str:
        return Origin("https", self.host, self.port).netloc


def parse_registry(value: str) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` as a registry name: (host, port). Raises
    MirrorRequestInvalid with what is wrong."""
    shown = value[:100]
    if not value or len(value) > 261:
        raise MirrorRequestInvalid(f"{shown!r} is not a registry name (host or host:port)")
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise MirrorRequestInvalid(f"{shown!r} is not a registry name ([address]:port)")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = value.partition(":")
        if ":" in port_text:
            raise MirrorRequestInvalid(f"{shown!r}: an IPv6 address must be in [brackets]")
    host = host.lower().rstrip(".")
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise MirrorRequestInvalid(f"{shown!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    else:
        port = 443
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not (valid_host_name(host) and all(_LABEL.fullmatch(x) for x in host.split("."))):
            raise MirrorRequestInvalid(
                f"{shown!r} is not a registry name: a DNS name (letters, digits, '-' and "
                "'.') or an IP address, with an optional :port"
            ) from None
    if host in DOCKER_HUB_NAMES and port == 443:
        host = DOCKER_HUB
    return host, port


def names_registry(component: str) -> bool:
    """Whether a path's first component is a registry rather than a repository's first
    part (the same rule as Docker's image references)."""
    return "." in component or ":" in component or component == "localhost"


def resolve(raw: str, default_registry: str) -> MirrorTarget:
    """The upstream and its path for an origin-form request target under /v2."""
    path, sep, query = raw.partition("?")
    params = query.split("&") if sep else []
    ns_values = [p[3:] for p in params if p.startswith("ns=")]
    kept = [p for p in params if p and not p.startswith("ns=") and p != "ns"]
    if len(ns_values) > 1 or "ns" in params:
        raise MirrorRequestInvalid("name the registry once, as ns=<registry>")
    upstream_query = ("?" + "&".join(kept)) if kept else ""
    if ns_values:
        value = unquote(ns_values[0])
        if "%" in value:
            raise MirrorRequestInvalid("ns must name a registry, not percent-encode one twice")
        host, port = parse_registry(value)
        return MirrorTarget(host, port, path + upstream_query, "ns")
    parts = path.split("/", 3)  # "", "v2", first, rest
    if len(parts) == 4 and names_registry(parts[2]) and parts[3]:
        if "%" in parts[2]:
            raise MirrorRequestInvalid("a registry in the path must not be percent-encoded")
        host, port = parse_registry(parts[2])
        return MirrorTarget(host, port, f"/v2/{parts[3]}{upstream_query}", "prefix")
    host, port = parse_registry(default_registry)
    return MirrorTarget(host, port, path + upstream_query, "default")


def is_mirror_path(raw: str) -> bool:
    path = raw.split("?", 1)[0]
    return path == "/v2" or path.startswith("/v2/")


class MirrorDoor:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.config = server.config
        # Registries whose addresses passed the destination check lately: (host, port) ->
        # until when. Every connection upstream is checked again by the guarded resolver;
        # this one is for a clear 403, and need not cost a lookup on every request.
        self._checked: dict[tuple[str, int], float] = {}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        server = self.server
        client = request.remote or "-"
        if not server.client_allowed(client):
            return error_response(403, "DENIED", f"client {client} is not in allowed_clients")
        authorization = request.headers.get("Authorization")
        ok, user = await server.proxy_user(authorization)
        if not ok:
            return error_response(
                401,
                "UNAUTHORIZED",
                "this registry cache needs a proxy user: send Authorization: Basic",
                headers={"WWW-Authenticate": 'Basic realm="registry-cache"'},
            )
        try:
            target = resolve(request.raw_path, self.config.mirror_default_registry)
        except MirrorRequestInvalid as e:
            return error_response(400, "NAME_INVALID", str(e))
        if request.method in PUSH_METHODS:
            # A mirror client has no credentials upstream, so a push would go with the
            # cache's own: the mirror is read-only, whatever allow_push says.
            return error_response(
                405,
                "UNSUPPORTED",
                "the registry cache's mirror is read-only: push to the registry itself "
                "(or through the cache as a proxy, with allow_push)",
                headers={"Allow": "GET, HEAD"},
            )
        if target.path.split("?", 1)[0] in ("/v2", "/v2/"):
            # The API ping is the cache's own: it speaks the registry API for every upstream.
            return web.json_response({}, headers={CACHE_HEADER: "PASS", **API_VERSION})
        refused = await self._refused_target(target)
        if refused is not None:
            return refused
        origin = Origin("https", target.host, target.port, mirror=True)
        # The client's Authorization is its proxy user's (or nothing): never sent upstream.
        headers = CIMultiDict(request.headers)
        headers.popall("Authorization", None)
        inner = request.clone(rel_url=URL(target.path, encoded=True), headers=headers)
        return await server.registry.serve(inner, origin, client, user, target.path, "mirror")

    async def _refused_target(self, target: MirrorTarget) -> web.Response | None:
        """The same destination rules as a CONNECT: port, intercept, resolved addresses."""
        host, port = target.host, target.port
        if port != 443 and port not in self.config.allowed_ports:
            return error_response(
                403, "DENIED", f"port {port} of {target.netloc} is not in allowed_ports"
            )
        if self.server.disposition(host, port) != "intercept":
            return error_response(
                403,
                "DENIED",
                f"{target.netloc} is not a registry this cache may fetch from (intercept); "
                "registries in passthrough cannot be mirrored",
            )
        now = time.monotonic()
        if self._checked.get((host, port), 0.0) > now:
            return None
        try:
            await self.server.destinations.resolve(host, port)
        except DestinationRefused as e:
            return error_response(403, "DENIED", str(e))
        except OSError as e:
            return error_response(502, "UNAVAILABLE", f"cannot resolve {host}: {e}")
        if len(self._checked) >= CHECKED_KEPT:
            self._checked = {k: t for k, t in self._checked.items() if t > now}
        if len(self._checked) < CHECKED_KEPT:
            self._checked[(host, port)] = now + CHECKED_FOR
        return None

    async def tls(
        self, transport: asyncio.Transport, slot: Slot, client: str, hello: bytes
    ) -> None:
        """TLS for the cache's own names (mirror_names), whatever the client's SNI; inside,
        the same HTTP as on the plain listener: the mirror front door and the own pages."""
        loop = asyncio.get_running_loop()
        holding = Holding()
        try:
            context = self.server.ca.own_context(self.server.mirror_names)
        except ValueError as e:
            log.error("cannot answer TLS from %s: %s", client, e)
            transport.abort()
            slot.release()
            return
        starting = asyncio.ensure_future(
            loop.start_tls(
                transport,
                holding,
                context,
                server_side=True,
                ssl_handshake_timeout=min(TLS_HANDSHAKE_TIMEOUT, self.config.head_timeout),
            )
        )
        # start_tls puts its TLS protocol on the transport and schedules its start; the
        # ClientHello bytes already read are handed to it right behind that start.
        await asyncio.sleep(0)
        loop.call_soon(feed_read_bytes, transport.get_protocol(), hello)
        try:
            tls = await starting
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
            log.warning("TLS handshake with %s (mirror) failed: %s", client, e)
            transport.abort()
            slot.release()
            return
        if tls is None:
            transport.abort()
            slot.release()
            return
        holding.hand_over(tls, self.server.plain_http(), slot)
