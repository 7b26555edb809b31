"""Filters that add the cache to k3s's registries.yaml, and take it out again.

k3s's registries.yaml lists mirrors per registry (`mirrors.<name>.endpoint`, tried in
order before the registry itself) and TLS settings per endpoint host
(`configs.<host:port>.tls`). The cache goes first in each endpoint list; every other
endpoint, rewrite, mirror and config of the file stays, so that taking the cache out
again gives the file back as it was (an entry the cache alone made is dropped).
"""

from __future__ import annotations

import copy
from typing import Any


def _as_list(value: str | list[str]) -> list[str]:
    """One cache (a string) or the nodes of a cluster (a list), as a list."""
    return [value] if isinstance(value, str) else list(value)


def _same(endpoint: Any, urls: list[str]) -> bool:
    return isinstance(endpoint, str) and endpoint.rstrip("/") in {u.rstrip("/") for u in urls}


def with_cache(
    config: dict[str, Any],
    registries: list[str],
    url: str | list[str],
    host: str | list[str],
    ca_file: str,
) -> dict[str, Any]:
    """The config with the cache first for each registry and its CA for its host. With
    several nodes (`url` and `host` lists), every node first, in the order given."""
    urls, hosts = _as_list(url), _as_list(host)
    result = copy.deepcopy(config) if config else {}
    mirrors = result.setdefault("mirrors", {}) or {}
    result["mirrors"] = mirrors
    for name in registries:
        entry = mirrors.get(name) or {}
        others = [e for e in entry.get("endpoint") or [] if not _same(e, urls)]
        mirrors[name] = {**entry, "endpoint": [*(u.rstrip("/") for u in urls), *others]}
    configs = result.get("configs") or {}
    for netloc in hosts:
        entry = configs.get(netloc) or {}
        configs[netloc] = {**entry, "tls": {**(entry.get("tls") or {}), "ca_file": ca_file}}
    result["configs"] = configs
    return result


def without_cache(
    config: dict[str, Any], url: str | list[str], host: str | list[str], ca_file: str
) -> dict[str, Any]:
    """The config with the cache (every node given) taken out of every endpoint list, and
    the CA file it named for the cache's hosts (other settings of those hosts stay)."""
    urls, hosts = _as_list(url), _as_list(host)
    result = copy.deepcopy(config) if config else {}
    mirrors = result.get("mirrors") or {}
    for name in list(mirrors):
        entry = mirrors[name] or {}
        endpoints = entry.get("endpoint") or []
        if not any(_same(e, urls) for e in endpoints):
            continue
        left = [e for e in endpoints if not _same(e, urls)]
        rest = {k: v for k, v in entry.items() if k != "endpoint"}
        if left:
            mirrors[name] = {**rest, "endpoint": left}
        elif rest:
            mirrors[name] = rest
        else:
            del mirrors[name]
    if "mirrors" in result and not mirrors:
        del result["mirrors"]
    configs = result.get("configs") or {}
    for netloc in hosts:
        entry = configs.get(netloc)
        if not (isinstance(entry, dict) and (entry.get("tls") or {}).get("ca_file") == ca_file):
            continue
        tls = {k: v for k, v in entry["tls"].items() if k != "ca_file"}
        rest = {k: v for k, v in entry.items() if k != "tls"}
        if tls:
            rest["tls"] = tls
        if rest:
            configs[netloc] = rest
        else:
            del configs[netloc]
    if "configs" in result and not configs:
        del result["configs"]
    return result


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"k3s_with_cache": with_cache, "k3s_without_cache": without_cache}
