"""verify_client_access: before content of a repository is served from the cache, the
upstream registry confirms that the client's credentials may read that repository.

Without it, whatever one client pulled with its own credentials (a private image) is
served to every client allowed to use the cache. With it, the cache asks upstream once per
repository and credential (a HEAD, which Docker Hub does not count as a pull) and
remembers a yes for ACCESS_TTL; a no is relayed as the registry gave it (401 with its
`WWW-Authenticate`, so a client goes and gets a token, 403, 404). The question is keyed on
what the cache would send upstream for the client, so clients without credentials share
one answer, and the cache's own `auth_registries` credentials count as theirs.

A repository is the unit: a client that may read a repository is served any blob asked
for under its name. Blobs are found by digest alone, which only a reader of some
manifest that names it knows.

When upstream cannot be reached nothing can be confirmed and the request fails (502):
this mode gives up serving cached content through an upstream outage.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from .metrics import Metrics
from .responses import error_response
from .routes import Route, RouteKind
from .upstream import Origin, Upstream

# A yes is remembered this long: about a registry token's lifetime (Docker Hub: 300 s).
ACCESS_TTL = 300.0
# Enough for every credential and repository of a large fleet's last few minutes.
MAX_REMEMBERED = 10_000
# What of the registry's refusal the client is given.
RELAYED_HEADERS = ("www-authenticate", "docker-distribution-api-version", "retry-after")

ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}


@dataclass(frozen=True)
class AccessRefused:
    status: int
    headers: Mapping[str, str]

    def response(self, origin: Origin, route: Route) -> web.Response:
        """The registry's refusal, for one client (the same refusal may answer several)."""
        return error_response(
            self.status,
            ERROR_CODES.get(self.status) or ("UNAVAILABLE" if self.status >= 500 else "DENIED"),
            f"{origin.netloc} answered {self.status} for {route.name} with this client's "
            "credentials (verify_client_access: the cache serves only what upstream allows)",
            "DENIED",
            headers=dict(self.headers),
        )


class ClientAccess:
    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._granted: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        # One question upstream at a time per key: a pull asks for its layers at once.
        self._asking: dict[tuple[str, str, str], asyncio.Future[AccessRefused | None]] = {}

    async def check(
        self, origin: Origin, route: Route, client_headers: Mapping[str, str]
    ) -> AccessRefused | None:
        """None when the client may read route's repository; else the registry's refusal.
        Raises the upstream error when the registry cannot be asked."""
        headers = self._upstream.request_headers(origin, client_headers)
        credential = hashlib.sha256(headers.get("Authorization", "").encode()).hexdigest()
        key = (origin.netloc, route.name, credential)
        until = self._granted.get(key)
        if until is not None and until > time.monotonic():
            self._granted.move_to_end(key)
            return None
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key, origin, route, client_headers))
            self._asking[key] = asking
            asking.add_done_callback(functools.partial(self._asked, key))
        return await asyncio.shield(asking)

    def _asked(
        self, key: tuple[str, str, str], asking: asyncio.Future[AccessRefused | None]
    ) -> None:
        del self._asking[key]
        if not asking.cancelled():
            # Retrieved here too: every client that waited for it may have gone already.
            asking.exception()

    async def _ask(
        self,
        key: tuple[str, str, str],
        origin: Origin,
        route: Route,
        client_headers: Mapping[str, str],
    ) -> AccessRefused | None:
        what = "blobs" if route.kind is RouteKind.BLOB else "manifests"
        response = await self._upstream.request(
            "HEAD", origin, f"/v2/{route.name}/{what}/{route.reference}", client_headers
        )
        try:
            # A redirect (blobs are often sent to a CDN) is a yes: the registry would serve.
            if response.status < 400:
                self._metrics.access_checks.labels("granted").inc()
                self._granted[key] = time.monotonic() + ACCESS_TTL
                self._granted.move_to_end(key)
                while len(self._granted) > MAX_REMEMBERED:
                    self._granted.popitem(last=False)
                return None
            self._metrics.access_checks.labels("refused").inc()
            relayed = {k: v for k, v in response.headers.items() if k.lower() in RELAYED_HEADERS}
            return AccessRefused(response.status, relayed)
        finally:
            response.release()
