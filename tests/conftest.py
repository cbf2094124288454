"""Shared test setup: tiny scale, two threads, seeded, and small datasets built once per run."""
from __future__ import annotations

import os

os.environ.setdefault("MUSICGEN_LITE_SCALE", "tiny")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # numba's on-disk cache (librosa's compiled functions) is not safe for two processes that
    # compile the same function at once: with a cold cache a worker crashed reading the other's
    # half-written entry (a segmentation fault in librosa's peak_pick). One cache per worker.
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                          ".pytest_cache", "numba-" + os.environ["PYTEST_XDIST_WORKER"]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """12 synthetic clips of 3 s at 16 kHz, with melody stems (about 5 s to render)."""
    from musicgen_lite.data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), n=12, seconds=3.0, seed=7, sample_rate=16_000,
                        workers=2, progress=False)


def _test_threads() -> int:
    import os

    return int(os.environ.get("MUSICGEN_LITE_TEST_THREADS", "1"))


def pytest_configure(config):
    """One torch thread per test process unless MUSICGEN_LITE_TEST_THREADS says otherwise: the
    tests are small (threads cost more than they give) and a long training job may share the
    machine's two cores (an oversubscribed OpenMP pool slowed it 8x)."""
    import torch

    torch.set_num_threads(_test_threads())


@pytest.fixture(autouse=True)
def _torch_threads():
    """Back to the test thread count before every test (CLI calls set their own --threads)."""
    import torch

    torch.set_num_threads(_test_threads())
    yield


def make_tiny_hf_musicgen(captions, V: int = 32, K: int = 4):
    """A tiny random transformers ``MusicgenForConditionalGeneration`` (2 kHz EnCodec, hop 4 -> 500 Hz,
    K codebooks of V entries; 2-layer decoder 24 wide; a tiny T5 with a sentencepiece vocabulary
    trained on ``captions``) and its tokenizer. Its codebooks are random: transformers starts them
    at zero, which would decode every code alike."""
    import torch
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    from musicgen_lite.conditioning import make_tiny_t5

    t5, tok = make_tiny_t5(captions)
    enc = EncodecConfig(sampling_rate=2000, upsampling_ratios=[2, 2], num_filters=4, hidden_size=16, codebook_size=V,
                        codebook_dim=16, num_residual_layers=1, num_lstm_layers=1, target_bandwidths=[10.0],
                        normalize=False)
    dec = MusicgenDecoderConfig(vocab_size=V, num_codebooks=K, hidden_size=24, num_hidden_layers=2,
                                num_attention_heads=4, ffn_dim=48, max_position_embeddings=128, pad_token_id=V,
                                bos_token_id=V, decoder_start_token_id=V)
    torch.manual_seed(0)
    hf = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5.config, audio_encoder=enc, decoder=dec)).eval()
    hf.text_encoder.load_state_dict(t5.state_dict())
    with torch.no_grad():
        for layer in hf.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    hf.generation_config.decoder_start_token_id = V
    hf.generation_config.pad_token_id = V
    return hf, tok
