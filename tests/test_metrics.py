"""Metrics measured as metrics: exact math against scipy, and the reference models' behaviour."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from musicgen_lite import metrics
from musicgen_lite.metrics import clap_score, frechet_distance, kl_divergence

HAVE_TAGGER = (metrics.CHECKPOINTS / "tagger" / "model.safetensors").exists()
HAVE_CLAP = (metrics.CHECKPOINTS / "clap" / "model.safetensors").exists()


def _fd_reference(a, b):
    """The textbook formula with scipy's general matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)


def test_frechet_distance_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert frechet_distance(a, b, eps=0) == pytest.approx(_fd_reference(a, b), rel=1e-7)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert abs(frechet_distance(a, a, eps=0)) < 1e-8


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 4))
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_kl_divergence_matches_scipy_and_is_zero_on_itself():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(5), size=10)
    q = rng.dirichlet(np.ones(5), size=10)
    got = kl_divergence(p, q, eps=1e-12)
    assert got["kl_ref_gen"] == pytest.approx(np.mean([scipy.stats.entropy(p[i], q[i]) for i in range(10)]), rel=1e-9)
    assert got["kl_gen_ref"] == pytest.approx(np.mean([scipy.stats.entropy(q[i], p[i]) for i in range(10)]), rel=1e-9)
    same = kl_divergence(p, p)
    assert same == {"kl_ref_gen": 0.0, "kl_gen_ref": 0.0}
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(p, q[:, :3])


def test_clap_score_is_mean_cosine():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert clap_score(t, a) == pytest.approx((1.0 + 1 / np.sqrt(2)) / 2)


def test_caption_ranking_counts():
    a = torch.eye(4)
    r = metrics.caption_ranking(a, a)
    assert r == {"true_above_shuffled": 1.0, "retrieval_r1": 1.0, "retrieval_r5": 1.0}


def test_tagger_shapes_and_heads():
    tagger = metrics.AudioTagger().eval()
    wav = 0.1 * torch.randn(2, 1, 32_000)
    probs = tagger.predict(wav, 32_000)
    assert set(probs) == set(metrics.HEADS)
    assert torch.allclose(probs["style"].sum(-1), torch.ones(2))
    assert tagger.embed(wav, 32_000).shape[:1] == (2,) and tagger.embed(wav, 32_000).shape[-1] == 128
    info = {"instrument_families": ["keys", "bass"], "style": "jazz", "mood": "sad", "tempo_bucket": "slow",
            "drums": True, "mode": "minor"}
    t = metrics.targets_from_info(info)
    assert t["family"].sum() == 2 and t["drums"] == 1 and t["mode"] == 1


def test_chroma_branch_finds_pitch_classes_and_ignores_the_key():
    import math

    branch = metrics.ChromaBranch(16_000)
    t = torch.arange(16_000) / 16_000
    a4 = torch.sin(2 * math.pi * 440 * t)[None, None]
    assert int(branch.chroma(a4).argmax()) == 9  # A
    c = torch.rand(3, 12)
    torch.testing.assert_close(branch(c), branch(torch.roll(c, 5, dims=-1)))


# ------------------------------------------------------------ the shipped reference models

@pytest.fixture(scope="module")
def heldout():
    """24 clips never seen in training (seeds outside every training set), 16 kHz, 6 s."""
    from musicgen_lite.data import compose, render
    from musicgen_lite.data.dataset import clip_seed

    clips = [compose(clip_seed(9_999, i), 6.0) for i in range(24)]
    wav = torch.stack([torch.from_numpy(render(c, 16_000))[None] for c in clips])
    return wav, [c.meta for c in clips]


@pytest.mark.skipif(not HAVE_TAGGER, reason="tagger checkpoint not trained yet")
def test_fad_grows_with_damage(heldout):
    import torchaudio.functional as AF

    wav, _ = heldout
    tagger = metrics.load_tagger()
    a, b = wav[:12], wav[12:]
    base = metrics.fad(a, b, 16_000, tagger)["fad"]
    gen = torch.Generator().manual_seed(0)
    noisy = [metrics.fad(a, b + s * torch.randn(b.shape, generator=gen), 16_000, tagger)["fad"]
             for s in (0.02, 0.1, 0.3)]
    assert base < noisy[0] < noisy[1] < noisy[2]
    low = [metrics.fad(a, AF.lowpass_biquad(b, 16_000, f), 16_000, tagger)["fad"] for f in (3000, 1000, 300)]
    assert base < low[0] < low[1] < low[2]
    assert metrics.fad(a, a, 16_000, tagger)["fad"] < 1e-3 * base
    assert metrics.fad(a, b, 16_000, tagger)["embedder"] == "musicgen-lite-tagger"


