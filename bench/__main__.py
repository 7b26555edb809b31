"""`python -m bench [--quick]`: run the figures, print the table, write docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import REPO_ROOT, cluster, figures, report, tools
from .figures import Params
from .services import Bench

FULL = {"layers": 5, "layer_size": 100_000_000, "params": Params()}
QUICK = {
    "layers": 5,
    "layer_size": 10_000_000,
    "params": Params(
        runs_throughput=3,
        runs_pull=2,  # one pair of each order
        runs_cold=2,  # one pair of each order
        runs_herd=1,
        herd_clients=50,
        runs_rss=1,
        rss_downloads=200,
        latency_batches=2,
        latency_requests=300,
        cluster_runs_tier=2,
        cluster_runs_cold=2,
    ),
}
# Kept between runs: the generated image and the upstream storage holding it.
DEFAULT_CACHE = "/var/tmp/registry-cache-bench"  # noqa: S108
FIGURES = (
    "throughput",
    "warm_pull",
    "mirror_pull",
    "tag_latency",
    "peak_rss",
    "cold_pull",
    "herd",
    "cluster",
)


def _log(message: str) -> None:
    print(message, flush=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="reduced version (10 MB layers, fewer runs)"
    )
    ap.add_argument(
        "--only", action="append", choices=FIGURES, help="run only this figure (repeatable)"
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("BENCH_CACHE", DEFAULT_CACHE)),
        help="where the generated image and upstream storage are kept between runs",
    )
    ap.add_argument(
        "--layer-mb", type=int, help="layer size in MB instead of the mode's (100, quick 10)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    ap.add_argument(
        "--no-write", action="store_true", help="do not write docs/BENCHMARKS.md (full mode)"
    )
    ap.add_argument(
        "--render",
        type=Path,
        metavar="RAW_JSON",
        help="only write docs/BENCHMARKS.md again from a raw result file of a full run",
    )
    args = ap.parse_args(argv)
    if args.render:
        raw = json.loads(args.render.read_text())
        rows = report.rows(raw["results"])
        print(report.table(rows))
        doc = REPO_ROOT / "docs" / "BENCHMARKS.md"
        doc.write_text(report.markdown(rows, raw["results"], raw["machine"], raw["meta"]))
        print(f"written: {doc.relative_to(REPO_ROOT)}")
        return 0
    mode = dict(QUICK if args.quick else FULL)
    if args.layer_mb:
        mode["layer_size"] = args.layer_mb * 1_000_000
    p: Params = mode["params"]  # type: ignore[assignment]
    wanted = args.only or list(FIGURES)
    if args.quick:
        tools.TIMEOUT = 60.0
    signal.signal(signal.SIGTERM, _terminate)

    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "quick" if args.quick else "full",
        "layers": mode["layers"],
        "layer_size": mode["layer_size"],
        "load_before": report.load(),
    }
    results: dict[str, Any] = {}

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name not in wanted:
            return
        _log(f"[{time.monotonic() - started:6.1f}s] {name}")
        try:
            results[name] = fn()
        except Exception as e:  # one broken figure must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}

    bench = Bench(args.cache, int(mode["layers"]), int(mode["layer_size"]), _log)  # type: ignore[call-overload]
    bench.keep = args.keep
    with bench:
        _log(f"[{time.monotonic() - started:6.1f}s] set up in {bench.run_dir}")
        warm = bench.proxy()
        step("throughput", lambda: figures.throughput(bench, warm, p, _log))
        step("warm_pull", lambda: figures.warm_pull(bench, warm, p, _log))
        step("mirror_pull", lambda: figures.mirror_pull(bench, warm, p, _log))
        step("tag_latency", lambda: figures.tag_latency(bench, warm, p, _log))

        def rss() -> dict[str, Any]:
            nonlocal warm
            if "throughput" not in wanted:  # the cache must hold the layers
                figures.fill(bench, warm)
            out, warm = figures.peak_rss(bench, warm, p, _log)
            return out

        step("peak_rss", rss)
        step("cold_pull", lambda: figures.cold_pull(bench, p, _log))
        step("herd", lambda: figures.herd(bench, p, _log))
        step("cluster", lambda: cluster.cluster(bench, p, _log))
        if args.keep:
            _log(f"logs kept in {bench.run_dir}")
    meta["seconds"] = time.monotonic() - started
    meta["load_after"] = report.load()

    rows = [r for r in report.rows(results) if "cluster" not in wanted or r.value != "not run"]
    cluster_rows = report.cluster_rows(results)
    if report.errors_text(results):
        print("\nerrors:\n" + report.errors_text(results))
    print()
    if rows:
        print(report.table(rows))
    if cluster_rows:
        print(f"\n{report.CLUSTER_HEADING[3:]}\n")
        print(report.table(cluster_rows))
    print(
        f"\n{meta['mode']} run, {meta['seconds']:.0f} s; load {meta['load_before']} -> "
        f"{meta['load_after']}"
    )
    raw_dir = REPO_ROOT / "docs" / "bench-raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    mach = report.machine()
    raw = raw_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{meta['mode']}.json"
    raw.write_text(json.dumps({"meta": meta, "machine": mach, "results": results}, indent=1))
    print(f"raw results: {raw.relative_to(REPO_ROOT)}")
    if not args.quick and not args.no_write and not args.only and not args.layer_mb:
        doc = REPO_ROOT / "docs" / "BENCHMARKS.md"
        doc.write_text(report.markdown(rows, results, mach, meta))
        print(f"written: {doc.relative_to(REPO_ROOT)}")
    elif args.only == ["cluster"] and not args.quick and not args.no_write and not args.layer_mb:
        # The cluster's section alone, the other figures' left as their last full run wrote
        doc = REPO_ROOT / "docs" / "BENCHMARKS.md"
        section = report.cluster_markdown(results, mach, meta)
        doc.write_text(report.with_cluster_section(doc.read_text(), section))
        print(f"written: the cluster section of {doc.relative_to(REPO_ROOT)}")
    failed = [r for r in rows + cluster_rows if r.value.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
