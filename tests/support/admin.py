"""The `registry-cache` admin commands (ls, purge, pin, unpin, refresh) run as an
operator runs them: the installed CLI against a running proxy's config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from support.proxy import REPO_ROOT, Proxy

CLI = str(REPO_ROOT / ".venv" / "bin" / "registry-cache")


def admin(
    proxy: Proxy,
    *args: str,
    prefix: tuple[str, ...] = (),
    config: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`registry-cache ARGS --config <the proxy's config>`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_CACHE_")}
    return subprocess.run(
        [*prefix, CLI, *args, "--config", str(config or proxy.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **(env or {})},
    )


def admin_json(proxy: Proxy, *args: str) -> Any:
    res = admin(proxy, *args, "--json")
    assert res.returncode == 0, f"registry-cache {' '.join(args)}: {res.stderr}"
    return json.loads(res.stdout)
