"""The checkpoints shipped in ``data/checkpoints/``: they load, fit together, do what their cards say."""
import json

import pytest
import torch

from musicgen_lite.hub import default_model_path

CHECKPOINTS = default_model_path().parent
CODEC = CHECKPOINTS / "codec_lite"
MODEL = default_model_path()

needs_codec = pytest.mark.skipif(not (CODEC / "config.json").is_file(), reason="no shipped lite codec")
needs_model = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no shipped default model")


@needs_codec
def test_shipped_codec_keeps_the_pitch_of_held_out_clips():
    """Two held-out clips (the card's seed, never trained on) through the shipped codec at 4 codebooks:
    most sounding frames keep their dominant pitch class (the card reports 0.855 on 16 clips)."""
    from musicgen_lite.codec_card import heldout_clips
    from musicgen_lite.hub import load_codec
    from musicgen_lite.metrics import chroma_cosine_similarity

    codec = load_codec(CODEC)
    assert (codec.sample_rate, codec.num_codebooks, codec.cardinality, codec.frame_rate) == (16_000, 4, 2048, 50)
    clips = heldout_clips(codec.sample_rate, n_synth=1, n_corpus=1)
    with torch.no_grad():
        codes = codec.encode(clips)
        rec = codec.decode(codes)[..., : clips.shape[-1]]
    assert codes.shape == (2, 4, clips.shape[-1] // codec.hop_length)
    agreement = float(chroma_cosine_similarity(clips, rec, codec.sample_rate))
    card = json.loads((CODEC / "report.json").read_text())["rows"][3]  # 4 codebooks, 16 clips
    assert agreement > 0.7 and agreement == pytest.approx(card["chroma_cosine"], abs=0.15)


@needs_model
def test_shipped_model_fits_its_codec_and_its_card():
    from musicgen_lite.data.dataset import codec_fingerprint
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.hub import load_codec

    model = MusicGen.load()
    assert codec_fingerprint(model.codec) == codec_fingerprint(load_codec(CODEC))  # the tokens it learned
    a = model.generate(["a calm piano piece"], duration=1.0, seed=5, progress=False)
    b = model.generate(["a calm piano piece"], duration=1.0, seed=5, progress=False)
    assert torch.equal(a, b) and a.shape == (1, 1, model.sample_rate) and torch.isfinite(a).all()
    from musicgen_lite.lm_card import target_lines

    result = json.loads((MODEL / "eval.json").read_text())
    card = (MODEL / "README.md").read_text()
    assert all(line in card for line in target_lines(result))  # the card says what its eval.json measured
    assert f"| FAD (lower better) | {result['fad']['value']:.3f} |" in card
