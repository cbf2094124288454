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
    assert model.cfg_coef == result["setup"]["generate"]["cfg_coef"]  # it generates as it was measured
    guide = model.key_guide
    assert (guide.strength if guide is not None else None) == result["setup"]["generate"].get("key_guidance")
    assert (guide.candidates if guide is not None else None) == result["setup"]["generate"].get("key_candidates")
    from musicgen_lite.lm_card import caption_gain_line

    assert caption_gain_line(result) is None or caption_gain_line(result) in card


@needs_model
def test_shipped_key_guide_favours_tokens_that_sound_like_the_key():
    """For every key, the codebook-0 tokens that fit it best sound like it: the mean chroma of the
    20 best is nearest that key's profile of all 24 (the key-finder's rule). Uncapped scores: at
    the cap many tokens tie."""
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.key_guidance import KeyGuide, key_profiles

    shipped = MusicGen.load().key_guide
    assert shipped is not None and (shipped.counts > 0).sum() > 0.9 * shipped.bins
    guide = KeyGuide(shipped.chroma, shipped.counts, cap=None)
    profiles = key_profiles().reshape(24, 12)
    for m, mode in enumerate(("major", "minor")):
        for tonic in range(12):
            chroma = guide.chroma[guide.score(tonic, mode).topk(20).indices].mean(0)
            assert int((profiles @ (chroma - chroma.mean())).argmax()) == 12 * m + tonic, (tonic, mode)


@needs_model
def test_shipped_model_reads_its_caption():
    """The default model's music depends on its text: on 4 s from the start of 8 fresh synthetic clips
    (seeds no training set drew) its loss rises by more than 5 nats a clip with no caption or another
    clip's (the first default, with a learned text encoder, failed this: 1.0 and 3.6 nats)."""
    from musicgen_lite.data.synth import synth_clip
    from musicgen_lite.evaluation import caption_gain
    from musicgen_lite.generation import MusicGen

    model = MusicGen.load()
    clips = [synth_clip(900_000 + i, seconds=4.0, sample_rate=model.sample_rate) for i in range(8)]
    gain = caption_gain(model, torch.stack([w for w, _ in clips]), model.sample_rate,
                        [meta["description"] for _, meta in clips])
    assert gain["gain_null"] > 5.0 and gain["gain_other"] > 5.0, gain


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
    assert model.cfg_coef == result["setup"]["generate"]["cfg_coef"]  # it generates as it was measured
    guide = model.key_guide
    assert (guide.strength if guide is not None else None) == result["setup"]["generate"].get("key_guidance")
    assert (guide.candidates if guide is not None else None) == result["setup"]["generate"].get("key_candidates")


def test_committed_results_and_cards_carry_no_machine_paths():
    """Everything shipped under data/ that a person reads or a notebook loads (cards, results,
    configs) names paths relative to the project, never this machine's."""
    import re

    pattern = re.compile(r"(/work/|/root/|/home/[^/\s\"]+/|/Users/[^/\s\"]+/|/tmp/|/content/)")
    data = CHECKPOINTS.parent
    files = [p for p in data.rglob("*") if p.suffix in (".json", ".md", ".txt") and "cache" not in p.parts]
    assert len(files) >= 5  # cards and results are there to check
    leaks = {str(p.relative_to(data)): m.group(0) for p in files for m in [pattern.search(p.read_text())] if m}
    assert not leaks, f"machine paths in shipped files: {leaks}"


PATTERN_MODELS = CHECKPOINTS / "patterns"


@pytest.mark.skipif(not (PATTERN_MODELS / "packing.json").is_file(), reason="no shipped pattern-study models")
def test_shipped_pattern_models_are_the_studys_own_and_storing_them_cost_little():
    """data/checkpoints/patterns: one model per pattern of data/results/patterns.json, whose validation
    loss (recomputed when packing) is the table's, stored in int8 rows at a small measured cost,
    sharing the lite codec; each loads and generates."""
    from musicgen_lite.data.dataset import codec_fingerprint
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.hub import load_codec
    from musicgen_lite.studies import PATTERN_STUDY

    packing = json.loads((PATTERN_MODELS / "packing.json").read_text())
    table = json.loads((CHECKPOINTS.parent / "results" / "patterns.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert sorted(r["name"] for r in packing["rows"]) == sorted(rows) == sorted(PATTERN_STUDY)
    assert packing["setup"] == table["setup"]
    card = (PATTERN_MODELS / "README.md").read_text()
    fingerprint = codec_fingerprint(load_codec(CODEC))
    for r in packing["rows"]:
        assert r["val_loss_fp32"] == pytest.approx(rows[r["name"]]["val_loss"], abs=1e-4), r["name"]
        assert abs(r["val_loss_stored"] - r["val_loss_fp32"]) < 0.01, r  # int8 rows: under 0.01 nats
        assert r["bytes"] < 0.3 * r["fp32_bytes"]
        assert f"| {r['name']} | {r['val_loss_fp32']:.3f} | {r['val_loss_stored']:.3f} |" in card
        folder = PATTERN_MODELS / r["name"]
        config = json.loads((folder / "config.json").read_text())["config"]
        assert config["codec_path"] == "../../codec_lite" and not (folder / "codec").exists()
        model = MusicGen.load(folder)
        assert model.pattern.name == r["name"] and codec_fingerprint(model.codec) == fingerprint
    wav = model.generate(["a calm piano piece"], duration=0.5, seed=1, progress=False)
    assert wav.shape == (1, 1, model.sample_rate // 2) and torch.isfinite(wav).all()


def test_committed_data_stays_under_80_mb():
    """DESIGN.md: the whole committed data/ folder (checkpoints, results, assets; not the ignored
    cache) at most 80 MB, so a clone stays quick."""
    data = CHECKPOINTS.parent
    total = sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and "cache" not in p.relative_to(data).parts)
    assert 1e6 < total <= 80e6, f"data/ holds {total / 1e6:.1f} MB"


@needs_model
def test_shipped_model_compiled_step_gives_the_fast_loops_tokens():
    """The compiled step (``compile_step=True``) on the shipped default, which has what the toy
    models lack: a beat clock read inside the step, key guidance and best-of-4 candidates around
    it. Sampled: the same noise must give the same draws."""
    from musicgen_lite.generation import MusicGen

    model = MusicGen.load()
    captions = ["a sad piano piece at 70 bpm", "an energetic rock song with drums at 150 bpm"]
    kw = dict(duration=0.5, seed=0, progress=False, fast=True)
    fast = model.generate_codes(captions, **kw)
    compiled = model.generate_codes(captions, compile_step=True, **kw)
    assert torch.equal(compiled, fast)
