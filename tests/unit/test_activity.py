"""The status page's data: per-minute buckets and their windows, the bounded parts, the
registry label cap, and the page's escaping."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy_app import status_page
from proxy_app.activity import HISTORY_MINUTES, RECENT_EVENTS, TOP_TRACKED, Activity
from proxy_app.metrics import MAX_REGISTRY_LABELS, Metrics, RegistryLabels, ratelimit_value

T0 = 1_800_000_000.0 - (1_800_000_000 % 60)  # the start of a minute


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_windows_of_an_hour_and_a_day() -> None:
    clock = Clock()
    a = Activity(clock)
    a.request("ghcr.io", "org/app", "blob", "miss")  # 3 h ago, seen from the end
    a.sent("ghcr.io", "upstream", 1000)
    clock.now += 3 * 3600 - 30 * 60  # 2.5 h later
    a.request("ghcr.io", "org/app", "blob", "hit")  # 30 min ago
    a.sent("ghcr.io", "cache", 1000)
    clock.now += 30 * 60 - 59
    a.request("ghcr.io", "org/app", "tag", "stale", "upstream answered 503")  # 59 s ago
    clock.now += 59
    hour, day = a.window(60), a.window(1440)
    assert (hour.hits, hour.misses, hour.stales, hour.requests) == (1, 0, 1, 2)
    assert hour.hit_ratio == 1.0
    assert (day.hits, day.misses, day.stales, day.requests) == (1, 1, 1, 3)
    assert day.hit_ratio == round(2 / 3, 4)
    assert (day.bytes_cache, day.bytes_upstream, hour.bytes_upstream) == (1000, 1000, 0)
    # a window of n minutes: the current minute (empty here) and the n - 1 before it
    assert a.window(1).requests == 0 and a.window(2).requests == 1
    history = a.history(60)
    assert len(history) == 60 and history[-1]["start"] == clock.now
    assert sum(m["requests"] for m in history) == 2
    by_hour = a.history(1440, 60)
    assert len(by_hour) == 24 and sum(h["requests"] for h in by_hour) == 3


def test_history_is_bounded_to_a_day() -> None:
    clock = Clock()
    a = Activity(clock)
    for _ in range(HISTORY_MINUTES + 100):
        a.request("ghcr.io", "", "blob", "hit")
        clock.now += 60
    assert len(a._minutes) <= HISTORY_MINUTES
    assert a.window(1440).requests == HISTORY_MINUTES - 1  # the current minute is empty


def test_other_kinds_do_not_count_toward_the_hit_ratio() -> None:
    a = Activity(Clock())
    a.request("ghcr.io", "", "other", "pass")
    a.request("ghcr.io", "org/app", "blob", "denied")
    assert a.window(60).requests == 2 and a.window(60).hit_ratio is None


def test_bounded_repositories_and_events() -> None:
    a = Activity(Clock())
    for _ in range(5):
        a.request("ghcr.io", "busy/one", "blob", "hit")
    for i in range(TOP_TRACKED * 2):
        a.request("ghcr.io", f"repo/{i}", "blob", "miss")
        a.upstream_error("ghcr.io", f"repo/{i}", "x" * 1000)
        a.request("ghcr.io", f"repo/{i}", "tag", "stale", "upstream down")
    assert len(a.repositories) <= TOP_TRACKED
    assert a.top_repositories(1)[0].name == "busy/one"
    assert len(a.errors) == len(a.stale) == RECENT_EVENTS
    assert a.errors[-1].what == f"repo/{TOP_TRACKED * 2 - 1}"
    assert len(a.registries["ghcr.io"].last_error) <= 300
    assert a.registries["ghcr.io"].errors == TOP_TRACKED * 2


def test_registry_label_cap_and_docker_hub() -> None:
    labels = RegistryLabels(limit=2)
    assert labels("registry-1.docker.io") == "docker.io"
    assert labels("index.docker.io") == "docker.io"
    assert labels("ghcr.io") == "ghcr.io"
    assert labels("quay.io") == "other"
    assert labels("ghcr.io") == "ghcr.io"
    assert labels("http://GHCR.io") == "ghcr.io"  # plain HTTP: the same registry name
    fresh = RegistryLabels(limit=2)
    assert fresh("tunnelled.example", claim=False) == "other"
    assert fresh("ghcr.io") == "ghcr.io"


def test_metrics_label_cap_keeps_page_and_metrics_alike() -> None:
    m = Metrics()
    for i in range(MAX_REGISTRY_LABELS + 20):
        m.request(f"r{i}.example", "blob", "hit", "connect", "app")
        m.sent(f"r{i}.example", "cache", 10)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    labels = {s.labels["registry"] for s in families["registry_cache_requests"].samples}
    assert len(labels) == MAX_REGISTRY_LABELS + 1 and "other" in labels
    other = [
        s.value
        for s in families["registry_cache_requests"].samples
        if s.labels["registry"] == "other" and s.name.endswith("_total")
    ]
    assert other == [20.0]
    assert m.activity.registries["other"].requests == 20
    assert len(m.activity.registries) == MAX_REGISTRY_LABELS + 1
    saved = [s for s in families["registry_cache_bytes_saved"].samples if s.name.endswith("total")]
    assert sum(s.value for s in saved) == 10 * (MAX_REGISTRY_LABELS + 20)


def test_docker_hub_pull_limit() -> None:
    assert ratelimit_value("100;w=21600") == 100
    assert ratelimit_value(" 76 ") == 76
    assert ratelimit_value("lots") is None and ratelimit_value(None) is None
    m = Metrics()
    assert b"dockerhub" not in m.render()  # not said yet: not a 0
    m.dockerhub_answer("ghcr.io", {"ratelimit-remaining": "5;w=1"})
    assert b"dockerhub" not in m.render()
    headers = {"ratelimit-remaining": "76;w=21600", "ratelimit-limit": "100;w=21600"}
    m.dockerhub_answer("registry-1.docker.io", headers)
    m.dockerhub_answer("registry-1.docker.io", {"ratelimit-remaining": "75;w=21600"})
    text = m.render().decode()
    assert "registry_cache_dockerhub_ratelimit_remaining 75.0" in text
    assert "registry_cache_dockerhub_ratelimit_limit 100.0" in text
    assert m.dockerhub["remaining"] == 75 and m.dockerhub["limit"] == 100


def test_page_escapes_what_clients_and_upstreams_said() -> None:
    m = Metrics()
    hostile = "<script>alert(1)</script>"
    m.request("evil.example", f"a/{hostile}", "blob", "stale", f'note "{hostile}"')
    m.upstream_error("evil.example", f"<b>{hostile}</b>", hostile)
    data = {
        "version": "x",
        "generated_at": m.activity.clock(),
        "uptime_seconds": 1.0,
        "cache": {"bytes": 1, "max_size": 10, "entries": 1},
        **m.activity.snapshot(),
        "inflight": [
            {
                "registry": hostile,
                "repository": hostile,
                "digest": "sha256:" + "a" * 64,
                "bytes": 5,
                "size": None,
                "began": m.activity.clock(),
                "verified": False,
            }
        ],
        "dockerhub": {},
    }
    page = status_page.render(data)
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
