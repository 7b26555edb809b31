"""The `registry-cache` command: serve, and tools that read the same config."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import __version__
from .ca import CAError
from .config import Config, ConfigError, human_size, load_config
from .index import Index
from .store_maintenance import StoreMaintenance

DEFAULT_CONFIG = Path("/etc/registry-cache/config.yml")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "registry_cache.access":
            return record.getMessage()
        return json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def setup_logging(config: Config | None, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config is not None and config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((config.log_level if config else level).upper())
    # aiohttp reports every client that hangs up mid-response; those are not our errors.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve
    from .connections import raise_descriptor_limit
    from .heap import map_large_buffers

    config = _load(args)
    setup_logging(config)
    raise_descriptor_limit()  # before the listener sizes max_connections from it
    map_large_buffers()
    try:
        _run_event_loop(serve(config))
    except (OSError, CAError) as e:
        print(f"registry-cache: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


def _run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    # uvloop, measured: a third less memory per TLS connection, less CPU per GiB
    # (docs/BENCHMARKS.md); the standard loop where it is not installed.
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _open_store(config: Config) -> tuple[Index, StoreMaintenance]:
    from .blobs import FilesystemBlobStore
    from .metrics import Metrics

    index_path = config.cache_dir / "index.sqlite3"
    if not index_path.exists():
        raise ConfigError(f"no cache at {config.cache_dir} (no index.sqlite3); is cache_dir right?")
    index = Index(index_path)
    store = FilesystemBlobStore(config.cache_dir)
    maintenance = StoreMaintenance(config, store, index, Metrics())
    maintenance.refresh_size()
    return index, maintenance


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    index, maintenance = _open_store(config)
    stats = index.stats()
    hits, misses, stale = stats.get("hits", 0), stats.get("misses", 0), stats.get("stales", 0)
    served = hits + misses + stale
    oldest = index.oldest_access()
    report = {
        "cache_dir": str(config.cache_dir),
        "size_bytes": maintenance.size,
        "max_size_bytes": config.max_size,
        "entries": index.count(),
        "hits": hits,
        "misses": misses,
        "stale": stale,
        "hit_ratio": round((hits + stale) / served, 4) if served else None,
        "oldest_access": oldest,
    }
    index.close()
    cluster = _cluster_view(config) if config.store.shared or config.peers else None
    if cluster is not None:
        report["cluster"] = cluster
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    age = f"{(time.time() - oldest) / 86400:.1f} days ago" if oldest else "-"
    ratio = f"{report['hit_ratio']:.1%}" if report["hit_ratio"] is not None else "-"
    print(f"cache dir     {config.cache_dir}")
    print(f"size          {human_size(maintenance.size)} of {human_size(config.max_size)}")
    print(f"entries       {report['entries']}")
    print(f"hit ratio     {ratio} ({hits} hits, {stale} stale, {misses} misses)")
    print(f"oldest entry  last used {age}")
    if cluster is not None:
        for line in _cluster_lines(cluster):
            print(line)
    return 0


def _cluster_view(config: Config) -> dict[str, Any]:
    """The running service's view of the shared store and the peers (admin socket)."""
    from .admin_client import AdminRefused, AdminUnavailable, call

    try:
        return call(config.admin_socket_path, "GET", "/admin/cluster")
    except (AdminUnavailable, AdminRefused) as e:
        return {"error": str(e)}


def _cluster_lines(view: dict[str, Any]) -> list[str]:
    if "error" in view:
        return [f"cluster       not asked: {view['error']}"]
    lines = []
    now = time.time()
    shared = view.get("shared_store")
    if shared:
        state = "reachable" if shared.get("reachable") else f"UNREACHABLE: {shared.get('problem')}"
        prefix = shared.get("prefix") or "-"
        lines.append(
            f"shared store  {shared['endpoint']} bucket {shared['bucket']} prefix {prefix} "
            f"({state})"
        )
        lease = shared.get("lease") or {}
        bound = shared.get("shared_max_size")
        if bound is None:
            lines.append("  size        not bounded (no shared_max_size): not trimmed")
        elif lease.get("bucket_bytes") is not None:
            age = now - float(lease.get("trimmed_at") or now)
            lines.append(
                f"  size        {human_size(lease['bucket_bytes'])} of {human_size(bound)} "
                f"(shared_max_size), {lease.get('bucket_blobs')} blobs, at the last trim "
                f"{age:.0f} s ago"
            )
        else:
            lines.append(f"  size        not known yet (no trim seen); bound {human_size(bound)}")
        if bound is not None:
            holder = lease.get("holder")
            if holder is None:
                lines.append("  trim lease  held by nobody (expired or never taken)")
            else:
                mine = " (this node)" if lease.get("held_by_me") else ""
                left = float(lease.get("expires") or now) - now
                lines.append(f"  trim lease  held by {holder}{mine}, {left:.0f} s left")
    peers = view.get("peers") or []
    if peers:
        parts = []
        for peer in peers:
            if peer.get("self"):
                parts.append(f"{peer['node']} (this node)")
            else:
                seen = "reachable" if peer["reachable"] else "UNREACHABLE"
                parts.append(f"{peer['node']} {seen}")
        lines.append("peers         " + ", ".join(parts))
    elif view.get("node"):
        lines.append(f"node          {view['node']} (no peers)")
    return lines


