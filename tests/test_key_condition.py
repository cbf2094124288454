"""The key condition: a clip's mode and tonic as a per-step input of the LM (riding on the beat
clock's columns), and the mode predictor that gives a caption without a mode its likely one.

A zero key map is the clocked LM without a key; cached decoding, the lean step and the static
step see the same key as one full forward; a toy task where only the key tells which scale
the notes come from is learned with it and not without; generation gives each row its
stated or predicted key, and the null rows of guidance none.
"""
from __future__ import annotations

import pytest
import torch

from musicgen_lite.lm import KEY_FEATURES, MusicLM, beat_clock, key_features, lm_config
from musicgen_lite.patterns import get_pattern


def _lm(**kw) -> MusicLM:
    torch.manual_seed(0)
    return MusicLM(lm_config("tiny", bins=16, dim=32, beat_clock=True, **kw)).eval()


def _clock(bpms, keys, start=0):
    return torch.cat([beat_clock(bpms, 50.0, start), key_features(keys)], dim=1)


def test_key_features_are_the_mode_and_the_tonic_one_hot():
    f = key_features([(9, "minor"), (None, "major"), (0, None), (None, None)])
    assert f.shape == (4, KEY_FEATURES) and f.dtype == torch.float64
    want = torch.zeros(4, KEY_FEATURES, dtype=torch.float64)
    want[0, 1] = want[0, 2 + 9] = 1  # minor, A
    want[1, 0] = 1  # major, no tonic
    want[2, 2] = 1  # C, no mode
    assert torch.equal(f, want)
    for bad in ([(12, "major")], [(None, "dorian")], [(1.0, "major")], [(True, "minor")]):
        with pytest.raises(ValueError, match="tonic|mode"):
            key_features(bad)


def test_a_zero_key_map_is_the_clocked_lm_without_a_key():
    clocked, keyed = _lm(), _lm(key_condition=True)
    assert keyed.key.weight.abs().sum() == 0 and keyed.clock_width == 2 + KEY_FEATURES
    missing = keyed.load_state_dict(clocked.state_dict(), strict=False).missing_keys
    assert missing == ["key.weight"]
    seq, cond = torch.randint(0, 17, (2, 4, 9)), torch.randn(2, 3, 32)
    beat = beat_clock([120, 75], 50.0)
    clock = _clock([120, 75], [(9, "minor"), (None, "major")])
    ref = clocked(seq, cond, clock=beat)
    torch.testing.assert_close(keyed(seq, cond, clock=clock), ref, rtol=0, atol=0)
    with torch.no_grad():
        keyed.key.weight.normal_()
    out = keyed(seq, cond, clock=clock)
    assert not torch.allclose(out, ref)
    # rows without a key: the clocked LM
    torch.testing.assert_close(keyed(seq, cond, clock=_clock([120, 75], [(None, None)] * 2)), ref)
    other = keyed(seq, cond, clock=_clock([120, 75], [(9, "major"), (None, "major")]))
    assert torch.equal(other[1], out[1]) and not torch.allclose(other[0], out[0])  # rows are their own
    with pytest.raises(ValueError, match=r"clock must be \[B=2, 16\] \(beats per step, beats at step 0, the key"):
        keyed(seq, cond, clock=beat)
    with pytest.raises(ValueError, match="needs beat_clock=True"):
        MusicLM(lm_config("tiny", bins=16, dim=32, key_condition=True))


@pytest.mark.parametrize("mode", ["cross", "prepend"])
def test_cached_lean_and_static_steps_see_the_same_key(mode):
    lm = _lm(key_condition=True, condition_mode=mode)
    with torch.no_grad():
        lm.beat.weight.normal_()
        lm.key.weight.normal_()
    seq, cond = torch.randint(0, 17, (2, 4, 12)), torch.randn(2, 3, 32)
    clock = _clock([131, 64], [(2, "minor"), (None, "major")], start=[0, 37])
    with torch.no_grad():
        full = lm(seq, cond, clock=clock)
        P = lm.prefix_length(cond)
        cache = lm.new_cache(2, P + 12)
        steps = [lm(seq[..., :5], cond, cache=cache, clock=clock)]
        for s in range(5, 8):  # one position, no gradients: the lean step
            steps.append(lm(seq[..., s:s + 1], cache=cache))
        for s in range(8, 12):  # the static step reads the key from the cache
            steps.append(lm.decode_step(seq[..., s:s + 1], torch.tensor([P + s]), cache).unsqueeze(2))
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-4, atol=1e-4)
    assert cache.key_bias is not None  # the key's map, once per generation


MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)


def test_the_key_tells_the_lm_which_scale_the_notes_come_from():
    """Windows of 6 notes drawn at random from C major or C minor (12 tokens, one per pitch
    class; the scales differ in E, A and B against Eb, Ab and Bb): without the key the first
    notes cannot tell the scale, with it they can. Trained on fresh windows every step, scored
    on windows it never saw."""
    pattern = get_pattern("delay", 4)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        tonic = torch.zeros(n, dtype=torch.long)
        minor = torch.rand(n, generator=gen) < 0.5
        degree = torch.randint(0, 7, (n, 6), generator=gen)
        scales = torch.where(minor[:, None], torch.tensor(MINOR)[None], torch.tensor(MAJOR)[None])  # (n, 7)
        notes = (tonic[:, None] + scales.gather(1, degree)) % 12  # (n, 6)
        keys = [(int(t), "minor" if m else "major") for t, m in zip(tonic, minor)]
        return notes[:, None].expand(-1, 4, -1).contiguous(), _clock([120] * n, keys)

    test_codes, test_clock = batch(64)
    losses = {}
    for keyed in (False, True):
        torch.manual_seed(0)
        lm = MusicLM(lm_config("tiny", bins=12, dim=32, cross_attention=False, beat_clock=True,
                               key_condition=True)).train()
        opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
        for _ in range(150):
            codes, clock = batch(16)
            if not keyed:
                clock[:, 2:] = 0
            loss, _ = lm.compute_loss(codes, pattern, clock=clock)
            opt.zero_grad()
            loss.backward()
            opt.step()
        clock = test_clock.clone()
        if not keyed:
            clock[:, 2:] = 0
        with torch.no_grad():
            losses[keyed] = lm.eval().compute_loss(test_codes, pattern, clock=clock)[1][0].item()
    # codebook 0 (the others copy it): knowing the scale, log 7 = 1.95 nats a note; not knowing it,
    # 2.24 for the first note (4 notes shared at 1/7, 6 at 1/14), less as the notes so far tell the
    # scale. Measured: 2.02 with the key, 2.12 without.
    assert losses[True] < 2.06 and losses[False] > losses[True] + 0.06, losses


