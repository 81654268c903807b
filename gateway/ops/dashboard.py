"""The call dashboard: server-rendered pages (no JavaScript) over the control plane's store, behind the
control API's key.

`GET /dashboard` lists live calls and recent call records; `GET /dashboard/calls/{call_id}` draws one call
as an inline SVG on one call-clock axis: the caller's and the agent's speech (from the record's duplex
timeline), their overlaps, barge-ins, escalation and limit events and the agent's transcript, each piece
at its time; then the timeline's quality figures, the escalations, the transcript and the counters. A
record without a timeline is drawn with empty lanes and says "no timeline".

Auth is the control API's key (`[control] api_key_env`; unset: 503). `Authorization: Bearer <key>` works;
a browser signs in through the form at `/dashboard/login` (the key goes in the POST body, never a URL),
which checks the key in constant time and sets an HttpOnly, SameSite=Strict cookie holding an expiry and
an HMAC of it keyed with the key: never the key itself, and void once the key changes. Wrong keys (form or
header) and forged cookies count against the gateway's failed-auth throttle. Every page carries a CSP that
allows no script at all, and Jinja escapes everything a record holds.

Size: the page templates live here, inline, so an installed package needs no data files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup

from gateway.ops.auth_throttle import client_address
from gateway.ops.store import StoreError

if TYPE_CHECKING:
    from gateway.ops.control import ControlPlane

COOKIE = "duplexgate_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_S = 12 * 3600  # a sign-in lasts this long
RECORDS_PAGE = 50
LIMIT_TRIGGERS = frozenset({"max_duration", "silence_timeout", "context_horizon"})  # drawn as limit events

# The SVG's geometry, in CSS pixels: lanes stacked under a time axis, the transcript in rows below.
GUTTER = 96  # left of the axis: the lane names
PX_PER_S = 40
MIN_AXIS_PX, MAX_AXIS_PX = 900, 24_000
TICK_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
LANE_H = 26
Y_TICKS, Y_CALLER, Y_AGENT, Y_EVENTS, Y_TEXT = 14, 22, 56, 90, 124
TEXT_ROW_H = 15
CHAR_PX = 6.4  # the transcript font's average advance, for laying out pieces without overlap
PIECE_CHARS = 40  # longer pieces are shortened in the drawing (whole in the table below it)
MAX_TEXT_ROWS = 12

# Quality figures of the timeline's `measures`: (key, label, how to show it).
LATENCIES = (
    ("response_latency_s", "response latency (caller stops, agent starts)"),
    ("yield_latency_s", "yield latency (barge-in, agent stops)"),
)
FIGURES = (
    ("barge_ins", "barge-ins", "count"),
    ("yielded", "barge-ins the agent yielded to", "count"),
    ("backchannels", "backchannels", "count"),
    ("backchannels_per_min", "backchannels per minute", "number"),
    ("overlap_ratio", "both talking", "ratio"),
    ("silence_ratio", "neither talking", "ratio"),
    ("caller_talk_s", "caller talk", "seconds"),
    ("agent_talk_s", "agent talk", "seconds"),
    ("caller_talk_share", "caller's share of the talk", "ratio"),
    ("duration_s", "timeline duration", "seconds"),
)

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#1c2733;background:#fafbfc}
header{display:flex;gap:16px;align-items:center;padding:10px 0;border-bottom:1px solid #d8dee4}
header form{margin-left:auto}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;background:#fff;margin-bottom:12px}
th,td{border:1px solid #d8dee4;padding:3px 8px;text-align:left;vertical-align:top}
td.value{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#6a737d}.error{color:#b31d28}
.scroll{overflow-x:auto;background:#fff;border:1px solid #d8dee4}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#6a737d}dd{margin:0}
.tick{stroke:#d8dee4}.tick-label,.lane-name,.piece,.event-label{font-size:11px;fill:#1c2733}
.lane-bg{fill:#f3f5f7}
.segment.caller{fill:#2f6fb0}.segment.agent{fill:#2e8b57}
.overlap{fill:none;stroke:#e08a00;stroke-width:2}.overlap-band{fill:#f0a030}
.barge-in{stroke:#c62828;fill:#c62828;stroke-width:1.5}
.event.escalation{stroke:#7b1fa2;fill:#7b1fa2}.event.limit{stroke:#e65100;fill:#e65100}
.event line{stroke-dasharray:3 2}
.legend span{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.swatch.caller{background:#2f6fb0}.swatch.agent{background:#2e8b57}.swatch.overlap{background:#f0a030}
.swatch.barge-in{background:#c62828}.swatch.escalation{background:#7b1fa2}.swatch.limit{background:#e65100}
"""
_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

