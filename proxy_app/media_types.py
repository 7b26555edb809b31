"""The manifest media types of the registry API, named once for every module that asks."""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# Indexes (manifest lists): a registry stores them and never makes one up, but gives a
# client that accepts neither the default platform's image manifest picked out of it.
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# Every type a client that knows them all accepts: indexes first, then image manifests.
MANIFEST_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST, *IMAGE_MANIFEST_TYPES)
# Docker schema 1, which distribution rewrites a schema 2 manifest into for a client that
# does not accept schema 2.
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
# What a manifest answer may be labelled to be stored and replayed: the types above, and
# OCI's short-lived artifact manifest. Anything else (text/html, application/json) goes
# to its own client as it came, and is never stored nor served to another.
STORED_MANIFEST_TYPES = frozenset(
    {*MANIFEST_TYPES, *SCHEMA1_TYPES, "application/vnd.oci.artifact.manifest.v1+json"}
)
