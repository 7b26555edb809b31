"""Start-up time of the proxy with a large store (issue 5, Must show 5).

`measure_startup(workdir)` fills a cache_dir with `entries` blobs (small files under
their true digests) and the matching index rows, then starts `python -m proxy_app serve`
on it several times and reports how long each start took, plus one start after the
index was deleted (every file verified and re-indexed). The bench harness calls it;
by hand: `cd tests && python -m support.startup_bench --entries 100000`.

A start is timed from just before the process is spawned to the proxy's own
"ready" log line (the listener is up); the time until /healthz first answers is
reported too, as a check.

Making and deleting 100,000 files is the slow part (tens of seconds each on this
machine's ext4 with discard); `--workdir` on a tmpfs makes both quick, with the same
warm-cache start-up figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from .proxy import Proxy

READY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*registry-cache \S+ ready", re.M)
RECONCILED = re.compile(r"store reconciled in ([\d.]+)s")


@dataclass
class StartupFigures:
    entries: int
    populate_seconds: float
    start_seconds: list[float] = field(default_factory=list)  # spawn -> "ready"
    healthy_seconds: list[float] = field(default_factory=list)  # spawn -> /healthz 200
    reconcile_seconds: list[float] = field(default_factory=list)  # as the proxy logs it
    empty_start_seconds: float = 0.0  # the same start with an empty store (baseline)
    rebuild_start_seconds: float = 0.0  # index deleted: every file verified, re-indexed
    rebuild_reconcile_seconds: float = 0.0

    @property
    def median_start(self) -> float:
        return statistics.median(self.start_seconds)

    def summary(self) -> str:
        return (
            f"start-up with {self.entries} index entries: median {self.median_start:.2f}s "
            f"(runs {', '.join(f'{s:.2f}' for s in self.start_seconds)}; reconcile "
            f"{statistics.median(self.reconcile_seconds):.2f}s; empty store "
            f"{self.empty_start_seconds:.2f}s); index rebuilt from the store: "
            f"{self.rebuild_start_seconds:.2f}s"
        )


def _timed_start(proxy: Proxy) -> tuple[float, float, float]:
    """(spawn -> ready log line, spawn -> healthy, reconcile as logged) of one start."""
    log_offset = proxy.stderr_path.stat().st_size if proxy.stderr_path.exists() else 0
    wall, mono = time.time(), time.monotonic()
    proxy.start(timeout=600)
    healthy = time.monotonic() - mono
    with proxy.stderr_path.open("rb") as f:
        f.seek(log_offset)
        text = f.read().decode(errors="replace")
    ready = READY.search(text)
    reconciled = RECONCILED.search(text)
    if not ready or not reconciled:
        raise RuntimeError(f"no ready/reconciled line in the proxy's log:\n{text[-2000:]}")
    ready_at = datetime.strptime(ready.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return ready_at - wall, healthy, float(reconciled.group(1))


def populate(cache_dir: Path, entries: int) -> None:
    """`entries` distinct small blobs in the store and their rows in the index (which the
    proxy has created before: its schema is the proxy's own)."""
    root = cache_dir / "blobs" / "sha256"
    salt = os.urandom(8).hex()
    now = time.time()
    rows = []
    for i in range(entries):
        data = f"registry-cache start-up bench {salt} {i}\n".encode()
        hexd = hashlib.sha256(data).hexdigest()
        shard = root / hexd[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / hexd).write_bytes(data)
        # spread over the last 30 days, as a store in use would be
        rows.append((f"sha256:{hexd}", len(data), None, now - i * 25, now - i * 25))
    db = sqlite3.connect(cache_dir / "index.sqlite3")
    try:
        with db:
            db.executemany(
                "INSERT INTO blobs(digest, size, media_type, stored_at, last_access) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
    finally:
        db.close()


def measure_startup(workdir: Path, entries: int = 100_000, runs: int = 3) -> StartupFigures:
    """Builds a store of `entries` blobs under `workdir` and times the proxy's start."""
    proxy = Proxy(workdir / "startup-proxy", {"max_size": "1t", "inactive": "3650d"})
    try:
        empty, _, _ = _timed_start(proxy)  # also makes the CA and the index schema
        proxy.stop()
        began = time.monotonic()
        populate(proxy.cache_dir, entries)
        figures = StartupFigures(entries, round(time.monotonic() - began, 2))
        figures.empty_start_seconds = round(empty, 3)
        for _ in range(runs):
            start, healthy, reconcile = _timed_start(proxy)
            proxy.stop()
            figures.start_seconds.append(round(start, 3))
            figures.healthy_seconds.append(round(healthy, 3))
            figures.reconcile_seconds.append(reconcile)
        for suffix in ("", "-wal", "-shm"):
            (proxy.cache_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
        start, _, reconcile = _timed_start(proxy)
        figures.rebuild_start_seconds = round(start, 3)
        figures.rebuild_reconcile_seconds = reconcile
        # the rebuilt index holds every entry again
        db = sqlite3.connect(proxy.cache_dir / "index.sqlite3")
        try:
            count = db.execute("SELECT count(*) FROM blobs").fetchone()[0]
        finally:
            db.close()
        if count != entries:
            raise RuntimeError(f"rebuilt index has {count} entries, expected {entries}")
        return figures
    finally:
        proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", type=Path, help="where to build the store (default: /tmp)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rc-startup-", dir=args.workdir))
    try:
        figures = measure_startup(workdir, args.entries, args.runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({**asdict(figures), "median_start": figures.median_start}, indent=2))
    else:
        print(figures.summary())


if __name__ == "__main__":
    main()
