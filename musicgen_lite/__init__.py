"""musicgen-lite: rebuild Meta's MusicGen step by step.

The public surface; notebooks, the CLI and the tests use these names.
"""
from .audio import AudioError, load_audio, normalize_loudness, normalize_peak, resample, save_audio
from .config import SCALES, ScaleConfig, get_config
from .patterns import PATTERNS, Pattern, get_pattern
from .quantization import (Codebook, QuantizedResult, ResidualVectorQuantizer, VectorQuantizer, bits_per_second,
                           codebook_stats, num_quantizers_for_bandwidth)
from .codec import CodecConfig, CompressionModel, MultiScaleMelLoss, codec_config, si_snr
from .hub import from_pretrained, from_transformers, load_checkpoint, load_codec, load_musicgen, save_checkpoint, save_musicgen
from .training import evaluate_codec, export_codec, export_musicgen, train_codec, train_lm, validation_loss
from . import sampling
from .conditioning import (ChromaExtractor, ConditionDropout, LearnedTextConditioner, MelodyConditioner,
                           SentenceConditioner, T5Conditioner, TempoPredictor, get_conditioner)
from .generation import MusicGen, TransformersCodec, from_transformers_musicgen, from_transformers_musicgen_melody
from .key_guidance import KeyGuide
from .lm import KVCache, LMConfig, MusicLM, beat_clock, from_transformers_decoder, lm_config
from .metrics import chroma_cosine_similarity, clap_score, fad, frechet_distance, kl_divergence
from .data import AudioDataset, TokenDataset, build_token_cache, compose, compose_corpus, make_dataset, read_manifest, render, synth_clip, write_manifest

__version__ = "0.1.0"

__all__ = [
    "PATTERNS", "Pattern", "get_pattern",
    "Codebook", "QuantizedResult", "ResidualVectorQuantizer", "VectorQuantizer", "bits_per_second", "codebook_stats",
    "num_quantizers_for_bandwidth",
    "CodecConfig", "CompressionModel", "MultiScaleMelLoss", "codec_config", "si_snr",
    "from_pretrained", "from_transformers", "load_checkpoint", "load_codec", "load_musicgen", "save_checkpoint",
    "save_musicgen", "evaluate_codec", "export_codec", "export_musicgen", "train_codec", "train_lm", "validation_loss",
    "sampling", "ChromaExtractor", "ConditionDropout", "LearnedTextConditioner", "SentenceConditioner", "T5Conditioner",
    "MelodyConditioner", "TempoPredictor", "get_conditioner", "MusicGen", "TransformersCodec", "from_transformers_musicgen",
    "from_transformers_musicgen_melody", "KeyGuide",
    "KVCache", "LMConfig", "MusicLM", "beat_clock", "from_transformers_decoder", "lm_config",
    "chroma_cosine_similarity", "clap_score", "fad", "frechet_distance", "kl_divergence",
    "AudioDataset", "AudioError", "TokenDataset", "build_token_cache", "SCALES", "ScaleConfig", "compose", "compose_corpus", "get_config",
    "load_audio", "make_dataset", "normalize_loudness", "normalize_peak", "read_manifest", "render",
    "resample", "save_audio", "synth_clip", "write_manifest",
]
