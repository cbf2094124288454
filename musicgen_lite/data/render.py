"""Compositions to audio: FluidSynth with the General MIDI soundfont, or a small built-in synth.

FluidSynth is driven note by note through pyfluidsynth (never the ``fluidsynth -F`` command
line, which was seen here to run forever on some files): the output length is fixed by
construction at ``round(seconds * sample_rate)`` samples. Each clip gets a fresh synth, with
FluidSynth's own reverb and chorus off, so the same seed gives the same bytes whatever was
rendered before; a fixed convolution reverb is added afterwards.

Where FluidSynth or the soundfont is missing, ``renderer="auto"`` falls back to the built-in
additive synth (plucked, sustained and noise-drum voices) with a warning.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from .music import INSTRUMENTS, Composition, Track

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/opt/homebrew/share/soundfonts/default.sf2",
)
REVERB_WET = {"ambient": 0.35, "classical": 0.25, "jazz": 0.15, "folk": 0.15}
_DEFAULT_WET = 0.1


class RenderError(RuntimeError):
    """Rendering could not happen as asked (e.g. FluidSynth requested but missing)."""


def find_soundfont() -> str | None:
    """``$MUSICGEN_LITE_SOUNDFONT``, else the usual places of the General MIDI soundfont."""
    env = os.environ.get("MUSICGEN_LITE_SOUNDFONT")
    if env:
        if not Path(env).is_file():
            raise RenderError(f"MUSICGEN_LITE_SOUNDFONT={env}: no such file")
        return env
    return next((p for p in SOUNDFONT_CANDIDATES if Path(p).is_file()), None)


@lru_cache(maxsize=1)
def _fluidsynth_module():
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pyfluidsynth prints where it found the library
            import fluidsynth  # noqa: F401  (needs the libfluidsynth shared library)
        return fluidsynth
    except Exception:
        return None


@lru_cache(maxsize=1)
def _write_float():
    """``fluid_synth_write_float`` from the library pyfluidsynth loaded.

    pyfluidsynth's ``get_samples`` asks for 16-bit output, which FluidSynth dithers from a
    table drawn with the C library's ``rand()``: a process that seeded ``rand`` differently
    (a Jupyter kernel does) would get different bytes. Float output has no dither.
    """
    import ctypes

    fn = _fluidsynth_module()._fl.fluid_synth_write_float
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _samples(synth, n: int) -> np.ndarray:
    """``n`` frames of FluidSynth output as float32 ``[n, 2]``."""
    buf = np.zeros((n, 2), dtype=np.float32)
    ptr = buf.ctypes.data
    if _write_float()(synth.synth, n, ptr, 0, 2, ptr, 1, 2) != 0:
        raise RenderError("FluidSynth failed to render samples")
    return buf


def fluidsynth_available() -> bool:
    return _fluidsynth_module() is not None and find_soundfont() is not None


def _missing_fluidsynth_message() -> str:
    what = []
    if _fluidsynth_module() is None:
        what.append("the FluidSynth library/pyfluidsynth (apt: fluidsynth; pip: pyfluidsynth)")
    if find_soundfont() is None:
        what.append("a General MIDI soundfont (apt: fluid-soundfont-gm, or set MUSICGEN_LITE_SOUNDFONT)")
    return "FluidSynth rendering is unavailable: missing " + " and ".join(what)


class FluidRenderer:
    """Renders each clip on a fresh FluidSynth instance.

    A reused synth keeps state between clips (voice filters and more), so
    the same clip would come out slightly different depending on what was rendered before.
    With dynamic sample loading a new instance costs about 20 ms, so determinism is cheap.
    """

    def __init__(self, sample_rate: int, soundfont: str):
        if _fluidsynth_module() is None:
            raise RenderError(_missing_fluidsynth_message())
        self.sample_rate = sample_rate
        self.soundfont = soundfont

    def _new_synth(self):
        synth = _fluidsynth_module().Synth(
            gain=0.5, samplerate=float(self.sample_rate),
            **{"synth.reverb.active": 0, "synth.chorus.active": 0, "synth.polyphony": 512,
               "synth.dynamic-sample-loading": 1})
        sfid = synth.sfload(self.soundfont)
        if sfid < 0:
            synth.delete()
            raise RenderError(f"{self.soundfont}: FluidSynth could not load this soundfont")
        return synth, sfid

    def render(self, comp: Composition) -> np.ndarray:
        sr = self.sample_rate
        total = int(round(comp.seconds * sr))
        synth, sfid = self._new_synth()
        try:
            events = []  # (sample, order, kind, channel, key, velocity): note-offs sort before note-ons
            channels = [c for c in range(16) if c != 9]
            for i, track in enumerate(comp.tracks):
                chan = 9 if track.is_drum else channels[i % len(channels)]
                if track.is_drum:
                    synth.program_select(9, sfid, 128, 0)
                else:
                    synth.program_select(chan, sfid, 0, track.program)
                for n in track.notes:
                    s, e = int(round(n.start * sr)), int(round(n.end * sr))
                    if s >= total:
                        continue
                    events.append((s, 1, "on", chan, n.pitch, n.velocity))
                    if e < total:
                        events.append((max(e, s + 1), 0, "off", chan, n.pitch, 0))
            events.sort()
            chunks, pos = [], 0
            for s, _, kind, chan, key, vel in events:
                if s > pos:  # the output length is fixed here, by construction
                    chunks.append(_samples(synth, s - pos))
                    pos = s
                if kind == "on":
                    synth.noteon(chan, key, vel)
                else:
                    synth.noteoff(chan, key)
            if total > pos:
                chunks.append(_samples(synth, total - pos))
        finally:
            synth.delete()
        stereo = np.concatenate(chunks) if chunks else np.zeros((0, 2), np.float32)
        return stereo.mean(axis=1)


@lru_cache(maxsize=4)
def _fluid_renderer(sample_rate: int, soundfont: str) -> FluidRenderer:
    return FluidRenderer(sample_rate, soundfont)


# -------------------------------------------------------------------------- built-in synth

def _note_rng(track_index: int, k: int, pitch: int) -> np.random.Generator:
    return np.random.default_rng([track_index, k, pitch])


def _tone(track: Track, pitch: int, dur: float, velocity: int, sr: int, rng) -> np.ndarray:
    """One pitched note: harmonic partials shaped by the instrument family's envelope."""
    family = INSTRUMENTS[track.name].family if track.name in INSTRUMENTS else "keys"
    sustained = family in ("strings", "organ", "brass", "reed", "pipe", "synth")
    release = 0.08 if sustained else 0.3
    n = int((dur + release) * sr)
    t = np.arange(n) / sr
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    H = max(1, min(12, int((sr / 2) / f0) - 1))
    h = np.arange(1, H + 1)[:, None]  # (H, 1)
    if family == "pipe":
        amps = np.array([1.0, 0.25, 0.08] + [0.0] * 9)[:H]
    elif family in ("synth",) or track.name == "synth lead":
        amps = np.where(h[:, 0] % 2 == 1, 1.0 / h[:, 0], 0.0)
    elif family in ("brass", "reed", "strings", "organ"):
        amps = 1.0 / h[:, 0] ** (1.0 if family != "organ" else 1.5)
    else:  # keys, guitar, bass: plucked / struck
        amps = 1.0 / h[:, 0] ** 1.3
    if sustained:
        attack = 0.08 if family in ("strings", "synth") and track.role == "harmony" else 0.02
        env = np.minimum(t / attack, 1.0) * np.where(t < dur, 1.0, np.exp(-(t - dur) / 0.04))
        decay = np.ones_like(h, dtype=float) * 0.0
    else:
        env = np.minimum(t / 0.004, 1.0) * np.where(t < dur, 1.0, np.exp(-(t - dur) / 0.05))
        decay = 1.5 + 1.2 * h  # higher partials die sooner, as on a string
    vib = 1 + (0.004 * np.sin(2 * np.pi * 5.5 * t) * (t > 0.2)) if family in ("strings", "reed") else 1.0
    phase = 2 * np.pi * f0 * np.cumsum(np.broadcast_to(vib, t.shape)) / sr
    partials = amps[:, None] * np.sin(h * phase[None, :]) * np.exp(-decay * t[None, :])
    out = partials.sum(0) * env
    if family == "pipe":
        out += 0.02 * rng.standard_normal(n) * env
    return (velocity / 127.0) * 0.3 * out