# ----------------------------------------------------------------------- the mode predictor

def test_mode_predictor_fits_the_words_that_carry_the_mode():
    from musicgen_lite.conditioning import ModePredictor

    texts = ["a sunny piano piece", "a joyful rock song", "a sad piano piece", "a melancholic rock song",
             "a tune without a mood"]
    modes = ["major", "major", "minor", "minor", None]  # no mode: left out of the fit
    mp = ModePredictor.fit(texts, modes)
    assert mp.fitted_on == 4 and "sunny" in mp.vocab
    assert mp.predict(["a sunny jazz tune", "a sad jazz tune", "a melancholic sunny song"][:2]) == ["major", "minor"]
    assert mp.score(["a sunny tune"])[0] > 0 > mp.score(["a sad tune"])[0]
    # a stated key wins, a stated mode keeps no tonic, an empty text has no key
    assert mp.key_for(["a sad piano piece in E major", "a sunny song in a minor key", "", None, "a sad song"]) == \
        [(4, "major"), (None, "minor"), (None, None), (None, None), (None, "minor")]
    again = ModePredictor.from_dict(mp.to_dict())
    assert again.score(texts) == pytest.approx(mp.score(texts), abs=1e-5)
    with pytest.raises(ValueError, match="no caption with a mode"):
        ModePredictor.fit(["a"], [None])


# ------------------------------------------------------------------------------- generation

def _keyed_musicgen():
    from test_generation import V, ToyCodec

    from musicgen_lite.conditioning import LearnedTextConditioner, ModePredictor, TempoPredictor
    from musicgen_lite.generation import MusicGen

    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=V, dim=32, beat_clock=True, key_condition=True)).eval()
    with torch.no_grad():
        lm.key.weight.normal_(std=3.0)  # a loud key: the key changes the tokens
    text = LearnedTextConditioner(output_dim=32, dim=32).eval()
    tempo = TempoPredictor.fit(["slow piano", "fast rock"], [70, 140], ridge=1e-6)
    modes = ModePredictor.fit(["sad piano", "sunny rock"], ["minor", "major"])
    return MusicGen(ToyCodec(), lm, text, "delay", max_duration=0.4, extend_stride=0.24, tempo=tempo,
                    mode_predictor=modes)


def test_generation_keeps_the_stated_or_predicted_key(monkeypatch):
    mg = _keyed_musicgen()
    assert mg.clock_keys(["sad piano", "sunny rock in C# minor", ""]) == [(None, "minor"), (1, "minor"), (None, None)]
    assert mg.clock_keys(["sad piano", "sunny rock"], key=["A major", None]) == [(9, "major"), (None, "major")]
    assert mg.clock_keys(["sad piano"], key="major") == [(None, "major")]
    assert mg.clock_keys(["sad piano"], key=(2, "minor")) == [(2, "minor")]
    texts = ["sad piano in D minor", "sunny rock"]
    greedy = dict(duration=0.3, top_k=1, progress=False)
    stated = mg.generate_codes(texts, **greedy)
    assert torch.equal(mg.generate_codes(texts, key=[(2, "minor"), "major"], **greedy), stated)
    assert not torch.equal(mg.generate_codes(texts, key=["D major", None], **greedy), stated)
    for bad in ("dorian", (12, "major"), (0, "lydian"), 3):
        with pytest.raises(ValueError, match="key must"):
            mg.generate_codes(texts, key=bad, **greedy)
    with pytest.raises(ValueError, match="2 descriptions"):
        mg.generate_codes(texts, key=["minor"] * 3, **greedy)
    from test_beat_clock import _clocked_musicgen, spy_clocks

    with pytest.raises(ValueError, match="no key condition"):
        _clocked_musicgen().generate_codes(texts, key="minor", **greedy)
    # guidance: the rows get their key after the beat's columns, the null rows nothing; fast = plain
    seen, forward = spy_clocks(monkeypatch)
    mg.generate_codes(texts, cfg_coef=3.0, **greedy)
    want = torch.cat([beat_clock(mg.clock_bpms(texts), 50.0), key_features([(2, "minor"), (None, "major")])], 1)
    torch.testing.assert_close(seen[0], torch.cat([want, torch.zeros_like(want)]))
    monkeypatch.setattr(MusicLM, "forward", forward)
    for kw in (dict(duration=1.0, cfg_coef=3.0), dict(duration=0.3, cfg_coef=1.0)):
        plain = mg.generate_codes(texts, top_k=1, progress=False, **kw)
        assert torch.equal(mg.generate_codes(texts, top_k=1, progress=False, fast=True, **kw), plain), kw

