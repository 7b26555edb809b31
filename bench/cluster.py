"""Issue 18's figures: cache nodes on one S3 bucket (SeaweedFS on loopback) that list
each other as `peers`, against the same upstream and nginx as the other figures.

- warm blob GET from the bucket tier (a node whose own disk is empty, the bucket full)
  and from the local tier (the same node again), each against nginx serving the files;
- a cold GET of the blobs a node does not own (the owner fetches them and streams them
  to it) against the same GETs straight from the upstream;
- 30 clients on 3 nodes pulling the cold image at once: upstream bytes / image size,
  and each node's peak RSS.

Every comparison alternates which side goes first, run by run (figures.py does alike).
"""

from __future__ import annotations

import shutil
import time
import uuid
from typing import Any

import yaml

from proxy_app.peers import owner
from tests.support.proxy import Proxy
from tests.support.seaweed import Seaweed

from . import tools
from .figures import (
    MB,
    Params,
    _client_argv,
    _fetched_upstream,
    _pid,
    _quartiles,
    _trouble,
    pair_ratios,
    paired_ratio,
    upstream_log_mark,
    upstream_requests,
)
from .services import Bench
from .tools import median

NODES = 3
UPLOADS_TIMEOUT = 300.0  # seconds for the nodes' background uploads to reach the bucket


class Cluster:
    """SeaweedFS with one bucket, and cache nodes made on it (one CA: the bench's)."""

    def __init__(self, bench: Bench, log: Any) -> None:
        self.bench = bench
        self.log = log
        self.dir = bench.run_dir / "cluster"
        self.seaweed = Seaweed(self.dir / "seaweed")
        self.bucket = ""
        self._count = 0

    def __enter__(self) -> Cluster:
        self.seaweed.start()
        try:
            self.bucket = self.seaweed.make_bucket()
        except BaseException:
            self.seaweed.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.seaweed.stop()

    def store(self, prefix: str) -> dict[str, Any]:
        return {
            "type": "s3",
            "endpoint": self.seaweed.endpoint,
            "bucket": self.bucket,
            "prefix": prefix,
            "access_key_id": self.seaweed.access_key,
            "secret_access_key": self.seaweed.secret_key,
        }

    def node(self, prefix: str, start: bool = True) -> Proxy:
        """A node: the bench's proxy config, a fresh cache dir, the bucket under `prefix`."""
        self._count += 1
        config = dict(self.bench.proxy_config())
        config["store"] = self.store(prefix)
        proxy = Proxy(self.dir / f"node-{self._count}", config)
        return proxy.start() if start else proxy

    def nodes(self, prefix: str, n: int = NODES) -> list[Proxy]:
        """n nodes listing each other in `peers` (the bench's CA directory is shared)."""
        made = [self.node(prefix, start=False) for _ in range(n)]
        for node in made:
            node.config["peers"] = [name_of(p) for p in made]
            node.config_path.write_text(yaml.safe_dump(node.config))
        try:
            for node in made:
                node.start()
        except BaseException:
            self.drop(made)
            raise
        return made

    def drop(self, nodes: list[Proxy]) -> None:
        for node in nodes:
            node.stop()
            shutil.rmtree(node.dir, ignore_errors=True)

    def bucket_blobs(self, prefix: str) -> set[str]:
        start = f"{prefix}blobs/sha256/"
        return {"sha256:" + k[len(start) :] for k in self.seaweed.keys(self.bucket, start)}

    def wait_uploaded(self, prefix: str, digests: set[str]) -> float:
        t0 = time.monotonic()
        while not digests <= self.bucket_blobs(prefix):
            if time.monotonic() - t0 > UPLOADS_TIMEOUT:
                missing = digests - self.bucket_blobs(prefix)
                raise RuntimeError(f"not in the bucket after {UPLOADS_TIMEOUT:.0f} s: {missing}")
            time.sleep(0.5)
        return time.monotonic() - t0


def name_of(node: Proxy) -> str:
    return f"127.0.0.1:{node.port}"


def _prefix() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}/"


def _hwm_mb(node: Proxy) -> float:
    return tools.status_kib(_pid(node), "VmHWM") * 1024 / MB


