"""verify_client_access: before content of a repository is served from the cache, the
upstream registry confirms that the client's credentials may read that repository.

Without it, whatever one client pulled with its own credentials (a private image) is
served to every client allowed to use the cache. With it, the cache asks upstream once per
repository and credential (a HEAD, which Docker Hub does not count as a pull) and
remembers a yes for ACCESS_TTL; a no is relayed as the registry gave it (401 with its
`WWW-Authenticate`, so a client goes and gets a token, 403, 404). The question is keyed on
the registry's scheme, host and port and on what the cache would send upstream for the
client, so clients without credentials share one answer, and the cache's own
`auth_registries` credentials count as theirs. Only that `Authorization` goes with the
question (no cookies, nothing else that could vouch for a client but is not in the key),
and a request with more than one `Authorization` header is refused.

Only a 2xx is a yes. A blob's HEAD may be redirected to storage (a CDN): the redirect is
followed, and the storage's answer is the one that counts.

A repository is the unit: a client that may read a repository is served any blob or
manifest asked for under its name by digest. Those are found by digest alone, which only
a reader of some manifest that names them knows.

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
from .upstream_share import RequestShare

# A yes is remembered this long: about a registry token's lifetime (Docker Hub: 300 s).
ACCESS_TTL = 300.0
# Enough for every credential and repository of a large fleet's last few minutes.
MAX_REMEMBERED = 10_000
# What of the registry's refusal the client is given.
RELAYED_HEADERS = ("www-authenticate", "docker-distribution-api-version", "retry-after")

ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


# Whom a yes is for: the registry (scheme, host, port), the repository, and a hash of the
# credential the cache sends for the client.
Key = tuple[Origin, str, str]


@dataclass(frozen=True)
class AccessRefused:
    status: int
    headers: Mapping[str, str]
    message: str = ""  # when the refusal is the cache's own, not the registry's
    # What the cache asked for, said after the registry's status in the client's message.
    why: str = (
        "with this client's credentials "
        "(verify_client_access: the cache serves only what upstream allows)"
    )

    def response(self, origin: Origin, route: Route) -> web.Response:
        """The registry's refusal, for one client (the same refusal may answer several)."""
        if self.message:
            code, message = "DENIED", self.message
        elif self.status == 404:
            # What the registry itself would say, so that clients that test for an unknown
            # manifest or blob (a tag that does not exist) read it right.
            code = "BLOB_UNKNOWN" if route.kind is RouteKind.BLOB else "MANIFEST_UNKNOWN"
            message = f"{route.name}:{route.reference} is not known to {origin.netloc}"
        else:
            code = ERROR_CODES.get(self.status) or (
                "UNAVAILABLE" if self.status >= 500 else "DENIED"
            )
            message = f"{origin.netloc} answered {self.status} for {route.name} {self.why}"
        return error_response(self.status, code, message, "DENIED", headers=dict(self.headers))


# Several Authorization headers: which one a registry would use is its own business.
AMBIGUOUS = AccessRefused(400, {}, "send one Authorization header, not several")


class ClientAccess:
    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._granted: OrderedDict[Key, float] = OrderedDict()
        # One question upstream at a time per key: a pull asks for its layers at once.
        self._asking: dict[Key, asyncio.Future[AccessRefused | None]] = {}

    async def check(
        self, origin: Origin, route: Route, client_headers: Mapping[str, str]
    ) -> AccessRefused | None:
        """None when the client may read route's repository; else the registry's refusal.
        Raises the upstream error when the registry cannot be asked."""
        question = question_for(client_headers)
        if isinstance(question, AccessRefused):
            return question
        # What the cache would send: the client's credential, or the cache's own for it.
        sent = self._upstream.request_headers(origin, question).get("Authorization", "")
        key = (origin, route.name, hashlib.sha256(sent.encode()).hexdigest())
        until = self._granted.get(key)
        if until is not None and until > time.monotonic():
            self._granted.move_to_end(key)
            return None
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key, origin, route, question))
            self._asking[key] = asking
            asking.add_done_callback(functools.partial(self._asked, key))
        return await asyncio.shield(asking)

    def _asked(self, key: Key, asking: asyncio.Future[AccessRefused | None]) -> None:
        del self._asking[key]
        if not asking.cancelled():
            # Retrieved here too: every client that waited for it may have gone already.
            asking.exception()

    async def _ask(
        self,
        key: Key,
        origin: Origin,
        route: Route,
        question: Mapping[str, str],
    ) -> AccessRefused | None:
        answer = await ask(self._upstream, origin, route, question)
        if isinstance(answer, AccessRefused):
            self._metrics.access_checks.labels("refused").inc()
            return answer
        self._metrics.access_checks.labels("granted").inc()
        self._granted[key] = time.monotonic() + ACCESS_TTL
        self._granted.move_to_end(key)
        while len(self._granted) > MAX_REMEMBERED:
            self._granted.popitem(last=False)
        return None


def question_for(client_headers: Mapping[str, str]) -> dict[str, str] | AccessRefused:
    """What goes with a question to the registry about a client: its one Authorization
    (nothing else that could vouch for it) and its Accept list."""
    # items(), not get(): a multidict gives every Authorization header it holds.
    given = [v for k, v in client_headers.items() if k.lower() == "authorization"]
    if len(given) > 1:
        return AMBIGUOUS
    # Clients send Accept several times (one media type each): all of them go, joined.
    accept = [v for k, v in client_headers.items() if k.lower() == "accept"]
    question = {"Accept": ", ".join(accept)} if accept else {}
    if given:
        question["Authorization"] = given[0]
    return question


async def ask(
    upstream: Upstream,
    origin: Origin,
    route: Route,
    question: Mapping[str, str],
    *,
    share: RequestShare | None = None,
    deadline: float | None = None,
    why: str | None = None,
) -> Mapping[str, str] | AccessRefused:
    """Asks the registry (a HEAD) whether route's blob or manifest may be read with the
    question's credential: the yes's headers (a 2xx), or its refusal as the registry gave
    it. A blob's redirect to storage is followed; a manifest's confirms nothing."""
    blob = route.kind is RouteKind.BLOB
    response = await upstream.request(
        "HEAD",
        origin,
        f"/v2/{route.name}/{'blobs' if blob else 'manifests'}/{route.reference}",
        question,
        follow_redirects=blob,
        exact=True,
        share=share,
        deadline=deadline,
    )
    try:
        if 200 <= response.status < 300:
            return response.headers
        if response.status < 400:
            # A redirect of a manifest (to another scheme, to a login page) confirms
            # nothing, and a client could not follow it here.
            return AccessRefused(
                403,
                {},
                f"{origin.netloc} answered {response.status} (a redirect) when asked whether "
                f"this client may read {route.name}; access cannot be confirmed",
            )
        relayed = {k: v for k, v in response.headers.items() if k.lower() in RELAYED_HEADERS}
        if why is None:
            return AccessRefused(response.status, relayed)
        return AccessRefused(response.status, relayed, why=why)
    finally:
        response.release()
