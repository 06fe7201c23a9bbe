"""The dashboard's charts: data from the storage (installations, versions, OS, Python, events)
and the ledger (refusals), each as JSON and as SVG drawn here, with no script and no style
attribute (the page's Content-Security-Policy allows neither)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape

from waypost_collector.ledger import REFUSED, REQUEST, Ledger
from waypost_collector.storage import Store

DAYS = 90
WEEKS = 13
SHARE_DAYS = 30
TOP_NAMES = 6
PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#4a5568")

CHARTS = {
    "active_daily": "Installations active per day (90 days)",
    "active_weekly": "Installations active per week (13 weeks)",
    "versions": "App versions (installations, 30 days)",
    "os": "Operating systems (installations, 30 days)",
    "python": "Python versions (installations, 30 days)",
    "events": "Events per name per day (90 days)",
    "refusals": "Refusals by reason (90 days)",
}
"""Chart names, in page order, with their titles."""


def _days(today: _dt.date, n: int) -> list[str]:
    return [(today - _dt.timedelta(days=n - 1 - i)).isoformat() for i in range(n)]


def _since(today: _dt.date, days: int) -> _dt.datetime:
    start = today - _dt.timedelta(days=days - 1)
    return _dt.datetime(start.year, start.month, start.day, tzinfo=_dt.timezone.utc)


def chart_data(
    name: str,
    *,
    app: str,
    store: Store | None,
    ledger: Ledger,
    today: _dt.date | None = None,
) -> dict[str, Any]:
    """One chart as data: ``series`` of ``[x, y]`` points (time charts) or ``items`` with a
    label, a value and a share (share charts)."""
    today = today or _dt.datetime.now(_dt.timezone.utc).date()
    out: dict[str, Any] = {"chart": name, "title": CHARTS[name], "app": app}
    if name == "refusals":
        first_day = (today - _dt.timedelta(days=DAYS - 1)).isoformat()
        totals: dict[str, int] = {}
        for _day, row_app, kind, reason, n in ledger.counts(since_day=first_day):
            if row_app == app and kind in (REFUSED, REQUEST):
                label = reason if kind == REFUSED else f"{reason} (request)"
                totals[label] = totals.get(label, 0) + n
        return {**out, "kind": "shares", "unit": "refusals", "items": _shares(totals)}
    if store is None:
        return {**out, "kind": "none", "note": "no storage that the dashboard can read"}
    if name in ("active_daily", "events"):
        days = _days(today, DAYS)
        since = _since(today, DAYS)
        if name == "active_daily":
            found = dict(store.active(app, since, per="day"))
            series = [{"name": "installations", "points": [[d, found.get(d, 0)] for d in days]}]
            return {**out, "kind": "lines", "unit": "installations", "series": series}
        per_name: dict[str, dict[str, int]] = {}
        for event, day, n in store.events_per_day(app, since):
            per_name.setdefault(event, {})[day] = n
        ranked = sorted(per_name, key=lambda e: (-sum(per_name[e].values()), e))[:TOP_NAMES]
        series = [{"name": e, "points": [[d, per_name[e].get(d, 0)] for d in days]} for e in ranked]
        return {**out, "kind": "lines", "unit": "events", "series": series}
    if name == "active_weekly":
        monday = today - _dt.timedelta(days=today.weekday())
        weeks = [(monday - _dt.timedelta(weeks=WEEKS - 1 - i)).isoformat() for i in range(WEEKS)]
        found = dict(store.active(app, _since(_dt.date.fromisoformat(weeks[0]), 1), per="week"))
        points = [[w, found.get(w, 0)] for w in weeks]
        return {**out, "kind": "bars", "unit": "installations", "points": points}
    path = {"versions": ("app", "version"), "os": ("os", "type"), "python": ("python",)}[name]
    rows = store.shares(app, _since(today, SHARE_DAYS), *path)
    return {**out, "kind": "shares", "unit": "installations", "items": _shares(dict(rows))}


def _shares(values: dict[str, int]) -> list[dict[str, Any]]:
    total = sum(values.values()) or 1
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"label": k, "value": v, "share": round(v / total, 4)} for k, v in ranked]


# --- SVG --------------------------------------------------------------------------------------

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 28, 36


def _text(x: float, y: float, text: str, *, anchor: str = "start", cls: str = "label") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}">{escape(text)}</text>'
    )


def _frame(title: str, body: list[str], height: int = HEIGHT) -> str:
    label = escape(title, {'"': "&quot;"})
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" aria-label="{label}">'
        f"<title>{escape(title)}</title>"
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>'
        + _text(LEFT, 18, title, cls="title")
        + "".join(body)
        + "</svg>"
    )


def _scale(top: float) -> float:
    """A round ceiling for the y axis."""
    if top <= 0:
        return 1.0
    step = 10 ** max(0, len(str(int(top))) - 1)
    for factor in (1, 2, 2.5, 5, 10):
        if top <= step * factor:
            return float(step * factor)
    return float(step * 10)


def _axes(ymax: float, labels: Sequence[str]) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = []
    for i in range(5):
        value = ymax * i / 4
        y = HEIGHT - BOTTOM - plot_h * i / 4
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>'
        )
        out.append(_text(LEFT - 6, y + 4, f"{value:g}", anchor="end"))
    if labels:
        plot_w = WIDTH - LEFT - RIGHT
        step = max(1, len(labels) // 6)
        for i in range(0, len(labels), step):
            x = LEFT + plot_w * (i + 0.5) / len(labels)
            out.append(_text(x, HEIGHT - BOTTOM + 16, labels[i][5:], anchor="middle"))
    return out


def to_svg(data: dict[str, Any]) -> str:
    """The chart drawn as one self-contained SVG document."""
    title = f"{data['title']}: {data['app']}"
    kind = data.get("kind")
    if kind == "lines":
        return _lines(title, data["series"])
    if kind == "bars":
        return _bars(title, data["points"])
    if kind == "shares":
        return _share_bars(title, data["items"])
    return _frame(title, [_text(LEFT, HEIGHT / 2, data.get("note", "no data"), cls="note")])


def _lines(title: str, series: list[dict[str, Any]]) -> str:
    if not series or not any(y for s in series for _, y in s["points"]):
        return _frame(title, [_text(LEFT, HEIGHT / 2, "no events in this period", cls="note")])
    labels = [x for x, _ in series[0]["points"]]
    ymax = _scale(max(y for s in series for _, y in s["points"]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    body = _axes(ymax, labels)
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        coords = " ".join(
            f"{LEFT + plot_w * (i + 0.5) / len(labels):.1f},"
            f"{HEIGHT - BOTTOM - plot_h * y / ymax:.1f}"
            for i, (_, y) in enumerate(s["points"])
        )
        body.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2">'
            f"<title>{escape(str(s['name']))}</title></polyline>"
        )
        legend_x = LEFT + 8 + (n % 3) * 220
        legend_y = TOP + 14 + (n // 3) * 14
        body.append(
            f'<rect x="{legend_x}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>'
        )
        body.append(_text(legend_x + 14, legend_y, str(s["name"])[:40]))
    return _frame(title, body)


def _bars(title: str, points: list[list[Any]]) -> str:
    if not any(y for _, y in points):
        return _frame(title, [_text(LEFT, HEIGHT / 2, "no events in this period", cls="note")])
    labels = [x for x, _ in points]
    ymax = _scale(max(y for _, y in points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    body = _axes(ymax, labels)
    width = plot_w / len(points)
    for i, (label, y) in enumerate(points):
        h = plot_h * y / ymax
        body.append(
            f'<rect x="{LEFT + width * i + 2:.1f}" y="{HEIGHT - BOTTOM - h:.1f}" '
            f'width="{max(1.0, width - 4):.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
            f"<title>{escape(f'{label}: {y}')}</title></rect>"
        )
    return _frame(title, body)


def _share_bars(title: str, items: list[dict[str, Any]]) -> str:
    shown = items[:10]
    if not shown:
        return _frame(title, [_text(LEFT, 60, "nothing in this period", cls="note")], 100)
    row = 22
    height = TOP + 16 + row * len(shown)
    label_w = 200
    plot_w = WIDTH - label_w - 90
    body = []
    for i, item in enumerate(shown):
        y = TOP + 12 + row * i
        w = plot_w * float(item["share"])
        body.append(_text(label_w - 8, y + 12, str(item["label"])[:32], anchor="end"))
        body.append(
            f'<rect x="{label_w}" y="{y}" width="{max(1.0, w):.1f}" height="{row - 6}" '
            f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(str(item["label"]))}</title></rect>'
        )
        body.append(_text(label_w + w + 6, y + 12, f"{item['share'] * 100:.1f}% ({item['value']})"))
    return _frame(title, body, height)
