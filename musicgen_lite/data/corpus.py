"""Real melodies from the music21 corpus (offline: it ships inside the pip package).

Two collections: folk tunes (Ryan's Mammoth Collection, about 1,000 single tunes in ABC) and
Bach's four-part chorales. A tune becomes a :class:`Composition` the same way a synthetic
clip does: the real melody on a lead instrument, an accompaniment (the chorale's own lower
voices, or chords chosen bar by bar to fit a folk tune's notes), drums by style, and a caption
and metadata from the same attributes. The melody line is kept alone too, for melody
conditioning.
"""
from __future__ import annotations

import json
import math
import string
from functools import lru_cache
from pathlib import Path

import numpy as np

from .music import INSTRUMENTS, STYLES, Composition, Note, chord_pitches
from .synth import BEATS_PER_BAR, arrange, make_caption, sample_attributes

COLLECTIONS = ("folk", "chorale")


@lru_cache(maxsize=2)
def list_tunes(collection: str) -> tuple[str, ...]:
    """Corpus paths (relative to music21's corpus folder, sorted) of one collection."""
    from music21 import corpus

    if collection not in COLLECTIONS:
        raise ValueError(f"collection must be one of {COLLECTIONS}, got {collection!r}")
    paths = []
    for p in corpus.getPaths():
        rel = str(p).split("/corpus/", 1)[-1]
        if collection == "folk" and rel.startswith("ryansMammoth/"):
            paths.append(rel)
        # Chorales are the numbered movements, bwvNNN.M; other Bach files (preludes...) are not.
        if collection == "chorale" and rel.startswith("bach/bwv") and "." in Path(rel).stem \
                and rel.endswith((".mxl", ".xml", ".musicxml")):
            paths.append(rel)
    return tuple(sorted(paths))


def _cache_dir() -> Path:
    from .dataset import cache_root

    d = cache_root() / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_tune(rel_path: str) -> dict:
    """Parse one tune into plain data (cached as JSON): title, tonic, mode, voices of notes.

    Each voice is a list of ``[offset, duration, midi_pitch]`` in quarter notes; voice 0 is
    the melody. Chords inside a voice keep their top note.
    """
    cached = _cache_dir() / (rel_path.replace("/", "__") + ".json")
    if cached.exists():
        return json.loads(cached.read_text())
    from music21 import corpus

    score = corpus.parse(rel_path)
    key = score.analyze("key")
    voices = []
    for part in score.parts:
        notes = []
        for n in part.flatten().notes:
            dur = float(n.duration.quarterLength)
            if dur <= 0:  # grace notes
                continue
            pitch = max(p.midi for p in n.pitches) if n.isChord else n.pitch.midi
            notes.append([float(n.offset), dur, int(pitch)])
        if notes:
            voices.append(notes)
    title = (score.metadata.title if score.metadata and score.metadata.title else Path(rel_path).stem)
    if rel_path.startswith("bach/"):
        title = "Chorale BWV " + Path(rel_path).stem[3:]
    title = title.replace(":", "")
    data = {"path": rel_path, "title": title if title.startswith("Chorale") else string.capwords(" ".join(title.replace("--", " ").split()).lower()),
            "tonic": int(key.tonic.pitchClass), "mode": "minor" if key.mode == "minor" else "major",
            "voices": voices}
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(cached)
    return data


def _loop_voice(notes: list, total_ql: float) -> list:
    """Repeat a voice until it covers ``total_ql`` quarter notes (short tunes loop)."""
    if not notes:
        return []
    start = notes[0][0]
    length = max(o + d for o, d, _ in notes) - start
    length = max(length, 1.0)
    out, shift = [], 0.0
    while shift < total_ql:
        out += [[o - start + shift, d, p] for o, d, p in notes if o - start + shift < total_ql]
        shift += math.ceil(length)
    return out


def _fit_octave(notes: list, low: int, high: int) -> int:
    """The octave shift that puts the voice's median pitch inside the instrument's range."""
    med = float(np.median([p for _, _, p in notes]))
    target = (low + high) / 2
    return int(12 * round((target - med) / 12))


def harmonize(melody: list, tonic: int, mode: str, n_bars: int) -> list[int]:
    """One chord (scale degree) per 4-beat bar: the triad that covers most of the bar's melody.

    Candidates are I, IV, V and vi (i, iv, V, VI in minor); ties go to the earlier candidate,
    so the tonic wins when the bar says nothing.
    """
    cands = [0, 3, 4, 5]
    degrees = []
    for b in range(n_bars):
        lo, hi = b * BEATS_PER_BAR, (b + 1) * BEATS_PER_BAR
        weight = np.zeros(12)
        for o, d, p in melody:
            overlap = min(o + d, hi) - max(o, lo)
            if overlap > 0:
                weight[p % 12] += overlap
        scores = [sum(weight[pc] for pc in chord_pitches(tonic, mode, c)) for c in cands]
        degrees.append(cands[int(np.argmax(scores))] if max(scores) > 0 else 0)
    degrees[0] = 0  # start at home
    return degrees


