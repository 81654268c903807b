"""The call dashboard: pages rendered from a constructed record (lanes, events, figures, escaping), its
auth over real HTTP on a real gateway (503 without a key, 401 with the sign-in form, the session cookie,
the shared failed-auth throttle), and a real headless chromium, driven by selenium, signing in and reading
the page of a call placed by the simulated carrier."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_recorder import stored_record

from gateway.call.notices import Escalation
from gateway.call.session import TranscriptPiece
from gateway.ops.dashboard import (
    COOKIE,
    SESSION_S,
    check_cookie,
    render_call_page,
    render_index,
    safe_next,
    session_cookie,
)
from gateway.ops.records import CallRecord
from gateway.simulator.call import simulate_call

API_KEY = "dashboard-test-key-0123456789abcdef"
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")

TIMELINE: dict[str, Any] = {
    "caller": [[0.2, 1.6], [3.0, 4.1], [6.5, 7.0]],
    "agent": [[1.9, 3.3], [4.5, 6.8]],
    "overlaps": [[3.0, 3.3], [6.5, 6.8]],
    "barge_ins": [{"at_s": 3.0, "yield_s": 0.3}, {"at_s": 6.5, "yield_s": None}],
    "turns": [
        {"caller_end_s": 1.6, "agent_start_s": 1.9, "latency_s": 0.3},
        {"caller_end_s": 4.1, "agent_start_s": 4.5, "latency_s": 0.4},
    ],
    "measures": {
        "response_latency_s": {"count": 2, "mean": 0.35, "p50": 0.35, "max": 0.4},
        "yield_latency_s": {"count": 1, "mean": 0.3, "p50": 0.3, "max": 0.3},
        "barge_ins": 2,
        "yielded": 1,
        "backchannels": 1,
        "backchannels_per_min": 7.5,
        "overlap_ratio": 0.075,
        "silence_ratio": 0.2,
        "caller_talk_s": 3.0,
        "agent_talk_s": 3.7,
        "caller_talk_share": 0.448,
        "duration_s": 8.0,
    },
    "dropped_segments": 0,
}
HOSTILE = "<script>alert('owned')</script>"


def a_record(**changes: Any) -> CallRecord:
    fields: dict[str, Any] = dict(
        call_id="CA" + "d" * 32,
        started_at=1_700_000_000.0,
        caller="+15550001111",
        called="+15550002222",
        agent="support",
        answered_at=1_700_000_001.0,
        ended_at=1_700_000_009.0,
        end_reason="carrier_stop",
        escalations=(
            Escalation(5.0, "dtmf", "caller pressed 0", ("announce", "transfer")),
            Escalation(7.5, "max_duration", "limit reached", ("hangup",)),
        ),
        transcript=(TranscriptPiece(1.9, " Hello, how can I help?"), TranscriptPiece(4.6, HOSTILE)),
        counters={"caller_frames": 100, "agent_frames_sent": 90},
    )
    fields.update(changes)
    return CallRecord(**fields)


def record_with(timeline: Any) -> dict[str, Any]:
    """The record's dict form with `timeline` set, whether or not CallRecord has the field yet."""
    return {**a_record().to_dict(), "timeline": timeline}


