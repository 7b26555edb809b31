"""The filters that put the cache into k3s's registries.yaml and take it out again: every
other setting stays, and taking the cache out gives back the file as it was."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

PLUGIN = Path(__file__).parents[2] / "roles/containerd_client/filter_plugins/k3s_registries.py"
spec = importlib.util.spec_from_file_location("k3s_registries", PLUGIN)
assert spec and spec.loader
k3s = importlib.util.module_from_spec(spec)
sys.modules["k3s_registries"] = k3s
spec.loader.exec_module(k3s)

URL = "https://cache.example.com:3128"
HOST = "cache.example.com:3128"
CA = "/etc/rancher/k3s/registry-cache/bundle.crt"
NAMES = ["docker.io", "ghcr.io", "*"]

CONFIGS: list[dict[str, Any]] = [
    {},
    {"mirrors": {"docker.io": {"endpoint": ["https://site-mirror.example"]}}},
    {
        "mirrors": {
            "registry.internal": {"endpoint": ["https://registry.internal:5000"]},
            "ghcr.io": {"endpoint": ["https://ghcr-proxy.example"], "rewrite": {"^a/(.*)": "b/$1"}},
        },
        "configs": {
            "registry.internal:5000": {"auth": {"username": "u", "password": "p"}},
            HOST: {"auth": {"username": "cache-user", "password": "secret"}},
        },
    },
]


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_gives_the_file_back(config: dict[str, Any]) -> None:
    added = k3s.with_cache(config, NAMES, URL, HOST, CA)
    assert k3s.without_cache(added, URL, HOST, CA) == config


@pytest.mark.parametrize("config", CONFIGS)
def test_the_cache_is_first_and_others_stay(config: dict[str, Any]) -> None:
    added = k3s.with_cache(config, NAMES, URL, HOST, CA)
    for name in NAMES:
        before = (config.get("mirrors", {}).get(name) or {}).get("endpoint", [])
        assert added["mirrors"][name]["endpoint"] == [URL, *before]
    assert added["configs"][HOST]["tls"] == {"ca_file": CA}
    for host, entry in config.get("configs", {}).items():
        for key, value in entry.items():
            assert added["configs"][host][key] == value
    # Applied twice, nothing more changes (the role's idempotence).
    assert k3s.with_cache(added, NAMES, URL, HOST, CA) == added


def test_input_is_not_changed_in_place() -> None:
    config = {"mirrors": {"docker.io": {"endpoint": ["https://x.example"]}}}
    k3s.with_cache(config, NAMES, URL, HOST, CA)
    assert config == {"mirrors": {"docker.io": {"endpoint": ["https://x.example"]}}}


def test_a_ca_file_of_someone_else_stays() -> None:
    config = {"configs": {HOST: {"tls": {"ca_file": "/site/ca.pem"}}}}
    assert k3s.without_cache(config, URL, HOST, CA) == config


NODE_URLS = ["https://10.0.0.12:3128", "https://10.0.0.11:3128/"]
NODE_HOSTS = ["10.0.0.12:3128", "10.0.0.11:3128"]


@pytest.mark.parametrize("config", CONFIGS)
def test_several_nodes_first_in_order_and_taken_out_again(config: dict[str, Any]) -> None:
    """The nodes of a cluster, given as lists, all go first in the order given (each
    once, without a trailing slash), each with the CA file; out again, the file is back."""
    added = k3s.with_cache(config, NAMES, NODE_URLS, NODE_HOSTS, CA)
    for name in NAMES:
        endpoints = added["mirrors"][name]["endpoint"]
        assert endpoints[:2] == ["https://10.0.0.12:3128", "https://10.0.0.11:3128"]
        assert len(endpoints) == len(set(endpoints))
    for host in NODE_HOSTS:
        assert added["configs"][host]["tls"]["ca_file"] == CA
    # Idempotent: applied twice, the same file.
    assert k3s.with_cache(added, NAMES, NODE_URLS, NODE_HOSTS, CA) == added
    assert k3s.without_cache(added, NODE_URLS, NODE_HOSTS, CA) == config


def test_one_node_as_a_list_is_the_same_as_a_string() -> None:
    for config in CONFIGS:
        assert k3s.with_cache(config, NAMES, [URL], [HOST], CA) == k3s.with_cache(
            config, NAMES, URL, HOST, CA
        )
