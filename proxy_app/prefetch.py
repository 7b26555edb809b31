"""`registry-cache prefetch`: warm the cache by pulling images through the running proxy,
exactly as a Docker host would (token dance included), so a fleet's first pull is a HIT.

Going through the proxy rather than around it means the blobs land in the store by the
same verified path as any other pull, and credentials come from `auth_registries`.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .content_coding import EXACT_BYTES, ContentCodingError, decode_body
from .image_ref import ImageRef, ImageRefInvalid, parse_image_ref
from .media_types import IMAGE_MANIFEST_TYPES, INDEX_TYPES, MANIFEST_TYPES


class PrefetchError(Exception):
    pass


def parse_ref(text: str) -> ImageRef:
    try:
        return parse_image_ref(text)
    except ImageRefInvalid as e:
        raise PrefetchError(f"{text!r} is not an image reference: {e}") from None


@dataclass
class PrefetchReport:
    image: str
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    results: dict[str, int] = field(default_factory=dict)

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1


def _parse_challenge(header: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


class Prefetcher:
    def __init__(self, proxy_url: str, ca_file: Path, platform: str | None = None) -> None:
        self.proxy_url = proxy_url
        self.platform = platform
        self.ssl = ssl.create_default_context()
        self.ssl.load_verify_locations(cafile=str(ca_file))
        self._tokens: dict[tuple[str, str], str] = {}

    async def run(self, images: list[str]) -> list[PrefetchReport]:
        refs = [parse_ref(i) for i in images]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl),
            timeout=timeout,
            auto_decompress=False,
            # The cache answers manifests and blobs uncoded; tokens pass through it, so
            # identity is asked for them too (and a realm that codes anyway is decoded).
            headers=EXACT_BYTES,
        ) as session:
            self.session = session
            return [await self._image(ref, text) for ref, text in zip(refs, images, strict=True)]

    async def _get(
        self, ref: ImageRef, path: str, accept: str | None = None
    ) -> aiohttp.ClientResponse:
        url = f"https://{ref.registry}{path}"
        for _ in range(2):
            headers = {"Accept": accept} if accept else {}
            token = self._tokens.get((ref.registry, ref.repository))
            if token:
                headers["Authorization"] = f"Bearer {token}"
            response = await self.session.get(url, headers=headers, proxy=self.proxy_url)
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status == 401 and challenge.lower().startswith("bearer") and not token:
                response.release()
                await self._token(ref, _parse_challenge(challenge))
                continue
            if response.status != 200:
                body = (await response.text())[:300]
                response.release()
                raise PrefetchError(f"{url}: upstream answered {response.status}: {body}")
            return response
        raise PrefetchError(f"{url}: still unauthorized with a token")

    async def _token(self, ref: ImageRef, challenge: dict[str, str]) -> None:
        realm = challenge.get("realm")
        if not realm:
            raise PrefetchError(f"{ref.registry} asks for a token without naming a realm")
        params = {"scope": f"repository:{ref.repository}:pull"}
        if "service" in challenge:
            params["service"] = challenge["service"]
        # No credentials here: the proxy adds those it holds for the realm's host.
        async with self.session.get(realm, params=params, proxy=self.proxy_url) as response:
            if response.status != 200:
                raise PrefetchError(f"token request to {realm} answered {response.status}")
            try:
                data = json.loads(decode_body(await response.read(), response.headers, 1 << 20))
            except (ContentCodingError, ValueError) as e:
                raise PrefetchError(f"token endpoint {realm} answered no JSON: {e}") from e
        token = data.get("token") or data.get("access_token")
        if not token:
            raise PrefetchError(f"token endpoint {realm} returned no token")
        self._tokens[(ref.registry, ref.repository)] = token

    async def _image(self, ref: ImageRef, text: str) -> PrefetchReport:
        report = PrefetchReport(text)
        response = await self._get(
            ref, f"/v2/{ref.repository}/manifests/{ref.reference}", ",".join(MANIFEST_TYPES)
        )
        manifest, media_type = await self._manifest(response, report)
        if media_type in INDEX_TYPES or "manifests" in manifest:
            wanted = [m for m in manifest.get("manifests", []) if self._platform_matches(m)]
            if not wanted:
                raise PrefetchError(f"{text}: no manifest for platform {self.platform}")
            for entry in wanted:
                child = await self._get(
                    ref,
                    f"/v2/{ref.repository}/manifests/{entry['digest']}",
                    entry.get("mediaType") or ",".join(IMAGE_MANIFEST_TYPES),
                )
                image, _ = await self._manifest(child, report)
                await self._blobs(ref, image, report)
        else:
            await self._blobs(ref, manifest, report)
        return report

    def _platform_matches(self, entry: dict[str, object]) -> bool:
        platform = entry.get("platform")
        if not isinstance(platform, dict):
            return self.platform is None
        if platform.get("os") == "unknown":  # attestation manifests, not images
            return False
        if self.platform is None:
            return True
        wanted = self.platform.split("/")
        have = [str(platform.get("os")), str(platform.get("architecture"))]
        if platform.get("variant"):
            have.append(str(platform["variant"]))
        return have[: len(wanted)] == wanted

    async def _manifest(
        self, response: aiohttp.ClientResponse, report: PrefetchReport
    ) -> tuple[dict, str]:
        try:
            body = await response.read()
        finally:
            response.release()
        report.manifests += 1
        report.count(response.headers.get("X-Registry-Cache", "?"))
        try:
            return json.loads(body), response.headers.get("Content-Type", "").split(";")[0]
        except ValueError as e:
            raise PrefetchError(f"{response.url}: manifest is not JSON") from e

    async def _blobs(self, ref: ImageRef, manifest: dict, report: PrefetchReport) -> None:
        descriptors = [manifest.get("config"), *manifest.get("layers", [])]
        for descriptor in descriptors:
            if not isinstance(descriptor, dict) or "digest" not in descriptor:
                continue
            response = await self._get(ref, f"/v2/{ref.repository}/blobs/{descriptor['digest']}")
            try:
                async for chunk in response.content.iter_chunked(1 << 20):
                    report.bytes += len(chunk)
            finally:
                response.release()
            report.blobs += 1
            report.count(response.headers.get("X-Registry-Cache", "?"))


def prefetch(
    images: list[str], proxy_url: str, ca_file: Path, platform: str | None
) -> list[PrefetchReport]:
    return asyncio.run(Prefetcher(proxy_url, ca_file, platform).run(images))
