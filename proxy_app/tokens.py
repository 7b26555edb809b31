"""Bearer tokens the cache gets for itself, for clients that cannot do the token dance.

A client of the CONNECT front door talks to the registry as it would directly: it reads
the registry's `401` challenge, asks the realm for a token (through the cache, which adds
`auth_registries` credentials there) and sends it. A mirror client cannot: containerd
would ask `auth.docker.io` itself, which a node without internet cannot reach, and the
token it got would be for the mirror's name. So for mirror requests the cache answers the
challenge on its own: anonymously, or with the `auth_registries` credentials of the realm's
host (Docker Hub: `auth.docker.io`) or, failing that, of the registry's.

A token is kept per realm, service, scope and credential until shortly before it expires,
and one request fetches it however many ask at once. A registry that refuses a cached
token (it was revoked, the clock drifted) gets a new one once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from yarl import URL

# Tokens are renewed this long before they expire: a request takes time to arrive.
EXPIRY_MARGIN = 10.0
DEFAULT_LIFETIME = 60.0  # the token specification's default for `expires_in`
MAX_TOKENS = 10_000
MAX_TOKEN_RESPONSE = 64 << 10

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    realm: str
    service: str | None
    scope: str | None

    @property
    def token_url(self) -> URL:
        query = {k: v for k, v in (("service", self.service), ("scope", self.scope)) if v}
        return URL(self.realm).update_query(query)


def parse_bearer(header: str) -> Challenge | None:
    """A `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge, or None."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    values = {
        name.lower(): re.sub(r"\\(.)", r"\1", quoted) if unquoted == "" else unquoted
        for name, quoted, unquoted in _PARAM.findall(params)
    }
    realm = values.get("realm")
    if not realm:
        return None
    try:
        url = URL(realm)
    except ValueError:
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return Challenge(realm, values.get("service") or None, values.get("scope") or None)


class TokenUnavailable(Exception):
    """The realm gave no token (refused the credentials, answered no JSON)."""


# (challenge, Authorization sent to the realm or "") -> (token, when to renew it)
Fetch = Callable[[Challenge, str], Awaitable[tuple[str, float]]]
# (registry the token is for, result: cached, fetched, refused or error), for the metrics
Observe = Callable[[str, str], None]


class TokenCache:
    def __init__(self, fetch: Fetch, observe: Observe | None = None) -> None:
        self._fetch = fetch
        self._observe = observe or (lambda _registry, _result: None)
        self._tokens: OrderedDict[tuple[Challenge, str], tuple[str, float]] = OrderedDict()
        self._fetching: dict[tuple[Challenge, str], asyncio.Future[str]] = {}

    @staticmethod
    def _key(challenge: Challenge, credential: str) -> tuple[Challenge, str]:
        # Only a hash of the credential is kept beside the token.
        return challenge, hashlib.sha256(credential.encode()).hexdigest()

    async def token(self, challenge: Challenge, credential: str, registry: str = "") -> str:
        """A token for `challenge`, held or fetched; `registry` (the one that asked for
        it) is for the metrics only."""
        key = self._key(challenge, credential)
        held = self._tokens.get(key)
        if held is not None and held[1] > time.monotonic():
            self._tokens.move_to_end(key)
            self._observe(registry, "cached")
            return held[0]
        fetching = self._fetching.get(key)
        if fetching is None:
            fetching = asyncio.ensure_future(self._get(key, challenge, credential))
            self._fetching[key] = fetching
            fetching.add_done_callback(lambda _f: self._fetching.pop(key, None))
            try:
                token = await asyncio.shield(fetching)
            except TokenUnavailable:
                self._observe(registry, "refused")
                raise
            except Exception:
                self._observe(registry, "error")
                raise
            self._observe(registry, "fetched")
            return token
        self._observe(registry, "cached")  # joined another request's fetch
        return await asyncio.shield(fetching)

    async def _get(self, key: tuple[Challenge, str], challenge: Challenge, credential: str) -> str:
        token, renew_at = await self._fetch(challenge, credential)
        self._tokens[key] = (token, renew_at)
        self._tokens.move_to_end(key)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        return token

    def forget(self, challenge: Challenge, credential: str) -> None:
        """A registry refused the token: the next request gets a new one."""
        self._tokens.pop(self._key(challenge, credential), None)


def read_token(body: bytes) -> tuple[str, float]:
    """The token and the monotonic time to renew it, from a token endpoint's JSON."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise TokenUnavailable("the token endpoint answered no JSON") from e
    if not isinstance(data, dict):
        raise TokenUnavailable("the token endpoint answered no JSON object")
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenUnavailable("the token endpoint answered no token")
    lifetime = data.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_LIFETIME
    return token, time.monotonic() + max(float(lifetime) - EXPIRY_MARGIN, 1.0)
