"""A Twilio call from the simulated carrier through the real gateway and the real engine (tiny random
checkpoint), with synthesised speech as the caller."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_AUTH_TOKEN

from gateway.simulator.call import simulate_call

CALLER_LINE = "Hi, my dishwasher is leaking. Can someone come this week?"


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run scripts/test.sh, which installs it")
    path = tmp_path_factory.mktemp("speech") / "caller.wav"
    subprocess.run([espeak, "-w", str(path), CALLER_LINE], check=True, timeout=30)
    return path


async def test_a_signed_twilio_call_talks_to_the_real_engine(start_gateway, engine, speech_wav) -> None:
    live = start_gateway(engine, auth_token=TEST_AUTH_TOKEN)
    calls = []
    live.state.notice_hooks.append(
        lambda n: n.kind == "started" and calls.append(live.state.calls[n.call_id])
    )

    summary = await simulate_call(
        None, speech_wav, webhook=live.webhook, auth_token=TEST_AUTH_TOKEN, tail_s=0.5
    )

    assert summary.handshake_status == 101
    assert summary.violations == []
    assert len(calls) == 1
    call = calls[0]
    pushed = call.stats.caller_frames - call.stats.caller_frames_dropped
    assert pushed >= 25, call.stats  # ~3 s of speech in 80 ms frames reached the engine
    # One agent frame per caller frame, bar those still in flight when the caller hung up (a loaded
    # CI machine may lag a few steps behind the caller).
    assert pushed - 10 <= call.stats.agent_frames <= pushed, call.stats
    assert summary.media_received >= call.stats.agent_frames // 2
    assert np.abs(summary.heard).max() > 100  # the random model speaks noise, not silence
    # The transcript holds the frames that carried words, stamped on the 80 ms agent clock.
    stamps = [piece.at_s for piece in call.transcript]
    assert 0 < len(stamps) <= call.stats.agent_frames and stamps == sorted(stamps)
    assert all(abs(s / 0.08 - round(s / 0.08)) < 1e-6 for s in stamps)
    assert await live.until(lambda: engine.active == 0 and not live.state.calls)
    assert engine.stats.steps >= call.stats.agent_frames


async def test_two_real_engine_calls_at_once_share_engine_steps(start_gateway, engine, speech_wav) -> None:
    import asyncio

    live = start_gateway(engine)
    before = engine.stats.steps
    first, second = await asyncio.gather(
        simulate_call(live.ws_url, speech_wav, call_sid="CA" + "1" * 32),
        simulate_call(live.ws_url, speech_wav, call_sid="CA" + "2" * 32),
    )
    assert first.violations == [] and second.violations == []
    assert first.media_received > 0 and second.media_received > 0
    replies = first.media_received + second.media_received
    # Batched: the engine ran fewer steps than there were replies (both calls joined the same steps).
    assert engine.stats.steps - before < replies
    assert await live.until(lambda: engine.active == 0)
