"""Dataclass configs and the three scale presets: ``tiny`` | ``lite`` | ``full``.

One code path runs everywhere; a scale only changes sizes. ``tiny`` keeps CI and the tests
fast on two CPU cores, ``lite`` gives results one can hear on a laptop CPU in minutes, and
``full`` uses the MusicGen paper's dimensions on a GPU.

Later modules add their own config dataclasses (codec, LM, training) and hang presets off
:class:`ScaleConfig`; a preset is just an instance.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

SCALES = ("tiny", "lite", "full")

#: MusicGen's audio numbers: 32 kHz mono, EnCodec hop 640 samples -> 50 frames/s, 4 x 2048.
MUSICGEN_SAMPLE_RATE = 32_000
MUSICGEN_FRAME_RATE = 50
MUSICGEN_NUM_CODEBOOKS = 4
MUSICGEN_CARDINALITY = 2048


@dataclass
class DataConfig:
    """How much data a notebook or test makes at this scale."""

    sample_rate: int = MUSICGEN_SAMPLE_RATE  # Hz of the rendered audio
    clip_seconds: float = 10.0  # length of one rendered clip
    n_clips: int = 1000  # clips in the training set
    n_heldout: int = 100  # clips kept apart for evaluation
    segment_seconds: float = 10.0  # what the dataset yields per item
    workers: int = 2  # processes that render in parallel


@dataclass
class ScaleConfig:
    """Everything that changes between scales, in one object."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    # Numbers a notebook quotes; the same at every scale (the problem does not shrink).
    frame_rate: int = MUSICGEN_FRAME_RATE
    num_codebooks: int = MUSICGEN_NUM_CODEBOOKS
    cardinality: int = MUSICGEN_CARDINALITY

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ScaleConfig] = {
    "tiny": ScaleConfig(
        name="tiny",
        data=DataConfig(sample_rate=32_000, clip_seconds=4.0, n_clips=16, n_heldout=4,
                        segment_seconds=2.0, workers=1),
    ),
    "lite": ScaleConfig(
        name="lite",
        data=DataConfig(sample_rate=32_000, clip_seconds=8.0, n_clips=400, n_heldout=50,
                        segment_seconds=4.0, workers=2),
    ),
    "full": ScaleConfig(
        name="full",
        data=DataConfig(sample_rate=32_000, clip_seconds=30.0, n_clips=20_000, n_heldout=500,
                        segment_seconds=30.0, workers=8),
    ),
}


def get_config(scale: str | None = None) -> ScaleConfig:
    """The preset for ``scale`` (default: ``$MUSICGEN_LITE_SCALE``, else ``lite``); a copy."""
    name = scale or os.environ.get("MUSICGEN_LITE_SCALE") or "lite"
    if name not in PRESETS:
        raise ValueError(f"scale must be one of {SCALES}, got {name!r}")
    preset = PRESETS[name]
    return replace(preset, data=replace(preset.data))
