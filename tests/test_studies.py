"""The ahead-of-time LM studies at toy size: rows, equal budgets, resume, time limits, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from musicgen_lite.patterns import get_pattern
from musicgen_lite.studies import format_study, run_study, study_lm, study_variants


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A tiny codec (saved), its tokens for 6 training clips and 4 held-out clips with captions."""
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.data import make_dataset
    from musicgen_lite.data.dataset import build_token_cache
    from musicgen_lite.hub import save_checkpoint
    from musicgen_lite.training import ClipBank

    root = tmp_path_factory.mktemp("study")
    train = make_dataset(root / "train", n=6, seconds=2.0, seed=11, sample_rate=16_000, workers=1,
                         melody_stems=False, progress=False)
    held = make_dataset(root / "held", n=4, seconds=2.0, seed=12, sample_rate=16_000, workers=1,
                        melody_stems=False, progress=False)
    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()
    codec.init_codebooks(torch.stack(ClipBank(train, 16_000).wavs))
    codec_dir = save_checkpoint(root / "codec", codec, codec.config.to_dict())
    return (build_token_cache(train, codec, progress=False), build_token_cache(held, codec, progress=False),
            codec_dir, held)


@pytest.fixture(scope="module")
def refs():
    from musicgen_lite.metrics import load_clap, load_tagger

    return load_tagger(), load_clap()


