"""Benchmark of the audio path: CPU cost per call per 20 ms for every carrier's wire format (its real
stream dialect and the codec path it needs), the Twilio path ours vs soxr, latency and filter quality.

Run `python bench/codec.py` (add `--cycles N` for more or fewer 80 ms cycles). Everything is single-thread
and measured in one run so the rows are comparable.
"""

from __future__ import annotations

import os

# Single thread for BLAS before numpy loads: the gateway runs many calls side by side, one core each.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import soxr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from gateway.audio import (  # noqa: E402
    InboundAudio,
    OutboundAudio,
    PolyphaseResampler,
    audioop,  # the stdlib module, imported there with its DeprecationWarning silenced
    float_to_pcm16,
)

CARRIER_RATE = 8000
MESSAGE_SAMPLES = 160  # one Twilio media message: 20 ms of 8 kHz mu-law
STREAM_SID = "MZ" + "0123456789abcdef" * 2
FIXTURE_WAV = Path(__file__).resolve().parents[1] / "tests/fixtures/personaplex-tiny/input_user.wav"


# --- test material -----------------------------------------------------------------------------------


def caller_audio_24k() -> np.ndarray:
    """The fixture's 11 s of caller audio (speech, noise, tones) or, without it, white noise."""
    if FIXTURE_WAV.exists():
        with wave.open(str(FIXTURE_WAV)) as wav:
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0
    return 0.1 * np.random.default_rng(0).standard_normal(11 * SAMPLE_RATE).astype(np.float32)