def cmd_gc(args: argparse.Namespace) -> int:
    config = _load(args)
    index, maintenance = _open_store(config)
    before = maintenance.size, index.count()
    expired = maintenance.expire_inactive()
    maintenance.make_room(0)
    after = maintenance.size, index.count()
    index.close()
    print(
        f"removed {before[1] - after[1]} blobs ({expired} unused for longer than inactive), "
        f"freed {human_size(before[0] - after[0])}; "
        f"{human_size(after[0])} in {after[1]} blobs remain"
    )
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    from .prefetch import PrefetchError, prefetch

    config = _load(args)
    address = config.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    # A proxy URL with a password comes from the environment, never the command line
    # (which every local user can read in /proc).
    proxy = (
        args.proxy
        or os.environ.get("REGISTRY_CACHE_PREFETCH_PROXY")
        or f"http://{'[' + host + ']' if ':' in host else host}:{address.port}"
    )
    ca_file = config.ca_dir / "ca.crt"
    try:
        reports = prefetch(args.images, proxy, ca_file, args.platform)
    except PrefetchError as e:
        print(f"registry-cache prefetch: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"registry-cache prefetch: cannot use the proxy at {proxy}: {e}", file=sys.stderr)
        return 1
    for r in reports:
        results = ", ".join(f"{k} {v}" for k, v in sorted(r.results.items()))
        size = human_size(r.bytes)
        print(f"{r.image}: {r.manifests} manifests, {r.blobs} blobs, {size} ({results})")
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from .ca import CAError, rotate_activate, rotate_finish, rotate_stage, rotation_state

    config = _load(args)
    ca_dir = config.ca_dir
    if args.rotate and args.action == "show":
        args.action = "stage"
    try:
        if args.action == "stage":
            staged = rotate_stage(ca_dir, config.ca_name_constraints)
            print(f"staged a new CA as {ca_dir / 'next.crt'} (sha256 {staged.fingerprint()}).")
            print("Make every client trust it (ca-bundle.crt), then run `ca rotate --activate`.")
        elif args.action == "activate":
            rotate_activate(ca_dir)
            print("the staged CA is now current; restart the proxy to sign with it.")
            print("Once no client needs the old CA, run `ca rotate --finish`.")
        elif args.action == "finish":
            print("removed the previous CA" if rotate_finish(ca_dir) else "no previous CA")
        else:
            for stem, fingerprint in rotation_state(ca_dir).items():
                print(f"{stem:9} {fingerprint or '-'}")
    except (CAError, OSError) as e:
        print(f"registry-cache ca: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    """ls, purge, pin, unpin, refresh: asked of the running service (admin_client.py)."""
    from .admin_client import AdminUnavailable, check_config_readable, run

    try:
        found = check_config_readable(args.config or DEFAULT_CONFIG)
    except AdminUnavailable as e:
        print(f"registry-cache {args.command}: {e}", file=sys.stderr)
        return 1
    if args.config is None and not found:
        return run(args, load_config(None))  # no config file: defaults and REGISTRY_CACHE_*
    return run(args, _load(args))


def cmd_hash_password(args: argparse.Namespace) -> int:
    from .proxy_auth import hash_password

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass()
    if not password:
        print("registry-cache: an empty password is not allowed", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-cache",
        description="A caching, TLS-intercepting proxy for container registries.",
    )
    parser.add_argument("--version", action="version", version=f"registry-cache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"YAML config file (default {DEFAULT_CONFIG} when it exists); "
            "REGISTRY_CACHE_<KEY> variables override it",
        )
        return p

    add("serve", "run the proxy").set_defaults(func=cmd_serve)
    st = add(
        "status",
        "size, entries, hit ratio and oldest entry of the cache; the shared store and the "
        "peers as the running service sees them",
    )
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)
    add("gc", "remove blobs unused for `inactive` and evict down to max_size now").set_defaults(
        func=cmd_gc
    )
    pf = add("prefetch", "pull images through the running proxy so that they are cached")
    pf.add_argument("images", nargs="+", metavar="IMAGE", help="e.g. alpine:3.20 ghcr.io/org/app:1")
    pf.add_argument("--platform", help="only this platform of a multi-platform image (linux/amd64)")
    pf.add_argument(
        "--proxy",
        help="proxy URL (default: $REGISTRY_CACHE_PREFETCH_PROXY, else the first listen "
        "address); give one with a password in that variable, not here",
    )
    pf.set_defaults(func=cmd_prefetch)
    ca = add("ca", "show the CA, or rotate it across a fleet in three steps")
    ca.add_argument("rotate", nargs="?", choices=["rotate"], help="rotate the CA")
    steps = ca.add_mutually_exclusive_group()
    for step in ("stage", "activate", "finish"):
        steps.add_argument(f"--{step}", dest="action", action="store_const", const=step)
    ca.set_defaults(func=cmd_ca, action="show")
    ls = add("ls", "cached images: tags, digest, size, last pulled, pulls, tag rule, pinned")
    ls.add_argument(
        "glob",
        nargs="?",
        metavar="REGISTRY/REPO-GLOB",
        help="only these, e.g. 'ghcr.io/org/*' or 'docker.io/library/alpine'",
    )
    ref_help = "e.g. alpine:3, registry.example:5000/team/app:1.0 or ...@sha256:<hex>"
    for name, help_text in (
        ("purge", "remove an image's tag answers and the blobs no other cached image uses"),
        ("pin", "keep an image whatever max_size and inactive say (no REF: list the pins)"),
        ("unpin", "let a pinned image be evicted again"),
        ("refresh", "make the next pull of a tag revalidate it upstream, as after tag_ttl"),
    ):
        p = add(name, help_text)
        p.add_argument("ref", metavar="REF", nargs="?" if name == "pin" else None, help=ref_help)
    for name in ("ls", "purge", "pin", "unpin", "refresh"):
        sub.choices[name].add_argument("--json", action="store_true", help="print JSON")
        sub.choices[name].set_defaults(func=cmd_admin)
    hp = sub.add_parser(
        "hash-password",
        help="read a password (prompt or stdin) and print the hash for a `users` entry",
    )
    hp.set_defaults(func=cmd_hash_password)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"registry-cache: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
