"""Key guidance: each codebook-0 token's mean chroma, its fit to a key, and the bias that steers
a generation toward its caption's mode.

The table is checked against hand sums and librosa's chroma; a token's best key against the
key-finder of :mod:`musicgen_lite.data.analysis` on the audio it encodes; the bias against its
definition; generation: strength 0 changes nothing, a huge strength leaves only the key's
best token in codebook 0 (plain and static loops alike), a mode-only row follows the music's
tonic, and the guide survives a save and load.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musicgen_lite.data.analysis import TEMPERLEY_MAJOR, TEMPERLEY_MINOR, estimate_key
from musicgen_lite.data.music import PITCH_CLASSES
from musicgen_lite.key_guidance import KeyGuide, frame_chroma, key_profiles


def _guide(bins=16, seed=0, **kw) -> KeyGuide:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, bins, (400,), generator=g)
    chroma = torch.rand(400, 12, generator=g) ** 4  # peaky, like real chroma
    return KeyGuide.fit(tokens, chroma, bins, **kw)


def test_fit_is_each_tokens_mean_chroma_pulled_toward_the_mean():
    g = torch.Generator().manual_seed(1)
    tokens = torch.tensor([0, 0, 2, 2, 2, 3])
    chroma = torch.rand(6, 12, generator=g, dtype=torch.float64)
    guide = KeyGuide.fit(tokens, chroma, bins=5, prior=2.0)
    mean = chroma.mean(0)
    want = torch.stack([(chroma[tokens == t].sum(0) + 2.0 * mean) / ((tokens == t).sum() + 2.0) for t in range(5)])
    torch.testing.assert_close(guide.chroma, want.float())
    assert guide.counts.tolist() == [2, 0, 3, 1, 0]
    torch.testing.assert_close(guide.chroma[1], mean.float())  # never seen: the overall mean, a zero score
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 5\)"):
        KeyGuide.fit(torch.tensor([5]), chroma[:1], bins=5)
    with pytest.raises(ValueError, match="6 tokens for 5 chroma frames"):
        KeyGuide.fit(tokens, chroma[:5], bins=5)
    with pytest.raises(ValueError, match="no frames"):
        KeyGuide.fit(tokens[:0], chroma[:0], bins=5)
    with pytest.raises(ValueError, match="strength must be a number >= 0"):
        KeyGuide.fit(tokens, chroma, bins=5, strength=-1.0)


def test_a_score_is_the_standardised_correlation_with_the_rotated_profile_capped():
    guide = _guide(bins=32, cap=None)
    capped = KeyGuide(guide.chroma, guide.counts, cap=1.0)
    c = guide.chroma.double().numpy()
    for tonic, mode, ref in ((0, "major", TEMPERLEY_MAJOR), (9, "minor", TEMPERLEY_MINOR), (4, "minor", TEMPERLEY_MINOR)):
        corr = np.array([np.corrcoef(row, np.roll(ref, tonic))[0, 1] for row in c])
        want = (corr - corr.mean()) / corr.std(ddof=1)
        np.testing.assert_allclose(guide.score(tonic, mode).numpy(), want, atol=1e-5)
        assert np.abs(want).max() > 1.2  # so that the cap bites
        np.testing.assert_allclose(capped.score(tonic, mode).numpy(), want.clip(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="cap must be"):
        KeyGuide(guide.chroma, guide.counts, cap=0.0)
    prof = key_profiles()
    assert prof.shape == (2, 12, 12)
    np.testing.assert_allclose(prof[1, 9].numpy(), (np.roll(TEMPERLEY_MINOR, 9) - TEMPERLEY_MINOR.mean())
                               / TEMPERLEY_MINOR.std(), atol=1e-6)


class _LevelCodec:
    """Each clip gets one codebook-0 token for all its frames: its peak level in tenths."""

    sample_rate, frame_rate, cardinality = 16_000, 50, 8

    def encode(self, wav):  # (B, 1, N) -> (B, 2, T)
        T = -(-wav.shape[-1] // 320)
        level = (wav.abs().amax(dim=(1, 2)) * 10).round().long()  # (B,)
        return level.view(-1, 1, 1).expand(-1, 2, T)


def _chord(pitch_classes, level: float, seconds: float = 1.0, sr: int = 16_000) -> torch.Tensor:
    t = np.arange(int(seconds * sr)) / sr
    wav = sum(np.sin(2 * np.pi * 220.0 * 2 ** ((pc - 9) / 12) * t) for pc in pitch_classes)
    return torch.from_numpy(level * wav / np.abs(wav).max()).float()[None]  # (1, N)


@pytest.mark.filterwarnings("ignore:n_fft=.*is too large")  # librosa's lowest CQT octaves of 1-s clips
def test_from_audio_pairs_each_frame_with_librosas_chroma_and_ranks_tokens_as_the_key_finder():
    chords = {2: [9, 0, 4], 5: [6, 10, 1], 7: [3, 7, 10]}  # A minor, F# major, Eb major triads: far-apart keys
    clips = [_chord(pcs, level / 10) for level, pcs in chords.items()]
    clips.append(_chord(chords[5], 0.5, seconds=1.5))  # another length (its own batch), token 5 again
    guide = KeyGuide.from_audio(_LevelCodec(), clips, batch_size=2, prior=0.0)
    # librosa's chroma, one row per codec frame (it has one more, centred on the clip's end: left out)
    cens = [frame_chroma(c.numpy(), 16_000, 320)[:-(-c.shape[-1] // 320)] for c in clips]
    assert guide.counts.tolist() == [0, 0, len(cens[0]), 0, 0, len(cens[1]) + len(cens[3]), 0, len(cens[2])]
    torch.testing.assert_close(guide.chroma[2], torch.from_numpy(cens[0].mean(0)).float())
    torch.testing.assert_close(guide.chroma[5], torch.from_numpy(np.concatenate([cens[1], cens[3]]).mean(0)).float())
    overall = torch.from_numpy(np.concatenate(cens).mean(0)).float()
    torch.testing.assert_close(guide.chroma[0], overall)  # never seen, even with no prior: the overall mean
    # for the key the key-finder hears in a clip, that clip's token is the likeliest of the three
    for level, clip in zip(chords, clips):
        tonic, mode = estimate_key(clip[0].numpy(), 16_000)
        seen = [2, 5, 7]
        assert seen[int(guide.score(tonic, mode)[seen].argmax())] == level, (PITCH_CLASSES[tonic], mode)
    with pytest.raises(ValueError, match="NaN"):
        KeyGuide.from_audio(_LevelCodec(), [torch.full((1, 800), float("nan"))])


def test_the_bias_follows_the_stated_tonic_or_the_musics():
    guide = _guide(bins=16, strength=2.0)
    state = guide.start([(9, "minor"), (None, "major"), (None, None), (3, None)])
    bias = state.bias()
    assert bias.shape == (4, 16)
    torch.testing.assert_close(bias[0], 2.0 * guide.score(9, "minor"))
    assert bias[1:].abs().sum() == 0  # no frame yet to take a tonic from; no mode; a tonic alone is no key
    # row 1 follows the music: the major tonic whose profile best fits the frames' mean chroma
    tokens = torch.tensor([[1, 2, 3], [4, 5, 16], [0, 0, 0], [1, 1, 1]])  # 16: the special token, no frame
    state.observe(tokens, valid=torch.tensor([[True, True, False]]))  # the third frame is not real
    assert state.frames[:, 0].tolist() == [2, 2, 2, 2]
    mean = guide.chroma[[4, 5]].mean(0).double().numpy()
    want = int(np.argmax([np.corrcoef(mean, np.roll(TEMPERLEY_MAJOR, t))[0, 1] for t in range(12)]))
    assert state.tonics()[:2].tolist() == [9, want]
    torch.testing.assert_close(state.bias()[1], 2.0 * guide.score(want, "major"))
    assert state.bias()[2:].abs().sum() == 0
    assert guide.start([(0, "major")], strength=0.0).bias().abs().sum() == 0


# ------------------------------------------------------------------------------- generation

def _guided_musicgen(strength=3.0):
    from test_generation import toy_musicgen

    from musicgen_lite.conditioning import ModePredictor

    mg = toy_musicgen()
    mg.key_guide = _guide(bins=mg.lm.config.bins, strength=strength, cap=None)  # uncapped: one best token per key
    mg.mode_predictor = ModePredictor.fit(["sad piano", "sunny rock"], ["minor", "major"])
    return mg


def test_strength_zero_is_the_unguided_model_and_a_huge_one_plays_the_keys_best_token():
    mg = _guided_musicgen()
    texts = ["sad piano in A minor", "sunny rock in D major"]
    opts = dict(duration=0.3, seed=3, progress=False)
    guide = mg.key_guide
    mg.key_guide = None
    plain = mg.generate_codes(texts, **opts)
    mg.key_guide = guide
    assert torch.equal(mg.generate_codes(texts, key_guidance=0, **opts), plain)
    assert not torch.equal(mg.generate_codes(texts, **opts), plain)  # the guide's own strength, 3
    best = torch.stack([guide.score(9, "minor").argmax(), guide.score(2, "major").argmax()])
    for fast in (False, True):
        codes = mg.generate_codes(texts, key_guidance=1e4, top_k=0, fast=fast, **opts)
        assert (codes[:, 0] == best[:, None]).all(), fast
        assert not (codes[:, 1] == best[:, None]).all()  # the other codebooks are left alone
    # a stated key beats the caption's; the key of a mode-only row comes from the music
    codes = mg.generate_codes(texts, key=["C major", None], key_guidance=1e4, top_k=0, **opts)
    assert (codes[0, 0] == guide.score(0, "major").argmax()).all()
    codes = mg.generate_codes(["sad piano"], key_guidance=1e4, top_k=0, **opts)[0, 0]  # minor, no tonic
    first = guide.chroma[codes[0]]
    tonic = int(torch.einsum("tj,j->t", key_profiles()[1], first - first.mean()).argmax())
    assert codes[1] == guide.score(tonic, "minor").argmax()  # the first frame's own tonic, then kept
    assert (codes[1:] == codes[1]).all()


def test_guidance_reads_a_prompt_and_errors_are_clear():
    mg = _guided_musicgen()
    prompt = torch.full((1, 4, 5), 7)
    state = mg._start_guide(([(None, "minor")], 3.0), 1, prompt)
    assert state.frames.item() == 5
    torch.testing.assert_close(state.seen[0], 5 * mg.key_guide.chroma[7])
    codes = mg.generate_codes(["sad piano"], duration=0.3, prompt_codes=prompt, seed=0, progress=False)
    assert torch.equal(codes[..., :5], prompt)
    for bad in (-1.0, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="key_guidance must be a number >= 0"):
            mg.generate_codes(["sad piano"], duration=0.3, key_guidance=bad, progress=False)
    with pytest.raises(ValueError, match="nothing would read it"):
        mg.generate_codes(["sad piano"], duration=0.3, key="A minor", key_guidance=0, progress=False)
    from test_generation import toy_musicgen

    bare = toy_musicgen()
    with pytest.raises(ValueError, match="no key guide"):
        bare.generate_codes(["sad piano"], duration=0.3, key_guidance=1.0, progress=False)
    with pytest.raises(ValueError, match="no key condition .* and no key guide"):
        bare.generate_codes(["sad piano"], duration=0.3, key="minor", progress=False)
    from musicgen_lite.generation import MusicGen

    with pytest.raises(ValueError, match="key_guide knows 16 tokens"):
        MusicGen(bare.codec, bare.lm, bare.conditioner, key_guide=_guide(bins=16))


def test_a_saved_model_keeps_its_guide(tmp_path):
    from test_evaluation import tiny_musicgen

    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.generation import MusicGen

    model = tiny_musicgen()
    model.key_guide = _guide(bins=model.lm.config.bins, strength=1.5)
    model.key_guide.candidates = 3
    model.save(tmp_path / "m", conditioner={"name": "learned", "kwargs": {"dim": 32}})
    again = MusicGen.load(tmp_path / "m")
    assert (again.key_guide.strength, again.key_guide.prior, again.key_guide.cap) == (1.5, 5.0, 1.5)
    assert again.key_guide.candidates == 3
    model.key_guide.candidates = 1
    assert torch.equal(again.key_guide.chroma, model.key_guide.chroma)
    model.save(tmp_path / "half", conditioner={"name": "learned", "kwargs": {"dim": 32}}, dtype=torch.float16)
    half = MusicGen.load(tmp_path / "half").key_guide
    assert torch.equal(half.counts, model.key_guide.counts) and torch.equal(half.chroma, model.key_guide.chroma)
    # the guide lives beside the weights: adding one to a folder leaves its weights' file as it was
    from musicgen_lite.hub import KEY_GUIDE_NAME, WEIGHTS_NAME, save_key_guide

    guide, model.key_guide = model.key_guide, None
    model.save(tmp_path / "bare", conditioner={"name": "learned", "kwargs": {"dim": 32}})
    weights = (tmp_path / "bare" / WEIGHTS_NAME).read_bytes()
    assert MusicGen.load(tmp_path / "bare").key_guide is None
    save_key_guide(tmp_path / "bare", guide)
    assert (tmp_path / "bare" / WEIGHTS_NAME).read_bytes() == weights
    attached = MusicGen.load(tmp_path / "bare")
    assert torch.equal(attached.key_guide.chroma, guide.chroma) and attached.key_guide.strength == 1.5
    with pytest.raises(ValueError, match="the key guide knows 16 tokens"):
        save_key_guide(tmp_path / "bare", _guide(bins=16))
    (tmp_path / "bare" / KEY_GUIDE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="names a key guide but there is no key_guide.safetensors"):
        MusicGen.load(tmp_path / "bare")
    model.key_guide = guide
    opts = dict(duration=0.2, seed=0, progress=False, key="A minor")
    assert torch.equal(again.generate_codes(["a song"], **opts),  # the loaded guide chooses among its 3
                       model.generate_codes(["a song"], key_candidates=3, **opts))
    # a guide learned from another codec's tokens is refused
    torch.manual_seed(5)
    model.codec = CompressionModel(codec_config("tiny")).eval()
    model.save(tmp_path / "other", conditioner={"name": "learned", "kwargs": {"dim": 32}})
    import json

    meta = json.loads((tmp_path / "other" / "config.json").read_text())
    meta["config"]["key_guide"]["codec"] = json.loads((tmp_path / "m" / "config.json").read_text())[
        "config"]["key_guide"]["codec"]
    (tmp_path / "other" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another codec's tokens"):
        MusicGen.load(tmp_path / "other")


def test_generate_cli_takes_the_strength(tmp_path, capsys, monkeypatch):
    from test_evaluation import tiny_musicgen

    from musicgen_lite.cli import main
    from musicgen_lite.generation import MusicGen

    model = tiny_musicgen()
    model.save(tmp_path / "bare", conditioner={"name": "learned", "kwargs": {"dim": 32}})
    model.key_guide = _guide(bins=model.lm.config.bins)
    model.save(tmp_path / "guided", conditioner={"name": "learned", "kwargs": {"dim": 32}})
    seen, generate_codes = [], MusicGen.generate_codes

    def spy(self, *a, **kw):
        codes = generate_codes(self, *a, **kw)
        if kw.get("key_candidates") != 1:  # the outer call, not the one a choice among candidates makes
            seen.append((kw.get("key_guidance"), codes))
        return codes

    monkeypatch.setattr(MusicGen, "generate_codes", spy)
    for strength in ("0", "50", None):
        out = tmp_path / f"g{strength}.wav"
        rc = main(["generate", "a sad song in A minor", "--model", str(tmp_path / "guided"), "--duration", "0.3",
                   "--quiet", "--threads", "1", "-o", str(out)] + (["--key-guidance", strength] if strength else []))
        assert rc == 0 and out.is_file()
    assert [s for s, _ in seen] == [0.0, 50.0, None]  # None: the model's own strength
    assert not torch.equal(seen[0][1], seen[1][1])
    calls = []
    monkeypatch.setattr(MusicGen, "_best_of_candidates", lambda self, n, *a, **kw: calls.append(n) or
                        generate_codes(self, *a, key_candidates=1, **{k: v for k, v in kw.items() if k != "melody"}))
    rc = main(["generate", "a sad song in A minor", "--model", str(tmp_path / "guided"), "--duration", "0.3",
               "--quiet", "--key-candidates", "3", "-o", str(tmp_path / "c.wav")])
    assert rc == 0 and calls == [3]
    rc = main(["generate", "a sad song", "--model", str(tmp_path / "guided"), "--key-candidates", "0",
               "--duration", "0.3", "--quiet", "-o", str(tmp_path / "c0.wav")])
    assert rc == 2 and "key_candidates must be a whole number >= 1" in capsys.readouterr().err
    rc = main(["generate", "a sad song", "--model", str(tmp_path / "bare"), "--key-guidance", "2", "--duration", "0.3",
               "--quiet", "-o", str(tmp_path / "x.wav")])
    assert rc == 2 and "no key guide" in capsys.readouterr().err


def test_guide_built_on_the_tables_device():
    """A guide whose table lives on another device (``load_musicgen(..., device="cuda")`` loads it
    there) computes its scores there: its key profiles follow the table (a GPU run found them
    left on the CPU). The meta device stands in for a GPU here."""
    guide = KeyGuide(torch.rand(16, 12, device="meta"), torch.ones(16, device="meta"))
    assert guide.profiles.device.type == "meta" and guide.scores.device.type == "meta"
    assert guide.scores.shape == (2, 12, 16)


# ------------------------------------------------------------------------ choosing among candidates

def test_key_fit_is_the_wanted_keys_correlation_minus_the_other_modes_best():
    """Against numpy: each row's mean table chroma, Pearson-correlated with the 24 rotated profiles;
    the stated key's correlation (or the wanted mode's best) minus the best of the other mode."""
    guide = _guide(bins=16, seed=4)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (4, 2, 9), generator=g)
    keys = [(9, "minor"), (None, "major"), (None, None), (2, "major")]
    fit = guide.key_fit(codes, keys)
    profiles = {"major": TEMPERLEY_MAJOR, "minor": TEMPERLEY_MINOR}
    for b, (tonic, mode) in enumerate(keys):
        mean = guide.chroma[codes[b, 0]].double().mean(0).numpy()
        corr = {m: np.array([np.corrcoef(mean, np.roll(p, t))[0, 1] for t in range(12)]) for m, p in profiles.items()}
        if mode is None:
            assert fit[b] == 0
            continue
        own = corr[mode][tonic] if tonic is not None else corr[mode].max()
        other = corr["major" if mode == "minor" else "minor"].max()
        assert fit[b].item() == pytest.approx(own - other, abs=1e-5)
    with pytest.raises(ValueError, match="codes must be"):
        guide.key_fit(codes, keys[:3])


def test_candidates_keep_each_rows_best_fitting_sample():
    """``key_candidates=3``: the rows with a mode are sampled 3 times in one batch (the same draws
    as generating the repeated rows directly), and each keeps its candidate of highest key fit; a
    row without a mode is sampled once. 1 is the plain generation."""
    mg = _guided_musicgen(strength=1.0)
    texts = ["sad piano in A minor", "", "sunny rock"]  # a stated key, no mode, a predicted mode
    opts = dict(duration=0.3, seed=5, progress=False)
    assert mg.key_guide.candidates == 1
    assert torch.equal(mg.generate_codes(texts, key_candidates=1, **opts), mg.generate_codes(texts, **opts))
    chosen = mg.generate_codes(texts, key_candidates=3, **opts)
    spread = [texts[0]] * 3 + [texts[1]] + [texts[2]] * 3
    all_rows = mg.generate_codes(spread, key_candidates=1, **opts)
    keys = mg.keys_for(texts)
    assert keys[0] == (9, "minor") and keys[1] == (None, None) and keys[2][1] == "major"
    fit = mg.key_guide.key_fit(all_rows, [keys[0]] * 3 + [keys[1]] + [keys[2]] * 3)
    best = [int(fit[:3].argmax()), 3, 4 + int(fit[4:].argmax())]
    assert torch.equal(chosen, all_rows[best])
    assert len({tuple(all_rows[i].flatten().tolist()) for i in range(3)}) == 3  # three different candidates
    mg.key_guide.candidates = 3  # the guide's own number, when not told
    assert torch.equal(mg.generate_codes(texts, **opts), chosen)
    # a prompt is shared by a row's candidates and not judged
    prompt = torch.full((3, 4, 4), 7)
    codes = mg.generate_codes(texts, prompt_codes=prompt, **opts)
    assert torch.equal(codes[..., :4], prompt)
    for bad in (0, -2, True, 2.5, "3"):
        with pytest.raises(ValueError, match="key_candidates must be a whole number >= 1"):
            mg.generate_codes(texts, key_candidates=bad, **opts)
    with pytest.raises(ValueError, match="not supported"):
        mg.generate_codes(texts, key_candidates=2, melody=[torch.zeros(100)], **opts)
    with pytest.raises(ValueError, match="candidates must be a whole number >= 1"):
        KeyGuide(torch.rand(16, 12), torch.ones(16), candidates=0)
    from test_generation import toy_musicgen

    with pytest.raises(ValueError, match="no key guide to choose"):
        toy_musicgen().generate_codes(texts, key_candidates=2, **opts)
