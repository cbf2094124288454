"""Synthetic captioned music: attributes -> composition -> caption + metadata.

Every clip is drawn from a handful of attributes (style, key, mode, tempo, 1-3 General MIDI
instruments, drums on/off); the notes, the caption and the metadata all come from those same
attributes, so whether a generated clip follows its text can be measured exactly later on.

    comp = compose(seed=3, seconds=10)           # a Composition (tracks of notes + meta)
    comp.meta["description"]                     # 'a cheerful folk tune with flute ...'
    wav, meta = synth_clip(seed=3, seconds=10)   # rendered audio [1, N] + metadata
"""
from __future__ import annotations

import math

import numpy as np

from .music import (INSTRUMENTS, MOOD_WORDS, PITCH_CLASSES, STYLES, Composition, Note, Track,
                    chord_name, chord_pitches, key_name, tempo_bucket)

BEATS_PER_BAR = 4

# Drum hits per bar as (GM drum key, beat positions, velocity). Beats are floats so that
# swing (2/3 of a beat) is exact. 36 kick, 38 snare, 37 side stick, 39 clap, 42 closed hat,
# 44 pedal hat, 46 open hat, 49 crash, 51 ride, 54 tambourine, 70 maracas.
DRUM_PATTERNS = {
    "rock": [(36, (0, 2, 2.5), 105), (38, (1, 3), 100), (42, tuple(i / 2 for i in range(8)), 70)],
    "electronic": [(36, (0, 1, 2, 3), 110), (39, (1, 3), 95), (46, (0.5, 1.5, 2.5, 3.5), 70),
                   (42, tuple(i / 4 for i in range(16)), 45)],
    "folk": [(36, (0, 2), 90), (37, (1, 3), 80), (54, tuple(i / 2 for i in range(8)), 55)],
    "jazz": [(51, (0, 1, 1 + 2 / 3, 2, 3, 3 + 2 / 3), 75), (44, (1, 3), 65), (36, (0, 2.5), 60)],
    "ambient": [(36, (0,), 70), (70, (0, 1, 2, 3), 45)],
    "classical": [(36, (0, 2), 80), (38, (1, 3), 70)],  # used only if a caller forces drums on
}

# Rhythms for one bar of melody, in beats (negative = rest).
MELODY_RHYTHMS = [
    (1, 1, 1, 1), (2, 1, 1), (1, 1, 2), (1.5, 0.5, 1, 1), (0.5, 0.5, 1, 2), (1, 0.5, 0.5, 2),
    (3, 1), (1, 1, 1, -1), (0.5, 0.5, 0.5, 0.5, 1, 1), (2, 2), (1, -0.5, 0.5, 2),
]
FAST_RHYTHMS = [(2, 2), (4,), (3, 1), (2, 1, 1), (1, 1, 2)]  # fewer notes when the beat is quick

TEMPO_WORDS = {"slow": ("slow", "unhurried", "gentle-paced", "laid-back"),
               "medium": ("mid-tempo", "moderate", "steady", "medium-tempo"),
               "fast": ("fast", "quick", "lively", "uptempo")}


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- attributes

