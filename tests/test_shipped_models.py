"""The checkpoints shipped in ``data/checkpoints/``: they load, fit together, do what their cards say."""
import json

import pytest
import torch

from musicgen_lite.hub import default_model_path

CHECKPOINTS = default_model_path().parent
CODEC = CHECKPOINTS / "codec_lite"
MODEL = default_model_path()

needs_codec = pytest.mark.skipif(not (CODEC / "config.json").is_file(), reason="no shipped lite codec")
MELODY = CHECKPOINTS / "musicgen_lite_melody"
needs_model = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no shipped default model")
needs_melody = pytest.mark.skipif(not (MELODY / "config.json").is_file(), reason="no shipped melody model")


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


def text_gain(model, n: int = 8, seconds: float = 4.0, seed: int = 900_000) -> dict:
    """What a caption is worth to the LM: its loss on fresh synthetic clips (seeds no training set
    drew, from their first frame, encoded by the model's own codec) with each clip's own caption,
    another clip's, and the null condition, in nats per clip (per-token loss x tokens per clip).
    A caption holds a few dozen nats (style, instruments, tempo, key, drums), so a model that reads
    it saves some of those; per token the gain shrinks as the LM learns to infer them from the music."""
    from musicgen_lite.data.synth import synth_clip
    from musicgen_lite.training import LMTask

    clips = [synth_clip(seed + i, seconds=seconds, sample_rate=model.sample_rate) for i in range(n)]
    wavs = torch.stack([w for w, _ in clips])
    texts = [meta["description"] for _, meta in clips]
    task = LMTask(model.lm.float(), model.conditioner.float(), "delay").eval()
    with torch.no_grad():
        codes = model.codec.encode(wavs)
        per_token = {"own": float(task(codes, texts)[0]), "other": float(task(codes, texts[1:] + texts[:1])[0]),
                     "null": float(task(codes, texts, drop=True)[0])}
    return {k: v * codes.shape[1] * codes.shape[2] for k, v in per_token.items()}


@needs_model
def test_shipped_model_reads_its_caption():
    """The default model's music depends on its text: with the null condition or another clip's caption
    its loss on 4 s from the start of fresh clips rises by more than 5 nats a clip (the first default,
    with a learned text encoder, failed this: 1.0 nat)."""
    from musicgen_lite.generation import MusicGen

    loss = text_gain(MusicGen.load())
    assert loss["null"] - loss["own"] > 5.0, loss
    assert loss["other"] - loss["own"] > 5.0, loss


@needs_melody
def test_shipped_melody_model_fits_its_codec_follows_a_melody_and_its_card():
    from musicgen_lite.data.dataset import codec_fingerprint
    from musicgen_lite.data.synth import synth_clip
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.hub import load_codec
    from musicgen_lite.lm_card import is_melody_result, target_lines

    model = MusicGen.load(MELODY)
    assert codec_fingerprint(model.codec) == codec_fingerprint(load_codec(CODEC))
    tunes = torch.stack([synth_clip(910_000 + i, seconds=2.0, sample_rate=model.sample_rate)[0] for i in range(2)])
    run = lambda melody: model.generate_with_chroma(["a calm piano piece"], melody, model.sample_rate,  # noqa: E731
                                                     duration=1.0, seed=5, progress=False)
    a, b, other = run(tunes[:1]), run(tunes[:1]), run(tunes[1:])
    assert torch.equal(a, b) and a.shape == (1, 1, model.sample_rate) and torch.isfinite(a).all()
    assert not torch.equal(a, other)  # the melody enters the model
    result = json.loads((MELODY / "eval.json").read_text())
    card = (MELODY / "README.md").read_text()
    assert is_melody_result(result) and all(line in card for line in target_lines(result))
