"""Long calls keep their role: every context-horizon action on the real tiny engine with a small LM
context, so the horizon (the role prompt about to leave the model's window) comes within seconds of a
real call through the gateway. wrap_up (the default) forces the wrap-up line into the agent's words and
ends the call; reanchor re-primes with the role prompt and the agent's recent words, sanitised and held to
the agent's budget, and the call goes on; hand_off runs the escalation (a transfer through the carrier)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from callaudio import speech_like
from carrier_api import CarrierApi

from engine.embedded import build_engine
from engine.loading import resolve_checkpoint
from gateway.call import escalation
from gateway.simulator.call import simulate_call

# The small window: the prompt, then 7.2 s of live audio; with a 6 s margin the horizon comes 1.2 s into a
# call, and a re-anchored prompt (at most half the window) leaves room for the next one soon after.
LIVE_WINDOW_S = 7.2
MARGIN_S = 6.0
PROMPT = "You are a helpful assistant for SwiftPlex."
LINE = "thank you for calling"  # words the demo model's small tokenizer can spell


@pytest.fixture(scope="module")
def small_window(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint with its LM context cut to the prompt plus LIVE_WINDOW_S of live audio."""
    probe = build_engine(resolve_checkpoint(tiny_checkpoint), torch.device("cpu"), capacity=1)
    positions = len(probe.runner.plan(probe._voice("demo").source, probe.tokenizer.encode(PROMPT)).tokens)
    probe.shutdown()
    directory = tmp_path_factory.mktemp("small-window")
    for item in tiny_checkpoint.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, directory / item.name)
    config = json.loads((directory / "duplexgate_config.json").read_text())
    config["lm"]["context"] = positions + 10 + round(LIVE_WINDOW_S / 0.08)
    (directory / "duplexgate_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def small_engine(small_window: Path):
    worker = build_engine(resolve_checkpoint(small_window), torch.device("cpu"), capacity=2)
    yield worker
    worker.shutdown()


def tables(**agent) -> dict:
    base = {"voice": "demo", "prompt": PROMPT, "allow_unprepared_streams": True}
    return {"agents": {"helper": {**base, **agent}}, "numbers": {"default": "helper"}}


def watch(live) -> tuple[list, list]:
    notices, calls = [], []
    live.state.notice_hooks.append(notices.append)
    live.state.notice_hooks.append(
        lambda n: n.kind == "started" and calls.append(live.state.calls[n.call_id])
    )
    return notices, calls


async def test_wrap_up_says_the_line_and_ends_the_call_before_the_role_leaves(start_gateway, small_engine):
    live = start_gateway(
        small_engine, tables=tables(limits={"horizon_margin": MARGIN_S, "wrap_up_line": LINE})
    )
    notices, calls = watch(live)
    summary = await simulate_call(live.ws_url, speech_like(8.0), tail_s=0.0)
    assert summary.closed_by == "gateway"
    horizon = next(n for n in notices if n.kind == "context_horizon")
    assert horizon.detail == "wrap_up" and horizon.at_s < 4.0  # the small window, not the call, decided
    # the gateway closes the stream first and says "ended" after: wait for it (bounded)
    assert await live.until(lambda: any(n.kind == "ended" for n in notices))
    assert [n.detail for n in notices if n.kind == "ended"] == ["context_horizon"]
    words = " ".join("".join(piece.text for piece in calls[0].transcript).split())
    assert LINE in words
    assert summary.media_sent * 0.02 < 8.0  # ended well before the caller's audio ran out


async def test_reanchor_reprimes_with_the_role_and_recent_words_and_the_call_goes_on(
    start_gateway, small_engine
) -> None:
    live = start_gateway(
        small_engine, tables=tables(limits={"horizon_action": "reanchor", "horizon_margin": MARGIN_S})
    )
    notices, calls = watch(live)
    prompts: list[str] = []
    build = live.state.reanchor_prompt
    live.state.reanchor_prompt = lambda *a: prompts.append(build(*a)) or prompts[-1]
    summary = await simulate_call(live.ws_url, speech_like(10.0), tail_s=0.0)
    assert summary.closed_by == "carrier"  # the call outlived the window it started with
    horizon = next(n for n in notices if n.kind == "context_horizon")
    assert horizon.at_s + MARGIN_S < 10.0  # without the re-anchor its role would have left mid-call
    assert [n.kind for n in notices].count("reanchored") >= 1
    assert prompts[0].startswith(PROMPT)
    said = " ".join(piece.text for piece in calls[0].transcript)
    if prompts[-1] != PROMPT:  # the demo model said words: they follow the role, sanitised
        assert prompts[-1].startswith(PROMPT + " Earlier in this call you said:")
        assert "<" not in prompts[-1] and ">" not in prompts[-1]
        assert prompts[-1].split(": ", 1)[1].split()[-1] in said
    budget = min(300, calls[0]._engine.reprime_token_budget())  # the agent's, and half the window
    assert all(small_engine.count_prompt_tokens(p) <= max(budget, len(PROMPT)) for p in prompts)


async def test_hand_off_runs_the_escalation_and_transfers_the_call(start_gateway, small_engine, monkeypatch):
    monkeypatch.setattr(escalation, "TRANSFER_GRACE_S", 0.3)
    api = CarrierApi()
    try:
        agent = tables(
            limits={"horizon_action": "hand_off", "horizon_margin": MARGIN_S},
            escalation={"transfer_to": "+15557654321", "actions": {"context_horizon": ["transfer"]}},
        )
        live = start_gateway(
            small_engine,
            tables={**agent, "twilio": {"api_base": api.url}},
            env={"TWILIO_ACCOUNT_SID": "AC" + "7" * 32, "TWILIO_AUTH_TOKEN": "t" * 32},
        )
        notices, _ = watch(live)
        summary = await simulate_call(live.ws_url, speech_like(6.0), auth_token="t" * 32, tail_s=0.0)
    finally:
        api.close()
    escalated = next(n for n in notices if n.kind == "escalated")
    assert escalated.escalation.trigger == "context_horizon" and escalated.escalation.actions == ("transfer",)
    assert len(api.requests) == 1 and "%3CDial%3E" in api.requests[0]["body"].decode()
    # the gateway closes the stream first and says "ended" after: wait for it (bounded)
    assert await live.until(lambda: any(n.kind == "ended" for n in notices))
    assert [n.detail for n in notices if n.kind == "ended"] == ["transferred_context_horizon"]
    assert summary.closed_by == "gateway"