def test_pattern_study_rows_resume_and_limits(tmp_path, caches, refs):
    tokens, held_tokens, codec, held = caches
    tagger, clap = refs
    kw = dict(scale="tiny", steps=2, n_eval=2, eval_duration=1.0, eval_captions=held, progress=False,
              eval_kw=dict(tagger=tagger, clap=clap, batch_size=2, top_k=20), batch_size=2, segment_seconds=1.0,
              log_every=1)
    out = tmp_path / "patterns.json"
    table = run_study("patterns", tokens, held_tokens, codec, out, tmp_path / "runs", variants=["delay", "flatten"],
                      lm="S", **kw)
    assert table["setup"]["lm"] == "S"
    shipped = json.loads((tmp_path / "runs" / "patterns" / "delay" / "model" / "config.json").read_text())
    assert shipped["config"]["lm"]["dim"] == study_lm("S", "tiny").dim == 16  # the size asked for, not the preset's 32
    assert [r["pattern"] for r in table["rows"]] == ["flatten", "delay"] and table["pending"] == []  # study order
    assert json.loads(out.read_text()) == table and not list(tmp_path.glob("*.tmp"))
    for r in table["rows"]:
        for key in ("val_loss", "fad", "kl", "clap", "attribute_accuracy", "caption_gain", "gen_seconds_10s", "params_m"):
            assert math.isfinite(r[key]), key
        assert r["steps_10s"] == get_pattern(r["pattern"], 4).num_steps(500)
    # flattening: 4 steps per frame; delay: one per frame plus K - 1
    assert [r["steps_30s"] for r in table["rows"]] == [4 * 1500, 1500 + 3]
    # equal budgets: the same steps, batch and segment, so the same tokens seen
    assert table["setup"]["tokens_seen"] == 2 * 2 * 50
    assert table["rows"][0]["params_m"] == table["rows"][1]["params_m"]  # only the pattern differs
    # shipping: int8 rows, the codec referenced, the cost measured on the same validation windows
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.studies import ship_study

    report = ship_study(out, tmp_path / "runs", tmp_path / "ship", codec, held_tokens, agreement_captions=2,
                        agreement_seconds=0.3)
    assert [r["name"] for r in report["rows"]] == ["flatten", "delay"]
    assert json.loads((tmp_path / "ship" / "packing.json").read_text()) == report
    for r, row in zip(report["rows"], table["rows"]):
        assert r["val_loss_fp32"] == pytest.approx(row["val_loss"], rel=1e-5)  # the study's own number, recomputed
        assert abs(r["val_loss_stored"] - r["val_loss_fp32"]) < 0.05 and 0.0 <= r["token_agreement"] <= 1.0
        assert r["bytes"] < 0.4 * r["fp32_bytes"]
        shipped_model = MusicGen.load(tmp_path / "ship" / r["name"])
        assert shipped_model.pattern.name == r["name"] and not (tmp_path / "ship" / r["name"] / "codec").exists()
    # a model whose run is gone is trained again from the table's recipe: the same model, to the last bit
    import shutil

    shutil.rmtree(tmp_path / "runs" / "patterns" / "delay")
    again = ship_study(out, tmp_path / "runs", tmp_path / "ship2", codec, held_tokens, agreement_captions=2,
                       agreement_seconds=0.3, progress=False)
    assert again["rows"][1]["val_loss_fp32"] == report["rows"][1]["val_loss_fp32"]
    a, b = (MusicGen.load(tmp_path / d / "delay").lm.state_dict() for d in ("ship", "ship2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and a model that is not the one the table scored is refused
    wrong = json.loads(out.read_text())
    wrong["rows"][1]["val_loss"] += 0.5
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="not the model the table scored"):
        ship_study(tmp_path / "wrong.json", tmp_path / "runs", tmp_path / "ship3", codec, held_tokens, progress=False)
    # a second call keeps finished rows and trains nothing
    again = run_study("patterns", tokens, held_tokens, codec, out, tmp_path / "runs", variants=["delay", "flatten"],
                      lm="S", **kw)
    assert again["rows"] == table["rows"]
    # no time left: nothing new runs, the rest is reported as pending
    limited = run_study("patterns", tokens, held_tokens, codec, out, tmp_path / "runs", max_minutes=0, **kw)
    assert set(limited["pending"]) == {"parallel", "coarse_first", "partial_delay"}
    assert "not finished yet" in format_study(limited) and "flatten" in format_study(limited)


def test_study_variants_and_bad_input(tmp_path, caches):
    assert [v["name"] for v in study_variants("patterns")] == ["flatten", "delay", "parallel", "coarse_first",
                                                                "partial_delay"]
    sizes = [v["lm"] for v in study_variants("scaling", "lite")]
    assert [s.dim for s in sizes] == [128, 256, 384] and sizes[1].num_layers == 6
    assert [v["conditioner"] for v in study_variants("text_encoders")] == ["learned", "minilm", "t5"]
    tokens, held_tokens, codec, _ = caches
    with pytest.raises(ValueError, match="unknown study"):
        study_variants("sizes")
    with pytest.raises(ValueError, match="unknown patterns variants"):
        run_study("patterns", tokens, held_tokens, codec, tmp_path / "x.json", tmp_path, steps=1, scale="tiny",
                  variants=["zigzag"])
    with pytest.raises(ValueError, match="steps must be"):
        run_study("patterns", tokens, held_tokens, codec, tmp_path / "x.json", tmp_path, steps=0, scale="tiny")
    # the LM of a study that does not vary it: the scale's preset, a preset, or a scaling size
    assert study_lm(None, "lite") == "lite" and study_lm("small") == "small"
    assert study_lm("S", "lite") == sizes[0] and study_lm("L", "tiny").dim == 48
    with pytest.raises(ValueError, match="lm='XL'"):
        run_study("patterns", tokens, held_tokens, codec, tmp_path / "x.json", tmp_path, steps=1, scale="tiny", lm="XL")


# ------------------------------------------------------------------ the shipped study results

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results"


def test_shipped_pattern_study_is_whole_and_its_steps_are_the_patterns_own():
    """data/results/patterns.json (README table, notebook 08): every pattern of the study, one
    budget, finite metrics, and decoding steps that are each pattern's own arithmetic."""
    table = json.loads((RESULTS / "patterns.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == {v["name"] for v in study_variants("patterns")}
    assert not table.get("pending")
    frames_10 = round(10 * 50.0)  # the lite codec's 50 Hz
    for name, row in rows.items():
        assert row["steps_10s"] == get_pattern(name, 4).num_steps(frames_10)
        assert row["steps_30s"] == get_pattern(name, 4).num_steps(3 * frames_10)
        for key in ("val_loss", "fad", "kl", "clap", "attribute_accuracy", "gen_seconds_10s"):
            assert math.isfinite(row[key]), (name, key)
        assert 0 < row["val_loss"] < math.log(2048) + 0.5  # below uniform guessing (7.62) give or take
    assert rows["flatten"]["steps_10s"] == 4 * frames_10  # one step per token
    assert "--variants" not in table["setup"]["command"]  # the command that rebuilds the whole table


def test_shipped_scaling_study_is_whole_and_its_conclusion_quotes_it():
    """data/results/scaling.json (notebook 07, README): the three sizes on one budget, growing
    LMs, finite metrics, and a conclusion whose numbers are the table's own."""
    table = json.loads((RESULTS / "scaling.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == [v["name"] for v in study_variants("scaling")] == ["S", "M", "L"]
    assert not table.get("pending") and not table.get("skipped")
    sizes = [rows[n]["lm_params_m"] for n in ("S", "M", "L")]
    assert sizes == sorted(sizes) and sizes[2] > 2 * sizes[1]
    for name, row in rows.items():
        for key in ("val_loss", "fad", "kl", "clap", "attribute_accuracy", "gen_seconds_10s"):
            assert math.isfinite(row[key]), (name, key)
        assert 0 < row["val_loss"] < math.log(2048)  # below uniform guessing
    conclusion = table["conclusion"]
    for row in rows.values():
        assert f"{row['val_loss']:.3f}" in conclusion and f"{row['fad']:.1f}" in conclusion
    readme = " ".join((RESULTS.parents[1] / "README.md").read_text().split())
    for row in rows.values():
        assert f"{row['val_loss']:.3f}" in readme


def test_shipped_melody_comparison_holds_every_metric_for_both_systems():
    """data/results/melody_eval.json (README, notebook 09): the melody model and the same model
    without its melody, each with FAD, KL, CLAP and chroma cosine, and the table renders."""
    from musicgen_lite.evaluation import format_table

    result = json.loads((RESULTS / "melody_eval.json").read_text())
    text_only = result["reference"]["text_only"]
    for system in (result, text_only):
        for path in (("fad", "value"), ("kl", "kl_ref_gen"), ("clap", "value"), ("chroma_cosine", "value")):
            value = system[path[0]][path[1]]
            assert math.isfinite(value), path
    assert result["setup"]["n"] == 100 and "about" in result
    table = format_table(result)
    assert "text-only" in table and "chroma cosine" in table


def test_shipped_int8_comparison_is_whole_and_consistent():
    """data/results/int8.json (`musicgen-lite evaluate --int8` on the shipped default): both
    systems scored on the same captions, int8 weights well under half the fp32 bytes."""
    path = RESULTS / "int8.json"
    if not path.is_file():
        pytest.skip("no int8 comparison shipped")
    r = json.loads(path.read_text())
    for name in ("fp32", "int8"):
        assert {"fad", "kl", "clap", "attribute_accuracy", "seconds", "weight_bytes"} <= set(r[name])
        assert all(math.isfinite(r[name][k]) for k in ("fad", "kl", "clap", "seconds"))
    assert r["int8"]["weight_bytes"] < 0.5 * r["fp32"]["weight_bytes"]
    assert 0.0 <= r["token_agreement"] <= 1.0
    assert r["speedup"] == pytest.approx(r["fp32"]["seconds"] / r["int8"]["seconds"])
    assert r["setup"]["model"] == "data/checkpoints/musicgen_lite" and r["setup"]["n"] == 100


def test_shipped_text_only_default_on_the_melody_set_matches_the_readme():
    """The separately trained text-only model on the melody model's 100 held-out captions: the
    paper's comparison, whose numbers the README quotes."""
    path = RESULTS / "default_on_melody_heldout.json"
    if not path.is_file():
        pytest.skip("no text-only comparison shipped")
    r = json.loads(path.read_text())
    assert r["setup"]["model"] == "data/checkpoints/musicgen_lite" and r["setup"]["n"] == 100
    assert r["setup"]["captions"] == "data/cache/melody_heldout"
    readme = " ".join((RESULTS.parents[1] / "README.md").read_text().split())
    assert f"FAD {r['fad']['value']:.2f}, KL {r['kl']['kl_ref_gen']:.3f}, CLAP {r['clap']['value']:.3f}" in readme