TEMPLATES = {
    "base.j2": """<!doctype html>
<html lang="en"><head><meta charset="utf-8">{% block head %}{% endblock %}
<title>{% block title %}duplexgate{% endblock %} · duplexgate</title>
<style>{{ css }}</style></head>
<body><header><strong><a href="/dashboard">duplexgate calls</a></strong>
{% if signed_in %}<form method="post" action="/dashboard/logout">
<button type="submit">sign out</button></form>{% endif %}
</header>
{% block body %}{% endblock %}
</body></html>""",
    "message.j2": """{% extends "base.j2" %}{% block title %}{{ heading }}{% endblock %}
{% block body %}<h1>{{ heading }}</h1><p id="message" class="error">{{ message }}</p>{% endblock %}""",
    "login.j2": """{% extends "base.j2" %}{% block title %}sign in{% endblock %}
{% block body %}<h1>Sign in</h1>
{% if error %}<p id="login-error" class="error">{{ error }}</p>{% endif %}
<form id="login" method="post" action="/dashboard/login">
<label>Control API key (the value of {{ env }})
<input type="password" name="key" id="key" autocomplete="current-password" required autofocus></label>
<input type="hidden" name="next" value="{{ next }}">
<button type="submit" id="sign-in">sign in</button>
</form>{% endblock %}""",
    "index.j2": """{% extends "base.j2" %}
{% block head %}<meta http-equiv="refresh" content="15">{% endblock %}
{% block title %}calls{% endblock %}
{% block body %}<h1>Calls</h1>
<section id="live"><h2>Live calls ({{ live|length }})</h2>
{% if live %}<table>
<tr><th>call</th><th>started (UTC)</th><th>caller</th><th>called</th><th>agent</th><th>replica</th></tr>
{% for call in live %}<tr class="live-call">
<td><a href="/dashboard/calls/{{ call.call_id|segment }}">{{ call.call_id }}</a></td>
<td>{{ call.started_at|utc }}</td><td>{{ call.caller or "" }}</td><td>{{ call.called or "" }}</td>
<td>{{ call.agent }}</td><td>{{ call.replica }}</td></tr>
{% endfor %}</table>
{% else %}<p class="note">no call in progress</p>{% endif %}</section>
<section id="records"><h2>Recent calls</h2>
{% if records %}<table>
<tr><th>call</th><th>started (UTC)</th><th>duration</th><th>caller</th><th>called</th><th>agent</th>
<th>end reason</th><th>escalations</th><th>timeline</th></tr>
{% for r in records %}<tr class="record">
<td><a href="/dashboard/calls/{{ r.call_id|segment }}">{{ r.call_id }}</a></td>
<td>{{ r.started_at|utc }}</td><td class="value">{{ r.duration }}</td>
<td>{{ r.caller or "" }}</td><td>{{ r.called or "" }}</td><td>{{ r.agent }}</td>
<td>{{ r.end_reason or "" }}</td><td class="value">{{ r.escalations }}</td>
<td>{{ "yes" if r.timeline else "no" }}</td></tr>
{% endfor %}</table>
{% if next_before is not none %}
<p><a id="older" href="/dashboard?before={{ next_before }}">older calls</a></p>{% endif %}
{% else %}<p class="note">no call records yet</p>{% endif %}</section>{% endblock %}""",
    "call.j2": """{% extends "base.j2" %}{% block title %}call {{ call_id }}{% endblock %}
{% block body %}<h1>Call <code id="call-id">{{ call_id }}</code></h1>
<section id="facts"><dl>
{% for name, value in facts %}<dt>{{ name }}</dt><dd>{{ value or "—" }}</dd>{% endfor %}
</dl></section>
{% if not record %}<p id="no-record" class="note">This call is live: its record, timeline and
transcript are written when it ends.</p>
{% else %}<section id="timeline"><h2>Timeline</h2>
{% if not t.present %}<p id="no-timeline" class="note">no timeline: this record carries no duplex
timeline, so the lanes are empty and there are no quality figures.</p>{% endif %}
{% if t.note %}<p id="timeline-note" class="error">{{ t.note }}</p>{% endif %}
<div class="scroll"><svg id="timeline-svg" xmlns="http://www.w3.org/2000/svg" role="img"
 width="{{ t.width }}" height="{{ t.height }}" viewBox="0 0 {{ t.width }} {{ t.height }}"
 aria-label="caller and agent speech over the call">
<g id="axis">{% for tick in t.ticks %}
<line class="tick" x1="{{ tick.x }}" x2="{{ tick.x }}" y1="{{ y.ticks }}" y2="{{ t.height }}"/>
<text class="tick-label" x="{{ tick.x }}" y="11" text-anchor="middle">{{ tick.label }}</text>
{% endfor %}</g>
{% for lane in t.lanes %}<g id="lane-{{ lane.name }}" class="lane">
<text class="lane-name" x="4" y="{{ lane.y + 17 }}">{{ lane.name }}</text>
<rect class="lane-bg" x="{{ t.x0 }}" y="{{ lane.y }}" width="{{ t.axis_w }}" height="{{ y.lane_h }}"/>
{% for s in lane.segments %}<rect class="segment {{ lane.name }}" x="{{ s.x }}" y="{{ lane.y }}"
 width="{{ s.w }}" height="{{ y.lane_h }}" data-start="{{ s.start }}" data-end="{{ s.end }}">
<title>{{ s.title }}</title></rect>
{% endfor %}</g>
{% endfor %}
<g id="overlaps">{% for s in t.overlaps %}<rect class="overlap" x="{{ s.x }}" y="{{ y.caller - 2 }}"
 width="{{ s.w }}" height="{{ y.agent + y.lane_h - y.caller + 4 }}"
 data-start="{{ s.start }}" data-end="{{ s.end }}"><title>{{ s.title }}</title></rect>
<rect class="overlap-band" x="{{ s.x }}" y="{{ y.caller + y.lane_h }}" width="{{ s.w }}"
 height="{{ y.agent - y.caller - y.lane_h }}"/>
{% endfor %}</g>
<g id="barge-ins">{% for b in t.barge_ins %}<g class="barge-in" data-at="{{ b.at }}">
<title>{{ b.title }}</title>
<line x1="{{ b.x }}" x2="{{ b.x }}" y1="{{ y.ticks }}" y2="{{ y.agent + y.lane_h }}"/>
<polygon points="{{ b.x - 5 }},{{ y.ticks }} {{ b.x + 5 }},{{ y.ticks }} {{ b.x }},{{ y.ticks + 7 }}"/>
</g>{% endfor %}</g>
<g id="events"><text class="lane-name" x="4" y="{{ y.events + 11 }}">events</text>
{% for e in t.events %}<g class="event {{ e.kind }}" data-at="{{ e.at }}"><title>{{ e.title }}</title>
<line x1="{{ e.x }}" x2="{{ e.x }}" y1="{{ y.caller }}" y2="{{ y.events }}"/>
<polygon points="{{ e.x }},{{ y.events }} {{ e.x + 5 }},{{ y.events + 6 }} {{ e.x }},{{ y.events + 12 }}
 {{ e.x - 5 }},{{ y.events + 6 }}"/>
<text class="event-label" x="{{ e.x + 8 }}" y="{{ y.events + 10 }}">{{ e.label }}</text></g>
{% endfor %}</g>
<g id="lane-transcript"><text class="lane-name" x="4" y="{{ y.text + 11 }}">transcript</text>
{% for p in t.pieces %}<text class="piece" x="{{ p.x }}" y="{{ p.y }}" data-at="{{ p.at }}">
{{- p.label }}<title>{{ p.title }}</title></text>
{% endfor %}</g>
</svg></div>
<p class="legend"><span><i class="swatch caller"></i>caller speaking</span>
<span><i class="swatch agent"></i>agent speaking</span><span><i class="swatch overlap"></i>both</span>
<span><i class="swatch barge-in"></i>barge-in</span><span><i class="swatch escalation"></i>escalation</span>
<span><i class="swatch limit"></i>limit</span></p>
</section>
<section id="measures"><h2>Quality figures</h2>
{% if not t.present %}<p class="note">no timeline: no figures for this call.</p>
{% else %}<table id="latencies"><tr><th></th><th>count</th><th>mean</th><th>p50</th><th>max</th></tr>
{% for row in latencies %}<tr><th>{{ row.label }}</th>
{% for c in row.cells %}<td class="value" data-measure="{{ c.key }}" data-value="{{ c.raw }}">
{{- c.text }}</td>{% endfor %}</tr>
{% endfor %}</table>
<table id="figures">{% for c in figures %}<tr><th>{{ c.label }}</th>
<td class="value" data-measure="{{ c.key }}" data-value="{{ c.raw }}">{{ c.text }}</td></tr>
{% endfor %}</table>{% endif %}
</section>
<section id="escalations"><h2>Escalations and limits</h2>
{% if escalations %}<table><tr><th>at</th><th>trigger</th><th>reason</th><th>actions</th></tr>
{% for e in escalations %}<tr class="escalation"><td class="value">{{ e.at_s|secs }}</td>
<td>{{ e.trigger }}</td><td>{{ e.reason }}</td><td>{{ e.actions|join(", ") }}</td></tr>
{% endfor %}</table>{% else %}<p class="note">none</p>{% endif %}</section>
<section id="transcript"><h2>Transcript (the agent's words)</h2>
{% if transcript %}<table>{% for p in transcript %}<tr class="transcript-piece">
<td class="value">{{ p.at_s|secs }}</td><td>{{ p.text }}</td></tr>
{% endfor %}</table>{% else %}<p class="note">empty</p>{% endif %}</section>
<section id="counters"><h2>Counters</h2><table>
{% for name, value in counters %}<tr><th>{{ name }}</th><td class="value">{{ value }}</td></tr>{% endfor %}
</table></section>{% endif %}{% endblock %}""",
}