def _herd(cl: Cluster, p: Params, log: Any) -> dict[str, Any]:
    bench = cl.bench
    prefix = _prefix()
    nodes = cl.nodes(prefix)
    try:
        idle = [tools.status_kib(_pid(n), "VmRSS") * 1024 / MB for n in nodes]
        mark = upstream_log_mark(bench)
        argvs = [_client_argv(bench, nodes[i % NODES]) for i in range(p.cluster_clients)]
        samplers = [tools.RssSampler(_pid(n)) for n in nodes]
        for s in samplers:
            s.__enter__()
        try:
            runs, spawned = tools.curl_many(argvs)
        finally:
            for s in samplers:
                s.__exit__()
        bench.wait_quiet(0.5)
        failed = [r for r in runs if r.returncode != 0 or not all(c == 200 for c in r.codes)]
        if failed:
            trouble = " / ".join(_trouble(n) for n in nodes)
            raise RuntimeError(f"{len(failed)} of {len(runs)} failed: {failed[0]}; {trouble}")
        fetched, manifests, per_blob = _fetched_upstream(bench, mark)
        # RSS while the owners upload to the bucket behind the clients counts too.
        uploads_s = cl.wait_uploaded(prefix, set(bench.image.blob_digests))
        peaks = [max(_hwm_mb(n), s.peak * 1024 / MB) for n, s in zip(nodes, samplers, strict=True)]
    finally:
        cl.drop(nodes)
    expected = bench.image.total_bytes
    slowest = max(r.seconds for r in runs)
    log(
        f"  {p.cluster_clients} clients on {NODES} nodes: slowest {slowest:.2f} s (spawned in "
        f"{spawned:.2f} s), upstream bytes / image {fetched / expected:.4f}, GETs per blob "
        f"{sorted(per_blob.values())}, manifest GETs {manifests}; in the bucket "
        f"{uploads_s:.1f} s later; peak RSS per node {[round(x) for x in peaks]} MB "
        f"(idle {[round(x) for x in idle]})"
    )
    return {
        "clients": p.cluster_clients,
        "nodes": NODES,
        "upstream_bytes_ratio": fetched / expected,
        "max_upstream_gets_per_blob": max(per_blob.values()),
        "upstream_manifest_gets": manifests,
        "slowest_s": slowest,
        "bucket_filled_after_s": uploads_s,
        "peak_rss_mb": peaks,
        "idle_rss_mb": idle,
        "image_bytes": expected,
    }


def _tiers(cl: Cluster, p: Params, log: Any) -> dict[str, Any]:
    """One node's layers from the bucket (its disk empty), then from its disk; nginx
    beside each run. The bucket is filled once, by a node of its own."""
    bench = cl.bench
    prefix = _prefix()
    layers = bench.image.layer_digests
    proxy_urls = [bench.blob_url(d) for d in layers]
    nginx_urls = [bench.nginx_url(d) for d in layers]
    ca = bench.pki.ca_path
    filler = cl.node(prefix)
    try:
        r = tools.curl(proxy_urls, filler.ca_path, proxy_port=filler.port)
        if not r.ok:
            raise RuntimeError(f"filling the bucket: {r.codes}")
        cl.wait_uploaded(prefix, set(layers))
    finally:
        cl.drop([filler])
    tools.curl(nginx_urls, ca)  # warm nginx's page cache
    rates: dict[str, list[float]] = {"bucket": [], "local": [], "nginx_b": [], "nginx_l": []}
    rss: list[float] = []
    for i in range(p.cluster_runs_tier):
        node = cl.node(prefix)
        try:
            mark = upstream_log_mark(bench)
            for tier, ref in (("bucket", "nginx_b"), ("local", "nginx_l")):
                order = (ref, tier) if i % 2 == 0 else (tier, ref)
                for side in order:
                    if side == tier:
                        r = tools.curl(proxy_urls, node.ca_path, proxy_port=node.port)
                    else:
                        r = tools.curl(nginx_urls, ca)
                    if not r.ok or r.bytes != bench.image.layer_bytes:
                        raise RuntimeError(f"{side}: {r.codes}, {r.bytes} bytes")
                    rates[side].append(r.bytes / r.seconds)
            rss.append(_hwm_mb(node))
            asked = [u for u in upstream_requests(bench, mark) if "/blobs/" in u.uri]
            if asked:
                raise RuntimeError(f"the bucket-tier node asked upstream: {asked[:3]}")
            bucket_lines = [ln for ln in node.log_lines("from bucket") if "/blobs/" in ln]
            if len(bucket_lines) < len(layers):
                raise RuntimeError(f"not every layer came from the bucket: {bucket_lines}")
        finally:
            cl.drop([node])
        log(
            f"  run {i + 1}: bucket tier {rates['bucket'][-1] / MB:.0f} MB/s (nginx "
            f"{rates['nginx_b'][-1] / MB:.0f}), local tier {rates['local'][-1] / MB:.0f} MB/s "
            f"(nginx {rates['nginx_l'][-1] / MB:.0f}), peak RSS {rss[-1]:.0f} MB"
        )
    return {
        "bucket_mb_s": median(rates["bucket"]) / MB,
        "local_mb_s": median(rates["local"]) / MB,
        "nginx_mb_s": median(rates["nginx_b"] + rates["nginx_l"]) / MB,
        "bucket_ratio": paired_ratio(rates["bucket"], rates["nginx_b"]),
        "local_ratio": paired_ratio(rates["local"], rates["nginx_l"]),
        "peak_rss_mb": max(rss),
        "bytes_per_run": bench.image.layer_bytes,
        "samples_mb_s": {k: [round(v / MB, 1) for v in vs] for k, vs in rates.items()},
    }


