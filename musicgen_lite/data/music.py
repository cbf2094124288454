"""The shared vocabulary of our data: keys, scales, chords, instruments, styles, and the
:class:`Composition` that both the synthetic generator and the corpus loader produce and the
renderer turns into sound.

A composition is a list of tracks of notes in seconds (not MIDI ticks), so rendering needs
no tempo map and a melody can be written down exactly in the clip's metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")
# Semitones above the tonic. Minor uses the harmonic minor's raised 7th in dominant chords
# (see ``chord_pitches``) so that a minor key is told apart from its relative major.
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}


@dataclass(frozen=True)
class Instrument:
    name: str  # what a caption calls it
    program: int  # General MIDI program (0-based)
    family: str  # the tagger's instrument-family label
    roles: tuple[str, ...]  # which parts it can play: melody, harmony, bass
    low: int  # comfortable MIDI range for a melody
    high: int


# A curated General MIDI palette: each entry sounds distinct in FluidR3_GM and in the fallback synth.
INSTRUMENTS: dict[str, Instrument] = {i.name: i for i in (
    Instrument("piano", 0, "keys", ("melody", "harmony"), 60, 84),
    Instrument("electric piano", 4, "keys", ("melody", "harmony"), 60, 81),
    Instrument("organ", 16, "organ", ("harmony",), 55, 79),
    Instrument("acoustic guitar", 25, "guitar", ("melody", "harmony"), 55, 79),
    Instrument("electric guitar", 27, "guitar", ("melody", "harmony"), 55, 81),
    Instrument("distorted guitar", 30, "guitar", ("harmony", "melody"), 52, 76),
    Instrument("bass", 33, "bass", ("bass",), 28, 52),
    Instrument("synth bass", 38, "bass", ("bass",), 28, 52),
    Instrument("violin", 40, "strings", ("melody",), 62, 88),
    Instrument("cello", 42, "strings", ("melody", "bass"), 40, 64),
    Instrument("strings", 48, "strings", ("harmony",), 55, 79),
    Instrument("trumpet", 56, "brass", ("melody",), 58, 82),
    Instrument("saxophone", 65, "reed", ("melody",), 56, 80),
    Instrument("flute", 73, "pipe", ("melody",), 67, 91),
    Instrument("synth lead", 81, "synth", ("melody",), 60, 84),
    Instrument("synth pad", 89, "synth", ("harmony",), 55, 79),
)}
INSTRUMENT_FAMILIES = tuple(sorted({i.family for i in INSTRUMENTS.values()}))


@dataclass(frozen=True)
class Style:
    name: str
    noun: tuple[str, ...]  # how captions name a piece of this style
    tempo: tuple[int, int]  # bpm range drawn from
    melody: tuple[str, ...]
    harmony: tuple[str, ...]
    bass: tuple[str, ...]
    drums_p: float  # chance of drums
    accompaniment: tuple[str, ...]  # comping figures (see synth.py)
    progressions_major: tuple[tuple[int, ...], ...]  # scale degrees (0 = tonic), one chord per bar
    progressions_minor: tuple[tuple[int, ...], ...]


STYLES: dict[str, Style] = {s.name: s for s in (
    Style("folk", ("folk tune", "folk song", "acoustic folk piece"), (80, 140),
          ("flute", "violin", "acoustic guitar"), ("acoustic guitar", "piano"), ("bass", "cello"),
          0.4, ("strum", "arpeggio"),
          ((0, 3, 4, 0), (0, 4, 0, 3), (0, 3, 0, 4)), ((0, 3, 4, 0), (0, 6, 3, 4), (0, 4, 0, 6))),
    Style("rock", ("rock track", "rock song", "guitar rock tune"), (100, 160),
          ("electric guitar", "synth lead", "piano"), ("distorted guitar", "electric guitar", "organ"), ("bass",),
          0.95, ("power", "eighths"),
          ((0, 4, 5, 3), (0, 3, 4, 4), (0, 5, 3, 4)), ((0, 3, 6, 0), (0, 5, 6, 0), (0, 3, 4, 0))),
    Style("ambient", ("ambient piece", "ambient soundscape", "atmospheric piece"), (60, 90),
          ("flute", "electric piano", "piano"), ("synth pad", "strings"), ("synth bass", "cello"),
          0.15, ("pad",),
          ((0, 3, 0, 4), (0, 5, 3, 0)), ((0, 5, 3, 4), (0, 3, 0, 5))),
    Style("electronic", ("electronic track", "synth-driven track", "dance track"), (110, 150),
          ("synth lead", "electric piano"), ("synth pad", "electric piano"), ("synth bass",),
          0.95, ("arp16", "pulse"),
          ((0, 5, 3, 4), (0, 4, 5, 3)), ((0, 5, 6, 4), (0, 3, 5, 4))),
    Style("classical", ("classical piece", "chamber piece", "classical miniature"), (60, 140),
          ("violin", "flute", "piano", "cello"), ("piano", "strings"), ("cello",),
          0.0, ("alberti", "arpeggio", "block"),
          ((0, 3, 4, 0), (0, 1, 4, 0), (0, 5, 3, 4)), ((0, 3, 4, 0), (0, 5, 1, 4))),
    Style("jazz", ("jazz tune", "jazz number", "laid-back jazz piece"), (70, 170),
          ("saxophone", "trumpet", "piano"), ("piano", "electric piano"), ("bass",),
          0.8, ("comp",),
          ((0, 5, 1, 4), (1, 4, 0, 0), (0, 3, 1, 4)), ((0, 3, 4, 0), (1, 4, 0, 0))),
)}

MOOD_WORDS = {
    # (mode, tempo bucket) -> (canonical mood, words a caption may use)
    ("major", "fast"): ("happy", ("cheerful", "upbeat", "bright", "joyful", "energetic")),
    ("major", "medium"): ("happy", ("happy", "sunny", "warm", "playful", "light-hearted")),
    ("major", "slow"): ("calm", ("calm", "peaceful", "gentle", "serene", "relaxed")),
    ("minor", "fast"): ("dark", ("dark", "intense", "tense", "driving", "dramatic")),
    ("minor", "medium"): ("dark", ("moody", "mysterious", "brooding", "restless", "haunting")),
    ("minor", "slow"): ("sad", ("melancholic", "sad", "somber", "wistful", "mournful")),
}
MOODS = ("happy", "calm", "dark", "sad")
TEMPO_BUCKETS = ("slow", "medium", "fast")


def tempo_bucket(bpm: float) -> str:
    return "slow" if bpm < 90 else ("medium" if bpm < 125 else "fast")


def key_name(tonic: int, mode: str) -> str:
    return f"{PITCH_CLASSES[tonic % 12]} {mode}"


def chord_pitches(tonic: int, mode: str, degree: int, seventh: bool = False) -> list[int]:
    """Pitch classes (relative to C) of the triad on scale ``degree`` (0-based), root first.

    In minor the dominant (degree 4) takes the raised leading tone, as in harmonic minor.
    """
    scale = list(SCALES[mode])
    if mode == "minor" and degree == 4:
        scale[6] = 11
    tones = [scale[(degree + step) % 7] + 12 * ((degree + step) // 7) for step in (0, 2, 4, 6)[: 4 if seventh else 3]]
    return [(tonic + t) % 12 for t in tones]


def chord_name(tonic: int, mode: str, degree: int) -> str:
    root, third, fifth = chord_pitches(tonic, mode, degree)[:3]
    quality = {(4, 7): "", (3, 7): "m", (3, 6): "dim", (4, 8): "aug"}.get(((third - root) % 12, (fifth - root) % 12), "")
    return PITCH_CLASSES[root] + quality


@dataclass
class Note:
    start: float  # seconds
    end: float  # seconds
    pitch: int  # MIDI note number
    velocity: int = 90


@dataclass
class Track:
    name: str  # instrument name (or "drums")
    program: int  # General MIDI program; ignored for drums
    role: str  # melody | harmony | bass | drums
    notes: list[Note] = field(default_factory=list)
    is_drum: bool = False


@dataclass
class Composition:
    """Tracks of notes in seconds plus the attributes they were made from."""

    tracks: list[Track]
    seconds: float
    meta: dict = field(default_factory=dict)

    def only(self, role: str) -> "Composition":
        return Composition([t for t in self.tracks if t.role == role], self.seconds, dict(self.meta))

    def melody_notes(self) -> list[list[float]]:
        """The melody as ``[start_s, end_s, midi_pitch]`` rows (what the metadata stores)."""
        mel = [t for t in self.tracks if t.role == "melody"]
        return [[round(n.start, 4), round(n.end, 4), n.pitch] for t in mel for n in t.notes]
