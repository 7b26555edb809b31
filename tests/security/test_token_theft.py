"""Issue 15, Must show 4: the cache's registry credentials never reach a hostile registry.

`loopback-alias.rcsec.test` (another domain than the real registry's rc.test) answers
every request with a Bearer challenge naming *our* token realm (auth.rc.test, for which
auth_registries holds credentials) and the scope of our private repository. A client that
pulls from it through the cache, and `registry-cache prefetch`, must never obtain a token
made with our credentials; the hostile registry records every Authorization it gets.
Pulls from the real registry keep working for clients without credentials, through
CONNECT and through the mirror.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from security.conftest import LOOPBACK_ALIAS
from support.durability import cli
from support.images import Image, layout_blobs, pull, skopeo
from support.net import HOSTNAMES
from support.proxy import Proxy
from support.servers import AioThread, AppServer
from support.topology import TOKEN_CREDS, Pki, TokenSetup

pytestmark = pytest.mark.integration


class HostileRegistry(AppServer):
    """Challenges every client with another registry's realm and private scope."""

    def __init__(self, aio: AioThread, pki: Pki, token_setup: TokenSetup) -> None:
        super().__init__(aio, LOOPBACK_ALIAS, pki.ca.issue("hostile", [LOOPBACK_ALIAS]))
        issuer = token_setup.issuer
        self.challenge = (
            f'Bearer realm="{issuer.realm}",service="{issuer.service}",'
            'scope="repository:tok/app:pull"'
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.record(request)
        if request.path in ("/v2/", "/v2") and not request.headers.get("Authorization"):
            return web.json_response({}, status=401, headers={"WWW-Authenticate": self.challenge})
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "token please"}]},
            status=401,
            headers={"WWW-Authenticate": self.challenge},
        )

    def tokens_received(self) -> list[str]:
        return [s.authorization for s in self.seen if s.authorization]


@pytest.fixture
def hostile(
    aio: AioThread, pki: Pki, token_setup: TokenSetup, upstream_ports: set[int], hostile_names
) -> Iterator[HostileRegistry]:
    server = HostileRegistry(aio, pki, token_setup)
    server.start()
    upstream_ports.add(server.port)
    yield server
    server.stop()


@pytest.fixture
def token_image(token_setup: TokenSetup, image_factory: Callable[..., Image]) -> Image:
    return image_factory(
        f"{token_setup.registry.netloc}/tok/app:latest", [20_000], creds=TOKEN_CREDS
    )


def test_no_token_made_with_our_credentials_reaches_a_hostile_registry(
    hostile: HostileRegistry,
    token_setup: TokenSetup,
    token_image: Image,
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    issuer = token_setup.issuer
    proxy = proxy_factory(
        auth_registries=f"{issuer.hostname}:{TOKEN_CREDS[0]}:{TOKEN_CREDS[1]}",
        # named exactly: the hostile registry sits on loopback like every test upstream
        intercept=["*", *HOSTNAMES, LOOPBACK_ALIAS],
        mirror_default_registry=token_setup.netloc,
    )
    minted_before = [s for s in issuer.seen if s.authorization]
    # A client pulling from the hostile registry through the cache (CONNECT).
    res = pull(proxy, f"{hostile.netloc}/private/secret:1", tmp_path / "bad", "--src-no-creds")
    assert res.returncode != 0
    # And the operator's prefetch of it.
    pre = cli(proxy, "prefetch", f"{hostile.netloc}/private/secret:1")
    assert pre.returncode != 0
    assert hostile.tokens_received() == [], hostile.tokens_received()
    # The realm was never asked with our credentials on the hostile registry's behalf.
    minted = [s for s in issuer.seen if s.authorization][len(minted_before) :]
    assert minted == [], [s.path for s in minted]

    # The real registry, with the same credentials, still works for clients with none:
    # through CONNECT ...
    ref = f"{token_setup.netloc}/tok/app:latest"
    res = pull(proxy, ref, tmp_path / "connect", "--src-no-creds")
    assert res.returncode == 0, res.stderr
    assert set(token_image.blob_digests) <= layout_blobs(tmp_path / "connect")
    # ... and through the mirror.
    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(proxy.cert_dir),
        f"docker://127.0.0.1:{proxy.port}/tok/app:latest",
        f"oci:{tmp_path / 'mirror'}:latest",
    )
    assert res.returncode == 0, res.stderr
    assert set(token_image.blob_digests) <= layout_blobs(tmp_path / "mirror")
    # A client's own token request gets no credentials added, for any registry.
    assert all(TOKEN_CREDS[1] not in line for line in proxy.log_lines())
