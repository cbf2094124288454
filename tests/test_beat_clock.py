"""The beat clock: a stated tempo's beat phase as a per-step input of the LM, and the tempo
predictor that gives a caption without a bpm its likely one.

The clock's math is exact (phases of a known tempo); the LM with a zero clock map is the LM
without one; cached decoding, the static decoding step and windowed generation all see
the same phase as one full forward.
"""
from __future__ import annotations

import math

import pytest
import torch

from musicgen_lite.lm import CLOCK_FEATURES, CLOCK_PERIODS, MusicLM, beat_clock, clock_features, lm_config
from musicgen_lite.patterns import get_pattern


def test_beat_clock_rows_and_features_are_the_beat_phase():
    clock = beat_clock([120, None, float("nan"), 0, 90], frame_rate=50.0, start_frame=[0, 0, 0, 0, 100])
    # 120 bpm = 2 beats/s = 0.04 beats per 50 Hz frame; 90 bpm from frame 100: 0.03 per frame, 3 beats in
    assert torch.allclose(clock, torch.tensor([[0.04, 0.0], [0, 0], [0, 0], [0, 0], [0.03, 3.0]], dtype=torch.float64))
    steps = torch.arange(0, 101)
    f = clock_features(clock, steps)
    assert f.shape == (5, 101, CLOCK_FEATURES)
    assert f[1:4].abs().sum() == 0  # no clock: nothing at all
    # 120 bpm: step 25 is beat 1 (0.5 s), step 12.5 would be the half beat; check exact angles
    for s in (0, 7, 25, 50, 100):
        beats = 0.04 * s
        want = [math.sin(2 * math.pi * beats / p) for p in CLOCK_PERIODS] + \
               [math.cos(2 * math.pi * beats / p) for p in CLOCK_PERIODS] + [1.0]
        assert torch.allclose(f[0, s], torch.tensor(want), atol=1e-6)
    # the 90 bpm row is the 90 bpm clock from step 0, shifted by its 100 frames
    ref = clock_features(beat_clock(90, 50.0), torch.arange(100, 201))
    assert torch.allclose(f[4], ref[0], atol=1e-6)
    # one beat apart: the same beat-period features, the bar features a quarter turn on
    one_beat = clock_features(beat_clock(120, 50.0), torch.tensor([10, 35]))[0]
    assert torch.allclose(one_beat[0, [0, 1, 4, 5]], one_beat[1, [0, 1, 4, 5]], atol=1e-6)
    # fp64 phase: ten minutes in, the phase is still exact (a float32 beat count would drift)
    far = clock_features(beat_clock(97, 50.0), torch.tensor([30_000]))[0, 0, 1]
    assert far.item() == pytest.approx(math.sin(2 * math.pi * (30_000 * 97 / 3000 % 1.0)), abs=1e-6)


def _lm(**kw) -> MusicLM:
    torch.manual_seed(0)
    return MusicLM(lm_config("tiny", bins=16, dim=32, **kw)).eval()


def test_a_zero_clock_map_is_the_lm_without_a_clock():
    plain, clocked = _lm(), _lm(beat_clock=True)
    assert clocked.beat.weight.abs().sum() == 0  # zero at init
    missing = clocked.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["beat.weight"]
    seq, cond = torch.randint(0, 17, (2, 4, 9)), torch.randn(2, 3, 32)
    clock = beat_clock([120, 75], 50.0)
    torch.testing.assert_close(clocked(seq, cond, clock=clock), plain(seq, cond), rtol=0, atol=0)
    with torch.no_grad():
        clocked.beat.weight.normal_()
    out = clocked(seq, cond, clock=clock)
    assert not torch.allclose(out, plain(seq, cond))
    # a row without a clock, or no clock at all: the plain LM
    torch.testing.assert_close(clocked(seq, cond, clock=beat_clock([None, None], 50.0)), plain(seq, cond))
    torch.testing.assert_close(clocked(seq, cond), plain(seq, cond))
    with pytest.raises(ValueError, match="no beat clock"):
        plain(seq, cond, clock=clock)
    with pytest.raises(ValueError, match=r"clock must be \[B=2, 2\]"):
        clocked(seq, cond, clock=clock[:1])


