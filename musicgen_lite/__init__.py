"""musicgen-lite: rebuild Meta's MusicGen step by step.

The public surface; notebooks, the CLI and the tests use these names.
"""
from .audio import AudioError, load_audio, normalize_loudness, normalize_peak, resample, save_audio
from .config import SCALES, ScaleConfig, get_config
from .patterns import PATTERNS, Pattern, get_pattern
from .quantization import (Codebook, QuantizedResult, ResidualVectorQuantizer, VectorQuantizer, bits_per_second,
                           codebook_stats, num_quantizers_for_bandwidth)
from .codec import CodecConfig, CompressionModel, MultiScaleMelLoss, codec_config, si_snr
from .hub import from_transformers, load_checkpoint, load_codec, save_checkpoint
from .training import evaluate_codec, export_codec, train_codec, train_lm
from . import sampling
from .conditioning import (ChromaExtractor, ConditionDropout, LearnedTextConditioner, SentenceConditioner, T5Conditioner,
                           get_conditioner)
from .generation import MusicGen, TransformersCodec, from_transformers_musicgen
from .lm import KVCache, LMConfig, MusicLM, from_transformers_decoder, lm_config
from .metrics import chroma_cosine_similarity, clap_score, fad, frechet_distance, kl_divergence
from .data import AudioDataset, TokenDataset, build_token_cache, compose, compose_corpus, make_dataset, read_manifest, render, synth_clip, write_manifest

__version__ = "0.1.0"

__all__ = [
    "PATTERNS", "Pattern", "get_pattern",
    "Codebook", "QuantizedResult", "ResidualVectorQuantizer", "VectorQuantizer", "bits_per_second", "codebook_stats",
    "num_quantizers_for_bandwidth",
    "CodecConfig", "CompressionModel", "MultiScaleMelLoss", "codec_config", "si_snr",
    "from_transformers", "load_checkpoint", "load_codec", "save_checkpoint",
    "evaluate_codec", "export_codec", "train_codec", "train_lm",
    "sampling", "ChromaExtractor", "ConditionDropout", "LearnedTextConditioner", "SentenceConditioner", "T5Conditioner",
    "get_conditioner", "MusicGen", "TransformersCodec", "from_transformers_musicgen",
    "KVCache", "LMConfig", "MusicLM", "from_transformers_decoder", "lm_config",
    "chroma_cosine_similarity", "clap_score", "fad", "frechet_distance", "kl_divergence",
    "AudioDataset", "AudioError", "TokenDataset", "build_token_cache", "SCALES", "ScaleConfig", "compose", "compose_corpus", "get_config",
    "load_audio", "make_dataset", "normalize_loudness", "normalize_peak", "read_manifest", "render",
    "resample", "save_audio", "synth_clip", "write_manifest",
]
