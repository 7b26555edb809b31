"""The peer front door: another node of the cluster asks this one, the owner, for a blob.

`GET /_peer/v2/<name>/blobs/<sha256 digest>?registry=<registry>` with a signature of the
cluster's key (peer_auth.py); `registry` is the registry as the index names it
(`ghcr.io`, `registry.lan:5000`, `http://registry.lan` for a plain-HTTP one). It is
served exactly as a mirror client's request for that blob would be: the same
destination rules (the registry must be in `intercept`, on port 443 (80 for plain HTTP)
or in `allowed_ports`, and resolve to no forbidden address), the same blob cache (a
peer's miss joins the fetch under way, or starts the one fetch), the cache's own
credentials upstream (anonymous, or `auth_registries`), `verify_client_access` asked
with none. So a peer gets nothing a client without credentials could not, only blobs,
and only by digest; anything else, or a request without a right signature, gets 403.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import peer_auth
from .destinations import DestinationRefused
from .mirror import MirrorRequestInvalid, parse_registry
from .peers import PEER_PREFIX, serving_peer
from .responses import error_response
from .routes import BadRoute, RouteKind, parse_route
from .upstream import Origin

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger(__name__)

_TARGET = re.compile(r"(?P<path>/v2/[^?]+)\?registry=(?P<registry>[A-Za-z0-9.:%\[\]-]+)")


def is_peer_path(raw: str) -> bool:
    return raw.startswith(PEER_PREFIX + "/")


class PeerDoor:
    def __init__(self, server: ProxyServer, key: bytes | None) -> None:
        self.server = server
        self.key = key  # None: this node is in no cluster, and refuses every peer request

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        client = request.remote or "-"
        raw = request.raw_path
        if self.key is None:
            return self._refuse(client, 403, "this registry cache is in no cluster (peers)")
        why = peer_auth.check(self.key, request.method, raw, request.headers.get(peer_auth.HEADER))
        if why:
            return self._refuse(client, 403, f"not a request of a node of this cluster: {why}")
        if request.method != "GET":
            return self._refuse(client, 405, "a peer asks for blobs with GET only")
        m = _TARGET.fullmatch(raw[len(PEER_PREFIX) :])
        if m is None:
            return self._refuse(client, 400, "expected /_peer/v2/<name>/blobs/<digest>?registry=")
        path = m["path"]
        try:
            route = parse_route(path)
            origin = self._origin(m["registry"])
        except (BadRoute, MirrorRequestInvalid) as e:
            return self._refuse(client, 400, str(e))
        if route.kind is not RouteKind.BLOB or not route.cacheable:
            return self._refuse(client, 403, "a peer may ask for blobs by sha256 digest only")
        refused = await self._refused_destination(origin)
        if refused:
            return self._refuse(client, 403, refused)
        # Only what a request for the blob needs: no Range, no credentials of anyone.
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() in ("host", "user-agent")
        )
        inner = request.clone(rel_url=URL(path, encoded=True), headers=headers)
        mark = serving_peer.set(True)  # the fetch this starts asks no peer in turn
        try:
            return await self.server.registry.serve(inner, origin, client, None, path, "peer")
        finally:
            serving_peer.reset(mark)

    def _origin(self, value: str) -> Origin:
        """The registry a peer names, as the index keys it (Origin.key)."""
        value = unquote(value)
        scheme = "https"
        if value.startswith("http://"):
            scheme, value = "http", value.removeprefix("http://")
        if "%" in value or "/" in value:
            raise MirrorRequestInvalid("registry must name a registry: [http://]host[:port]")
        host, port = parse_registry(value)
        if scheme == "http" and not re.search(r":\d+$", value):
            port = 80
        return Origin(scheme, host, port, mirror=True)

    async def _refused_destination(self, origin: Origin) -> str:
        """The CONNECT and mirror doors' rules for where the cache may fetch from."""
        config = self.server.config
        if origin.port != (443 if origin.scheme == "https" else 80) and (
            origin.port not in config.allowed_ports
        ):
            return f"port {origin.port} of {origin.netloc} is not in allowed_ports"
        if self.server.disposition(origin.host, origin.port) != "intercept":
            return f"{origin.netloc} is not a registry this cache may fetch from (intercept)"
        try:
            await self.server.destinations.resolve(origin.host, origin.port)
        except DestinationRefused as e:
            return str(e)
        except OSError as e:
            return f"cannot resolve {origin.host}: {e}"
        return ""

    def _refuse(self, client: str, status: int, message: str) -> web.Response:
        log.warning("peer request from %s refused (%d): %s", client, status, message)
        code = {400: "NAME_INVALID", 405: "UNSUPPORTED"}.get(status, "DENIED")
        return error_response(status, code, message)