@pytest.mark.skipif(not HAVE_TAGGER, reason="tagger checkpoint not trained yet")
def test_tagger_hears_the_attributes_and_its_card_says_how_well(heldout):
    wav, metas = heldout
    tagger = metrics.load_tagger()
    probs = tagger.predict(wav, 16_000)
    targets = metrics._stack_targets([metrics.targets_from_info(m) for m in metas])
    acc = metrics.attribute_accuracy(probs, targets)
    assert acc["drums"] >= 0.8 and acc["style"] >= 0.5 and acc["family"] >= 0.8
    card = json.loads((metrics.CHECKPOINTS / "tagger" / "config.json").read_text())["extra"]
    assert set(card["heldout_accuracy"]) == set(metrics.HEADS) and card["heldout_clips"] >= 100
    p = probs["style"]
    assert kl_divergence(p, p)["kl_ref_gen"] == 0.0


@pytest.mark.skipif(not HAVE_CLAP, reason="CLAP checkpoint not trained yet")
def test_clap_prefers_the_true_caption(heldout):
    wav, metas = heldout
    clap = metrics.load_clap()
    a = clap.embed_audio(wav, 16_000)
    t = clap.embed_text([m["description"] for m in metas])
    ranking = metrics.caption_ranking(a, t)
    assert ranking["true_above_shuffled"] >= 0.8
    card = json.loads((metrics.CHECKPOINTS / "clap" / "config.json").read_text())["extra"]
    assert card["true_above_shuffled"] >= 0.8 and card["heldout_clips"] >= 100


def test_reference_trainers_run_end_to_end(tmp_path):
    """A minute-scale smoke run of both trainers on 8 tiny clips: cards, checkpoints, reload."""
    from musicgen_lite.data import make_dataset

    train = make_dataset(tmp_path / "train", n=8, seconds=2.0, seed=5, sample_rate=16_000, workers=1,
                         melody_stems=False, progress=False)
    held = make_dataset(tmp_path / "held", n=4, seconds=2.0, seed=6, sample_rate=16_000, workers=1,
                        melody_stems=False, progress=False)
    card = metrics.train_tagger([train], [held], out=tmp_path / "tagger", epochs=1, batch_size=4, progress=False)
    assert card["steps"] == 2 and set(card["heldout_accuracy"]) == set(metrics.HEADS)
    assert metrics.load_tagger(tmp_path / "tagger").predict(torch.zeros(1, 1, 16_000), 16_000)["style"].shape == (1, 6)
    card = metrics.train_clap([train], [held], out=tmp_path / "clap", epochs=1, batch_size=4, progress=False)
    assert card["steps"] == 2 and 0.0 <= card["true_above_shuffled"] <= 1.0
    assert set(p.name for p in (tmp_path / "clap").iterdir()) == {"model.safetensors", "config.json"}
    with pytest.raises(FileNotFoundError, match="train it"):
        metrics.load_tagger(tmp_path / "nothing")


def test_family_top1_reads_the_most_probable_family():
    import torch

    from musicgen_lite.metrics import family_top1

    targets = torch.zeros(4, 9)
    targets[0, [1, 2]] = targets[1, 0] = targets[2, 5] = targets[3, [3, 8]] = 1
    probs = torch.full((4, 9), 0.1)
    probs[0, 2] = probs[1, 4] = probs[2, 5] = probs[3, 0] = 0.9  # right, wrong, right, wrong
    assert family_top1(probs, targets) == 0.5
    silent = torch.zeros(4, 9)  # "no family at all": 7-8 of 9 yes/no answers right, yet no instrument named
    yes_no = float(((silent > 0.5).float() == targets).float().mean())
    assert yes_no > 0.8 and family_top1(silent + torch.arange(9) * 1e-3, targets) == 0.25


def _notes(freqs, onsets, sr=16_000, seconds=2.0, note=0.3):
    """Harmonic tones (4 partials, decaying) starting at ``onsets`` (s), one frequency each, over
    faint noise (in digital silence a note's fade-out reads as a spectral onset)."""
    t = np.arange(int(sr * seconds)) / sr
    y = np.zeros_like(t)
    for f, t0 in zip(freqs, onsets):
        seg = (t >= t0) & (t < t0 + note)
        tt = t[seg] - t0
        release = np.clip((note - tt) / 0.03, 0, 1)  # a 30 ms fade: no click at the note's end
        y[seg] += sum(0.3 / k * np.sin(2 * np.pi * k * f * tt) for k in range(1, 5)) * np.exp(-3 * tt) * release
    y += 1e-3 * np.random.default_rng(0).standard_normal(len(t))  # a floor, as any recording has
    return torch.tensor(y, dtype=torch.float32)[None]