def compose_corpus(seed: int, seconds: float = 10.0, collection: str | None = None,
                   style: str | None = None, drums: bool | None = None,
                   exclude_titles: frozenset | set | tuple = ()) -> Composition:
    """A clip built on a real corpus melody, chosen and arranged from ``seed``.

    ``exclude_titles``: tunes never to pick (held-out sets: the titles a training set used);
    the choice is drawn again from the same generator until the title is a new one.
    """
    rng = np.random.default_rng(seed)
    coll = collection or ("folk" if rng.random() < 0.75 else "chorale")
    tunes = list_tunes(coll)
    tune = load_tune(tunes[int(rng.integers(len(tunes)))])
    for _ in range(10_000):
        if tune["title"] not in exclude_titles:
            break
        tune = load_tune(tunes[int(rng.integers(len(tunes)))])
    else:
        raise ValueError(f"exclude_titles: no {coll} tune left after 10,000 draws")
    attrs = sample_attributes(rng, style=style, drums=drums)
    if coll == "chorale":  # hymn tempo, whatever the style
        attrs["bpm"] = int(rng.integers(60, 101))
        from .music import MOOD_WORDS, tempo_bucket

        attrs["tempo_bucket"] = tempo_bucket(attrs["bpm"])
        attrs["mood"], words = MOOD_WORDS[(tune["mode"], attrs["tempo_bucket"])]
        attrs["moods"] = [str(w) for w in rng.choice(words, size=2, replace=False)]
    else:
        from .music import MOOD_WORDS

        attrs["mood"], words = MOOD_WORDS[(tune["mode"], attrs["tempo_bucket"])]
        attrs["moods"] = [str(w) for w in rng.choice(words, size=2, replace=False)]
    attrs["tonic"], attrs["mode"] = tune["tonic"], tune["mode"]
    if "melody" not in attrs["roles"]:
        attrs["roles"]["melody"] = str(rng.choice(STYLES[attrs["style"]].melody))
    attrs["instruments"] = list(dict.fromkeys(attrs["roles"][r] for r in ("melody", "harmony", "bass")
                                              if r in attrs["roles"]))
    beat = 60.0 / attrs["bpm"]
    total_ql = seconds / beat
    n_bars = math.ceil(total_ql / BEATS_PER_BAR)
    voices = [_loop_voice(v, total_ql + BEATS_PER_BAR) for v in tune["voices"]]
    lead = INSTRUMENTS[attrs["roles"]["melody"]]
    shift = _fit_octave(voices[0], lead.low, lead.high)
    # each note ends 2% of its length early, so repeated pitches are heard as separate notes
    melody = [Note(o * beat, (o + d) * beat * 0.98 + 0.02 * o * beat, p + shift, 100) for o, d, p in voices[0]]
    attrs["chord_degrees"] = harmonize(voices[0], tune["tonic"], tune["mode"], n_bars + 1)
    attrs["source"] = "corpus"
    attrs["title"] = tune["title"]
    attrs["artist"] = "J. S. Bach" if coll == "chorale" else "traditional"
    caption = make_caption(attrs, rng)
    origin = "a Bach chorale melody" if coll == "chorale" else "a traditional folk melody"
    attrs["description"] = caption + (f", based on {origin}" if rng.random() < 0.5 else "")
    comp = arrange(attrs, seconds, rng, seed=seed, melody=melody)
    if coll == "chorale" and len(voices) >= 4:
        # The chorale's own alto, tenor (and bass) replace the generated accompaniment.
        roles = attrs["roles"]
        inner = voices[1:3] if "bass" in roles else voices[1:4]  # no bass part: the bass voice joins the harmony
        for track in comp.tracks:
            if track.role == "harmony":
                track.notes = [Note(o * beat, (o + d) * beat, p, 70) for v in inner for o, d, p in v]
            if track.role == "bass":
                track.notes = [Note(o * beat, (o + d) * beat, p - 12 if p > 52 else p, 90) for o, d, p in voices[3]]
        for t in comp.tracks:
            t.notes = [Note(n.start, min(n.end, seconds), n.pitch, n.velocity) for n in t.notes if n.start < seconds - 0.02]
    comp.meta.update({"corpus_path": tune["path"], "collection": coll, "melody": comp.melody_notes()})
    return comp
