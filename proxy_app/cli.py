"""The `registry-cache` command: serve, and tools that read the same config."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load_config

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

    config = _load(args)
    setup_logging(config)
    asyncio.run(serve(config))
    return 0


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
