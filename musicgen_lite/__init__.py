"""musicgen-lite: rebuild Meta's MusicGen step by step.

The public surface; notebooks, the CLI and the tests use these names.
"""
from .audio import AudioError, load_audio, normalize_loudness, normalize_peak, resample, save_audio
from .config import SCALES, ScaleConfig, get_config
from .patterns import PATTERNS, Pattern, get_pattern
from .quantization import (Codebook, QuantizedResult, ResidualVectorQuantizer, VectorQuantizer, bits_per_second,
                           codebook_stats, num_quantizers_for_bandwidth)
from .data import AudioDataset, compose, compose_corpus, make_dataset, read_manifest, render, synth_clip, write_manifest

__version__ = "0.1.0"

__all__ = [
    "PATTERNS", "Pattern", "get_pattern",
    "Codebook", "QuantizedResult", "ResidualVectorQuantizer", "VectorQuantizer", "bits_per_second", "codebook_stats",
    "num_quantizers_for_bandwidth",
    "AudioDataset", "AudioError", "SCALES", "ScaleConfig", "compose", "compose_corpus", "get_config",
    "load_audio", "make_dataset", "normalize_loudness", "normalize_peak", "read_manifest", "render",
    "resample", "save_audio", "synth_clip", "write_manifest",
]
