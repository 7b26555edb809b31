"""ClientAccess against a small registry on loopback that answers HEAD 200 to one token
and 401 to anything else, slowly: concurrent questions for one repository and credential
go upstream once, a yes is remembered per repository and credential, a no never is, and a
registry that cannot be reached is an error (nothing is served unconfirmed)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy_app.client_access import AccessRefused, ClientAccess
from proxy_app.config import Config
from proxy_app.metrics import Metrics
from proxy_app.routes import parse_route
from proxy_app.upstream import Origin, Upstream

GOOD = "Bearer good"
COOKIE = "session=alice"
DIGEST = "sha256:" + "ab" * 32


@asynccontextmanager
async def slow_registry() -> AsyncIterator[tuple[Origin, Counter[str], web.AppRunner]]:
    asked: Counter[str] = Counter()

    async def head(request: web.Request) -> web.Response:
        asked[f"{request.match_info['name']} {request.headers.get('Authorization')}"] += 1
        await asyncio.sleep(0.2)  # long enough for the concurrent questions to meet
        if request.headers.get("Authorization") == GOOD:
            return web.Response(status=200)
        if request.headers.get("Cookie") == COOKIE:  # a session a registry would accept
            return web.Response(status=200)
        if request.match_info["name"] == "sso/app":  # a front that sends strangers to log in
            return web.Response(status=302, headers={"Location": "https://login.example/"})
        return web.Response(
            status=401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token"'}
        )

    app = web.Application()
    app.router.add_route("HEAD", "/v2/{name:.+}/{what:blobs|manifests}/{reference}", head)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Origin("http", "127.0.0.1", runner.addresses[0][1]), asked, runner
    await runner.cleanup()


def test_questions_are_shared_and_only_a_yes_is_remembered() -> None:
    async def scenario() -> None:
        async with slow_registry() as (origin, asked, runner):
            upstream = Upstream(Config())
            await upstream.start()
            access = ClientAccess(upstream, Metrics())
            blob = parse_route(f"/v2/team/app/blobs/{DIGEST}")
            tag = parse_route("/v2/team/app/manifests/latest")
            other = parse_route("/v2/team/other/manifests/latest")
            try:
                answers = await asyncio.gather(
                    *(access.check(origin, blob, {"Authorization": GOOD}) for _ in range(10))
                )
                assert answers == [None] * 10
                assert asked == {f"team/app {GOOD}": 1}, asked  # ten clients, one question

                assert await access.check(origin, tag, {"Authorization": GOOD}) is None
                assert asked[f"team/app {GOOD}"] == 1, "the yes for team/app was not remembered"
                assert await access.check(origin, other, {"Authorization": GOOD}) is None
                assert asked[f"team/other {GOOD}"] == 1, "a yes for one repository opened another"

                for _ in range(2):
                    refused = await access.check(origin, tag, {"Authorization": "Bearer stolen"})
                    assert isinstance(refused, AccessRefused) and refused.status == 401
                    assert refused.headers["WWW-Authenticate"].startswith("Bearer realm=")
                    assert await access.check(origin, tag, {}) is not None
                assert asked["team/app Bearer stolen"] == 2, "a no was remembered"
                assert asked["team/app None"] == 2

                # Only the keyed credential goes with the question: a cookie that would
                # vouch for one client must not open the repository for every anonymous one.
                cookie = await access.check(origin, tag, {"Cookie": COOKIE})
                assert cookie is not None and cookie.status == 401
                assert await access.check(origin, tag, {}) is not None
                # Two Authorization headers: refused without asking.
                before = sum(asked.values())
                two = CIMultiDict([("Authorization", ""), ("Authorization", GOOD)])
                ambiguous = await access.check(origin, tag, two)
                assert ambiguous is not None and ambiguous.status == 400
                assert sum(asked.values()) == before
                # A redirect of a manifest (to a login page) is not a yes.
                sso = await access.check(origin, parse_route("/v2/sso/app/manifests/1"), {})
                assert sso is not None and sso.status == 403
                # A yes over https is not one over http (another registry, as far as the
                # cache can tell), though both are the same host on default ports.
                plain = Origin("https", origin.host, origin.port)
                with pytest.raises(aiohttp.ClientError):  # there is no TLS there to ask
                    await access.check(plain, tag, {"Authorization": GOOD})

                await runner.cleanup()  # upstream gone: nothing new can be confirmed
                with pytest.raises(aiohttp.ClientError):
                    await access.check(origin, tag, {"Authorization": "Bearer new"})
            finally:
                await upstream.close()

    asyncio.run(scenario())