class Page(HTMLParser):
    """Every element of a page: tag, attributes, the ids of the elements around it, and its text."""

    VOID = frozenset({"meta", "br", "input", "link", "img", "hr", "wbr", "source", "col", "area", "base"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        within = [e["attrs"]["id"] for e in self._open if "id" in e["attrs"]]
        element = {"tag": tag, "attrs": dict(attrs), "within": within, "text": ""}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element["text"] += data

    def find(self, classes: str = "", within: str | None = None, tag: str | None = None) -> list[dict]:
        wanted = set(classes.split())
        return [
            e
            for e in self.elements
            if wanted <= set((e["attrs"].get("class") or "").split())
            and (within is None or within in e["within"])
            and (tag is None or e["tag"] == tag)
        ]

    def by_id(self, element_id: str) -> dict[str, Any]:
        (element,) = [e for e in self.elements if e["attrs"].get("id") == element_id]
        return element

    def measure(self, key: str) -> tuple[str, str]:
        (cell,) = [e for e in self.elements if e["attrs"].get("data-measure") == key]
        return cell["attrs"]["data-value"], cell["text"].strip()


# --- pages from a constructed record ------------------------------------------------------------------


def test_a_call_page_draws_each_lane_with_its_segments_on_one_axis() -> None:
    page = Page(render_call_page(record_with(TIMELINE)))
    caller = page.find("segment caller", within="lane-caller")
    agent = page.find("segment agent", within="lane-agent")
    assert len(caller) == 3 and len(agent) == 2
    assert page.find("segment", within="lane-caller") == caller  # no agent speech in the caller's lane
    assert [(float(s["attrs"]["data-start"]), float(s["attrs"]["data-end"])) for s in caller] == [
        (0.2, 1.6),
        (3.0, 4.1),
        (6.5, 7.0),
    ]
    # one axis: the same time is the same x in every lane, and later is further right
    x = {float(s["attrs"]["data-start"]): float(s["attrs"]["x"]) for s in caller + agent}
    overlaps = page.find("overlap", within="overlaps", tag="rect")
    assert len(overlaps) == 2 and float(overlaps[0]["attrs"]["x"]) == x[3.0]
    assert x[0.2] < x[1.9] < x[3.0] < x[4.5] < x[6.5]
    barge_ins = page.find("barge-in", within="barge-ins", tag="g")
    assert [float(b["attrs"]["data-at"]) for b in barge_ins] == [3.0, 6.5]
    assert "did not yield" in barge_ins[1]["text"] and "0.30 s" in barge_ins[0]["text"]
    (escalation,) = page.find("event escalation", within="events")
    (limit,) = page.find("event limit", within="events")
    assert (escalation["attrs"]["data-at"], limit["attrs"]["data-at"]) == ("5.0", "7.5")
    assert "max_duration" in limit["text"] and "hangup" in limit["text"]
    pieces = page.find("piece", within="lane-transcript")
    assert [float(p["attrs"]["data-at"]) for p in pieces] == [1.9, 4.6]
    assert float(pieces[0]["attrs"]["x"]) == x[1.9]  # the transcript sits on the same axis
    assert page.find("no-timeline") == [] and "no timeline" not in page.by_id("timeline")["text"]


def test_a_call_page_shows_the_timeline_measures() -> None:
    page = Page(render_call_page(record_with(TIMELINE)))
    measures = TIMELINE["measures"]
    for key in ("barge_ins", "yielded", "backchannels", "overlap_ratio", "caller_talk_s", "duration_s"):
        assert page.measure(key)[0] == str(measures[key])
    for stat in ("count", "mean", "p50", "max"):
        assert page.measure(f"response_latency_s.{stat}")[0] == str(measures["response_latency_s"][stat])
    assert page.measure("barge_ins")[1] == "2"
    assert page.measure("response_latency_s.p50")[1] == "0.350 s"
    assert page.measure("yield_latency_s.max")[1] == "0.300 s"
    assert page.measure("overlap_ratio")[1] == "7.5 %"
    assert page.measure("caller_talk_share")[1] == "44.8 %"
    assert page.measure("backchannels_per_min")[1] == "7.50"
    assert page.measure("dropped_segments") == ("0", "0")
    assert "measures" in page.find("value", tag="td")[0]["within"]


def test_missing_measures_show_as_a_dash_not_an_error() -> None:
    timeline = {**TIMELINE, "measures": {**TIMELINE["measures"], "caller_talk_share": None}}
    timeline["measures"]["yield_latency_s"] = {"count": 0, "mean": None, "p50": None, "max": None}
    page = Page(render_call_page(record_with(timeline)))
    assert page.measure("caller_talk_share") == ("", "—")
    assert page.measure("yield_latency_s.mean") == ("", "—")
    assert page.measure("yield_latency_s.count") == ("0", "0")


def test_hostile_text_in_a_record_is_shown_never_run() -> None:
    reason = '"><img src=x onerror=alert(1)>'
    record = a_record(escalations=(Escalation(2.0, "api", reason, ()),), agent="<b>bold</b>")
    html = render_call_page({**record.to_dict(), "timeline": TIMELINE})
    page = Page(html)
    assert "<script" not in html.lower() and "<img" not in html.lower() and "<b>" not in html
    assert [e for e in page.elements if e["tag"] in ("script", "img", "b")] == []
    assert "&lt;script&gt;" in html
    # the text reads as written: in the drawing (with its tooltip) and in the transcript table
    (piece,) = [p for p in page.find("piece") if p["attrs"]["data-at"] == "4.6"]
    assert piece["text"].startswith(HOSTILE)
    assert [r["text"].strip() for r in page.find("transcript-piece")][1].endswith(HOSTILE)
    assert reason in page.find("event escalation")[0]["text"]
    index = render_index([], [record.to_dict()], None)
    assert "<b>bold</b>" not in index and "&lt;b&gt;bold&lt;/b&gt;" in index


@pytest.mark.parametrize("timeline", [None, {}], ids=["absent", "empty"])
def test_a_record_without_a_timeline_says_so(timeline: Any) -> None:
    data = a_record().to_dict()
    if timeline is None:
        data.pop("timeline", None)
    else:
        data["timeline"] = timeline
    page = Page(render_call_page(data))
    assert "no timeline" in page.by_id("no-timeline")["text"]
    assert page.by_id("lane-caller") and page.by_id("lane-agent")  # the lanes are there, empty
    drawn = [e for e in page.elements if "timeline-svg" in e["within"]]
    assert [
        e for e in drawn if {"segment", "overlap", "barge-in"} & set(e["attrs"].get("class", "").split())
    ] == []
    assert len(page.find("event", "events")) == 2 and len(page.find("piece")) == 2  # still on the axis
    assert "no timeline" in page.by_id("measures")["text"]
    assert [e for e in page.elements if "data-measure" in e["attrs"]] == []


def test_an_unreadable_timeline_is_reported_on_the_page() -> None:
    page = Page(render_call_page(record_with({**TIMELINE, "caller": [[0.5, "soon"]]})))
    assert "could not be read" in page.by_id("timeline-note")["text"]
    assert page.find("segment") == []


def test_a_long_transcript_is_laid_out_in_rows_that_do_not_overlap() -> None:
    words = tuple(TranscriptPiece(0.1 * n, f"word{n}") for n in range(60))
    page = Page(render_call_page({**a_record(transcript=words).to_dict(), "timeline": TIMELINE}))
    pieces = page.find("piece")
    assert len(pieces) == 60
    rows: dict[str, list[float]] = {}
    for piece in pieces:
        rows.setdefault(piece["attrs"]["y"], []).append(float(piece["attrs"]["x"]))
    assert len(rows) > 1
    for xs in rows.values():  # each piece starts past the end of the one before it in its row
        assert all(b - a >= len("word00") * 6 for a, b in zip(xs, xs[1:], strict=False))


def test_a_live_call_is_listed_and_has_a_page_before_its_record() -> None:
    live = {
        "call_id": "CA/live 1",
        "replica": "gw-1",
        "agent": "support",
        "caller": "+15550001111",
        "called": "+15550002222",
        "started_at": 1_700_000_000.0,
        "details": {"answered_at": 1_700_000_001.0},
    }
    index = Page(render_index([live], [a_record().to_dict()], next_before=1_699_999_000.0))
    (row,) = index.find("live-call")
    (link,) = [e for e in index.elements if e["tag"] == "a" and "live" in e["within"]]
    assert link["attrs"]["href"] == "/dashboard/calls/CA%2Flive%201" and "gw-1" in row["text"]
    (record_link, older) = [e for e in index.elements if e["tag"] == "a" and "records" in e["within"]]
    assert record_link["attrs"]["href"] == "/dashboard/calls/CA" + "d" * 32
    assert older == index.by_id("older") and older["attrs"]["href"] == "/dashboard?before=1699999000.0"
    page = Page(render_call_page(None, live))
    assert (
        page.by_id("call-id")["text"] == "CA/live 1"
        and "written when it ends" in page.by_id("no-record")["text"]
    )
    assert "gw-1" in page.by_id("facts")["text"] and page.find("segment") == []


def test_the_session_cookie_is_an_hmac_not_the_key() -> None:
    now = time.time()
    cookie = session_cookie(API_KEY, int(now) + SESSION_S)
    assert API_KEY not in cookie
    assert check_cookie(API_KEY, cookie, now) == "valid"
    assert check_cookie(API_KEY, cookie, now + SESSION_S + 1) == "expired"
    assert check_cookie("another key", cookie, now) == "forged"  # void once the key changes
    expires, _, mac = cookie.partition(".")
    assert check_cookie(API_KEY, f"{int(expires) + 3600}.{mac}", now) == "forged"  # its expiry is signed
    assert check_cookie(API_KEY, API_KEY, now) == "forged"
    assert check_cookie(API_KEY, "", now) == "forged"


@pytest.mark.parametrize(
    "given, expected",
    [
        ("/dashboard/calls/CA123", "/dashboard/calls/CA123"),
        ("/dashboard?before=1700000000.5", "/dashboard?before=1700000000.5"),
        ("//evil.example/dashboard", "/dashboard"),
        ("https://evil.example/", "/dashboard"),
        ("/dashboard/../v1/calls", "/dashboard"),
        ("/dashboardx", "/dashboard"),
    ],
)
def test_sign_in_only_returns_to_a_dashboard_page(given: str, expected: str) -> None:
    assert safe_next(given) == expected


# --- auth over real HTTP --------------------------------------------------------------------------------


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)


async def test_the_dashboard_answers_503_without_a_key(start_gateway, echo_engine, monkeypatch) -> None:
    monkeypatch.delenv("DUPLEXGATE_API_KEY", raising=False)
    live = start_gateway(echo_engine)
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        pages = [
            await client.get("/dashboard", headers={"Authorization": f"Bearer {API_KEY}"}),
            await client.get("/dashboard/login"),
            await client.post("/dashboard/login", data={"key": API_KEY}),
        ]
    assert [page.status_code for page in pages] == [503, 503, 503]
    assert all(
        "DUPLEXGATE_API_KEY" in page.text and COOKIE not in page.headers.get("set-cookie", "")
        for page in pages
    )


async def test_without_the_key_the_dashboard_answers_401_with_the_sign_in_form(
    start_gateway, echo_engine, keyed
) -> None:
    live = start_gateway(echo_engine)
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        anonymous = await client.get("/dashboard/calls/CA123")
        wrong_key = await client.get("/dashboard", headers={"Authorization": "Bearer nope"})
        forged = await client.get("/dashboard", headers={"Cookie": f"{COOKIE}=123.abc"})
        stale = session_cookie("the key before it was rotated", int(time.time()) + 60)
        rotated = await client.get("/dashboard", headers={"Cookie": f"{COOKIE}={stale}"})
        bearer = await client.get("/dashboard", headers={"Authorization": f"Bearer {API_KEY}"})
    for page in (anonymous, wrong_key, forged, rotated):
        assert page.status_code == 401
        form = Page(page.text).by_id("login")
        assert (form["attrs"]["method"], form["attrs"]["action"]) == ("post", "/dashboard/login")
        assert API_KEY not in page.text
    assert 'value="/dashboard/calls/CA123"' in anonymous.text  # back to that page once signed in
    assert bearer.status_code == 200 and Page(bearer.text).by_id("records")
    csp = bearer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp  # no script may run on these pages


async def test_signing_in_sets_an_httponly_strict_cookie_the_pages_accept(
    start_gateway, echo_engine, keyed
) -> None:
    live = start_gateway(echo_engine)
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        form = await client.get("/dashboard/login")
        wrong = await client.post("/dashboard/login", data={"key": "not it", "next": "/dashboard"})
        signed_in = await client.post(
            "/dashboard/login", data={"key": API_KEY, "next": "https://evil.example/"}
        )
        cookie = signed_in.cookies[COOKIE]
        page = await client.get("/dashboard", headers={"Cookie": f"{COOKIE}={cookie}"})
        signed_out = await client.post("/dashboard/logout")
    assert form.status_code == 200 and Page(form.text).by_id("key")["attrs"]["type"] == "password"
    assert wrong.status_code == 401 and "not the key" in Page(wrong.text).by_id("login-error")["text"]
    assert COOKIE not in wrong.headers.get("set-cookie", "")
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    set_cookie = signed_in.headers["set-cookie"]
    flags = {part.strip().lower() for part in set_cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/dashboard"} <= flags
    assert API_KEY not in set_cookie and API_KEY not in signed_in.headers["location"]
    assert check_cookie(API_KEY, cookie, time.time()) == "valid"
    assert page.status_code == 200 and Page(page.text).by_id("live")
    assert signed_out.status_code == 303 and f'{COOKIE}=""' in signed_out.headers["set-cookie"]


async def test_failed_sign_ins_count_against_the_gateways_auth_throttle(
    start_gateway, echo_engine, keyed
) -> None:
    live = start_gateway(echo_engine, auth_failures_per_minute=2)
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        tries = [await client.post("/dashboard/login", data={"key": f"guess {n}"}) for n in range(2)]
        locked = await client.post("/dashboard/login", data={"key": API_KEY})
        control = await client.get("/v1/calls", headers={"Authorization": f"Bearer {API_KEY}"})
        page = await client.get("/dashboard", headers={"Authorization": f"Bearer {API_KEY}"})
    assert [t.status_code for t in tries] == [401, 401]
    assert (locked.status_code, control.status_code, page.status_code) == (429, 429, 429)
    assert int(locked.headers["retry-after"]) >= 1 and COOKIE not in locked.headers.get("set-cookie", "")


# --- a real browser on a real call ----------------------------------------------------------------------


def chromium_driver() -> Any:
    """Debian's chromium through Debian's chromedriver, headless: never a downloaded driver or browser."""
    if not CHROMEDRIVER.exists() or not CHROMIUM.exists():
        pytest.skip(
            f"the browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1100")
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(10)
    return driver


async def test_a_browser_signs_in_and_reads_a_real_call(
    start_gateway, echo_engine, tone_wav, keyed, tmp_path: Path
) -> None:
    live = start_gateway(echo_engine)
    summary = await simulate_call(live.ws_url, tone_wav(440, 1.5), webhook=live.webhook, tail_s=0.5)
    record = await stored_record(live, summary.call_sid, api_key=API_KEY)
    timeline = record.get("timeline") or None  # there once the duplex timeline is recorded

    driver = chromium_driver()
    try:
        from selenium.webdriver.common.by import By

        driver.get(f"{live.base_url}/dashboard")
        assert driver.find_elements(By.ID, "login")  # 401: the sign-in form
        driver.find_element(By.ID, "key").send_keys(API_KEY)
        driver.find_element(By.ID, "sign-in").click()
        assert driver.current_url == f"{live.base_url}/dashboard"
        assert API_KEY not in driver.current_url
        cookie = driver.get_cookie(COOKIE)
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert API_KEY not in cookie["value"]

        links = driver.find_elements(By.CSS_SELECTOR, "#records tr.record a")
        (link,) = [a for a in links if a.text == summary.call_sid]
        link.click()
        assert driver.current_url.endswith(f"/dashboard/calls/{summary.call_sid}")
        assert driver.find_element(By.ID, "call-id").text == summary.call_sid
        for lane in ("lane-caller", "lane-agent", "lane-transcript", "events"):
            assert driver.find_element(By.ID, lane)
        svg = driver.find_element(By.ID, "timeline-svg")
        assert svg.size["width"] > 500 and svg.size["height"] > 100
        assert driver.find_element(By.ID, "measures").is_displayed()
        assert record["end_reason"] in driver.find_element(By.ID, "facts").text
        pieces = driver.find_elements(By.CSS_SELECTOR, "#lane-transcript .piece")
        assert len(pieces) == len([p for p in record["transcript"] if p["text"].strip()])
        caller = driver.find_elements(By.CSS_SELECTOR, "#lane-caller .segment.caller")
        agent = driver.find_elements(By.CSS_SELECTOR, "#lane-agent .segment.agent")
        if timeline is None:
            assert "no timeline" in driver.find_element(By.ID, "no-timeline").text
            assert caller == [] and agent == []
        else:
            assert (len(caller), len(agent)) == (len(timeline["caller"]), len(timeline["agent"]))
            figures = driver.find_elements(By.CSS_SELECTOR, "#measures td[data-measure]")
            shown = {cell.get_attribute("data-measure"): cell.get_attribute("data-value") for cell in figures}
            assert shown["barge_ins"] == str(timeline["measures"]["barge_ins"])
            assert shown["duration_s"] == str(timeline["measures"]["duration_s"])

        screenshot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    print(f"dashboard screenshot: {screenshot}")
