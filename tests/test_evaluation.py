"""evaluate(): every metric on a tiny random MusicGen, and the sanity of its numbers on stand-in models.

A "perfect" model that returns the real held-out clip for each caption must get FAD ~ 0, KL = 0
and the real audio's attribute accuracy; a noise model must do worse on every count.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from musicgen_lite.evaluation import HELDOUT_SEED, evaluate, format_table, load_clips

SECONDS = 3.0
N = 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models step faster on one thread (two threads spin against each other on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def refs():
    from musicgen_lite.metrics import load_clap, load_tagger

    return load_tagger(), load_clap()


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from musicgen_lite.data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("heldout"), n=N, seconds=SECONDS, seed=HELDOUT_SEED,
                        sample_rate=16_000, workers=1, progress=False)


class PerfectModel:
    """Returns the real held-out clip of each caption: what an ideal model would make."""

    sample_rate = 16_000

    def __init__(self, folder):
        wav, infos = load_clips(folder, None, SECONDS)
        self.bank = {i["description"]: w for w, i in zip(wav, infos)}

    def generate(self, descriptions, duration=10.0, cfg_coef=3.0, top_k=250, top_p=0.0, temperature=1.0,
                 seed=None):
        return torch.stack([self.bank[d][..., : int(duration * self.sample_rate)] for d in descriptions])

    def generate_with_chroma(self, descriptions, melody_wavs, melody_sample_rate, duration=10.0, seed=None):
        assert melody_wavs.shape[:2] == (len(descriptions), 1) and melody_sample_rate == self.sample_rate
        return self.generate(descriptions, duration, seed=seed)


class NoiseModel(PerfectModel):
    """Seeded white noise at 32 kHz (a rate other than the evaluation's, to exercise resampling)."""

    sample_rate = 32_000

    def __init__(self):
        pass

    def generate(self, descriptions, duration=10.0, cfg_coef=3.0, top_k=250, top_p=0.0, temperature=1.0,
                 seed=None):
        g = torch.Generator().manual_seed(1000 + seed)
        return 0.1 * torch.randn(len(descriptions), 1, int(duration * self.sample_rate), generator=g)


def _finite_numbers(d):
    """Every number anywhere in a nested dict/list."""
    if isinstance(d, dict):
        for v in d.values():
            yield from _finite_numbers(v)
    elif isinstance(d, list):
        for v in d:
            yield from _finite_numbers(v)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield d


def tiny_musicgen():
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.conditioning import LearnedTextConditioner
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.lm import MusicLM, lm_config

    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()  # 16 kHz, 50 frames/s, 4 x 256
    lm = MusicLM(lm_config("tiny", bins=codec.cardinality, dim=32, cross_attention=True)).eval()
    return MusicGen(codec, lm, LearnedTextConditioner(output_dim=32, dim=32).eval())


def test_tiny_random_musicgen_gets_every_metric(refs, heldout):
    tagger, clap = refs
    model = tiny_musicgen()
    r = evaluate(model, captions=heldout, n=4, duration=2.0, seed=0, batch_size=2, tagger=tagger, clap=clap,
                 progress=False, top_k=50)
    for key in ("fad", "kl", "clap", "chroma_cosine", "attribute_accuracy", "reference"):
        assert key in r
    assert r["chroma_cosine"] is None  # no melodies given
    assert set(r["reference"]) == {"real", "shuffled", "noise"}
    numbers = list(_finite_numbers({k: v for k, v in r.items() if k != "setup"}))
    assert len(numbers) > 50 and all(math.isfinite(x) for x in numbers)
    assert set(r["attribute_accuracy"]["per_attribute"]) >= {"family", "family_top1", "style", "mood", "tempo",
                                                             "drums", "mode"}
    # each number names the reference model that produced it: name@weights-hash
    assert r["fad"]["embedder"].startswith("musicgen-lite-tagger@")
    assert r["kl"]["classifier"] == r["fad"]["embedder"]
    assert r["clap"]["model"].startswith("musicgen-lite-clap@") and "MiniLM" in r["clap"]["model"]
    json.dumps(r)  # JSON-ready
    assert "FAD" in format_table(r) and "noise" in format_table(r)
    gain = r["caption_gain"]  # teacher-forced LM loss on the real clips: own caption, another's, none
    assert gain["clips"] == 4 and gain["seconds"] == 2.0 and gain["tokens_per_clip"] == 4 * 100
    assert gain["gain_null"] == pytest.approx(gain["null"] - gain["own"], abs=2e-3)
    assert "caption gain" in format_table(r)
    assert set(r["word_gain"]) == {"mode", "bpm", "seconds"} and "read the words?" in format_table(r)
    # the same seed gives the same numbers
    again = evaluate(model, captions=heldout, n=4, duration=2.0, seed=0, batch_size=2, tagger=tagger, clap=clap,
                     progress=False, top_k=50)
    assert again["fad"]["value"] == r["fad"]["value"]


def test_perfect_model_beats_noise_and_kl_of_identical_distributions_is_zero(refs, heldout):
    tagger, clap = refs
    kw = dict(captions=heldout, n=N, duration=SECONDS, tagger=tagger, clap=clap, progress=False)
    perfect = evaluate(PerfectModel(heldout), melodies=heldout / "stems", **kw)
    noise = evaluate(NoiseModel(), **kw)

    # identical audio: FAD is only round-off, KL(p, p) = 0 in both directions and per attribute
    assert abs(perfect["fad"]["value"]) < 1e-3
    assert perfect["kl"]["kl_ref_gen"] == pytest.approx(0, abs=1e-9)
    assert perfect["kl"]["kl_gen_ref"] == pytest.approx(0, abs=1e-9)
    assert all(v["kl_ref_gen"] == pytest.approx(0, abs=1e-9) for v in perfect["kl"]["per_attribute"].values())
    # its accuracy and CLAP are exactly the real audio's (the reference ceiling)
    assert perfect["attribute_accuracy"] == perfect["reference"]["real"]["attribute_accuracy"]
    # librosa's tempo of real clips mostly matches their captions' bpm; of noise, much less
    bpm_real = perfect["attribute_accuracy"]["per_attribute"]["tempo_bpm"]
    assert bpm_real >= 0.5 and bpm_real > noise["attribute_accuracy"]["per_attribute"]["tempo_bpm"]
    assert perfect["clap"]["value"] == pytest.approx(perfect["reference"]["real"]["clap"]["value"])
    # rhythm: the real clips have a beat (pulse clarity) whose tempo ranks with their captions' bpm;
    # noise has neither, and another clip's caption's bpm does not rank with a clip's tempo
    assert perfect["rhythm"] == perfect["reference"]["real"]["rhythm"]
    assert perfect["rhythm"]["pulse_clarity"] > noise["rhythm"]["pulse_clarity"] + 0.2
    # (the rank correlation needs more and longer clips than these to mean much: 0.60 on the 100
    # held-out clips of 6 s; here only its presence and range)
    assert -1 <= perfect["rhythm"]["tempo_rank_correlation"] <= 1
    assert perfect["reference"]["shuffled"]["rhythm"]["pulse_clarity"] is None
    assert -1 <= perfect["reference"]["shuffled"]["rhythm"]["tempo_rank_correlation"] <= 1
    assert "pulse clarity" in format_table(perfect)

    assert noise["fad"]["value"] > 10 * max(1.0, perfect["fad"]["value"])
    assert noise["kl"]["kl_ref_gen"] > 0.5
    assert perfect["attribute_accuracy"]["mean"] > noise["attribute_accuracy"]["mean"] + 0.2
    top1 = {name: r["attribute_accuracy"]["per_attribute"]["family_top1"] for name, r in (("real", perfect), ("noise", noise))}
    assert top1["real"] > top1["noise"] + 0.3  # the top family tells real instruments from noise
    assert perfect["clap"]["value"] > noise["clap"]["value"] + 0.3
    # references: real audio prefers its own captions to shuffled ones
    ref = perfect["reference"]
    assert ref["real"]["clap"]["value"] > ref["shuffled"]["clap"]["value"]
    assert ref["shuffled"]["kl"]["kl_ref_gen"] > 0
    # chroma: a real mix shares its melody stem's dominant pitch far more often than noise does
    assert perfect["chroma_cosine"]["value"] > ref["noise"]["chroma_cosine"]["value"] + 0.3
    assert perfect["chroma_cosine"]["value"] > ref["shuffled"]["chroma_cosine"]["value"]
    # text-only reference: the same captions and seeds through generate(); this model ignores the
    # melody, so its text-only audio is the same and so are its numbers, exactly
    assert ref["text_only"]["chroma_cosine"]["value"] == perfect["chroma_cosine"]["value"]
    assert ref["text_only"]["attribute_accuracy"] == perfect["attribute_accuracy"]
    # every metric of the text-only run, measured as the model's own (the stand-in ignores the melody)
    assert ref["text_only"]["fad"]["value"] == pytest.approx(perfect["fad"]["value"], abs=1e-9)
    assert ref["text_only"]["kl"]["kl_ref_gen"] == pytest.approx(perfect["kl"]["kl_ref_gen"], abs=1e-9)
    assert "text-only" in format_table(perfect) and "text_only" not in noise["reference"]


def test_default_heldout_set_and_errors(refs, tmp_path, monkeypatch, heldout):
    tagger, clap = refs
    monkeypatch.setenv("MUSICGEN_LITE_CACHE", str(tmp_path))
    r = evaluate(NoiseModel(), n=2, duration=SECONDS, tagger=tagger, clap=clap, progress=False)
    from musicgen_lite.evaluation import heldout_set

    folder = heldout_set(2, SECONDS, progress=False)  # rendered once, then cached
    assert folder.is_relative_to(tmp_path) and r["setup"]["heldout_seed"] == HELDOUT_SEED
    assert r["setup"]["captions"] == "/".join(folder.parts[-2:])  # recorded without the machine's path
    # the default set's first clips are those of the same seed at any size
    infos_default = load_clips(folder, None, SECONDS)[1]
    infos_ours = load_clips(heldout, 2, SECONDS)[1]
    assert [i["description"] for i in infos_default] == [i["description"] for i in infos_ours]

    with pytest.raises(ValueError, match="n must be at least 2"):
        evaluate(NoiseModel(), n=1, tagger=tagger, clap=clap, progress=False)
    with pytest.raises(ValueError, match="melody"):
        evaluate(tiny_musicgen(), captions=heldout, n=2, duration=1.0, melodies=heldout / "stems", tagger=tagger,
                 clap=clap, progress=False)


def test_cli_evaluate_help_and_missing_model(tmp_path, capsys):
    from musicgen_lite.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--json" in out and "--melodies" in out

    missing = tmp_path / "no_such_model"
    assert main(["evaluate", "--model", str(missing), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "evaluate: error" in err and str(missing) in err
    assert not (tmp_path / "r.json").exists()


def test_cli_evaluate_end_to_end_on_a_saved_tiny_model(tmp_path, heldout, capsys):
    from musicgen_lite.cli import main

    model_dir = tmp_path / "model"
    tiny_musicgen().save(model_dir, conditioner={"name": "learned", "kwargs": {"dim": 32}})
    out = tmp_path / "eval" / "r.json"
    rc = main(["evaluate", "--model", str(model_dir), "--json", str(out), "--captions", str(heldout), "--n", "2",
               "--duration", "1", "--top-k", "20", "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert {"fad", "kl", "clap", "chroma_cosine", "attribute_accuracy", "reference"} <= set(r)
    assert r["setup"]["n"] == 2 and r["setup"]["generate"] == {"cfg_coef": 3.0, "top_k": 20}
    assert "FAD" in capsys.readouterr().out
    # tmp_path lies outside the working directory: the result keeps only the folders' last parts
    assert r["setup"]["captions"] == "/".join(heldout.parts[-2:]) and r["setup"]["model"] == f"{tmp_path.name}/model"


def test_result_files_record_paths_without_the_machine(tmp_path, monkeypatch):
    from musicgen_lite.evaluation import portable_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cache" / "set").mkdir(parents=True)
    assert portable_path(tmp_path / "data" / "cache" / "set") == "data/cache/set"  # under the working directory
    assert portable_path("data/cache/set") == "data/cache/set"
    assert portable_path("/elsewhere/deep/runs/model") == "runs/model"  # outside it: the last two parts
    assert portable_path("model") == "model"


def test_caption_gain_is_the_lm_loss_per_clip_and_zero_for_a_model_that_ignores_its_text(heldout):
    from musicgen_lite.evaluation import caption_gain
    from musicgen_lite.training import LMTask

    model = tiny_musicgen()
    wav, infos = load_clips(heldout, 4, SECONDS)  # 16 kHz, like the codec
    texts = [i["description"] for i in infos]
    g = caption_gain(model, wav, 16_000, texts, seconds=2.0, batch_size=4)
    assert not model.lm.training and not model.conditioner.training  # left in eval mode, as it was given
    task = LMTask(model.lm, model.conditioner, model.pattern).eval()
    with torch.no_grad():
        codes = model.codec.encode(wav[..., :32_000])
        own = float(task(codes, texts)[0]) * codes.shape[1] * codes.shape[2]
        null = float(task(codes, texts, drop=True)[0]) * codes.shape[1] * codes.shape[2]
    assert g["own"] == pytest.approx(own, abs=1e-3) and g["null"] == pytest.approx(null, abs=1e-3)
    assert g["gain_null"] != 0  # a random text encoder still moves the logits
    # a conditioner whose states are all zero: the cross-attention adds nothing, with or without a caption
    with torch.no_grad():
        for p in model.conditioner.parameters():
            p.zero_()
    g0 = caption_gain(model, wav, 16_000, texts, seconds=2.0, batch_size=2)
    assert g0["gain_null"] == 0 and g0["gain_other"] == 0
    assert caption_gain(type("NoText", (), {"conditioner": None})(), wav, 16_000, texts) is None
    with pytest.raises(ValueError, match="one caption per clip"):
        caption_gain(model, wav, 16_000, texts[:3])


def test_mode_and_bpm_are_also_scored_on_only_the_captions_that_state_them():
    from types import SimpleNamespace

    from musicgen_lite.evaluation import _Measures, caption_states
    from musicgen_lite.metrics import HEADS

    assert caption_states("Calm ambient piece in D minor, 71 bpm") == {"mode": True, "bpm": True}
    assert caption_states("jazz: piano, drums, 120bpm, happy") == {"mode": False, "bpm": True}
    assert caption_states("a major-league banger") == {"mode": True, "bpm": False}  # the word, as the LM reads it
    assert caption_states("Minority report") == {"mode": False, "bpm": False}
    assert caption_states("") == {"mode": False, "bpm": False}

    def info(caption, mode, bpm):
        return {"description": caption, "instrument_families": ["keys"], "style": HEADS["style"][0][0],
                "mood": HEADS["mood"][0][0], "tempo_bucket": "slow", "drums": False, "mode": mode, "bpm": bpm}

    infos = [info("sad piece in A minor at 80 bpm", "minor", 80),   # both stated; mode right, bpm right
             info("happy piece in C major", "major", 100),          # mode stated, wrong; bpm unstated, wrong
             info("a calm piece", "minor", 120),                    # nothing stated; mode right, bpm right (half)
             info("rock, 140 bpm", "major", 140)]                   # bpm stated, wrong; mode unstated, right
    n = len(infos)
    probs = {k: torch.full((n, len(labels)), 1.0 / len(labels)) for k, (labels, _) in HEADS.items()}
    probs["mode"] = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])  # minor, minor, minor, major
    bpms = [81.0, 150.0, 60.0, 100.0]
    fake = SimpleNamespace(has_attributes=True, tagger_id="t")
    acc = _Measures.accuracy_of(fake, probs, infos, bpms)
    per = acc["per_attribute"]
    assert per["mode"] == 3 / 4 and per["mode_stated"] == 1 / 2
    assert per["tempo_bpm"] == 2 / 4 and per["tempo_bpm_stated"] == 1 / 2
    assert acc["stated"] == {"mode": 2, "bpm": 2, "clips": 4}
    unstated = [info("a calm piece", "minor", 120)] * 2
    per = _Measures.accuracy_of(fake, {k: v[:2] for k, v in probs.items()}, unstated, bpms[:2])["per_attribute"]
    assert "mode_stated" not in per and "tempo_bpm_stated" not in per  # no caption says it: not scored, not 0


def test_caption_metadata_states_every_key_and_bpm_and_keeps_what_was_said(refs, heldout):
    """``evaluate(caption_metadata=True)``: the model is asked with captions that all name the
    clip's key and bpm (the written words kept, the missing ones added), and every caption
    then counts in ``mode_stated`` / ``tempo_bpm_stated``."""
    from musicgen_lite.evaluation import caption_states, load_clips

    class Recorder(NoiseModel):
        def generate(self, descriptions, duration=10.0, seed=None, **kw):
            self.asked = getattr(self, "asked", []) + list(descriptions)
            return super().generate(descriptions, duration=duration, seed=seed)

    tagger, clap = refs
    kw = dict(captions=heldout, n=N, duration=SECONDS, tagger=tagger, clap=clap, progress=False)
    plain, told = Recorder(), Recorder()
    r_plain = evaluate(plain, **kw)
    r_told = evaluate(told, caption_metadata=True, **kw)
    infos = load_clips(heldout, N, SECONDS)[1]
    assert plain.asked == [i["description"] for i in infos]
    assert all(caption_states(c) == {"mode": True, "bpm": True} for c in told.asked)
    for written, asked, info in zip(plain.asked, told.asked, infos):
        assert asked.startswith(written.rstrip(" .,;"))  # the caption as written comes first
        assert f"{int(round(float(info['bpm'])))} bpm" in asked or caption_states(written)["bpm"]
        assert info["mode"] in asked
    assert r_told["attribute_accuracy"]["stated"] == {"mode": N, "bpm": N, "clips": N}
    assert r_told["setup"]["caption_metadata"] is True and r_plain["setup"]["caption_metadata"] is False
    # the audio and the attributes it is scored against are the same: only the text changed
    assert r_told["attribute_accuracy"]["per_attribute"]["mode"] == r_plain["attribute_accuracy"]["per_attribute"]["mode"]


def test_word_gain_swaps_only_the_mode_word_and_the_bpm_number():
    from musicgen_lite.evaluation import bpm_changed, mode_swapped, word_gain

    assert mode_swapped("Sad piano in D minor, a major-ish Minor mood, minority") == \
        "Sad piano in D major, a minor-ish Major mood, minority"
    assert bpm_changed("rock at 120 bpm, then 80bpm, 99.5 BPM") == "rock at 80 bpm, then 120bpm, 149 BPM"
    for bpm in (60, 100, 109, 110, 150, 200):  # moved out of +-10% of the bpm, its half and its double
        moved = int(bpm_changed(f"{bpm} bpm").split()[0])
        assert all(abs(moved - bpm * f) > 0.1 * bpm * f for f in (0.5, 1.0, 2.0))
    assert mode_swapped("no key here, 90 bpm") == "no key here, 90 bpm"

    model = tiny_musicgen()
    g = torch.Generator().manual_seed(0)
    wavs = 0.1 * torch.randn(3, 1, 16_000, generator=g)
    captions = ["calm piano in A minor, 80 bpm", "rock with drums in C major", "jazz trio"]
    r = word_gain(model, wavs, 16_000, captions, seconds=1.0, batch_size=2)
    assert r["mode"]["clips"] == 2 and r["bpm"]["clips"] == 1 and r["seconds"] == 1.0
    assert math.isfinite(r["mode"]["gain"]) and math.isfinite(r["bpm"]["gain"])
    # the gain is the loss under the altered captions minus the loss under the true ones, clip for clip
    from musicgen_lite.evaluation import _caption_losses

    losses, _ = _caption_losses(model, wavs[:1], 16_000, {"own": captions[:1], "wrong": [bpm_changed(captions[0])]},
                                1.0, 2)
    assert r["bpm"]["gain"] == pytest.approx(losses["wrong"] - losses["own"], abs=1e-3)
    none = word_gain(model, wavs[2:], 16_000, captions[2:], seconds=1.0)
    assert none["mode"] == {"clips": 0, "gain": None} and none["bpm"] == {"clips": 0, "gain": None}
    assert word_gain(type("NoText", (), {"conditioner": None})(), wavs, 16_000, captions) is None