def sample_attributes(rng: np.random.Generator, style: str | None = None, drums: bool | None = None) -> dict:
    """Draw the attributes of one clip: style, key, mode, bpm, instruments by role, drums."""
    st = STYLES[style] if style else STYLES[rng.choice(sorted(STYLES))]
    mode = "major" if rng.random() < 0.5 else "minor"
    tonic = int(rng.integers(12))
    bpm = int(rng.integers(st.tempo[0], st.tempo[1] + 1))
    has_drums = bool(rng.random() < st.drums_p) if drums is None else bool(drums)
    n_inst = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))

    roles: dict[str, str] = {}
    if n_inst == 1:
        both = [n for n in st.melody + st.harmony if {"melody", "harmony"} <= set(INSTRUMENTS[n].roles)]
        name = str(rng.choice(sorted(set(both))))
        roles = {"melody": name, "harmony": name}
    else:
        roles["melody"] = str(rng.choice(st.melody))
        harmony = [n for n in st.harmony if n != roles["melody"]]
        bass = [n for n in st.bass if n != roles["melody"]]
        if harmony and (n_inst == 3 or not bass or rng.random() < 0.7):
            roles["harmony"] = str(rng.choice(harmony))
        if bass and (n_inst == 3 or "harmony" not in roles):
            roles["bass"] = str(rng.choice(bass))
    instruments = list(dict.fromkeys(roles[r] for r in ("melody", "harmony", "bass") if r in roles))
    bucket = tempo_bucket(bpm)
    mood, words = MOOD_WORDS[(mode, bucket)]
    moods = [str(w) for w in rng.choice(words, size=2, replace=False)]
    return {"style": st.name, "mode": mode, "tonic": tonic, "bpm": bpm, "drums": has_drums,
            "roles": roles, "instruments": instruments, "mood": mood, "moods": moods,
            "tempo_bucket": bucket, "accompaniment": str(rng.choice(st.accompaniment)),
            "progression": [int(d) for d in st_progression(st, mode, rng)]}


def st_progression(st, mode: str, rng: np.random.Generator) -> tuple[int, ...]:
    options = st.progressions_major if mode == "major" else st.progressions_minor
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------- caption