def _drum(key: int, velocity: int, sr: int, rng) -> np.ndarray:
    t = np.arange(int(0.6 * sr)) / sr
    noise = rng.standard_normal(len(t))
    if key in (35, 36):  # kick: a falling sine
        f = 45 + 75 * np.exp(-t * 30)
        out = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t * 8)
    elif key in (38, 40, 39, 37):  # snare / clap / side stick: noise + body
        out = 0.6 * noise * np.exp(-t * 22) + 0.4 * np.sin(2 * np.pi * 185 * t) * np.exp(-t * 30)
        if key == 37:
            out = out * np.exp(-t * 40)
    elif key == 51:  # ride: bright, long
        hp = np.diff(noise, prepend=0.0)
        out = 0.35 * hp * np.exp(-t * 7) + 0.1 * np.sin(2 * np.pi * 3200 * t) * np.exp(-t * 5)
    elif key in (46, 49):  # open hat, crash
        out = 0.4 * np.diff(noise, prepend=0.0) * np.exp(-t * (5 if key == 49 else 12))
    else:  # closed/pedal hat, tambourine, maracas
        out = 0.3 * np.diff(noise, prepend=0.0) * np.exp(-t * 60)
    return (velocity / 127.0) * 0.5 * out


def render_builtin(comp: Composition, sample_rate: int) -> np.ndarray:
    total = int(round(comp.seconds * sample_rate))
    mix = np.zeros(total + 2 * sample_rate)
    for ti, track in enumerate(comp.tracks):
        for k, n in enumerate(track.notes):
            rng = _note_rng(ti, k, n.pitch)
            sound = (_drum(n.pitch, n.velocity, sample_rate, rng) if track.is_drum
                     else _tone(track, n.pitch, n.end - n.start, n.velocity, sample_rate, rng))
            s = int(round(n.start * sample_rate))
            mix[s:s + len(sound)] += sound[: len(mix) - s]
    return mix[:total].astype(np.float32)


