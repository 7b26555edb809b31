"""Registry Cache: a caching, TLS-intercepting proxy for container registries."""

__version__ = "0.1.0"