def _utc(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _secs(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, int | float) else ""


_env = Environment(loader=DictLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined)
_env.filters.update(utc=_utc, secs=_secs, segment=lambda value: quote(str(value), safe=""))


def render(template: str, **context: Any) -> str:
    context.setdefault("signed_in", False)
    return _env.get_template(template).render(css=Markup(CSS), **context)


# --- pages as data: what the templates draw ---------------------------------------------------------


def record_data(record: Any) -> dict[str, Any]:
    """A stored record as the pages read it: its dict form, with its timeline once records carry one."""
    data = record.to_dict()
    timeline = getattr(record, "timeline", None)
    if not data.get("timeline") and timeline:
        data["timeline"] = timeline
    return data


def _number(value: Any) -> float:
    number = float(value)
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{value!r} is not a time")
    return number


def _span_pairs(items: Any) -> list[tuple[float, float]]:
    pairs = []
    for start, end in items or ():
        start, end = _number(start), _number(end)
        pairs.append((start, max(start, end)))
    return pairs


def read_timeline(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The timeline's parts with checked numbers, or None and why (None, None: the record has none, which
    records keep as an empty object)."""
    if not raw:
        return None, None
    try:
        barge_ins = []
        for item in raw.get("barge_ins") or ():
            yield_s = item.get("yield_s")
            barge_ins.append((_number(item["at_s"]), None if yield_s is None else _number(yield_s)))
        return {
            "caller": _span_pairs(raw.get("caller")),
            "agent": _span_pairs(raw.get("agent")),
            "overlaps": _span_pairs(raw.get("overlaps")),
            "barge_ins": barge_ins,
            "measures": dict(raw.get("measures") or {}),
            "dropped_segments": int(raw.get("dropped_segments") or 0),
        }, None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return None, f"this record's timeline could not be read ({type(exc).__name__})"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    try:
        if kind == "count":
            return str(int(value))
        if kind == "ratio":
            return f"{float(value) * 100:.1f} %"
        if kind == "seconds":
            return f"{float(value):.3f} s"
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return "?"


def _raw(value: Any) -> str:
    return "" if value is None else str(value)


class Axis:
    """Call-clock seconds to x: 40 px a second, within a width a browser can still scroll."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.width = min(max(span_s * PX_PER_S, MIN_AXIS_PX), MAX_AXIS_PX)
        self.scale = self.width / span_s

    def x(self, at_s: float) -> float:
        return round(GUTTER + min(max(at_s, 0.0), self.span_s) * self.scale, 1)

    def ticks(self) -> list[dict[str, Any]]:
        fitting = [step for step in TICK_STEPS if self.span_s / step <= self.width / 80]
        step = fitting[0] if fitting else TICK_STEPS[-1]
        count = int(self.span_s / step + 1e-9)
        ticks = []
        for n in range(count + 1):
            at = n * step
            label = f"{int(at) // 60}:{int(at) % 60:02d}" if step >= 60 else f"{round(at, 1):g} s"
            ticks.append({"x": self.x(at), "label": label})
        return ticks


def timeline_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """The SVG's shapes for one record: lanes, overlaps, barge-ins, events and transcript pieces."""
    timeline, note = read_timeline(data.get("timeline"))
    transcript = data.get("transcript") or ()
    escalations = data.get("escalations") or ()
    ends = [1.0]
    ends += [piece["at_s"] + 1.0 for piece in transcript] + [e["at_s"] + 1.0 for e in escalations]
    if timeline is not None:
        ends += [end for part in ("caller", "agent", "overlaps") for _, end in timeline[part]]
        ends += [at for at, _ in timeline["barge_ins"]]
        duration = timeline["measures"].get("duration_s")
        if isinstance(duration, int | float) and math.isfinite(duration):
            ends.append(float(duration))
    call_start = data.get("answered_at") or data.get("started_at")
    if isinstance(call_start, int | float) and isinstance(data.get("ended_at"), int | float):
        ends.append(data["ended_at"] - call_start)
    axis = Axis(max(ends))

    def shapes(pairs: list[tuple[float, float]], what: str) -> list[dict[str, Any]]:
        return [
            {
                "x": axis.x(start),
                "w": max(1.0, round(axis.x(end) - axis.x(start), 1)),
                "start": start,
                "end": end,
                "title": f"{what} {start:.2f}–{end:.2f} s",
            }
            for start, end in pairs
        ]

    parts = timeline or {"caller": [], "agent": [], "overlaps": [], "barge_ins": []}
    barge_ins = [
        {
            "x": axis.x(at),
            "at": at,
            "title": f"barge-in at {at:.2f} s: "
            + ("the agent did not yield" if yield_s is None else f"the agent yielded after {yield_s:.2f} s"),
        }
        for at, yield_s in parts["barge_ins"]
    ]
    events = [
        {
            "x": axis.x(e["at_s"]),
            "at": e["at_s"],
            "kind": "limit" if e["trigger"] in LIMIT_TRIGGERS else "escalation",
            "label": e["trigger"],
            "title": f"{e['at_s']:.2f} s {e['trigger']}: {e['reason']}"
            + (f" ({', '.join(e['actions'])})" if e.get("actions") else ""),
        }
        for e in escalations
    ]
    pieces, row_ends = [], []  # each piece in the first row where it does not overlap the one before
    for piece in sorted(transcript, key=lambda p: p["at_s"]):
        label = " ".join(piece["text"].split())
        if not label:
            continue
        if len(label) > PIECE_CHARS:
            label = label[: PIECE_CHARS - 1] + "…"
        x = axis.x(piece["at_s"])
        row = next((i for i, end in enumerate(row_ends) if end <= x), None)
        if row is None and len(row_ends) < MAX_TEXT_ROWS:
            row = len(row_ends)
            row_ends.append(0.0)
        elif row is None:
            row = min(range(len(row_ends)), key=row_ends.__getitem__)
        row_ends[row] = x + len(label) * CHAR_PX + 6
        title = f"{piece['at_s']:.2f} s: {piece['text']}"
        pieces.append(
            {"x": x, "y": Y_TEXT + 11 + row * TEXT_ROW_H, "at": piece["at_s"], "label": label, "title": title}
        )
    return {
        "present": timeline is not None,
        "note": note,
        "x0": GUTTER,
        "axis_w": axis.width,
        "width": round(GUTTER + axis.width + 24),
        "height": Y_TEXT + max(1, len(row_ends)) * TEXT_ROW_H + 10,
        "ticks": axis.ticks(),
        "lanes": [
            {"name": "caller", "y": Y_CALLER, "segments": shapes(parts["caller"], "caller speaking")},
            {"name": "agent", "y": Y_AGENT, "segments": shapes(parts["agent"], "agent speaking")},
        ],
        "overlaps": shapes(parts["overlaps"], "both speaking"),
        "barge_ins": barge_ins,
        "events": events,
        "pieces": pieces,
        "measures": timeline["measures"] if timeline else {},
        "dropped_segments": timeline["dropped_segments"] if timeline else 0,
    }


def render_call_page(
    data: Mapping[str, Any] | None, live: Mapping[str, Any] | None = None, **page: Any
) -> str:
    """One call's page from its record's dict form (`record_data`), or from its live entry alone."""
    source = data or live or {}
    facts = [
        ("caller", source.get("caller") or ""),
        ("called", source.get("called") or ""),
        ("agent", source.get("agent") or ""),
        ("started (UTC)", _utc(source.get("started_at"))),
    ]
    if live is not None and data is None:
        facts += [("replica", live.get("replica", ""))]
        facts += [(str(k), str(v)) for k, v in (live.get("details") or {}).items()]
        return render("call.j2", call_id=live["call_id"], facts=facts, record=False, **page)
    assert data is not None
    start = data.get("answered_at") or data.get("started_at")
    duration = data["ended_at"] - start if isinstance(data.get("ended_at"), int | float) else None
    facts += [
        ("voice", data.get("voice") or ""),
        ("answered (UTC)", _utc(data.get("answered_at"))),
        ("ended (UTC)", _utc(data.get("ended_at"))),
        ("duration", _secs(duration)),
        ("end reason", data.get("end_reason") or ""),
        ("CRM lookup", data.get("crm_status") or ""),
        ("seed", "" if data.get("seed") is None else str(data["seed"])),
    ]
    t = timeline_view(data)
    measures = t["measures"]
    latencies = []
    for key, label in LATENCIES:
        stats = measures.get(key) if isinstance(measures.get(key), Mapping) else {}
        cells = [
            {"key": f"{key}.{stat}", "raw": _raw(stats.get(stat)), "text": _fmt(stats.get(stat), kind)}
            for stat, kind in (
                ("count", "count"),
                ("mean", "seconds"),
                ("p50", "seconds"),
                ("max", "seconds"),
            )
        ]
        latencies.append({"label": label, "cells": cells})
    figures = [
        {"key": key, "label": label, "raw": _raw(measures.get(key)), "text": _fmt(measures.get(key), kind)}
        for key, label, kind in FIGURES
    ]
    figures.append(
        {
            "key": "dropped_segments",
            "label": "segments the timeline had no room for",
            "raw": str(t["dropped_segments"]),
            "text": str(t["dropped_segments"]),
        }
    )
    return render(
        "call.j2",
        call_id=data["call_id"],
        facts=facts,
        record=True,
        t=t,
        y={
            "ticks": Y_TICKS,
            "caller": Y_CALLER,
            "agent": Y_AGENT,
            "events": Y_EVENTS,
            "text": Y_TEXT,
            "lane_h": LANE_H,
        },
        latencies=latencies,
        figures=figures,
        escalations=data.get("escalations") or (),
        transcript=data.get("transcript") or (),
        counters=sorted((data.get("counters") or {}).items()),
        **page,
    )


def render_index(
    live: list[Mapping[str, Any]], records: list[Mapping[str, Any]], next_before: float | None
) -> str:
    rows = []
    for data in records:
        start = data.get("answered_at") or data.get("started_at")
        ended = data.get("ended_at")
        rows.append(
            {
                **data,
                "duration": _secs(ended - start) if isinstance(ended, int | float) and start else "",
                "escalations": len(data.get("escalations") or ()),
                "timeline": bool(data.get("timeline")),
            }
        )
    return render("index.j2", live=live, records=rows, next_before=next_before, signed_in=True)


# --- auth -------------------------------------------------------------------------------------------


def session_cookie(key: str, expires: int) -> str:
    """The cookie's value: its expiry and an HMAC of it keyed with the API key (the key never leaves)."""
    mac = hmac.new(key.encode(), f"duplexgate dashboard session {expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def check_cookie(key: str, value: str, now: float) -> str:
    """'valid', 'expired' (a genuine cookie past its time) or 'forged'."""
    expires, _, _ = value.partition(".")
    if not expires.isdigit() or len(expires) > 12:
        return "forged"
    if not hmac.compare_digest(value.encode(), session_cookie(key, int(expires)).encode()):
        return "forged"
    return "valid" if int(expires) > now else "expired"


_NEXT = re.compile(r"/dashboard(?:/calls/[\w.~%:+@-]+)?(?:\?before=[0-9.eE+-]+)?")


def safe_next(value: str) -> str:
    """Where to go after signing in: a dashboard page, never another site."""
    return value if _NEXT.fullmatch(value) else "/dashboard"


class Dashboard:
    """The dashboard's routes over one control plane's store and key."""

    def __init__(self, control: ControlPlane, clock: Callable[[], float] = time.time) -> None:
        self.control = control
        self.clock = clock
        self.router = self._routes()

    @property
    def env(self) -> str:
        return self.control.gateway.config.control.api_key_env

    @staticmethod
    def _page(html: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return HTMLResponse(html, status_code=status, headers={**HEADERS, **(headers or {})})

    def _message(self, status: int, heading: str, message: str, **headers: str) -> Response:
        return self._page(render("message.j2", heading=heading, message=message), status, headers)

    def _disabled(self) -> Response:
        return self._message(503, "Dashboard disabled", f"set {self.env} (see [control] in the config)")

    def _login(self, status: int, next_path: str, error: str = "") -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        html = render("login.j2", env=self.env, next=safe_next(next_path), error=error)
        return self._page(html, status, headers)

    def gate(self, request: Request) -> Response | None:
        """None when the request may see the pages; else the answer (503, 429, or 401 with the form)."""
        opened = self._open_to(request)
        if isinstance(opened, Response):
            return opened
        key, address = opened
        throttle = self.control.gateway.auth_throttle
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        header = request.headers.get("authorization")
        if header is not None:
            if self.control.bearer_matches(header):
                return None
            throttle.failed(address)
            return self._login(401, here, "wrong key")
        cookie = request.cookies.get(COOKIE)
        if cookie is None:
            return self._login(401, here)
        verdict = check_cookie(key, cookie, self.clock())
        if verdict == "valid":
            return None
        if verdict == "forged":  # a genuine one has only expired, or outlived a change of key
            throttle.failed(address)
        return self._login(401, here, "please sign in again")

    def _open_to(self, request: Request) -> tuple[str, str] | Response:
        """(the key, the address) when the dashboard is on and the request's address is not locked out;
        else the answer: 503 (no key set) or 429 (too many failures)."""
        key = self.control.api_key
        if key is None:
            return self._disabled()
        address = client_address(request)
        if (retry := self.control.gateway.auth_throttle.retry_after(address)) is not None:
            return self._throttled(retry)
        return key, address

    def _throttled(self, retry_after: dict[str, str]) -> Response:
        return self._message(429, "Too many failed sign-ins", "try later", **retry_after)

    def _routes(self) -> APIRouter:
        router = APIRouter(prefix="/dashboard", include_in_schema=False)
        store = self.control.store

        @router.get("")
        async def index(request: Request, before: float | None = None) -> Response:
            if (denied := self.gate(request)) is not None:
                return denied
            if before is not None and not math.isfinite(before):
                before = None
            try:
                live = [asdict(call) for call in await store.list_live()]
                records = await store.list_records(RECORDS_PAGE, before)
            except StoreError as exc:
                return self._message(503, "Call store unavailable", str(exc))
            live.sort(key=lambda call: call["started_at"], reverse=True)
            next_before = records[-1].started_at if len(records) == RECORDS_PAGE else None
            html = render_index(live, [record_data(record) for record in records], next_before)
            return self._page(html)

        @router.get("/calls/{call_id}")
        async def call_page(request: Request, call_id: str) -> Response:
            if (denied := self.gate(request)) is not None:
                return denied
            try:
                record = await store.get_record(call_id)
                live = None if record is not None else await store.get_live(call_id)
            except StoreError as exc:
                return self._message(503, "Call store unavailable", str(exc))
            if record is None and live is None:
                return self._message(404, "No such call", f"no live call and no record with id {call_id}")
            data = record_data(record) if record is not None else None
            live_data = None if live is None else asdict(live)
            return self._page(render_call_page(data, live_data, signed_in=True))

        @router.get("/login")
        async def login_form(request: Request, next: str = "/dashboard") -> Response:
            if self.control.api_key is None:
                return self._disabled()
            return self._login(200, next)

        @router.post("/login")
        async def login(request: Request) -> Response:
            opened = self._open_to(request)
            if isinstance(opened, Response):
                return opened
            key, address = opened
            throttle = self.control.gateway.auth_throttle
            try:
                form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=8)
            except ValueError:  # more fields than the form has
                form = {}
            given = (form.get("key") or [""])[0]
            next_path = (form.get("next") or ["/dashboard"])[0]
            if not hmac.compare_digest(given.encode(), key.encode()):
                throttle.failed(address)
                return self._login(401, next_path, f"that is not the key in {self.env}")
            expires = int(self.clock()) + SESSION_S
            response = RedirectResponse(safe_next(next_path), status_code=303, headers=HEADERS)
            response.set_cookie(
                COOKIE,
                session_cookie(key, expires),
                max_age=SESSION_S,
                path=COOKIE_PATH,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return response

        @router.post("/logout")
        async def logout() -> Response:
            response = RedirectResponse("/dashboard/login", status_code=303, headers=HEADERS)
            response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
            return response

        return router


def install_dashboard(app: FastAPI, control: ControlPlane) -> Dashboard:
    """Serve the dashboard on `app` from `control`'s store, behind its key."""
    dashboard = Dashboard(control)
    app.include_router(dashboard.router)
    return dashboard
