"""Prometheus metrics: GET /metrics on a real gateway after a simulated call on the real tiny engine,
compared with that call's record; the bearer key guarding it like the control API; the families fed
from records (drops, conversation quality) and from the engine's step observers; multiprocess mode; and
the shipped Grafana dashboard asking only for metrics the gateway exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_recorder import stored_record

from engine.echo import EchoEngine
from engine.worker import WorkerStats
from gateway.call.notices import CallNotice, NoticeKind
from gateway.carriers.base import AnsweredWithoutStream
from gateway.ops.metrics import DROP_CAUSES, GatewayMetrics, reason_label, refusal_label
from gateway.simulator.call import simulate_call

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "metrics-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(autouse=True)
def _control_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)
    torch.set_num_threads(1)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (sample name, its labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    """The sum of a sample name over all its label values."""
    return sum(v for (n, _), v in samples.items() if n == name)


async def scrape(live: Any) -> Samples:
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.get(live.base_url + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_metrics_after_a_call_match_its_record(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    assert len(engine.stats.observers) == 1  # the gateway's metrics listen to the engine's steps
    junk = [(0.3, "not json"), (0.5, '{"event": "media"}')]  # counted as malformed, the call goes on
    summary = await simulate_call(None, tone_wav(440, 1.0), webhook=live.webhook, tail_s=0.3, inject=junk)
    record = await stored_record(live, summary.call_sid, api_key=API_KEY)
    counters = record["counters"]
    expected_drops = {cause: counters.get(name, 0) for cause, name in DROP_CAUSES.items()}
    assert expected_drops["malformed"] > 0

    # the record hook runs once the record is stored: wait (bounded) for its counts to arrive
    deadline = time.monotonic() + 5.0
    while True:
        samples = await scrape(live)
        drops = {c: value(samples, "duplexgate_frames_dropped_total", cause=c) for c in DROP_CAUSES}
        if drops == expected_drops or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert drops == expected_drops

    reason = reason_label(record["end_reason"])
    assert value(samples, "duplexgate_calls_started_total", carrier="twilio") == 1
    assert value(samples, "duplexgate_calls_ended_total", carrier="twilio", reason=reason) == 1
    assert total(samples, "duplexgate_calls_ended_total") == 1
    assert value(samples, "duplexgate_calls_active") == 0
    assert total(samples, "duplexgate_engine_step_seconds_count") > 0
    assert value(samples, "duplexgate_engine_slots_capacity") == engine.capacity
    assert value(samples, "duplexgate_engine_prime_seconds_count") == 1
    assert total(samples, "duplexgate_admission_refusals_total") == 0
    if record["crm_status"] is not None:
        assert value(samples, "duplexgate_crm_lookups_total", outcome=record["crm_status"]) == 1
    measures = (record.get("timeline") or {}).get("measures")
    if measures is not None:  # the call's quality measures reached their histograms once
        has_mean = isinstance((measures.get("response_latency_s") or {}).get("mean"), int | float)
        assert value(samples, "duplexgate_call_response_latency_seconds_count") == int(has_mean)
        assert value(samples, "duplexgate_call_overlap_ratio_count") == 1
    # no per-call label anywhere
    assert not any(summary.call_sid in str(labels) for _, labels in samples)


async def test_metrics_need_the_control_key(start_gateway) -> None:
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient() as client:
        missing = await client.get(live.base_url + "/metrics")
        wrong = await client.get(live.base_url + "/metrics", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401


async def test_metrics_answer_503_without_a_key_configured(start_gateway, monkeypatch) -> None:
    monkeypatch.delenv("DUPLEXGATE_API_KEY")
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient() as client:
        response = await client.get(live.base_url + "/metrics", headers=AUTH)
    assert response.status_code == 503
    assert "DUPLEXGATE_API_KEY" in response.json()["detail"]


async def test_a_refused_call_is_counted_by_reason(start_gateway, tone_wav) -> None:
    live = start_gateway(EchoEngine(max_sessions=0))
    with pytest.raises(AnsweredWithoutStream):  # the webhook answers the overflow
        await simulate_call(None, tone_wav(440, 0.5), webhook=live.webhook, tail_s=0.1)
    await simulate_call(
        live.ws_url, tone_wav(440, 0.5), tail_s=0.1
    )  # a stream with no webhook: refused at open
    samples = await scrape(live)
    assert value(samples, "duplexgate_admission_refusals_total", reason="no_slot") == 2
    assert value(samples, "duplexgate_calls_ended_total", carrier="twilio", reason="engine_unavailable") == 1


def fake_gateway(engine: Any = None) -> SimpleNamespace:
    return SimpleNamespace(calls={}, engine=engine or EchoEngine(), webhooks=None)


def test_quality_histograms_come_from_the_record_timeline() -> None:
    metrics = GatewayMetrics(fake_gateway())
    measures = {
        "response_latency_s": {"count": 4, "mean": 0.42, "p50": 0.4, "max": 0.9},
        "yield_latency_s": {"count": 0, "mean": None, "p50": None, "max": None},
        "backchannels": 3,
        "overlap_ratio": 0.05,
        "silence_ratio": 0.3,
        "caller_talk_share": 0.6,
    }
    record = SimpleNamespace(
        end_reason="carrier_stop",
        stream_id="MZ1",
        counters={"caller_frames_dropped": 2, "malformed_messages": 1, "agent_frames": 9},
        timeline={"measures": measures},
        started_at=1000.0,
        answered_at=1000.0,
        ended_at=1120.0,  # two minutes
    )
    metrics.on_record(record)
    metrics.on_record(SimpleNamespace(end_reason="no_media_stream", stream_id=None, counters={}))
    measured = {**measures, "backchannels_per_min": 2.5}  # the timeline's own rate wins
    metrics.on_record(
        SimpleNamespace(end_reason="x", stream_id="MZ2", counters={}, timeline={"measures": measured})
    )
    samples = parse(metrics.render()[0].decode())
    assert value(samples, "duplexgate_call_response_latency_seconds_count") == 2
    assert value(samples, "duplexgate_call_response_latency_seconds_sum") == pytest.approx(0.84)
    assert value(samples, "duplexgate_call_yield_latency_seconds_count") == 0  # no barge-in: no mean
    assert value(samples, "duplexgate_call_overlap_ratio_sum") == pytest.approx(0.1)
    assert value(samples, "duplexgate_call_silence_ratio_sum") == pytest.approx(0.6)
    assert value(samples, "duplexgate_call_backchannels_per_minute_sum") == pytest.approx(1.5 + 2.5)
    assert value(samples, "duplexgate_frames_dropped_total", cause="caller_before_engine") == 2
    assert value(samples, "duplexgate_frames_dropped_total", cause="malformed") == 1
    assert value(samples, "duplexgate_calls_without_stream_total") == 1


def test_labels_stay_bounded() -> None:
    assert (
        reason_label("engine_unavailable: EngineBusy: all 4 engine slots are in use") == "engine_unavailable"
    )
    assert reason_label("carrier_stop") == "carrier_stop"
    assert reason_label("Weird Reason!") == "other"
    assert reason_label(None) == "unknown"
    assert refusal_label("all 4 engine slots are in use") == "no_slot"
    assert refusal_label("echo engine full (3 sessions)") == "no_slot"
    assert refusal_label("engine steps of size 8 take 75 ms ... real-time budget to admit") == "step_time"
    metrics = GatewayMetrics(fake_gateway())
    for i in range(100):  # a stream of distinct reasons: the label set stops growing
        call_id = f"c{i}"
        metrics.gateway.calls[call_id] = SimpleNamespace(started=SimpleNamespace(carrier="twilio"))
        metrics.on_notice(CallNotice(NoticeKind.STARTED, call_id, 0.0))
        metrics.on_notice(CallNotice(NoticeKind.ENDED, call_id, 1.0, f"reason_{i}"))
    ended = {
        labels
        for (name, labels) in parse(metrics.render()[0].decode())
        if name == "duplexgate_calls_ended_total"
    }
    assert len(ended) <= 33
    assert frozenset({("carrier", "twilio"), ("reason", "other")}) in ended


async def test_step_observers_feed_the_step_histogram_and_a_failing_one_is_dropped() -> None:
    stats = WorkerStats(capacity=4)
    engine = SimpleNamespace(stats=stats, capacity=4, active=1)
    metrics = GatewayMetrics(fake_gateway(engine))
    await metrics.start()

    def broken(size: int, seconds: float) -> None:
        raise RuntimeError("observer bug")

    stats.observers.insert(0, broken)
    stats.record(0.012, size=2)
    stats.record(0.030, size=4)
    assert stats.observers == [metrics.on_step]
    samples = parse(metrics.render()[0].decode())
    assert value(samples, "duplexgate_engine_step_seconds_count", size="2") == 1
    assert value(samples, "duplexgate_engine_step_seconds_count", size="4") == 1
    assert value(samples, "duplexgate_engine_slots_busy") == 1
    await metrics.aclose()
    assert stats.observers == []


def test_multiprocess_mode_merges_the_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set before start, two processes' counts add up at one scrape."""
    script = textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace
        from gateway.call.notices import CallNotice, NoticeKind
        from gateway.ops.metrics import GatewayMetrics

        gateway = SimpleNamespace(calls={}, engine=SimpleNamespace(capacity=2, active=0), webhooks=None)
        metrics = GatewayMetrics(gateway)
        assert metrics.multiprocess
        gateway.calls["a"] = SimpleNamespace(started=SimpleNamespace(carrier="twilio"))
        metrics.on_notice(CallNotice(NoticeKind.STARTED, "a", 0.0))
        metrics.sample()
        if sys.argv[1] == "scrape":
            sys.stdout.write(metrics.render()[0].decode())
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    for mode in ("write", "scrape"):
        done = subprocess.run(
            [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    samples = parse(done.stdout)
    assert value(samples, "duplexgate_calls_started_total", carrier="twilio") == 2
    # live gauges count only live processes: the first one exited without marking itself dead here, so
    # its gauge file remains; a gateway marks itself dead at shutdown (GatewayMetrics.aclose)
    assert value(samples, "duplexgate_engine_slots_capacity") >= 2


def exported_names() -> set[str]:
    """Every sample name the gateway's families can produce."""
    metrics = GatewayMetrics(fake_gateway())
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in metrics.registry.collect() for suffix in suffixes[family.type]}


def test_the_grafana_dashboard_asks_only_for_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "duplexgate.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"\bduplexgate_[a-z0-9_]+", expr)}
    assert used and used <= exported_names(), used - exported_names()
    # the families the dashboard is for are all on it
    for family in (
        "duplexgate_calls_active",
        "duplexgate_calls_ended_total",
        "duplexgate_engine_step_seconds_bucket",
        "duplexgate_engine_slots_busy",
        "duplexgate_frames_dropped_total",
        "duplexgate_call_response_latency_seconds_bucket",
    ):
        assert family in used


def test_prometheus_scrapes_the_gateway_with_the_key_from_a_file() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "duplexgate"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in ("prometheus", "grafana"):
        assert compose["services"][service]["profiles"] == ["observability"]
    assert "profiles" not in compose["services"]["gateway"]