def test_melody_accuracy_hears_the_line_a_semitone_off_and_forgives_octaves():
    sr = 16_000
    line = [220.0, 261.63, 329.63, 392.0, 329.63, 261.63]
    onsets = [0.05 + 0.3 * i for i in range(6)]
    ref = _notes(line, onsets, note=0.29)
    same = metrics.melody_accuracy(ref, ref, sr)
    assert same["raw_pitch"] == 1.0 and same["raw_chroma"] == 1.0 and same["voiced_frames"] > 50
    up = metrics.melody_accuracy(ref, _notes([f * 2 ** (1 / 12) for f in line], onsets, note=0.29), sr)
    assert up["raw_pitch"] < 0.1 and up["raw_chroma"] < 0.1  # 100 cents off: outside 50 cents
    down = metrics.melody_accuracy(ref, _notes([f / 2 for f in line], onsets, note=0.29), sr)
    assert down["raw_pitch"] < 0.1 and down["raw_chroma"] > 0.9  # an octave: the pitch class is kept
    quiet = metrics.melody_accuracy(torch.zeros(1, sr), ref[..., :sr], sr)
    assert quiet == {"raw_pitch": None, "raw_chroma": None, "voiced_frames": 0}
    with pytest.raises(ValueError, match="NaN"):
        metrics.melody_accuracy(torch.full((1, sr), float("nan")), ref, sr)


def test_onset_matching_is_the_one_to_one_f_measure():
    r = metrics.match_onsets([0.5, 1.0, 1.5], [0.52, 1.2, 1.5, 2.0])
    assert (r["precision"], r["recall"]) == (2 / 4, 2 / 3)
    assert r["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert metrics.match_onsets([1.0, 1.04], [1.03])["recall"] == 0.5  # one estimate matches one reference
    assert metrics.match_onsets([], [])["f1"] == 1.0 and metrics.match_onsets([1.0], [])["f1"] == 0.0


def test_onset_f1_hears_the_rhythm_and_not_a_shifted_one():
    sr = 16_000
    onsets = [0.1, 0.5, 0.9, 1.3, 1.5]  # legato: each note lasts until the next
    durations = [0.4, 0.4, 0.4, 0.2, 0.6]

    def notes(freq, shift=0.0):
        return sum(_notes([freq], [t + shift], note=d) for t, d in zip(onsets, durations))

    ref = notes(440.0)
    assert len(metrics.onset_times(ref, sr)) == 5
    assert metrics.onset_f1(ref, ref, sr)["f1"] == 1.0
    assert metrics.onset_f1(ref, notes(330.0), sr)["f1"] == 1.0  # other pitch, same rhythm
    late = metrics.onset_f1(ref, notes(440.0, shift=0.12), sr)
    assert late["f1"] == 0.0 and late["reference"] == 5


def _clicks(times, sr: int = 16_000, seconds: float = 6.0, seed: int = 0) -> torch.Tensor:
    """Short noise bursts (25 ms, decaying) at ``times``: a drum-like click track."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(seconds * sr), dtype=np.float32)
    burst = (rng.standard_normal(400) * np.hanning(800)[400:]).astype(np.float32)
    for t in times:
        i = int(t * sr)
        x[i:i + 400] += burst[: len(x[i:i + 400])]
    return torch.from_numpy(x)[None]


def test_pulse_clarity_hears_a_steady_beat_and_not_random_hits():
    from musicgen_lite.metrics import pulse_clarity

    sr = 16_000
    steady = [pulse_clarity(_clicks(np.arange(0, 6, 60 / bpm)), sr) for bpm in (72, 90, 120, 150)]
    rng = np.random.default_rng(1)
    scattered = [pulse_clarity(_clicks(np.sort(rng.uniform(0, 6, 12)), seed=k), sr) for k in range(4)]
    assert min(steady) > 0.6 and max(scattered) < 0.35
    assert pulse_clarity(torch.randn(1, 6 * sr, generator=torch.Generator().manual_seed(0)) * 0.1, sr) < 0.2
    assert pulse_clarity(torch.zeros(1, 6 * sr), sr) == 0.0
    assert pulse_clarity(_clicks([0.5, 1.0], seconds=1.0), sr) == 0.0  # too short for a 50 bpm period


def test_rank_correlation_is_spearmans():
    from musicgen_lite.metrics import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2) -> 0.866
    assert rank_correlation([1, 1, 2], [3, 4, 5]) == pytest.approx(math.sqrt(3) / 2)
    # the Pearson correlation of the ranks, computed by hand for a shuffled case
    a, b = [3.0, 1.0, 4.0, 1.5, 5.0], [2.0, 7.0, 1.0, 8.0, 2.5]
    ra, rb = np.array([2, 0, 3, 1, 4.0]), np.array([1, 3, 0, 4, 2.0])
    assert rank_correlation(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert rank_correlation([1, 2], [2, 1]) is None and rank_correlation([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="one length"):
        rank_correlation([1, 2, 3], [1, 2])