# -------------------------------------------------------------------------------- the mix

@lru_cache(maxsize=8)
def _reverb_ir(sample_rate: int, seconds: float = 1.2) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    ir = np.random.default_rng(1234).standard_normal(len(t)) * np.exp(-t / 0.35)
    return ir / np.sqrt((ir ** 2).sum())


def finish(dry: np.ndarray, sample_rate: int, style: str | None, peak: float = 0.9) -> np.ndarray:
    """Add the fixed room reverb and peak-normalise; the length is kept exactly."""
    from scipy.signal import fftconvolve

    wet = REVERB_WET.get(style or "", _DEFAULT_WET)
    out = (1 - wet) * dry + wet * fftconvolve(dry, _reverb_ir(sample_rate))[: len(dry)]
    m = np.abs(out).max()
    if m > 0:
        out = out * (peak / m)
    return out.astype(np.float32)


def render(comp: Composition, sample_rate: int = 32_000, renderer: str = "auto") -> np.ndarray:
    """Render ``comp`` to mono float32 audio of exactly ``round(seconds * sample_rate)`` samples.

    ``renderer``: ``"fluidsynth"`` (error if missing), ``"builtin"``, or ``"auto"`` (FluidSynth
    when available, else the built-in synth with a warning).
    """
    if renderer not in ("auto", "fluidsynth", "builtin"):
        raise ValueError(f"renderer must be 'auto', 'fluidsynth' or 'builtin', got {renderer!r}")
    if not (isinstance(sample_rate, int) and 8_000 <= sample_rate <= 192_000):
        raise ValueError(f"sample_rate must be an integer in [8000, 192000] Hz, got {sample_rate!r}")
    use_fluid = renderer == "fluidsynth" or (renderer == "auto" and fluidsynth_available())
    if renderer == "fluidsynth" and not fluidsynth_available():
        raise RenderError(_missing_fluidsynth_message())
    if use_fluid:
        dry = _fluid_renderer(sample_rate, find_soundfont()).render(comp)
    else:
        if renderer == "auto":
            _warn_fallback_once()
        dry = render_builtin(comp, sample_rate)
    return finish(dry, sample_rate, comp.meta.get("style"))


@lru_cache(maxsize=1)
def _warn_fallback_once() -> None:
    warnings.warn(_missing_fluidsynth_message() + "; using the built-in synthesizer instead.", stacklevel=3)


def which_renderer(renderer: str = "auto") -> str:
    """The renderer ``render`` would use: ``"fluidsynth"`` or ``"builtin"``."""
    if renderer == "auto":
        return "fluidsynth" if fluidsynth_available() else "builtin"
    return renderer
