"""The durability tests (issue 5) reuse the integration fixtures: the TLS registries on
loopback, the image pusher and the proxy runner. They are imported, not moved, so that
tests/integration/conftest.py stays the one place that defines them."""

from __future__ import annotations

from integration.conftest import (  # noqa: F401
    aio,
    hosts,
    image_factory,
    make_registry,
    pki,
    proxy_factory,
    registry,
    upstream_ports,
    workroot,
)
