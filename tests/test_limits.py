"""Per-call limits: the guard's decisions frame by frame, their configuration, and real calls (simulated
Twilio, real gateway, real tiny engine) that hit each limit."""

from __future__ import annotations

import numpy as np
import pytest
from callaudio import speech_like

from gateway.call.limits import CallLimits, LimitGuard, parse_limits
from gateway.simulator.call import simulate_call

SPEECH = (0.1 * np.sin(np.arange(1920) * 0.05)).astype(np.float32)  # about -23 dBFS
SILENCE = np.zeros(1920, dtype=np.float32)


def run_guard(
    limits: CallLimits, frames: list[np.ndarray], horizon=lambda i: None
) -> list[tuple[str, float]]:
    guard, events = LimitGuard(limits), []
    for i, frame in enumerate(frames):
        events += [(e.kind, e.at_s) for e in guard.on_caller_frame((i + 1) * 0.08, frame, horizon(i))]
    return events


def test_warning_comes_before_the_hard_maximum_and_each_fires_once():
    events = run_guard(CallLimits(max_duration=2.0, warn_before=0.8), [SPEECH] * 40)
    assert events == [("warning", 1.2), ("max_duration", 2.0)]


def test_silence_timeout_counts_from_the_last_caller_speech():
    frames = [SPEECH] * 5 + [SILENCE] * 10 + [SPEECH] * 2 + [SILENCE] * 20
    events = run_guard(CallLimits(silence_timeout=1.2), frames)
    # Speech until 1.36 s (frame 17): silent for 1.2 s at 2.56 s; the earlier 0.8 s gap is not enough.
    assert events == [("silence_timeout", 2.56)]


def test_context_horizon_fires_inside_the_margin_and_again_only_when_rearmed():
    guard = LimitGuard(CallLimits(horizon_action="reanchor", horizon_margin=1.0))
    assert guard.on_caller_frame(0.08, SPEECH, horizon_steps=20) == []  # 1.6 s away
    assert [e.kind for e in guard.on_caller_frame(0.16, SPEECH, horizon_steps=12)] == ["context_horizon"]
    assert guard.on_caller_frame(0.24, SPEECH, horizon_steps=11) == []
    guard.rearm("context_horizon")
    assert [e.detail for e in guard.on_caller_frame(0.32, SPEECH, horizon_steps=10)] == ["reanchor"]


def test_per_call_parameters_can_only_tighten_the_agents_limits():
    agent = CallLimits(max_duration=600.0, silence_timeout=10.0)
    call = agent.with_overrides({"limit_max_duration": "45", "limit_silence_timeout": "off", "token": "x"})
    assert (call.max_duration, call.silence_timeout) == (45.0, 10.0)  # shortened; "off" ignored
    longer = agent.with_overrides({"limit_max_duration": "3600", "limit_silence_timeout": "60"})
    assert (longer.max_duration, longer.silence_timeout) == (600.0, 10.0)
    assert agent.with_overrides({"limit_horizon_action": "none", "limit_silence_dbfs": "-90"}) == agent
    assert CallLimits().with_overrides({"limit_max_duration": "30"}).max_duration == 30.0  # set where open
    with pytest.raises(ValueError, match="max_duration"):
        agent.with_overrides({"limit_max_duration": "soon"})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_duraton": 60}, "unknown key 'max_duraton'"),
        ({"max_duration": -5}, "max_duration = -5 should be greater than 0"),
        ({"warn_before": 10}, "warn_before needs max_duration"),
        ({"horizon_action": "panic"}, "horizon_action = 'panic' should be 'wrap_up', 'reanchor'"),
        ({"silence_timeout": "ten"}, r"silence_timeout = 'ten' should be a number"),
    ],
)
def test_bad_limits_are_errors_naming_where_and_the_key(table, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_limits(table, "gw.toml: [agents.a.limits]")
    assert str(err.value).startswith("gw.toml: [agents.a.limits]")


# --- real calls ----------------------------------------------------------------------------------------


def agent_tables(**limits) -> dict:
    agent = {"voice": "demo", "prompt": "You are a helpful assistant for SwiftPlex.", "limits": limits}
    return {"agents": {"helper": agent}, "numbers": {"default": "helper"}}


def record_notices(live) -> list:
    notices: list = []
    live.state.notice_hooks.append(notices.append)
    return notices


async def test_a_call_is_ended_by_the_gateway_at_max_duration_after_a_spoken_warning(start_gateway, engine):
    live = start_gateway(
        engine, tables=agent_tables(max_duration=1.6, warn_before=1.0, wrap_up_line="goodbye now")
    )
    notices = record_notices(live)
    summary = await simulate_call(live.ws_url, speech_like(5.0), tail_s=0.0)
    kinds = [n.kind for n in notices]
    assert summary.closed_by == "gateway" and summary.violations == []
    assert kinds.index("warning") < kinds.index("max_duration") < kinds.index("ended")
    ended = next(n for n in notices if n.kind == "ended")
    # Ended at 1.6 s of caller audio, well before the 5 s the caller would have talked.
    assert ended.detail == "max_duration" and 1.6 <= ended.at_s < 3.0
    assert await live.until(lambda: engine.active == 0)


async def test_the_wrap_up_line_is_forced_into_the_agents_words(start_gateway, engine):
    line = "thank you for calling"  # words the demo model's small tokenizer can spell (it has no "b")
    live = start_gateway(engine, tables=agent_tables(max_duration=4.0, warn_before=3.6, wrap_up_line=line))
    calls = []
    live.state.notice_hooks.append(
        lambda n: n.kind == "started" and calls.append(live.state.calls[n.call_id])
    )
    await simulate_call(live.ws_url, speech_like(5.0), tail_s=0.0)
    words = "".join(piece.text for piece in calls[0].transcript)
    assert line in " ".join(words.split())


async def test_a_silent_caller_times_out(start_gateway, engine):
    live = start_gateway(engine, tables=agent_tables(silence_timeout=1.0))
    notices = record_notices(live)
    summary = await simulate_call(live.ws_url, np.zeros(8000 * 4, np.int16), tail_s=0.0)
    assert summary.closed_by == "gateway"
    assert [n.detail for n in notices if n.kind == "ended"] == ["silence_timeout"]


async def test_a_call_parameter_shortens_the_agents_maximum(start_gateway, engine):
    live = start_gateway(engine, tables=agent_tables(max_duration=600))
    notices = record_notices(live)
    summary = await simulate_call(
        live.ws_url, speech_like(5.0), tail_s=0.0, custom_parameters={"limit_max_duration": "1.2"}
    )
    assert summary.closed_by == "gateway"
    assert [n.detail for n in notices if n.kind == "ended"] == ["max_duration"]


async def test_the_context_horizon_guard_reanchors_the_call_and_it_goes_on(start_gateway, engine):
    # A margin wider than the tiny model's whole window makes the guard act at once.
    live = start_gateway(engine, tables=agent_tables(horizon_action="reanchor", horizon_margin=300))
    notices = record_notices(live)
    summary = await simulate_call(live.ws_url, speech_like(2.0), tail_s=0.0)
    kinds = [n.kind for n in notices]
    assert "context_horizon" in kinds and "reanchored" in kinds
    assert summary.closed_by == "carrier" and summary.media_received > 0  # the call went on to its end
