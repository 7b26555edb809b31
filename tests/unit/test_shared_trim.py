"""The shared store's trim without a bucket: access maps read from what nodes wrote,
every node's reads merged, and the plan (least recently read first, pins kept)."""

from __future__ import annotations

import hashlib

import pytest

from proxy_app.config import ConfigError, load_config
from proxy_app.shared_trim import (
    AccessMap,
    BucketBlob,
    map_name,
    merge_reads,
    parse_access_map,
    plan_trim,
)


def d(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def test_parse_access_map_keeps_only_well_formed_entries() -> None:
    doc = {
        "node": "10.0.0.1:3128",
        "written": 100.5,
        "reads": {d(1): 10, d(2): 20.5, "sha256:short": 30, d(3): "late", d(4): True},
        "pinned": [d(5), "../etc/passwd", 7],
    }
    access = parse_access_map(doc)
    assert access == AccessMap("10.0.0.1:3128", 100.5, {d(1): 10.0, d(2): 20.5}, frozenset({d(5)}))
    for bad in (None, [], {"node": 1, "written": 1, "reads": {}}, {"node": "a", "reads": {}}):
        assert parse_access_map(bad) is None
    assert parse_access_map({"node": "a", "written": 1, "reads": {}, "pinned": "x"}) == AccessMap(
        "a", 1.0, {}
    )


def test_merge_takes_each_digests_latest_read_on_any_node() -> None:
    a = AccessMap("a", 0, {d(1): 10.0, d(2): 50.0})
    b = AccessMap("b", 0, {d(1): 40.0, d(3): 5.0})
    assert merge_reads([a, b]) == {d(1): 40.0, d(2): 50.0, d(3): 5.0}
    assert merge_reads([]) == {}


def test_plan_deletes_least_recently_read_until_under_the_bound() -> None:
    blobs = [
        BucketBlob(d(1), 100, modified=1.0),  # uploaded first, read again late on node b
        BucketBlob(d(2), 100, modified=2.0),  # read by nobody since its upload
        BucketBlob(d(3), 100, modified=3.0),  # newest upload
        BucketBlob(d(4), 100, modified=0.5),  # read at 2.5 on node a
    ]
    reads = merge_reads([AccessMap("a", 9, {d(4): 2.5}), AccessMap("b", 9, {d(1): 9.0})])
    plan = plan_trim(blobs, reads, set(), max_size=250)
    assert [b.digest for b in plan.delete] == [d(2), d(4)]
    assert (plan.total, plan.after, plan.cut) == (400, 200, 2.5)
    # within the bound: nothing
    assert plan_trim(blobs, reads, set(), max_size=400).delete == []
    # LastModified is a floor: a read older than the upload does not make it older
    stale_read = merge_reads([AccessMap("a", 9, {d(3): 0.1})])
    assert [b.digest for b in plan_trim(blobs, stale_read, set(), 350).delete] == [d(4)]


def test_plan_keeps_pinned_blobs_and_says_when_they_alone_overflow() -> None:
    blobs = [BucketBlob(d(i), 100, modified=float(i)) for i in range(1, 5)]
    plan = plan_trim(blobs, {}, {d(1), d(2)}, max_size=300)
    assert [b.digest for b in plan.delete] == [d(3)]
    assert plan.pinned_bytes == 200
    over = plan_trim(blobs, {}, {d(1), d(2), d(3)}, max_size=150)
    assert [b.digest for b in over.delete] == [d(4)]
    assert over.after == 300  # over the bound: only pinned blobs are left


def test_plan_ties_are_broken_the_same_way_on_every_node() -> None:
    blobs = [BucketBlob(d(i), 10, modified=5.0) for i in range(6)]
    first = plan_trim(blobs, {}, set(), 30).delete
    assert first == plan_trim(list(reversed(blobs)), {}, set(), 30).delete
    assert [b.digest for b in first] == sorted(b.digest for b in blobs)[:3]


def test_map_names_are_safe_object_names() -> None:
    assert map_name("127.0.0.1:3128") == "127.0.0.1_3128.json"
    assert map_name("[fd00::1]:3128") == "_fd00__1__3128.json"
    assert map_name("cache1-ab12cd34") == "cache1-ab12cd34.json"


def test_trim_interval_config() -> None:
    assert load_config(None, environ={}).shared_trim_interval == 60.0
    store = {"REGISTRY_CACHE_STORE": "{type: s3, endpoint: 'http://h:8333', bucket: rcb}"}
    cfg = load_config(None, environ={**store, "REGISTRY_CACHE_SHARED_TRIM_INTERVAL": "2s"})
    assert cfg.shared_trim_interval == 2.0
    with pytest.raises(ConfigError, match="shared_trim_interval"):
        load_config(None, environ={**store, "REGISTRY_CACHE_SHARED_TRIM_INTERVAL": "0"})