def twilio_media_messages(audio_24k: np.ndarray) -> list[str]:
    """The caller audio as Twilio sends it: JSON text messages with 160 mu-law bytes each."""
    mulaw = OutboundAudio().encode(audio_24k)
    messages = []
    for i in range(len(mulaw) // MESSAGE_SAMPLES):
        chunk = mulaw[i * MESSAGE_SAMPLES : (i + 1) * MESSAGE_SAMPLES]
        media = {
            "track": "inbound",
            "chunk": str(i + 1),
            "timestamp": str(52 + 20 * i),
            "payload": base64.b64encode(chunk).decode("ascii"),
        }
        message = {"event": "media", "sequenceNumber": str(i + 2), "media": media, "streamSid": STREAM_SID}
        messages.append(json.dumps(message))
    return messages


# --- the two pipelines, as a call would run them -----------------------------------------------------

JSON_LIBS: dict[str, tuple[Callable[[str], dict], Callable[[dict], str]]] = {
    "json": (json.loads, lambda m: json.dumps(m, separators=(",", ":"))),
    "orjson": (orjson.loads, lambda m: orjson.dumps(m).decode()),
}


class OursPipeline:
    """gateway.audio: polyphase FIR, whole 80 ms frames."""

    def __init__(self, quality: str) -> None:  # one fixed design; `quality` keeps the rows uniform
        self.inbound = InboundAudio("mulaw", CARRIER_RATE)
        self.outbound = OutboundAudio("mulaw", CARRIER_RATE)

    def decode(self, payload: bytes) -> list[np.ndarray]:
        return self.inbound.push(payload)

    def encode(self, frame: np.ndarray) -> bytes:
        return self.outbound.encode(frame)


class SoxrPipeline:
    """soxr.ResampleStream per direction (int16 in, so mu-law decodes straight into it) plus framing."""

    def __init__(self, quality: str) -> None:
        self.up = soxr.ResampleStream(CARRIER_RATE, SAMPLE_RATE, 1, dtype="int16", quality=quality)
        self.down = soxr.ResampleStream(SAMPLE_RATE, CARRIER_RATE, 1, dtype="float32", quality=quality)
        self.pending = np.empty(0, dtype=np.int16)

    def decode(self, payload: bytes) -> list[np.ndarray]:
        pcm = np.frombuffer(audioop.ulaw2lin(payload, 2), dtype=np.int16)
        # soxr's output length varies per call; cut it into exact model frames.
        self.pending = np.concatenate((self.pending, self.up.resample_chunk(pcm)))
        frames = []
        while len(self.pending) >= FRAME_SAMPLES:
            frames.append(self.pending[:FRAME_SAMPLES].astype(np.float32) / np.float32(32768.0))
            self.pending = self.pending[FRAME_SAMPLES:]
        return frames

    def encode(self, frame: np.ndarray) -> bytes:
        return audioop.lin2ulaw(float_to_pcm16(self.down.resample_chunk(frame)), 2)


class Call:
    """One simulated call: a pipeline plus the JSON library its transport would use."""

    def __init__(self, pipeline: OursPipeline | SoxrPipeline, lib: str) -> None:
        self.pipeline = pipeline
        self.loads, self.dumps = JSON_LIBS[lib]

    def receive(self, texts: list[str]) -> None:
        """Twilio media messages in: parse, base64-decode, decode, resample, frame."""
        for text in texts:
            message = self.loads(text)
            self.pipeline.decode(base64.b64decode(message["media"]["payload"], validate=True))

    def send(self, frame: np.ndarray) -> None:
        """One model frame out: resample, encode, base64, outbound media message."""
        payload = self.pipeline.encode(frame)
        if payload:  # a resampler that withholds output sends nothing this cycle
            b64 = base64.b64encode(payload).decode("ascii")
            self.dumps({"event": "media", "streamSid": STREAM_SID, "media": {"payload": b64}})


def time_calls(
    calls: list[Call], messages: list[str], frames: list[np.ndarray], cycles: int
) -> tuple[np.ndarray, np.ndarray]:
    """ns per 80 ms cycle (4 inbound messages; 1 outbound frame), shape [call, cycle].

    The calls take turns within each cycle, so load from other processes falls on all rows alike.
    """
    inbound_ns = np.empty((len(calls), cycles), dtype=np.int64)
    outbound_ns = np.empty((len(calls), cycles), dtype=np.int64)
    clock = time.perf_counter_ns
    per_frame = FRAME_SAMPLES * CARRIER_RATE // SAMPLE_RATE // MESSAGE_SAMPLES
    for c in range(cycles):
        k = c % min(len(frames), len(messages) // per_frame)
        batch = messages[k * per_frame : (k + 1) * per_frame]
        for i, call in enumerate(calls):
            start = clock()
            call.receive(batch)
            inbound_ns[i, c] = clock() - start
            start = clock()
            call.send(frames[k])
            outbound_ns[i, c] = clock() - start
    return inbound_ns, outbound_ns


def cost_table(cycles: int) -> list[str]:
    audio = caller_audio_24k()
    messages = twilio_media_messages(audio)
    frames = [audio[i : i + FRAME_SAMPLES] for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
    per_20ms = FRAME_SAMPLES / (SAMPLE_RATE * 0.02)  # 4 Twilio messages per model frame
    rows = [
        ("ours", OursPipeline, "", "orjson"),
        ("ours", OursPipeline, "", "json"),
        ("soxr VHQ", SoxrPipeline, "VHQ", "orjson"),
        ("soxr VHQ", SoxrPipeline, "VHQ", "json"),
        ("soxr HQ", SoxrPipeline, "HQ", "orjson"),
    ]
    time_calls([Call(kind(q), lib) for _, kind, q, lib in rows], messages, frames, 200)  # warm-up
    inbound, outbound = time_calls([Call(kind(q), lib) for _, kind, q, lib in rows], messages, frames, cycles)
    inbound, outbound = inbound / per_20ms / 1e3, outbound / per_20ms / 1e3  # us per 20 ms
    lines = [
        f"{'resampler':10s} {'json':7s} {'in median':>10s} {'out median':>11s} {'both median':>12s}"
        f" {'both best':>10s} {'in mean':>8s} {'out mean':>9s}   (us per call per 20 ms of audio)"
    ]
    blocks = 10  # 'both best': the lowest of 10 consecutive blocks' medians, the least disturbed by load
    for (name, _, _, lib), t_in, t_out in zip(rows, inbound, outbound, strict=True):
        med_in, med_out = np.median(t_in), np.median(t_out)
        per_block = zip(np.array_split(t_in, blocks), np.array_split(t_out, blocks), strict=True)
        best = min(np.median(b_in) + np.median(b_out) for b_in, b_out in per_block)
        lines.append(
            f"{name:10s} {lib:7s} {med_in:10.2f} {med_out:11.2f} {med_in + med_out:12.2f} {best:10.2f}"
            f" {t_in.mean():8.2f} {t_out.mean():9.2f}"
        )
    return lines


# --- every carrier's wire format -----------------------------------------------------------------------


class CarrierCall:
    """One call on a carrier's real stream dialect: its peer's media messages parsed and decoded to 80 ms
    frames, and each agent frame encoded and rendered as that carrier's outbound messages."""

    def __init__(self, name: str, audio_24k: np.ndarray) -> None:
        from gateway.call.events import CallStarted
        from gateway.carriers import carrier_class

        kind = carrier_class(name)
        self.name = name
        peer = kind.peer(None, "+15550001111", "+15550002222")
        target = peer.target(f"wss://gw.example.com/{name}/media", {"token": "0" * 48})
        self.stream = kind(kind.settings_type(), "https://gw.example.com").open_stream({}, {})
        started = None
        for message in peer.opening(target):
            event = self.stream.parse(message)
            started = event if isinstance(event, CallStarted) else started
        if started is None:
            raise RuntimeError(f"{name}: the peer's opening messages never started the call")
        fmt = started.media_format
        self.wire = f"{fmt.encoding} {fmt.sample_rate // 1000} kHz"
        self.inbound, self.outbound = (
            InboundAudio(fmt.encoding, fmt.sample_rate),
            OutboundAudio(fmt.encoding, fmt.sample_rate),
        )
        wire = OutboundAudio(fmt.encoding, fmt.sample_rate).encode(audio_24k)
        size = round(fmt.bytes_per_second * peer.chunk_s)
        self.messages = [
            peer.media(wire[i : i + size], n) for n, i in enumerate(range(0, len(wire) - size, size))
        ]
        self.per_frame = max(1, round(0.08 / peer.chunk_s))  # peer messages per 80 ms

    def receive(self, messages: list[str | bytes]) -> None:
        for message in messages:
            event = self.stream.parse(message)
            self.inbound.push(event.payload)  # type: ignore[union-attr]

    def send(self, frame: np.ndarray) -> None:
        self.stream.audio(self.outbound.encode(frame))


def carrier_table(cycles: int) -> list[str]:
    from gateway.carriers import registry

    audio = caller_audio_24k()
    frames = [audio[i : i + FRAME_SAMPLES] for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
    calls = [CarrierCall(name, audio) for name in sorted(registry())]
    clock = time.perf_counter_ns
    totals = np.zeros((len(calls), cycles))
    for c in range(-200, cycles):  # 200 cycles of warm-up
        for i, call in enumerate(calls):  # the calls take turns, so load falls on every row alike
            k = c % min(len(frames), len(call.messages) // call.per_frame)
            start = clock()
            call.receive(call.messages[k * call.per_frame : (k + 1) * call.per_frame])
            call.send(frames[k])
            if c >= 0:
                totals[i, c] = (clock() - start) / 4 / 1e3  # us per 20 ms
    lines = [
        f"{'carrier':11s} {'wire format':14s} {'median':>8s} {'mean':>8s}  (us per call per 20 ms, both ways)"
    ]
    for call, row in zip(calls, totals, strict=True):
        lines.append(f"{call.name:11s} {call.wire:14s} {np.median(row):8.2f} {row.mean():8.2f}")
    return lines


# --- latency and filter quality ----------------------------------------------------------------------


class Stream:
    """One direction of a resampler under test, with soxr's end-of-stream flush where it has one."""

    def __init__(self, kind: str, in_rate: int, out_rate: int) -> None:
        self.kind = kind
        if kind == "ours":
            self.ours = PolyphaseResampler(in_rate, out_rate)
        else:
            self.soxr = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=kind.split()[1])

    def process(self, chunk: np.ndarray) -> np.ndarray:
        return self.ours.process(chunk) if self.kind == "ours" else self.soxr.resample_chunk(chunk)

    def flush(self) -> np.ndarray:
        if self.kind == "ours":
            return np.empty(0, dtype=np.float32)  # nothing withheld; the filter tail is not needed
        return self.soxr.resample_chunk(np.empty(0, dtype=np.float32), last=True)


def chirp(rate: int, seconds: float, f0: float = 300.0, f1: float = 3400.0) -> np.ndarray:
    """Linear chirp with 20 ms raised-cosine ends, sampled at `rate`."""
    t = np.arange(round(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))
    ramp = round(0.02 * rate)
    taper = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    x[:ramp] *= taper
    x[-ramp:] *= taper[::-1]
    return x.astype(np.float32)


def latency(kind: str, in_rate: int, out_rate: int, chunk_s: float) -> tuple[float, float, float]:
    """(group delay, mean withheld, worst withheld) in ms for a chirp streamed in `chunk_s` pieces.

    Group delay: lag of the cross-correlation peak between the output and the chirp computed directly at
    the output rate. Withheld: after each chunk, output the input so far allows but not yet returned.
    """
    seconds = 2.0
    x = chirp(in_rate, seconds)
    stream = Stream(kind, in_rate, out_rate)
    step = round(chunk_s * in_rate)
    out, withheld, fed, produced = [], [], 0, 0
    for start in range(0, len(x), step):
        y = stream.process(x[start : start + step])
        out.append(y)
        fed += len(x[start : start + step])
        produced += len(y)
        withheld.append(max(0.0, fed * out_rate / in_rate - produced) / out_rate * 1000)
    y = np.concatenate([*out, stream.flush()])
    ref = chirp(out_rate, seconds)
    n = 1 << (len(y) + len(ref)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(ref, n)), n)
    peak = int(np.argmax(xcorr))
    # Parabolic interpolation for a sub-sample peak; indices past n/2 are negative lags (circular).
    a, b, c = xcorr[peak - 1], xcorr[peak], xcorr[(peak + 1) % n]
    lag = (peak if peak < n // 2 else peak - n) + 0.5 * (a - c) / (a - 2 * b + c)
    return lag / out_rate * 1000, float(np.mean(withheld)), float(np.max(withheld))


def tone_response(kind: str, in_rate: int, out_rate: int, freq: int) -> np.ndarray:
    """Amplitude spectrum (1 Hz bins) of 1 s of steady-state output for a 0.5-amplitude tone at `freq`."""
    x = (0.5 * np.sin(2 * np.pi * freq * np.arange(round(1.5 * in_rate)) / in_rate)).astype(np.float32)
    stream = Stream(kind, in_rate, out_rate)
    step = round(0.02 * in_rate)
    y = np.concatenate([*(stream.process(x[i : i + step]) for i in range(0, len(x), step)), stream.flush()])
    segment = y[out_rate // 4 : out_rate // 4 + out_rate].astype(np.float64)
    return np.abs(np.fft.rfft(segment)) * 2 / out_rate


def quality(kind: str, in_rate: int, out_rate: int) -> tuple[float, float]:
    """(worst image/alias rejection in dB over 4.6-12 kHz, worst passband deviation in dB over 300-3400 Hz).

    Tones every 20 Hz, one stream each. Up (8 -> 24 kHz): tones 20-3400 Hz, whose images at 8 kHz -/+ f
    cover 4.6-11.4 kHz; rejection = tone level / strongest image. Down (24 -> 8 kHz): tones 4.6-11.98 kHz;
    rejection = input level / level at the alias frequency.
    """
    passband = range(300, 3401, 20)
    if out_rate > in_rate:
        rejection, deviation = [], []
        for f in range(20, 3401, 20):
            spectrum = tone_response(kind, in_rate, out_rate, f)
            rejection.append(20 * np.log10(spectrum[f] / max(spectrum[8000 - f], spectrum[8000 + f])))
            if f in passband:
                deviation.append(abs(20 * np.log10(spectrum[f] / 0.5)))
    else:
        deviation = [abs(20 * np.log10(tone_response(kind, in_rate, out_rate, f)[f] / 0.5)) for f in passband]
        rejection = []
        for f in range(4600, 12000, 20):
            alias = abs(f - 8000 * round(f / 8000))
            rejection.append(20 * np.log10(0.5 / tone_response(kind, in_rate, out_rate, f)[alias]))
    return float(min(rejection)), float(max(deviation))


def quality_table() -> list[str]:
    lines = [
        f"{'resampler':10s} {'direction':10s} {'chunk':>6s} {'group delay':>12s} {'withheld mean':>14s}"
        f" {'withheld max':>13s} {'latency mean':>13s} {'latency max':>12s} {'rejection':>10s}"
        f" {'passband dev':>13s}"
    ]
    for kind in ("ours", "soxr HQ", "soxr VHQ"):
        for in_rate, out_rate, chunk_s in ((8000, 24000, 0.02), (24000, 8000, 0.08)):
            delay, mean_w, max_w = latency(kind, in_rate, out_rate, chunk_s)
            rejection, deviation = quality(kind, in_rate, out_rate)
            direction = f"{in_rate // 1000}k->{out_rate // 1000}k"
            lines.append(
                f"{kind:10s} {direction:10s} {chunk_s * 1000:4.0f}ms {delay:10.2f}ms {mean_w:12.2f}ms"
                f" {max_w:11.2f}ms {delay + mean_w:11.2f}ms {delay + max_w:10.2f}ms {rejection:8.1f}dB"
                f" {deviation:11.4f}dB"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5000, help="80 ms cycles timed per row (default 5000)")
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, soxr {soxr.__version__}, "
        f"orjson {orjson.__version__}, {platform.processor() or platform.machine()}, single thread"
    )
    print(f"caller audio: {'fixture input_user.wav' if FIXTURE_WAV.exists() else 'synthetic noise'}\n")
    print("CPU cost per carrier: its stream dialect (parse, render) + codec + resample + framing, both ways:")
    print("\n".join(carrier_table(args.cycles)))
    print("\nCPU cost, Twilio media JSON + base64 + mu-law + resample + 80 ms framing, both directions:")
    print("\n".join(cost_table(args.cycles)))
    print(
        "\nLatency (group delay by chirp cross-correlation + output withheld after each chunk) and quality"
        "\n(rejection: worst image/alias over 4.6-12 kHz; passband dev: worst |gain| over 300-3400 Hz):"
    )
    print("\n".join(quality_table()))


if __name__ == "__main__":
    main()
