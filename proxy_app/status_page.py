"""The status page (`GET /`) as HTML: server-rendered, no external assets, two inline SVG
charts, refreshing itself every REFRESH_SECONDS.

It renders the data the app gathers (app.status: the activity of activity.py, the store's
size, the fetches in flight, Docker Hub's pull limit), the same that `Accept:
application/json` gets as it is. Every value that came from a client or an upstream (a
registry or repository name, an error message) is escaped; numbers are also given raw in
`data-value` attributes, beside stable `data-*` names, for scripts and tests.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any

REFRESH_SECONDS = 10
CHART_WIDTH, CHART_HEIGHT = 600, 120

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;
text-align:right}th:first-child,td:first-child{text-align:left}
td.t{text-align:left}.muted{color:#777}.err{color:#a00}.cache{fill:#2a7}.upstream{fill:#d84}
.ratio{stroke:#36c;fill:none;stroke-width:2}.grid{stroke:#eee}
svg{background:#fafafa;border:1px solid #ddd}.legend span{margin-right:1em}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.3em}
"""


def e(value: object) -> str:
    """Escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    ago = max(now - timestamp, 0)
    if ago < 120:
        return f"{ago:.0f} s ago"
    if ago < 7200:
        return f"{ago / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def cell(field: str, value: object, text: str | None = None, cls: str = "") -> str:
    """A table cell named `field`, its raw value in data-value, shown as `text`."""
    attrs = f' data-field="{e(field)}" data-value="{e("" if value is None else value)}"'
    if cls:
        attrs += f' class="{e(cls)}"'
    return f"<td{attrs}>{e(value if text is None else text)}</td>"


def table(headers: Iterable[str], rows: list[str], attrs: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(rows) or '<tr><td class="muted" colspan="9">none</td></tr>'
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bytes_chart(history: list[dict[str, Any]]) -> str:
    """Bytes per minute of the last hour, from the cache and from upstream, stacked."""
    peak = max((m["bytes_cache"] + m["bytes_upstream"] for m in history), default=0)
    any_traffic, peak = peak > 0, peak or 1
    width = CHART_WIDTH / max(len(history), 1)
    bars = []
    for i, m in enumerate(history):
        x = i * width
        cache_h = m["bytes_cache"] / peak * (CHART_HEIGHT - 10)
        up_h = m["bytes_upstream"] / peak * (CHART_HEIGHT - 10)
        label = e(
            f"{time.strftime('%H:%M', time.localtime(m['start']))}: "
            f"{size(m['bytes_cache'])} from cache, {size(m['bytes_upstream'])} from upstream"
        )
        bars.append(
            f"<g><title>{label}</title>"
            f'<rect class="cache" x="{x:.1f}" y="{CHART_HEIGHT - cache_h:.1f}" '
            f'width="{max(width - 1, 1):.1f}" height="{cache_h:.1f}"/>'
            f'<rect class="upstream" x="{x:.1f}" y="{CHART_HEIGHT - cache_h - up_h:.1f}" '
            f'width="{max(width - 1, 1):.1f}" height="{up_h:.1f}"/></g>'
        )
    return (
        f'<svg id="chart-bytes" role="img" aria-label="bytes per minute, last hour" '
        f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}">{"".join(bars)}</svg>'
        f'<div class="legend muted"><span><i class="sw" style="background:#2a7"></i>cache'
        f'</span><span><i class="sw" style="background:#d84"></i>upstream</span>'
        + (f"<span>peak {e(size(peak))}/min</span>" if any_traffic else "<span>no traffic</span>")
        + "</div>"
    )


def ratio_chart(history: list[dict[str, Any]]) -> str:
    """Hit ratio per hour of the last day (hours without cacheable answers left out)."""
    step = (CHART_WIDTH - 10) / max(len(history) - 1, 1)
    points = [
        f"{5 + i * step:.1f},{CHART_HEIGHT - 5 - h['hit_ratio'] * (CHART_HEIGHT - 10):.1f}"
        for i, h in enumerate(history)
        if h["hit_ratio"] is not None
    ]
    grid = "".join(
        f'<line class="grid" x1="0" x2="{CHART_WIDTH}" y1="{y:.1f}" y2="{y:.1f}"/>'
        for y in (5, CHART_HEIGHT / 2, CHART_HEIGHT - 5)
    )
    line = f'<polyline class="ratio" points="{" ".join(points)}"/>' if len(points) > 1 else ""
    dots = "".join(
        f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="#36c"/>'
        for p in points
    )
    return (
        f'<svg id="chart-ratio" role="img" aria-label="hit ratio per hour, last day" '
        f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}">{grid}{line}{dots}</svg>'
        '<div class="legend muted"><span>0% to 100%, one point per hour with traffic</span>'
        "</div>"
    )


def summary(data: dict[str, Any]) -> str:
    rows = []
    for window, title in (("hour", "last hour"), ("day", "last day")):
        w = data[f"last_{window}"]
        rows.append(
            f'<tr data-window="{window}"><td>{title}</td>'
            + cell("hit_ratio", w["hit_ratio"], percent(w["hit_ratio"]))
            + cell("requests", w["requests"])
            + cell("bytes_cache", w["bytes_cache"], size(w["bytes_cache"]))
            + cell("bytes_upstream", w["bytes_upstream"], size(w["bytes_upstream"]))
            + cell("bytes_saved", w["bytes_saved"], size(w["bytes_saved"]))
            + cell("errors", w["errors"], cls="err" if w["errors"] else "")
            + "</tr>"
        )
    return table(
        ["", "hit ratio", "requests", "from cache", "from upstream", "saved", "upstream errors"],
        rows,
        ' id="summary"',
    )


def registries(data: dict[str, Any], now: float) -> str:
    rows = []
    for name, r in data["registries"].items():
        rows.append(
            f'<tr data-registry="{e(name)}"><td data-field="registry">{e(name)}</td>'
            + cell("requests", r["requests"])
            + cell("hit_ratio", r["hit_ratio"], percent(r["hit_ratio"]))
            + cell("bytes_cache", r["bytes_cache"], size(r["bytes_cache"]))
            + cell("bytes_upstream", r["bytes_upstream"], size(r["bytes_upstream"]))
            + cell("errors", r["errors"], cls="err" if r["errors"] else "")
            + cell("last_error", r["last_error"], r["last_error"] or "-", "t")
            + cell("last_error_at", r["last_error_at"], when(r["last_error_at"], now))
            + "</tr>"
        )
    return table(
        [
            "registry",
            "requests",
            "hit ratio",
            "from cache",
            "from upstream",
            "errors",
            "last error",
            "when",
        ],
        rows,
        ' id="registries"',
    )


def repositories(data: dict[str, Any]) -> str:
    rows = [
        f'<tr data-repository="{e(r["registry"])}/{e(r["name"])}">'
        f'<td data-field="repository">{e(r["registry"])}/{e(r["name"])}</td>'
        + cell("requests", r["requests"])
        + cell("bytes", r["bytes"], size(r["bytes"]))
        + "</tr>"
        for r in data["top_repositories"]
    ]
    if data.get("repositories_hidden"):
        return (
            '<p class="note" id="repositories-hidden">Repository names are shown to admin '
            "users only on a cache with verify_client_access.</p>"
        )
    return table(["repository", "requests", "bytes sent"], rows, ' id="repositories"')


def inflight(data: dict[str, Any], now: float) -> str:
    rows = []
    for f in data["inflight"]:
        total = f["size"]
        bar = (
            f'<progress max="{e(total)}" value="{e(f["bytes"])}"></progress>'
            if total
            else "size unknown"
        )
        rows.append(
            f'<tr data-digest="{e(f["digest"])}"><td>{e(f["registry"])}/{e(f["repository"])}'
            f'<br><span class="muted">{e(f["digest"][:19])}…</span></td>'
            + cell("bytes", f["bytes"], size(f["bytes"]))
            + cell("size", total, size(total))
            + f"<td>{bar}</td>"
            + cell("began", f["began"], when(f["began"], now))
            + "</tr>"
        )
    return table(["blob", "so far", "size", "progress", "started"], rows, ' id="inflight"')


def events(items: list[dict[str, Any]], table_id: str, now: float) -> str:
    rows = [
        f'<tr><td data-field="registry">{e(ev["registry"])}</td>'
        f'<td class="t" data-field="what">{e(ev["what"] or "-")}</td>'
        f'<td class="t" data-field="message">{e(ev["message"])}</td>'
        + cell("at", ev["at"], when(ev["at"], now))
        + "</tr>"
        for ev in items
    ]
    return table(["registry", "repository", "what happened", "when"], rows, f' id="{table_id}"')


def dockerhub(data: dict[str, Any], now: float) -> str:
    hub = data["dockerhub"]
    if "remaining" not in hub and "limit" not in hub:
        return '<p id="dockerhub" class="muted">No answer from Docker Hub has said it yet.</p>'
    remaining, limit = hub.get("remaining"), hub.get("limit")
    return (
        f'<p id="dockerhub"><span data-field="remaining" data-value="{e(remaining)}">'
        f"{e(remaining)}</span> pulls left of "
        f'<span data-field="limit" data-value="{e(limit)}">{e(limit)}</span> '
        f'<span class="muted">(seen {e(when(hub.get("seen_at"), now))})</span></p>'
    )


def render(data: dict[str, Any]) -> str:
    now = data["generated_at"]
    cache = data["cache"]
    used = cache["bytes"] / cache["max_size"] if cache["max_size"] else 0.0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>registry-cache status</title><style>{STYLE}</style></head>
<body>
<h1>registry-cache {e(data["version"])}</h1>
<p class="muted">up {e(round(data["uptime_seconds"]))} s; this page refreshes every
{REFRESH_SECONDS} s; the same as JSON with <code>Accept: application/json</code>;
counters for Prometheus at <a href="/metrics">/metrics</a>.</p>

<h2>Traffic</h2>
{summary(data)}
<h2>Bytes per minute, last hour</h2>
{bytes_chart(data["history_hour"])}
<h2>Hit ratio per hour, last day</h2>
{ratio_chart(data["history_day"])}

<h2>Cache</h2>
<p id="cache"><span data-field="cache_bytes" data-value="{cache["bytes"]}">
{e(size(cache["bytes"]))}</span> of
<span data-field="max_size" data-value="{cache["max_size"]}">{e(size(cache["max_size"]))}</span>
(<span data-field="used" data-value="{used:.4f}">{used:.1%}</span>) in
<span data-field="entries" data-value="{cache["entries"]}">{e(cache["entries"])}</span> blobs
<br><meter min="0" max="1" value="{used:.4f}" style="width:{CHART_WIDTH}px"></meter></p>

<h2>Registries</h2>
{registries(data, now)}
<h2>Most requested repositories</h2>
{repositories(data)}
<h2>Fetches in flight</h2>
{inflight(data, now)}
<h2>Recent STALE answers</h2>
{events(data["recent_stale"], "recent-stale", now)}
<h2>Recent upstream errors</h2>
{events(data["recent_errors"], "recent-errors", now)}
<h2>Docker Hub pull limit</h2>
{dockerhub(data, now)}
</body></html>
"""


HIDDEN = "(hidden)"


def without_repositories(data: dict[str, Any]) -> dict[str, Any]:
    """The page's data without repository names, for a cache with verify_client_access:
    there a client may read only the repositories upstream lets it read, and the names of
    what other clients pull (private repositories among them) are not for every reader.
    Registries, counts and bytes stay; admin users see everything."""
    out = dict(data)
    out["top_repositories"] = []
    out["recent_stale"] = [{**e, "what": HIDDEN} for e in data.get("recent_stale", [])]
    out["recent_errors"] = [{**e, "what": HIDDEN} for e in data.get("recent_errors", [])]
    out["inflight"] = [{**f, "repository": HIDDEN} for f in data.get("inflight", [])]
    out["repositories_hidden"] = True
    return out