def _cold_run(cl: Cluster, kind: str, first: str) -> tuple[dict[str, float], int, int]:
    """One pair on a fresh 3-node cluster (fresh prefix): through the node that owns
    the fewest of the image's blobs (their owners download the rest and stream them to
    it) and straight from the upstream, `first` first. `kind` "pull": skopeo copies the
    whole image; "get": curl fetches the layers the node does not own, one after
    another. The seconds of each side; the blobs that went through a peer, of how many."""
    bench = cl.bench
    nodes = cl.nodes(_prefix())
    try:
        names = [name_of(n) for n in nodes]
        blobs = bench.image.blob_digests if kind == "pull" else bench.image.layer_digests
        asker = min(nodes, key=lambda n: sum(owner(names, d) == name_of(n) for d in blobs))
        theirs = [d for d in blobs if owner(names, d) != name_of(asker)]
        urls = [bench.blob_url(d) for d in theirs]
        expected = sum(bench.image.sizes[d] for d in theirs)
        out: dict[str, float] = {}
        for side in (first, "direct" if first == "node" else "node"):
            port = asker.port if side == "node" else None
            if kind == "pull":
                cert_dir = asker.cert_dir if side == "node" else bench.pki.cert_dir
                out[side] = tools.skopeo_pull(bench.upstream_ref(), cert_dir, proxy_port=port)
                continue
            ca = asker.ca_path if side == "node" else bench.pki.ca_path
            r = tools.curl(urls, ca, proxy_port=port)
            if not r.ok or r.bytes != expected:
                raise RuntimeError(f"{side}: {r.codes}, {r.bytes} of {expected} bytes")
            out[side] = r.seconds
        peer_lines = [
            ln
            for n in nodes
            if n is not asker
            for ln in n.log_lines()
            if ln.rstrip().endswith("peer") and "/blobs/" in ln
        ]
        if len(peer_lines) < len(theirs):
            raise RuntimeError(f"the owners were not asked: {peer_lines}")
    finally:
        cl.drop(nodes)
    return out, len(theirs), len(blobs)


def _cold_non_owner(cl: Cluster, p: Params, log: Any) -> dict[str, Any]:
    """Pairs of cold runs, alternating which side goes first: a whole-image pull
    (skopeo, as figure 3) and the GETs of the layers that are not the node's own (curl)."""
    times: dict[str, dict[str, list[float]]] = {
        kind: {"node": [], "direct": []} for kind in ("pull", "get")
    }
    through: dict[str, list[str]] = {"pull": [], "get": []}
    for i in range(p.cluster_runs_cold):
        first = "direct" if i % 2 == 0 else "node"
        for kind in ("pull", "get"):
            pair, peer, total = _cold_run(cl, kind, first)
            for side, seconds in pair.items():
                times[kind][side].append(seconds)
            through[kind].append(f"{peer}/{total}")
        log(
            f"  run {i + 1}: image pull direct {times['pull']['direct'][-1]:.2f} s, through "
            f"the node {times['pull']['node'][-1]:.2f} s ({through['pull'][-1]} blobs from "
            f"peers); layer GETs ({through['get'][-1]} layers) direct "
            f"{times['get']['direct'][-1]:.2f} s, through the node {times['get']['node'][-1]:.2f} s"
        )
    out: dict[str, Any] = {}
    for kind, t in times.items():
        out[kind] = {
            "node_s": median(t["node"]),
            "direct_s": median(t["direct"]),
            "ratio": paired_ratio(t["node"], t["direct"]),
            "ratio_quartiles": _quartiles(pair_ratios(t["node"], t["direct"])),
            "through_peers": through[kind],
            "samples_s": {k: [round(v, 3) for v in vs] for k, vs in t.items()},
        }
    return out


def cluster(bench: Bench, p: Params, log: Any) -> dict[str, Any]:
    """Every cluster figure, on one SeaweedFS started for them."""
    out: dict[str, Any] = {}
    with Cluster(bench, log) as cl:
        for name, fn in (("herd", _herd), ("tiers", _tiers), ("cold", _cold_non_owner)):
            log(f"  - {name}")
            try:
                out[name] = fn(cl, p, log)
            except Exception as e:  # the other parts still run
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  {name} failed: {out[name]['error']}")
    return out
