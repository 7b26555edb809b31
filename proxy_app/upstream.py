"""Requests to upstream registries: one client session, credentials, redirects.

The client's own `Authorization` goes upstream unchanged. When it sends none and
`auth_registries` names the request's host, Basic credentials are added; for Docker
Hub that host is the token realm `auth.docker.io`, so the credentials travel only to
the token endpoint, never to the registry or to a CDN. Redirects (blob storage on a CDN
or S3) are followed here for cached content, without the registry's Authorization.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .config import Config, Credentials
from .content_coding import EXACT_BYTES, ContentCodingError, decode_body
from .destinations import DestinationPolicy, GuardedResolver, host_matches
from .metrics import Metrics
from .tokens import (
    MAX_TOKEN_RESPONSE,
    Challenge,
    TokenCache,
    TokenUnavailable,
    parse_bearer,
    read_token,
)
from .upstream_share import LIMIT_PER_HOST, RequestShare

log = logging.getLogger(__name__)

# Headers that describe one connection, not the message; never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# Headers that describe a request body: they go only with the body they describe.
BODY_FRAMING = ("Content-Length", "Transfer-Encoding", "Expect", "Content-Encoding")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError)


_URL_USERINFO = re.compile(r"(\w+://)[^/@\s'\"]+@")
_URL_QUERY = re.compile(r"(\w+://[^\s?'\"]+)\?[^\s'\"]*")


def describe(error: BaseException) -> str:
    """An error's first line for a client's answer and the log, without secrets: a URL's
    user and password (a parent proxy's) and its query (a CDN's signature) are cut."""
    text = str(error) or type(error).__name__
    text = _URL_QUERY.sub(r"\1?…", _URL_USERINFO.sub(r"\1…@", text))
    return text.splitlines()[0][:200]


def basic_auth(username: str, password: str) -> str:
    """An `Authorization` (or `Proxy-Authorization`) value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class UpstreamRefused(Exception):
    """A request whose registry challenge the cache answered itself (a mirror client's, or
    one the cache holds credentials for) and that the registry still refused: answered to
    the client with `status` and `code`, never with a challenge it cannot answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _domain(host: str) -> str:
    """The last two labels of a name (docker.io for auth.docker.io): whom a registry's
    credentials may be shown to when its token realm is another host."""
    return ".".join(host.lower().rstrip(".").split(".")[-2:])


@dataclass(frozen=True)
class Origin:
    """Where a client's request is really going: scheme, host and port of a registry."""

    scheme: str
    host: str
    port: int
    # Asked for through the mirror front door: the client has no credentials of its own
    # upstream, so the cache answers Bearer challenges itself (tokens.py), and a 401 it
    # cannot answer becomes a registry-style refusal (UpstreamRefused), never a challenge.
    mirror: bool = False

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def key(self) -> str:
        """The registry as the index names it: plain HTTP apart from HTTPS on the same
        host, which another party on the path could answer for."""
        return self.netloc if self.scheme == "https" else f"http://{self.netloc}"

    def url(self, path_and_query: str) -> URL:
        return URL(f"{self.scheme}://{self.netloc}{path_and_query}", encoded=True)