@pytest.mark.parametrize("mode", ["cross", "prepend"])
def test_cached_decoding_and_the_static_step_see_the_same_clock(mode):
    lm = _lm(beat_clock=True, condition_mode=mode)
    with torch.no_grad():
        lm.beat.weight.normal_()
    seq, cond = torch.randint(0, 17, (2, 4, 12)), torch.randn(2, 3, 32)
    clock = beat_clock([131, 64], 50.0, start_frame=[0, 37])
    full = lm(seq, cond, clock=clock)
    P = lm.prefix_length(cond)
    cache = lm.new_cache(2, P + 12)
    steps = [lm(seq[..., :5], cond, cache=cache, clock=clock)]
    for s in range(5, 8):
        steps.append(lm(seq[..., s:s + 1], cache=cache))
    for s in range(8, 12):  # the static step reads the clock from the cache at a device position
        steps.append(lm.decode_step(seq[..., s:s + 1], torch.tensor([P + s]), cache).unsqueeze(2))
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="first call"):
        lm(seq[..., :1], cache=cache, clock=clock)


def _beat_tokens(bpm: torch.Tensor, start: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, 4, T]``: token 1 on the frame where a beat starts, 0 elsewhere (all four streams)."""
    frames = start[:, None] + torch.arange(T)[None]  # (B, T)
    per = bpm[:, None] / 60 / 50
    on = (torch.remainder(frames * per + 1e-9, 1.0) < per).long()
    return on[:, None].expand(-1, 4, -1).contiguous()


def test_the_clock_tells_the_lm_where_the_beat_falls():
    """Short windows (40 frames, about two beats) at random tempos and phases: without the
    clock the LM cannot know where the next beat falls, with it the clock says so. Trained
    on fresh windows every step, scored on windows it never saw."""
    pattern = get_pattern("delay", 4)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        bpm = 60 + 120 * torch.rand(n, generator=gen)
        start = torch.randint(0, 500, (n,), generator=gen)
        return _beat_tokens(bpm, start, 40), beat_clock(bpm.tolist(), 50.0, start_frame=start.tolist())

    test_codes, test_clock = batch(64)
    losses = {}
    for clocked in (False, True):
        torch.manual_seed(0)
        lm = MusicLM(lm_config("tiny", bins=2, dim=32, cross_attention=False, beat_clock=True)).train()
        opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
        for _ in range(120):
            codes, clock = batch(16)
            loss, _ = lm.compute_loss(codes, pattern, clock=clock if clocked else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[clocked] = lm.eval().compute_loss(test_codes, pattern, clock=test_clock if clocked else None)[0].item()
    assert losses[True] < 0.5 * losses[False], losses


# ----------------------------------------------------------------------- the tempo predictor

def test_tempo_predictor_fits_the_words_that_carry_the_tempo():
    from musicgen_lite.conditioning import TempoPredictor

    texts, bpms = [], []
    for word, bpm in (("slow", 60.0), ("medium", 90.0), ("fast", 150.0)):
        for style in ("piano piece", "rock song", "jazz tune"):
            texts.append(f"a {word} {style}")
            bpms.append(bpm)
    texts.append("a tune without a tempo")
    bpms.append(None)  # no bpm: left out of the fit
    tempo = TempoPredictor.fit(texts, bpms, ridge=1e-6)
    assert tempo.fitted_on == 9 and "slow" in tempo.vocab
    pred = tempo.predict(["a slow piano piece", "a fast rock song", "a medium jazz tune"])
    assert pred == pytest.approx([60.0, 150.0, 90.0], rel=1e-4)
    # words never seen count for nothing: the bias, the geometric mean of the styles' mean tempo
    assert tempo.predict(["zzz"])[0] == pytest.approx((60 * 90 * 150) ** (1 / 3), rel=1e-3)
    # a stated bpm wins; an empty text has no tempo
    assert tempo.bpm_for(["a slow piano piece at 133 bpm", "", None, "a fast rock song"]) == \
        [133.0, None, None, pytest.approx(150.0, rel=1e-4)]
    again = TempoPredictor.from_dict(tempo.to_dict())
    assert again.predict(texts[:9]) == pytest.approx(tempo.predict(texts[:9]), rel=1e-5)
    # a ridge shrinks the words towards the mean tempo
    shrunk = TempoPredictor.fit(texts, bpms, ridge=10.0).predict(["a fast rock song"])[0]
    assert 90 < shrunk < 150
    with pytest.raises(ValueError, match="no caption with a positive bpm"):
        TempoPredictor.fit(["a"], [None])


# ------------------------------------------------------------------------------- generation

def _clocked_musicgen():
    from test_generation import V, ToyCodec

    from musicgen_lite.conditioning import LearnedTextConditioner, TempoPredictor
    from musicgen_lite.generation import MusicGen

    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=V, dim=32, beat_clock=True)).eval()
    with torch.no_grad():
        lm.beat.weight.normal_(std=3.0)  # a loud clock: the tempo changes the tokens
    text = LearnedTextConditioner(output_dim=32, dim=32).eval()
    tempo = TempoPredictor.fit(["slow piano", "fast rock"], [70, 140], ridge=1e-6)
    return MusicGen(ToyCodec(), lm, text, "delay", max_duration=0.4, extend_stride=0.24, tempo=tempo)


def test_generation_keeps_the_stated_or_predicted_tempo():
    mg = _clocked_musicgen()
    assert mg.clock_bpms(["slow piano", "rock at 100 bpm", ""]) == [pytest.approx(70), 100.0, None]
    assert mg.clock_bpms(["slow piano", "rock at 100 bpm"], bpm=[None, 120]) == [pytest.approx(70), 120.0]
    texts = ["slow piano at 100 bpm", "fast rock"]
    greedy = dict(duration=0.3, top_k=1, progress=False)
    stated = mg.generate_codes(texts, **greedy)
    assert torch.equal(mg.generate_codes(texts, bpm=[100, None], **greedy), stated)
    assert not torch.equal(mg.generate_codes(texts, bpm=[160, None], **greedy), stated)
    for bad in (10, 500, float("nan"), "fast", True):
        with pytest.raises(ValueError, match="bpm must be a tempo"):
            mg.generate_codes(texts, bpm=bad, **greedy)
    with pytest.raises(ValueError, match="2 descriptions"):
        mg.generate_codes(texts, bpm=[100, 120, 130], **greedy)
    from test_generation import toy_musicgen

    with pytest.raises(ValueError, match="no beat clock"):
        toy_musicgen().generate_codes(texts, bpm=120, **greedy)


def spy_clocks(monkeypatch):
    """Record every clock :meth:`MusicLM.forward` is given: ``(seen, the original forward)``."""
    seen, forward = [], MusicLM.forward

    def spy(self, *a, clock=None, **kw):
        if clock is not None:
            seen.append(clock.clone())
        return forward(self, *a, clock=clock, **kw)

    monkeypatch.setattr(MusicLM, "forward", spy)
    return seen, forward


def test_each_window_and_the_null_rows_get_their_clock(monkeypatch):
    """Windowed generation: window ``w`` starts at frame ``start`` of the piece, and its clock
    says so; with guidance the null rows carry no clock. The fast loop gives the plain loop's
    greedy tokens with the clock, through windows and a prompt."""
    mg = _clocked_musicgen()
    seen, forward = spy_clocks(monkeypatch)
    texts = ["slow piano at 100 bpm", "fast rock at 150 bpm"]
    plan = mg.plan_windows(50)  # 1 s: windows of 20 frames, each re-reading the last 8
    codes = mg.generate_codes(texts, duration=1.0, top_k=1, progress=False)
    starts = [0] + [sum(new for _, new in plan[:i + 1]) - plan[i + 1][0] for i in range(len(plan) - 1)]
    assert len(seen) == len(plan) > 2
    for clock, start in zip(seen, starts):
        want = beat_clock([100, 150], 50.0, start)
        torch.testing.assert_close(clock, torch.cat([want, torch.zeros_like(want)]))
    monkeypatch.setattr(MusicLM, "forward", forward)
    for kw in (dict(duration=1.0, cfg_coef=3.0), dict(duration=0.3, cfg_coef=1.0),
               dict(duration=0.3, prompt_codes=torch.randint(0, 16, (2, 4, 6)))):
        plain = mg.generate_codes(texts, top_k=1, progress=False, **kw)
        assert torch.equal(mg.generate_codes(texts, top_k=1, progress=False, fast=True, **kw), plain), kw
    assert torch.equal(codes, mg.generate_codes(texts, duration=1.0, top_k=1, progress=False, fast=True))
    from musicgen_lite.generation import MusicGen

    with pytest.raises(ValueError, match="one step per frame"):
        MusicGen(mg.codec, mg.lm, mg.conditioner, "flatten", max_duration=0.4, extend_stride=0.24)


def test_a_clocked_lm_in_int8_and_bf16():
    """The clock map is a linear layer like the others: int8 quantisation and a bf16 cast keep
    the clocked LM's logits close to fp32's."""
    from musicgen_lite.int8 import quantize_int8

    lm = _lm(beat_clock=True)
    with torch.no_grad():
        lm.beat.weight.normal_(std=0.5)
    seq, cond = torch.randint(0, 17, (2, 4, 9)), torch.randn(2, 3, 32)
    clock = beat_clock([120, 75], 50.0)
    ref = lm(seq, cond, clock=clock)
    q = quantize_int8(lm)
    assert (q(seq, cond, clock=clock) - ref).abs().max() < 0.1 * ref.abs().max()
    half = _lm(beat_clock=True)
    half.load_state_dict(lm.state_dict())
    half = half.to(torch.bfloat16)
    assert (half(seq, cond.bfloat16(), clock=clock).float() - ref).abs().max() < 0.1 * ref.abs().max()
