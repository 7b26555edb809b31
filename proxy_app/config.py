"""Configuration: a YAML file, each key overridable by a REGISTRY_CACHE_<KEY> variable.

Every value is validated at start-up; a bad value or an unknown key stops the start
with a message that names the key and says what is wrong.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .registry_names import display_name
from .tag_policy import TagRule

log = logging.getLogger(__name__)

ENV_PREFIX = "REGISTRY_CACHE_"

# Loopback, the private IPv4 ranges, carrier-grade NAT and IPv6 unique-local addresses.
DEFAULT_ALLOWED_CLIENTS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
)

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who has to fix it."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    # The registries (host globs) these credentials may get tokens for, when their host is
    # a token realm; empty: the registries of the realm's own domain.
    registries: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never show the password, even in a debug dump
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class ProxyUser:
    name: str
    password_hash: str
    allow: tuple[str, ...] = ()
    admin: bool = False  # may read the status page (`GET /`)

    def __repr__(self) -> str:
        return f"ProxyUser(name={self.name!r}, allow={self.allow!r}, admin={self.admin!r})"


@dataclass(frozen=True)
class StoreConfig:
    """Where blobs live behind the node's own disk: `filesystem` (nothing behind it) or
    `s3`, a bucket several cache nodes share (shared_store.py)."""

    type: str = "filesystem"
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    prefix: str = ""  # ends with "/" when not empty
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    # Incomplete multipart uploads older than this are a crashed node's and are aborted
    # at start; younger ones may be another node's upload under way (shared_store.py).
    abandoned_upload_age: float = 30 * 60.0

    @property
    def shared(self) -> bool:
        return self.type == "s3"

    def __repr__(self) -> str:  # never show the secret, even in a debug dump
        if not self.shared:
            return "StoreConfig(type='filesystem')"
        return (
            f"StoreConfig(type='s3', endpoint={self.endpoint!r}, bucket={self.bucket!r}, "
            f"region={self.region!r}, prefix={self.prefix!r}, "
            f"access_key_id={self.access_key_id!r}, secret_access_key=***)"
        )


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 3128), ListenAddress("::", 3128))
    cache_dir: Path = Path("/var/lib/registry-cache")
    ca_dir: Path = Path("/var/lib/registry-cache/ca")
    max_size: int = 32 << 30
    inactive: float = 60 * 86400
    tag_ttl: float = 300
    stale_if_error: float = 7 * 86400
    auth_registries: Mapping[str, Credentials] = field(default_factory=dict)
    allow_push: bool = False
    verify_client_access: bool = False
    intercept: tuple[str, ...] = ("*",)
    passthrough: tuple[str, ...] = ()
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_ALLOWED_CLIENTS
    )
    allowed_ports: frozenset[int] = frozenset({443})
    users: tuple[ProxyUser, ...] = ()
    upstream_ca_bundle: Path | None = None
    upstream_proxy: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    max_connections_per_client: int = 256
    max_connections: int = 0  # open client connections in all; 0: from the descriptor limit
    ca_name_constraints: tuple[str, ...] = ()
    head_timeout: float = 30.0
    # Longest wait for an upstream answer's head, and for a whole manifest or tag check.
    upstream_timeout: float = 60.0
    # The upstream of mirror requests that name no registry (Docker's registry-mirrors).
    mirror_default_registry: str = "docker.io"
    # Names on the mirror's own TLS certificate; empty: the host's (default_mirror_names).
    mirror_names: tuple[str, ...] = ()
    tag_rules: tuple[TagRule, ...] = ()
    # The admin API's UNIX socket (mode 0660, the service user's); None: <cache_dir>/admin.sock.
    admin_socket: Path | None = None
    # Images kept whatever max_size and inactive say (normalised references); the service
    # makes its index's config pins exactly these at start. `registry-cache pin` adds more.
    pinned: tuple[str, ...] = ()
    # Every node of a cluster (`host:port` of its listener), this one too; empty: no
    # cluster. peer_self names this node among them when it cannot find itself (peers.py).
    peers: tuple[str, ...] = ()
    peer_self: str | None = None
    # The shared tier behind the local one (store: {type: s3, ...}), and its size bound.
    store: StoreConfig = StoreConfig()
    shared_max_size: int | None = None
    # How often a node publishes its reads to the bucket and the trim lease is renewed
    # (the lease expires after two); tuning, short in tests (shared_trim.py).
    shared_trim_interval: float = 60.0
    # True when `listen` was not configured: a missing IPv6 stack then is not an error.
    listen_is_default: bool = True

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.cache_dir / "admin.sock"


# --- value parsers: each takes the raw value (YAML or environment string) ---------------


def human_size(n: float) -> str:
    """A byte count as the commands print it: 512 B, 1.5 MiB, 2.0 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def parse_size(value: Any) -> int:
    """`32g`, `500m`, `1.5t`, `4096`: binary units (k = 1024)."""
    if isinstance(value, bool):
        raise ConfigError("expected a size such as 32g, 500m or 1048576")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError("a size cannot be negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{value!r} is not a size; use a number with k, m, g or t (e.g. 32g)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_mirror_names(value: Any) -> tuple[str, ...]:
    """DNS names and IP addresses the cache answers to as a mirror."""
    from .destinations import valid_host_name

    names = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError("expected a list of host names and addresses")
    out: list[str] = []
    for name in names:
        name = name.strip().lower().strip("[]")
        try:
            out.append(str(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not (valid_host_name(name) and re.fullmatch(r"[a-z0-9.*-]+", name)):
            raise ConfigError(f"{name[:100]!r} is neither a host name nor an IP address")
        out.append(name.rstrip("."))
    return tuple(dict.fromkeys(out))


def default_mirror_names(config: Config) -> tuple[str, ...]:
    """The host's own names and addresses: FQDN, short name, localhost, loopback, the
    addresses it listens on (not the wildcards), and those its name resolves to."""
    fqdn = socket.getfqdn().lower()
    names = [fqdn, fqdn.split(".", 1)[0], socket.gethostname().lower(), "localhost"]
    names += ["127.0.0.1", "::1"]
    names += [a.host for a in config.listen if a.host not in ("0.0.0.0", "::")]
    try:
        resolved = [str(i[4][0]) for i in socket.getaddrinfo(fqdn, None)]
    except OSError:
        resolved = []  # a name the host cannot resolve: its other names still serve
    names += [a for a in resolved if "%" not in a]  # no link-local scopes
    return parse_mirror_names([n for n in names if n])


def parse_mirror_registry(value: Any) -> str:
    from .mirror import MirrorRequestInvalid, parse_registry

    try:
        parse_registry(str(value))
    except MirrorRequestInvalid as e:
        raise ConfigError(str(e)) from e
    return str(value)


def parse_pinned(value: Any) -> tuple[str, ...]:
    """Image references, normalised as Docker does (alpine: docker.io/library/alpine:latest)."""
    from .image_ref import ImageRefInvalid, parse_image_ref

    refs = []
    for item in _string_list(value):
        try:
            refs.append(str(parse_image_ref(item)))
        except ImageRefInvalid as e:
            raise ConfigError(str(e)) from None
    return tuple(dict.fromkeys(refs))


def parse_positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ConfigError("must be longer than 0 seconds, such as 30s or 2m")
    return seconds


def parse_duration(value: Any) -> float:
    """`30s`, `10m`, `2h`, `60d`, `1w`, or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError("expected a duration such as 30s, 10m, 2h or 60d")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError("a duration cannot be negative")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{value!r} is not a duration; use a number with s, m, h, d or w")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{value!r} is not a boolean; use true or false")


def _string_list(value: Any) -> list[str]:
    """A YAML list, or a string of items separated by spaces or commas (environment form)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item for item in re.split(r"[\s,]+", value) if item]
    if isinstance(value, list | tuple):
        if not all(isinstance(item, str | int) and not isinstance(item, bool) for item in value):
            raise ConfigError("expected a list of strings")
        return [str(item) for item in value]
    raise ConfigError("expected a list (or a space-separated string)")


def parse_listen(value: Any) -> tuple[ListenAddress, ...]:
    addresses = []
    for item in _string_list(value):
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", item)
        if not m:
            raise ConfigError(f"{item!r} is not host:port (use [::]:3128 for IPv6)")
        host = m.group(1) if m.group(1) is not None else m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 < port < 65536:
            raise ConfigError(f"port {port} in {item!r} is out of range 1-65535")
        addresses.append(ListenAddress(host or "0.0.0.0", port))
    if not addresses:
        raise ConfigError("at least one address is needed")
    return tuple(addresses)


def parse_peer(item: str) -> str:
    """A cluster node, `host:port` or `[v6]:port`, lower case: how every node names it."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([A-Za-z0-9.-]+):(\d+)", item)
    if not m:
        raise ConfigError(f"{item!r} is not host:port (a node's listener, [v6]:port for IPv6)")
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} in {item!r} is out of range 1-65535")
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(m.group(1))
        except ValueError:
            raise ConfigError(f"{item!r}: {m.group(1)} is not an IPv6 address") from None
    return item.lower()


def parse_peers(value: Any) -> tuple[str, ...]:
    peers = tuple(parse_peer(item) for item in _string_list(value))
    if len(set(peers)) != len(peers):
        raise ConfigError("a node is listed twice")
    return peers


def parse_auth_registries(value: Any) -> dict[str, Credentials]:
    """The list form `[{host, username, password}]` or the string form `host:user:pass ...`."""
    entries: list[tuple[str, str, str, tuple[str, ...]]] = []
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        for i, item in enumerate(value.split(), start=1):
            parts = item.split(":", 3)
            if len(parts) == 4 and parts[1].isdigit():
                # host:port:username:password (a registry on another port than 443)
                parts = [f"{parts[0]}:{parts[1]}", parts[2], parts[3]]
            else:
                parts = item.split(":", 2)
            if len(parts) != 3 or not all(parts):
                raise ConfigError(
                    f"entry {i} is not host[:port]:username:password "
                    "(entries are separated by spaces; the password may contain ':')"
                )
            entries.append((parts[0], parts[1], parts[2], ()))
    elif isinstance(value, list):
        for i, item in enumerate(value, start=1):
            if not isinstance(item, Mapping):
                raise ConfigError(f"entry {i} must be a mapping with host, username, password")
            unknown = set(item) - {"host", "username", "password", "registries"}
            if unknown:
                raise ConfigError(f"entry {i} has unknown keys: {', '.join(sorted(unknown))}")
            missing = [k for k in ("host", "username", "password") if not item.get(k)]
            if missing:
                raise ConfigError(f"entry {i} lacks {', '.join(missing)}")
            registries = item.get("registries") or []
            if not isinstance(registries, list) or not all(
                isinstance(r, str) and r for r in registries
            ):
                raise ConfigError(f"entry {i}: registries must be a list of registry host globs")
            entries.append(
                (
                    str(item["host"]),
                    str(item["username"]),
                    str(item["password"]),
                    tuple(r.lower() for r in registries),
                )
            )
    else:
        raise ConfigError("expected a list of {host, username, password} or 'host:user:pass ...'")
    result: dict[str, Credentials] = {}
    for host, user, password, registries in entries:
        host = host.lower()
        if not re.fullmatch(r"[a-z0-9.-]+(:\d+)?", host):
            raise ConfigError(f"{host!r} is not a registry host name (host or host:port)")
        if host in result:
            raise ConfigError(f"{host!r} is listed twice")
        result[host] = Credentials(user, password, registries)
    return result


def parse_host_globs(value: Any) -> tuple[str, ...]:
    globs = _string_list(value)
    for g in globs:
        if not re.fullmatch(
            r"[A-Za-z0-9.*?\[\]_-]+(:[0-9*?]+)?|\[[0-9a-fA-F:.*?]+\](:[0-9*?]+)?", g
        ):
            raise ConfigError(f"{g!r} is not a host glob (host, *.example.com, host:port)")
    return tuple(g.lower() for g in globs)


def parse_networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _string_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as e:
            raise ConfigError(f"{item!r} is not a network in CIDR form (e.g. 10.0.0.0/8)") from e
    return tuple(networks)


def parse_ports(value: Any) -> frozenset[int]:
    ports = set()
    for item in _string_list(value):
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise ConfigError(f"{item!r} is not a port number 1-65535")
        ports.add(int(item))
    return frozenset(ports)


def parse_users(value: Any) -> tuple[ProxyUser, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("expected a list of {name, password_hash, allow, admin}")
    users = []
    for i, item in enumerate(value, start=1):
        if not isinstance(item, Mapping):
            raise ConfigError(f"entry {i} must be a mapping with name and password_hash")
        unknown = set(item) - {"name", "password_hash", "allow", "admin"}
        if unknown:
            raise ConfigError(f"entry {i} has unknown keys: {', '.join(sorted(unknown))}")
        name, pw_hash = item.get("name"), item.get("password_hash")
        if not name or not isinstance(name, str) or ":" in name:
            raise ConfigError(f"entry {i} needs a name without ':'")
        if not isinstance(pw_hash, str) or not pw_hash.startswith("scrypt$"):
            raise ConfigError(
                f"user {name!r} needs a password_hash made by `registry-cache hash-password`"
            )
        admin = item.get("admin", False)
        if not isinstance(admin, bool):
            raise ConfigError(
                f"user {name!r}: admin must be true or false (a YAML boolean), not {admin!r}"
            )
        users.append(ProxyUser(name, pw_hash, tuple(_string_list(item.get("allow"))), admin))
    return tuple(users)


_RULE_EXAMPLE = '{match: "docker.io/library/*:latest", ttl: 1m}'


def parse_tag_rules(value: Any) -> tuple[TagRule, ...]:
    """`[{match: "registry/repo-glob:tag-glob", ttl: 1m}, ...]` (tag_policy.py)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"expected a list of rules such as {_RULE_EXAMPLE}")
    rules = []
    for i, item in enumerate(value, start=1):
        if not isinstance(item, Mapping) or set(item) != {"match", "ttl"}:
            raise ConfigError(f"rule {i} must have exactly match and ttl, such as {_RULE_EXAMPLE}")
        match = item["match"]
        if not isinstance(match, str) or not match.strip() or any(c.isspace() for c in match):
            raise ConfigError(
                f"rule {i}: match must be a glob without spaces, such as registry.internal/*"
            )
        if "@" in match:
            raise ConfigError(
                f"rule {i}: {match!r} names a digest; digests never change and follow no rule"
            )
        try:
            ttl = parse_duration(item["ttl"])
        except ConfigError as e:
            raise ConfigError(f"rule {i} ({match}): ttl {e}") from None
        host, slash, rest = match.partition("/")
        rules.append(TagRule(display_name(host) + slash + rest, ttl))
    return tuple(rules)


def parse_dns_names(value: Any) -> tuple[str, ...]:
    names = _string_list(value)
    for name in names:
        if not re.fullmatch(
            r"\.?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", name
        ):
            raise ConfigError(f"{name!r} is not a DNS name (e.g. docker.io, ghcr.io)")
    return tuple(sorted(n.lower() for n in names))


def parse_count(value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ConfigError(f"{value!r} is not a whole number")
    if int(value) < minimum:
        raise ConfigError(f"must be at least {minimum}")
    return int(value)


def parse_path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("expected a path")
    return Path(value).expanduser()


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def parse_optional_path(value: Any) -> Path | None:
    return None if _unset(value) else parse_path(value)


def parse_proxy_url(value: Any) -> str | None:
    if _unset(value):
        return None
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+/?", value):
        raise ConfigError(f"{value!r} is not a proxy URL such as http://proxy.example:3128")
    return value


_STORE_KEYS = (
    "type",
    "endpoint",
    "bucket",
    "region",
    "prefix",
    "access_key_id",
    "secret_access_key",
    "abandoned_upload_age",
)
_DURATION_STORE_KEYS = ("abandoned_upload_age",)
_S3_EXAMPLE = "{type: s3, endpoint: http://seaweed.example:8333, bucket: registry-cache}"


def parse_store(value: Any) -> StoreConfig:
    """`{type: filesystem}` (the default) or `{type: s3, endpoint, bucket, region, prefix,
    access_key_id, secret_access_key, abandoned_upload_age}`. No message repeats a value
    of secret_access_key."""
    if value is None or value == "filesystem":
        return StoreConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping such as {_S3_EXAMPLE}")
    unknown = sorted(str(k) for k in value if k not in _STORE_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; known keys are {', '.join(_STORE_KEYS)}"
        )
    kind = str(value.get("type") or "filesystem").strip().lower()
    if kind not in ("filesystem", "s3"):
        raise ConfigError(f"type {kind[:40]!r} is not filesystem or s3")
    if kind == "filesystem":
        extra = sorted(str(k) for k in value if k != "type")
        if extra:
            raise ConfigError(f"type filesystem takes no other keys (got {', '.join(extra)})")
        return StoreConfig()
    strings: dict[str, str] = {}
    for key in _STORE_KEYS[1:]:
        if key in _DURATION_STORE_KEYS:
            continue
        raw = value.get(key)
        if raw is None:
            continue
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            raise ConfigError(f"{key} must be a string")
        strings[key] = str(raw).strip() if key != "secret_access_key" else str(raw)
    endpoint = strings.get("endpoint", "")
    if not endpoint:
        raise ConfigError(f"type s3 needs an endpoint, such as {_S3_EXAMPLE}")
    parsed = urlsplit(endpoint)
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or port == -1
        or parsed.path not in ("", "/")
        or parsed.query
        or parsed.fragment
        or parsed.username is not None
    ):
        raise ConfigError(
            f"endpoint {endpoint[:100]!r} is not an http(s) URL of an S3 service such as "
            "http://seaweed.example:8333 (no path, no credentials in it)"
        )
    bucket = strings.get("bucket", "")
    if not bucket:
        raise ConfigError(f"type s3 needs a bucket, such as {_S3_EXAMPLE}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or ".." in bucket:
        raise ConfigError(
            f"bucket {bucket[:70]!r} is not an S3 bucket name (3-63 characters: lower-case "
            "letters, digits, dots and hyphens)"
        )
    region = strings.get("region") or "us-east-1"
    if not re.fullmatch(r"[a-z0-9-]{1,40}", region):
        raise ConfigError(f"region {region[:50]!r} is not a region name such as us-east-1")
    prefix = strings.get("prefix", "").strip("/")
    if prefix and (
        not re.fullmatch(r"[A-Za-z0-9._/-]+", prefix) or "//" in prefix or ".." in prefix
    ):
        raise ConfigError(
            f"prefix {prefix[:100]!r} must be letters, digits, '.', '_', '-' and '/' "
            "(a folder inside the bucket, such as registry-cache/)"
        )
    key_id, secret = strings.get("access_key_id", ""), strings.get("secret_access_key", "")
    if bool(key_id) != bool(secret):
        missing = "secret_access_key" if key_id else "access_key_id"
        raise ConfigError(
            f"access_key_id and secret_access_key go together: {missing} is missing "
            "(neither: anonymous requests)"
        )
    abandoned = StoreConfig.abandoned_upload_age
    if value.get("abandoned_upload_age") is not None:
        try:
            abandoned = parse_duration(value["abandoned_upload_age"])
        except ConfigError as e:
            raise ConfigError(f"abandoned_upload_age: {e}") from None
    return StoreConfig(
        type="s3",
        endpoint=endpoint.rstrip("/"),
        bucket=bucket,
        region=region,
        prefix=prefix + "/" if prefix else "",
        access_key_id=key_id,
        secret_access_key=secret,
        abandoned_upload_age=abandoned,
    )


def parse_optional_size(value: Any) -> int | None:
    return None if _unset(value) else parse_size(value)


def parse_choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ConfigError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


PARSERS: dict[str, Callable[[Any], Any]] = {
    "listen": parse_listen,
    "cache_dir": parse_path,
    "ca_dir": parse_optional_path,
    "max_size": parse_size,
    "inactive": parse_duration,
    "tag_ttl": parse_duration,
    "stale_if_error": parse_duration,
    "auth_registries": parse_auth_registries,
    "allow_push": parse_bool,
    "verify_client_access": parse_bool,
    "intercept": parse_host_globs,
    "passthrough": parse_host_globs,
    "allowed_clients": parse_networks,
    "allowed_ports": parse_ports,
    "users": parse_users,
    "upstream_ca_bundle": parse_optional_path,
    "upstream_proxy": parse_proxy_url,
    "log_format": parse_choice("text", "json"),
    "log_level": parse_choice("debug", "info", "warning", "error"),
    "max_connections_per_client": lambda v: parse_count(v, minimum=1),
    "max_connections": lambda v: parse_count(v, minimum=0),
    "ca_name_constraints": lambda v: parse_dns_names(v),
    "head_timeout": parse_duration,
    "upstream_timeout": lambda v: parse_positive_duration(v),
    "mirror_default_registry": lambda v: parse_mirror_registry(v),
    "mirror_names": lambda v: parse_mirror_names(v),
    "tag_rules": parse_tag_rules,
    "admin_socket": parse_optional_path,
    "pinned": lambda v: parse_pinned(v),
    "peers": parse_peers,
    "peer_self": lambda v: None if _unset(v) else parse_peer(str(v)),
    "store": parse_store,
    "shared_max_size": parse_optional_size,
    "shared_trim_interval": lambda v: parse_positive_duration(v),
}

# Keys whose environment value is YAML rather than a plain string (lists of mappings).
_YAML_ENV_KEYS = {"users", "tag_rules", "store"}
# Variables with the prefix that belong to other tools (make config), not to the server.
_FOREIGN_ENV = {
    "HOST",
    "CLIENTS",
    "VAULT_PASSWORD_FILE",
    "CONFIG",
    "ADDRESS",
    "PORT",
    "DIR",
    "WHEELHOUSE",
    "INSTALL_VENV",
    "PREFETCH_PROXY",
}


def ports_named_in(globs: tuple[str, ...]) -> set[int]:
    return {int(g.rsplit(":", 1)[1]) for g in globs if re.search(r":\d+$", g)}


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, without the text around it: PyYAML's own message quotes
    the line, and a config file's lines hold passwords and the store's secret."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return type(error).__name__
    where = error.problem_mark or error.context_mark
    problem = " ".join(str(p) for p in (error.context, error.problem) if p)
    if where is None:
        return problem
    return f"{problem} (line {where.line + 1}, column {where.column + 1})"


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Reads the file (when given), applies the environment, validates everything."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    store_env: dict[str, str] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a mapping of keys to values")
        unknown = sorted(str(k) for k in loaded if k not in PARSERS)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(PARSERS)}"
            )
        raw.update(loaded)

    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key.startswith("store_") and key[len("store_") :] in _STORE_KEYS:
            # One key of the store mapping (REGISTRY_CACHE_STORE_SECRET_ACCESS_KEY): kept
            # out of the config file, merged into it below.
            store_env[key[len("store_") :]] = value
        elif key in PARSERS:
            if key in _YAML_ENV_KEYS:
                try:
                    raw[key] = yaml.safe_load(value)
                except yaml.YAMLError as e:
                    # YAML's message quotes the text, and the store's holds a secret.
                    detail = "" if key == "store" else f": {e}"
                    raise ConfigError(f"{name} is not valid YAML{detail}") from None
            else:
                raw[key] = value
        elif key.upper() not in _FOREIGN_ENV:
            log.warning("ignoring environment variable %s: no config key %r", name, key)

    if store_env:
        store = raw.get("store")
        if store is None or store == "filesystem":
            store = {}
        if isinstance(store, Mapping):
            raw["store"] = {**store, **store_env}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            values[key] = PARSERS[key](value)
        except ConfigError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None

    cache_dir = values.get("cache_dir", Config.cache_dir)
    if values.get("ca_dir") is None:
        values["ca_dir"] = cache_dir / "ca"
    intercept = values.get("intercept", Config.intercept)
    if "allowed_ports" not in values:
        values["allowed_ports"] = frozenset({443} | ports_named_in(intercept))
    values["listen_is_default"] = "listen" not in raw
    if values.get("tag_ttl", Config.tag_ttl) > values.get("stale_if_error", Config.stale_if_error):
        log.warning("stale_if_error is shorter than tag_ttl: stale tags will never be served")
    peers, peer_self = values.get("peers", ()), values.get("peer_self")
    if peer_self is not None and peer_self not in peers:
        raise ConfigError(f"config key 'peer_self': {peer_self} is not one of peers")
    if values.get("store", Config.store).type == "filesystem":
        for key in ("shared_max_size", "shared_trim_interval"):
            if values.get(key) is not None:
                raise ConfigError(
                    f"config key {key!r}: it bounds the shared store, and there is none "
                    "(store type filesystem): set store: {type: s3, ...} or remove it"
                )
    bundle = values.get("upstream_ca_bundle")
    try:
        bundle_ok = bundle is None or bundle.is_file()
    except OSError as e:  # a folder this user may not enter (a tool run by another user)
        raise ConfigError(f"config key 'upstream_ca_bundle': {bundle}: {e.strerror}") from None
    if not bundle_ok:
        raise ConfigError(f"config key 'upstream_ca_bundle': {bundle} is not a readable file")
    return Config(**values)
