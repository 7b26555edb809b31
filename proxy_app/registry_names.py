"""Docker Hub's names, in one place: clients call it `docker.io` or `index.docker.io`,
its registry API answers at `registry-1.docker.io`, and people (metrics, the status page,
tag rules) read `docker.io`."""

from __future__ import annotations

DOCKER_HUB = "registry-1.docker.io"  # where Docker Hub's registry API answers
DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", DOCKER_HUB})


def display_name(netloc: str) -> str:
    """A registry as people name it: lower case, Docker Hub as docker.io (a plain-HTTP
    registry keeps the `http://` of its index key out of the name)."""
    name = netloc.lower().removeprefix("http://").rstrip(".")
    return "docker.io" if name in DOCKER_HUB_NAMES else name