def forwardable(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Request or response headers minus the hop-by-hop ones (and their Connection list)."""
    listed = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower not in HOP_BY_HOP and lower not in listed:
            out.add(key, value)
    return out


class Upstream:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._credentials: Mapping[str, Credentials] = config.auth_registries
        self._proxy = config.upstream_proxy
        ctx = ssl.create_default_context()
        if config.upstream_ca_bundle is not None:
            ctx.load_verify_locations(cafile=str(config.upstream_ca_bundle))
        self._ssl = ctx
        self._policy = DestinationPolicy(config)
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenCache(self._fetch_token, metrics.token if metrics else None)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            ssl=self._ssl,
            limit=0,
            limit_per_host=LIMIT_PER_HOST,
            ttl_dns_cache=60,
            resolver=GuardedResolver(self._policy),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through exactly as the registry sent them
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=120),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def credentials_for(self, origin: Origin) -> Credentials | None:
        host = origin.host.lower()
        return self._credentials.get(f"{host}:{origin.port}") or self._credentials.get(host)

    def request_headers(
        self, origin: Origin, client_headers: Mapping[str, str], cache_credentials: bool = True
    ) -> CIMultiDict[str]:
        headers = forwardable(client_headers)
        # Never over plain HTTP: anyone on the path would read the password.
        if cache_credentials and origin.scheme == "https" and "Authorization" not in headers:
            creds = self.credentials_for(origin)
            if creds is not None:
                headers["Authorization"] = basic_auth(creds.username, creds.password)
        return headers

    async def request(
        self,
        method: str,
        origin: Origin,
        path_and_query: str,
        client_headers: Mapping[str, str],
        **options: Any,
    ) -> aiohttp.ClientResponse:
        """Sends a request upstream (see _request); its answer's status class (or `error`
        when none came) is counted per registry."""
        try:
            response = await self._request(
                method, origin, path_and_query, client_headers, **options
            )
        except UpstreamRefused:
            self._answered(origin, 401)  # the registry refused the cache's own token
            raise
        except UPSTREAM_ERRORS:
            self._answered(origin, None)
            raise
        self._answered(origin, response.status)
        return response

    def _answered(self, origin: Origin, status: int | None) -> None:
        if self._metrics is not None:
            self._metrics.upstream_answer(origin.netloc, status)

    async def _request(
        self,
        method: str,
        origin: Origin,
        path_and_query: str,
        client_headers: Mapping[str, str],
        *,
        data: Any = None,
        follow_redirects: bool = False,
        cache_credentials: bool = True,
        exact: bool = False,
        share: RequestShare | None = None,
        deadline: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Sends a request upstream; the caller must release the response.

        `exact`: the cache will hash what comes back, so it asks for the registry's exact
        bytes (identity), whatever coding the client would accept.
        `share`: the client's share of the registry's connections, taken first (waiting
        for it is bounded only by `deadline`: a client's own requests queue behind its own).
        The answer's head must come within upstream_timeout (unless a body is sent), and
        before `deadline` (the event loop's clock) when one is given; TimeoutError after."""
        loop = asyncio.get_running_loop()
        if share is not None:
            if deadline is None:
                await share.take(origin.netloc)
            else:
                async with asyncio.timeout_at(deadline):
                    await share.take(origin.netloc)
        # A request with a body (a push's layer) may take as long as its upload takes.
        until = None if data is not None else loop.time() + self._config.upstream_timeout
        if deadline is not None:
            until = deadline if until is None else min(until, deadline)
        async with asyncio.timeout_at(until):
            response = await self._send(
                method,
                origin,
                path_and_query,
                client_headers,
                data,
                follow_redirects,
                cache_credentials,
                exact,
            )
            if response.status != 401:
                return response
            challenge = parse_bearer(response.headers.get("WWW-Authenticate", ""))
            credential = self._realm_credential(origin, challenge) if challenge else ""
            if not origin.mirror and not (
                credential and data is None and "Authorization" not in client_headers
            ):
                # A client of its own: it answers the challenge itself, as it would the
                # registry directly (the cache adds no credentials to its token request).
                return response
            # A mirror client cannot answer the registry's challenge, and the cache's
            # credentials never go to a client (which could hand a token made with them
            # to another registry): the cache answers it on its own upstream leg.
            response.release()
            if challenge is None or data is not None:
                raise self._refused(origin, path_and_query, None)
            return await self._with_token(
                challenge,
                credential,
                method,
                origin,
                path_and_query,
                client_headers,
                follow_redirects,
                exact,
            )

    async def _with_token(
        self,
        challenge: Challenge,
        credential: str,
        method: str,
        origin: Origin,
        path_and_query: str,
        client_headers: Mapping[str, str],
        follow_redirects: bool,
        exact: bool,
    ) -> aiohttp.ClientResponse:
        """The request again with a token the cache got for `challenge`; a token the
        registry refuses is replaced once. Raises UpstreamRefused when none is accepted."""
        headers = CIMultiDict(client_headers)
        headers.popall("Authorization", None)
        for _ in range(2):
            try:
                token = await self.tokens.token(challenge, credential, origin.netloc)
            except TokenUnavailable as e:
                raise self._refused(origin, path_and_query, f"no token: {e}") from e
            headers["Authorization"] = f"Bearer {token}"
            response = await self._send(
                method, origin, path_and_query, headers, None, follow_redirects, False, exact
            )
            if response.status != 401:
                return response
            response.release()
            self.tokens.forget(challenge, credential)  # revoked or expired early
        raise self._refused(origin, path_and_query, "the registry refused its token")

    def _realm_credential(self, origin: Origin, challenge: Challenge) -> str:
        """Basic credentials for the token realm: those of the realm's host, else the
        registry's, and only when the realm is in the registry's own domain (a registry
        naming another's realm must not get a token made with that one's credentials)."""
        realm = URL(challenge.realm)
        realm_host = (realm.host or "").lower()
        if realm.scheme != "https":
            return ""
        realm_port = realm.port or 443
        creds = self._credentials.get(f"{realm_host}:{realm_port}") or self._credentials.get(
            realm_host
        )
        if creds is not None and creds.registries:
            # Bound to the registries listed with them (auth_registries' `registries`).
            bound = host_matches(creds.registries, origin.host.lower(), origin.port)
        else:
            bound = _domain(realm_host) == _domain(origin.host)
            creds = creds or self.credentials_for(origin)
        return basic_auth(creds.username, creds.password) if creds and bound else ""

    def _refused(self, origin: Origin, path: str, why: str | None) -> UpstreamRefused:
        name = path.split("?", 1)[0].removeprefix("/v2/")
        name = re.split(r"/(?:manifests|blobs|tags)/", name, maxsplit=1)[0][:200]
        if self.credentials_for(origin) is None and why is None:
            return UpstreamRefused(
                404,
                "NAME_UNKNOWN",
                f"{origin.netloc} refused {name} to the registry cache, which has no "
                "credentials for it: the repository does not exist, or it is private "
                "(add its credentials to auth_registries)",
            )
        return UpstreamRefused(
            403,
            "DENIED",
            f"{origin.netloc} refused {name} to the registry cache's credentials"
            + (f" ({why})" if why else "")
            + ": check auth_registries",
        )

    async def _fetch_token(self, challenge: Challenge, credential: str) -> tuple[str, float]:
        """Asks a token realm for a token (the destination policy applies to it too)."""
        url = challenge.token_url
        self._policy.check_redirect(url)
        headers = {"Authorization": credential, **EXACT_BYTES} if credential else EXACT_BYTES
        async with self.session.get(
            url, headers=headers, proxy=self._proxy, allow_redirects=False
        ) as response:
            body = bytearray()
            async for chunk in response.content.iter_chunked(16 << 10):
                body += chunk
                if len(body) > MAX_TOKEN_RESPONSE:
                    raise TokenUnavailable(f"{url.host} answered more than 64 KiB")
            if response.status != 200:
                raise TokenUnavailable(f"{url.host} answered {response.status}")
            try:
                return read_token(decode_body(bytes(body), response.headers, MAX_TOKEN_RESPONSE))
            except ContentCodingError as e:
                raise TokenUnavailable(f"{url.host}: {e}") from e

    async def _send(
        self,
        method: str,
        origin: Origin,
        path_and_query: str,
        client_headers: Mapping[str, str],
        data: Any,
        follow_redirects: bool,
        cache_credentials: bool,
        exact: bool,
    ) -> aiohttp.ClientResponse:
        # The cache's credentials go only to the registry API (/v2/, a Basic-auth
        # registry), never with a client's request to anything else: a token endpoint
        # would mint a token with them that the client could hand to any registry.
        path = path_and_query.split("?", 1)[0]
        cache_credentials = cache_credentials and (path == "/v2" or path.startswith("/v2/"))
        headers = self.request_headers(origin, client_headers, cache_credentials)
        if exact:
            headers.update(EXACT_BYTES)
        if data is None:
            # A body announced but not sent would leave the registry waiting for it.
            for framing in BODY_FRAMING:
                headers.popall(framing, None)
        url = origin.url(path_and_query)
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=self._proxy,
            )
            location = response.headers.get("Location")
            if not (follow_redirects and response.status in REDIRECT_STATUSES and location):
                return response
            response.release()
            try:
                target = url.join(URL(location, encoded=True))
            except ValueError as e:
                raise aiohttp.InvalidURL(location[:200]) from e
            self._policy.check_redirect(target)
            if target.origin() != url.origin():
                # The registry's credentials are for the registry; a CDN or S3 URL carries
                # its own signature and must not see them.
                headers = CIMultiDict((k, v) for k, v in headers.items() if k != "Authorization")
            if response.status == 303:
                method = "GET"
            url = target
        raise aiohttp.TooManyRedirects(response.request_info, response.history)