def make_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A natural caption that names style, mood, instruments, tempo and drums (key sometimes)."""
    st = STYLES[attrs["style"]]
    noun = str(rng.choice(st.noun))
    mood, mood2 = attrs["moods"]
    insts = _join(attrs["instruments"])
    key = key_name(attrs["tonic"], attrs["mode"])
    tempo_word = str(rng.choice(TEMPO_WORDS[attrs["tempo_bucket"]]))
    bpm = attrs["bpm"]
    if attrs["drums"]:
        drums = str(rng.choice([", with drums", " and drums", ", with a steady drum beat",
                                f" over {_article(attrs['style'])} {attrs['style']} drum groove", ", drums and percussion"]))
        drums_short = str(rng.choice(["drums", "with drums", "full drum kit"]))
    else:
        drums = str(rng.choice([" without drums", ", no drums", " with no percussion"]))
        drums_short = str(rng.choice(["no drums", "without percussion", "drumless"]))
    in_key = f" in {key}" if rng.random() < 0.5 else ""
    lead = attrs["roles"]["melody"]
    others = [i for i in attrs["instruments"] if i != lead]
    templates = [
        f"{_article(mood)} {mood} {noun} with {insts}{drums} at {bpm} bpm",
        f"{mood} {noun}{in_key or ' in ' + key}, {tempo_word}, {drums_short}, featuring {insts}",
        f"{insts} playing {_article(mood)} {mood} {attrs['style']} melody{drums}, {tempo_word} tempo",
        f"{_article(tempo_word)} {tempo_word} {attrs['style']} piece{in_key} featuring {insts}; {mood} and {mood2}{drums}",
        f"{attrs['style']}: {insts}, {drums_short}, {bpm} bpm, {mood}{', ' + key if in_key else ''}",
        f"{mood} and {mood2} {noun} led by {lead}" + (f" with {_join(others)}" if others else "")
        + f", {drums_short}, around {bpm} bpm",
        f"{tempo_word} and {mood}: {_article(attrs['style'])} {attrs['style']} {noun.split()[-1]} for {insts}{in_key}{drums}",
    ]
    text = str(templates[int(rng.integers(len(templates)))])
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


# ---------------------------------------------------------------------------- composition

def _place(pc: int, low: int, high: int, near: int) -> int:
    """The MIDI pitch of pitch class ``pc`` within [low, high] closest to ``near``."""
    cands = [p for p in range(low, high + 1) if p % 12 == pc]
    return min(cands, key=lambda p: abs(p - near)) if cands else low + (pc - low) % 12


def _voicing(pcs: list[int], low: int = 52, high: int = 76, center: int = 62) -> list[int]:
    return sorted({_place(pc, low, high, center + 4 * i) for i, pc in enumerate(pcs)})


def _harmony_notes(figure: str, pcs: list[int], t0: float, beat: float, rng, vel: int) -> list[Note]:
    """One bar of accompaniment in ``figure`` over the chord ``pcs`` starting at ``t0`` seconds."""
    v = _voicing(pcs)
    bar = BEATS_PER_BAR * beat
    out: list[Note] = []

    def hit(start_beats: float, dur_beats: float, pitches, velocity=vel, strum=0.0):
        for i, p in enumerate(pitches):
            s = t0 + start_beats * beat + i * strum
            out.append(Note(s, t0 + (start_beats + dur_beats) * beat, int(p), int(velocity)))

    if figure in ("block", "pad"):
        hit(0, BEATS_PER_BAR, v, vel if figure == "block" else int(vel * 0.8))
    elif figure == "strum":
        for b, d, acc in ((0, 1, 1.0), (1, 1, 0.8), (2, 1, 0.9), (3, 1, 0.8)):
            hit(b, d, v + [v[0] + 12], int(vel * acc), strum=0.012)
    elif figure in ("arpeggio", "arp16", "alberti"):
        if figure == "alberti":
            order = [v[0], v[-1], v[1], v[-1]]
        else:
            order = v + [v[0] + 12] + v[1:][::-1]
        step = 0.25 if figure == "arp16" else 0.5
        for i in range(int(BEATS_PER_BAR / step)):
            hit(i * step, step, [order[i % len(order)]], int(vel * (1.0 if i % 2 == 0 else 0.8)))
    elif figure == "power":
        root = _place(pcs[0], 40, 52, 45)
        third = _place(pcs[1], root + 12, root + 24, root + 16)  # keeps the mode audible
        for i in range(8):
            hit(i * 0.5, 0.5, [root, root + 7, root + 12, third], int(vel * (1.0 if i % 2 == 0 else 0.85)))
    elif figure == "eighths":
        for i in range(8):
            hit(i * 0.5, 0.5, v, int(vel * (1.0 if i % 2 == 0 else 0.8)))
    elif figure == "pulse":
        for b in (0.5, 1.5, 2.5, 3.5):
            hit(b, 0.4, v, vel)
    elif figure == "comp":  # jazz: syncopated stabs, a new rhythm each bar
        starts = [(0, 1.5), (1 + 2 / 3, 1)] if rng.random() < 0.5 else [(0, 1), (2 + 2 / 3, 1.2)]
        for b, d in starts:
            hit(b, d, v, vel)
    else:
        raise ValueError(f"unknown accompaniment figure {figure!r}")
    assert all(n.end <= t0 + bar + 1e-6 for n in out)
    return out


def _bass_notes(style: str, pcs: list[int], next_pcs: list[int], t0: float, beat: float, vel: int) -> list[Note]:
    root = _place(pcs[0], 33, 47, 40)
    fifth = _place(pcs[2], 33, 52, root + 7)
    if style == "jazz":  # walking: root, third, fifth, approach to the next root
        nxt = _place(next_pcs[0], 33, 47, root)
        line = [root, _place(pcs[1], 33, 52, root + 4), fifth, nxt + (1 if nxt < fifth else -1)]
        return [Note(t0 + i * beat, t0 + (i + 1) * beat, p, vel) for i, p in enumerate(line)]
    if style in ("rock", "electronic"):
        beats = [i / 2 for i in range(8)] if style == "rock" else [0.5, 1.5, 2.5, 3.5]
        return [Note(t0 + b * beat, t0 + (b + 0.45) * beat, root, vel) for b in beats]
    if style == "ambient":
        return [Note(t0, t0 + BEATS_PER_BAR * beat, root, int(vel * 0.8))]
    return [Note(t0, t0 + 1.9 * beat, root, vel), Note(t0 + 2 * beat, t0 + 3.9 * beat, fifth, vel)]


def _melody_notes(attrs: dict, chords: list[list[int]], beat: float, rng, low: int, high: int,
                  vel: int) -> list[Note]:
    """A stepwise melody: chord tones on strong beats, scale steps between, phrases end on the tonic."""
    scale_pcs = [(attrs["tonic"] + s) % 12 for s in
                 ((0, 2, 4, 5, 7, 9, 11) if attrs["mode"] == "major" else (0, 2, 3, 5, 7, 8, 10))]
    scale = [p for p in range(low, high + 1) if p % 12 in scale_pcs]
    rhythms = FAST_RHYTHMS if attrs["bpm"] >= 130 else MELODY_RHYTHMS
    swing = attrs["style"] == "jazz"
    tonic_pitch = _place(attrs["tonic"], low, high, (low + high) // 2)
    cur = tonic_pitch
    notes: list[Note] = []
    motif = rhythms[int(rng.integers(len(rhythms)))]
    for bar, pcs in enumerate(chords):
        t0 = bar * BEATS_PER_BAR * beat
        # Repeat the bar's rhythm motif often: repetition is what makes a line sound like a tune.
        rhythm = motif if rng.random() < 0.5 else rhythms[int(rng.integers(len(rhythms)))]
        pos = 0.0
        phrase_end = bar % 4 == 3
        for j, dur in enumerate(rhythm):
            rest, dur = dur < 0, abs(dur)
            last = phrase_end and j == len(rhythm) - 1
            if not rest:
                strong = pos in (0.0, 2.0)
                if bar == 0 and pos == 0.0:
                    cur = tonic_pitch
                elif last and 0 in [(pc - attrs["tonic"]) % 12 for pc in pcs]:
                    cur = _place(attrs["tonic"], low, high, cur)
                elif strong:
                    cur = min((p for p in range(low, high + 1) if p % 12 in pcs), key=lambda p: abs(p - cur))
                else:
                    i = int(np.searchsorted(scale, cur))
                    i = int(np.clip(i + rng.choice([-2, -1, -1, 1, 1, 2]), 0, len(scale) - 1))
                    cur = scale[i]
                start = pos + (1 / 6 if swing and pos % 1 == 0.5 else 0)
                end = pos + dur + (1 / 6 if swing and (pos + dur) % 1 == 0.5 else 0)
                accent = 1.0 if strong else 0.85
                notes.append(Note(t0 + start * beat, t0 + end * beat * 0.98, int(cur),
                                  int(np.clip(vel * accent + rng.integers(-6, 7), 30, 127))))
            pos += dur
    return notes


def _drum_notes(style: str, n_bars: int, beat: float, rng) -> list[Note]:
    notes = []
    for bar in range(n_bars):
        t0 = bar * BEATS_PER_BAR * beat
        for key, beats, vel in DRUM_PATTERNS[style]:
            for b in beats:
                accent = 1.0 if b == int(b) else 0.85
                v = int(np.clip(vel * accent + rng.integers(-8, 9), 20, 127))
                notes.append(Note(t0 + b * beat, t0 + b * beat + 0.1, key, v))
        if bar % 4 == 0 and style in ("rock", "electronic"):
            notes.append(Note(t0, t0 + 0.5, 49, 90))
    return notes


def compose(seed: int, seconds: float = 10.0, style: str | None = None, drums: bool | None = None) -> Composition:
    """A complete clip from one seed: attributes, notes for every track, caption, metadata."""
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(rng, style=style, drums=drums)
    return arrange(attrs, seconds, rng, seed=seed)


def arrange(attrs: dict, seconds: float, rng: np.random.Generator, seed: int | None = None,
            melody: list[Note] | None = None) -> Composition:
    """Notes for the attributes ``attrs`` (a given ``melody`` replaces the generated one)."""
    beat = 60.0 / attrs["bpm"]
    n_bars = math.ceil(seconds / (BEATS_PER_BAR * beat))
    prog = attrs["progression"]
    degrees = attrs.get("chord_degrees") or [prog[i % len(prog)] for i in range(n_bars + 1)]
    seventh = attrs["style"] == "jazz"
    chords = [chord_pitches(attrs["tonic"], attrs["mode"], d, seventh=seventh) for d in degrees]
    tracks: list[Track] = []
    roles = attrs["roles"]
    if "melody" in roles:
        inst = INSTRUMENTS[roles["melody"]]
        notes = melody if melody is not None else _melody_notes(attrs, chords[:n_bars], beat, rng, inst.low, inst.high, 100)
        tracks.append(Track(inst.name, inst.program, "melody", notes))
    if "harmony" in roles:
        inst = INSTRUMENTS[roles["harmony"]]
        vel = 62 if roles.get("melody") == inst.name else 72
        notes = [n for b in range(n_bars)
                 for n in _harmony_notes(attrs["accompaniment"], chords[b], b * BEATS_PER_BAR * beat, beat, rng, vel)]
        tracks.append(Track(inst.name, inst.program, "harmony", notes))
    if "bass" in roles:
        inst = INSTRUMENTS[roles["bass"]]
        notes = [n for b in range(n_bars)
                 for n in _bass_notes(attrs["style"], chords[b], chords[b + 1], b * BEATS_PER_BAR * beat, beat, 95)]
        tracks.append(Track(inst.name, inst.program, "bass", notes))
    if attrs["drums"]:
        tracks.append(Track("drums", 0, "drums", _drum_notes(attrs["style"], n_bars, beat, rng), is_drum=True))
    for t in tracks:  # everything inside the clip
        t.notes = [Note(n.start, min(n.end, seconds), n.pitch, n.velocity) for n in t.notes if n.start < seconds - 0.02]

    comp = Composition(tracks, seconds)
    description = attrs.get("description") or make_caption(attrs, rng)
    comp.meta = {
        "description": description,
        "title": attrs.get("title", ""),
        "artist": attrs.get("artist", "musicgen-lite synth"),
        "key": key_name(attrs["tonic"], attrs["mode"]),
        "tonic": PITCH_CLASSES[attrs["tonic"]],
        "mode": attrs["mode"],
        "bpm": attrs["bpm"],
        "tempo_bucket": attrs["tempo_bucket"],
        "genre": attrs["style"],
        "style": attrs["style"],
        "moods": attrs["moods"],
        "mood": attrs["mood"],
        "instrument": ", ".join(attrs["instruments"]),
        "instruments": attrs["instruments"],
        "instrument_families": sorted({INSTRUMENTS[i].family for i in attrs["instruments"]}),
        "roles": roles,
        "drums": attrs["drums"],
        "chords": [chord_name(attrs["tonic"], attrs["mode"], d) for d in degrees[:n_bars]],
        "keywords": [attrs["style"], *attrs["moods"], *attrs["instruments"], "drums" if attrs["drums"] else "no drums"],
        "melody": comp.melody_notes(),
        "source": attrs.get("source", "synth"),
        "seed": seed,
        "duration": seconds,
    }
    return comp


def synth_clip(seed: int, seconds: float = 10.0, sample_rate: int = 32_000, style: str | None = None,
               drums: bool | None = None, renderer: str = "auto"):
    """Compose and render one clip: ``(wav [1, N] float32 tensor, metadata dict)``."""
    import torch

    from .render import render

    comp = compose(seed, seconds, style=style, drums=drums)
    wav = render(comp, sample_rate, renderer=renderer)
    meta = dict(comp.meta, sample_rate=sample_rate)
    return torch.from_numpy(wav)[None], meta
