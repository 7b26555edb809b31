"""Image references as people type them (`alpine`, `ghcr.io/org/app:1`,
`registry.example:5000/team/app@sha256:...`), normalised the way Docker does, and named
the way the index names them.

`alpine` is `docker.io/library/alpine:latest`; `docker.io`, `index.docker.io` and
`registry-1.docker.io` are all Docker Hub, which the index keys as `registry-1.docker.io`
(what clients connect to). A reference with a tag and a digest means the digest, as for
Docker. Anything else is refused with what is wrong: the admin commands delete things, and
a name that is not one (`../x`, `%2e%2e`, upper case, a digest that is not sha256) must
never reach the index.
"""

from __future__ import annotations

from dataclasses import dataclass

from .mirror import MirrorRequestInvalid, parse_registry
from .registry_names import DOCKER_HUB, display_name
from .routes import MAX_NAME_LENGTH, NAME, SHA256, TAG
from .upstream import Origin

MAX_REF_LENGTH = 512


class ImageRefInvalid(ValueError):
    """Not an image reference; the message says why, for the person who typed it."""


@dataclass(frozen=True)
class ImageRef:
    registry: str  # as the index keys it: host[:port], port 443 left out
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """The tag or digest: what a manifest is asked for by."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{display_name(self.registry)}/{self.repository}{at}"


def names_registry(component: str) -> bool:
    """Whether an image name's first component is a registry (Docker's rule)."""
    return "." in component or ":" in component or component == "localhost"


def parse_image_ref(text: str) -> ImageRef:
    """`[registry/]repository[:tag][@sha256:hex]`; raises ImageRefInvalid saying why not."""
    if not isinstance(text, str) or not text.strip():
        raise ImageRefInvalid("an image reference is needed, e.g. alpine:3 or ghcr.io/org/app:1")
    shown = text[:100]
    if len(text) > MAX_REF_LENGTH:
        raise ImageRefInvalid(f"{shown!r}...: longer than {MAX_REF_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() or c == "%" or not c.isascii() for c in text):
        raise ImageRefInvalid(
            f"{shown!r}: no spaces, control or non-ASCII characters, no '%' in a reference"
        )
    rest, digest = text, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not SHA256.fullmatch(digest):
            raise ImageRefInvalid(
                f"{shown!r}: the digest must be sha256:<64 lower-case hex>, not {digest[:80]!r}"
            )
    first, slash, remainder = rest.partition("/")
    if slash and names_registry(first):
        try:
            host, port = parse_registry(first)
        except MirrorRequestInvalid as e:
            raise ImageRefInvalid(str(e)) from None
        registry, path = Origin("https", host, port).netloc, remainder
    else:
        registry, path = DOCKER_HUB, rest
    tag = None
    if ":" in path.rsplit("/", 1)[-1]:
        path, _, tag = path.rpartition(":")
        if not TAG.fullmatch(tag):
            raise ImageRefInvalid(
                f"{shown!r}: invalid tag {tag[:80]!r} (up to 128 of letters, digits, _ . -)"
            )
    if registry == DOCKER_HUB and path and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ImageRefInvalid(f"{shown!r}: empty, '.' and '..' path components are not allowed")
    if len(path) > MAX_NAME_LENGTH or not NAME.fullmatch(path):
        hint = " (repository names are lower case)" if path.lower() != path else ""
        raise ImageRefInvalid(
            f"{shown!r}: invalid repository name {path[:80]!r}: lower-case letters, digits "
            f"and separators (., _, -) in components joined by /{hint}"
        )
    if digest is not None:
        return ImageRef(registry, path, None, digest)
    return ImageRef(registry, path, tag or "latest", None)
