"""Fast generation: the static-shape decoding step, on-device sampling, and the fast loop's tokens.

The fast loop (``generate(..., fast=True)``) is what a CUDA graph captures on a GPU; here it
runs eagerly on the CPU, the same code. Its greedy tokens must equal the plain loop's (which
the other tests tie to transformers' ``generate``), and its sampler must draw from the same
distribution as :func:`musicgen_lite.sampling.sample_next`.
"""
from __future__ import annotations

import pytest
import torch
from test_generation import K, V, ToyCodec, hf_musicgen, toy_musicgen  # noqa: F401 (a fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from musicgen_lite import sampling
from musicgen_lite.conditioning import LearnedTextConditioner, MelodyConditioner
from musicgen_lite.generation import MusicGen, from_transformers_musicgen
from musicgen_lite.lm import MusicLM, lm_config

TEXTS = ["a sad piano piece", "an energetic rock song with drums at 150 bpm"]


def toy_melody_musicgen(**lm_kw) -> MusicGen:
    """A melody model (prepend LM, chroma + text prefix) around the toy codec (1600 Hz)."""
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=V, dim=32, condition_mode="prepend", **lm_kw)).eval()
    text = LearnedTextConditioner(output_dim=32, dim=32).eval()
    melody = MelodyConditioner(ToyCodec.sample_rate, 32, length=6, radix2_exp=8).eval()
    with torch.no_grad():
        melody.proj.weight.normal_()  # a strong prefix: the melody changes the tokens
    return MusicGen(ToyCodec(), lm, text, "delay", max_duration=0.4, extend_stride=0.24, melody_conditioner=melody)


def tune(midis, seconds: float) -> torch.Tensor:
    """``[1, N]`` at the toy codec's rate: one sine per midi note."""
    t = torch.arange(int(seconds * ToyCodec.sample_rate)) / ToyCodec.sample_rate
    return torch.cat([torch.sin(2 * torch.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midis])[None]


# ----------------------------------------------------------------------------- the LM step

@pytest.mark.parametrize("mode", ["cross", "prepend"])
def test_decode_step_equals_the_cached_forward(mode):
    """Static step (device position, whole-cache masked attention) == the plain cached step."""
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=V, condition_mode=mode)).eval()
    seq = torch.randint(0, V + 1, (3, K, 9))
    cond = torch.randn(3, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # padding; a null row (gated)
    P = 5 if mode == "prepend" else 0
    plain, static = lm.new_cache(3, P + 9), lm.new_cache(3, 24)  # the static one longer: masked, not sliced
    with torch.no_grad():
        ref = [lm(seq[..., :4], cond, mask, cache=plain, last_only=True)[:, :, -1]]
        ref += [lm(seq[..., s:s + 1], cache=plain)[:, :, -1] for s in range(4, 9)]
        out = [lm(seq[..., :4], cond, mask, cache=static, last_only=True)[:, :, -1]]  # the prefill is plain
        ptr, pos = static.self_k[0].data_ptr(), torch.tensor([P + 4])
        for s in range(4, 9):
            out.append(lm.decode_step(seq[..., s:s + 1], pos, static))
            pos.add_(1)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert static.self_k[0].data_ptr() == ptr and static.pos == P + 4  # written in place; pos is the caller's
    with pytest.raises(ValueError, match=r"seq must be \[B, K=4, 1\]"):
        lm.decode_step(seq[..., :2], pos, static)


# ------------------------------------------------------------------------- greedy parity

@pytest.mark.parametrize("cfg_coef", [1.0, 3.0])
def test_fast_greedy_equals_transformers_generate(hf_musicgen, cfg_coef):  # noqa: F811
    hf, tok = hf_musicgen
    ours = from_transformers_musicgen(hf, tokenizer=tok)
    seen, decode = [], hf.audio_encoder.decode
    hf.audio_encoder.decode = lambda codes, *a, **kw: seen.append(codes[0].clone()) or decode(codes, *a, **kw)
    try:
        with torch.no_grad():
            hf.generate(**tok(TEXTS, padding=True, return_tensors="pt"), do_sample=False, guidance_scale=cfg_coef,
                        max_new_tokens=20)
    finally:
        hf.audio_encoder.decode = decode
    codes = ours.generate_codes(TEXTS, duration=(20 - (K - 1)) / 500, cfg_coef=cfg_coef, top_k=1, progress=False,
                                fast=True)
    assert torch.equal(codes, seen[-1])


def test_fast_greedy_equals_plain_loop_with_prompts_windows_and_no_condition():
    mg = toy_musicgen()  # 20-frame windows, 8-frame context
    texts = ["rock song", "", "sad piano"]  # an empty text: a null row inside the conditional half
    for kw in (dict(duration=0.3, cfg_coef=3.0), dict(duration=0.3, cfg_coef=1.0),
               dict(duration=1.0, cfg_coef=2.0),  # four windows, each prompted by the last
               dict(duration=0.3, cfg_coef=3.0, prompt_codes=torch.randint(0, V, (3, K, 6)))):
        plain = mg.generate_codes(texts, top_k=1, progress=False, **kw)
        fast = mg.generate_codes(texts, top_k=1, progress=False, fast=True, **kw)
        assert torch.equal(fast, plain), kw
    unconditional = toy_musicgen(conditioned=False)
    plain = unconditional.generate_codes(None, duration=0.2, num_samples=2, temperature=0, progress=False)
    assert torch.equal(unconditional.generate_codes(None, duration=0.2, num_samples=2, temperature=0,
                                                    progress=False, fast=True), plain)


@pytest.mark.parametrize("melody_mode", ["prefix", "add"])
def test_fast_greedy_equals_plain_loop_for_a_melody_model(melody_mode):
    mg = toy_melody_musicgen(**({"melody_mode": "add", "melody_rows": 6, "melody_ratio": 2.0}
                                if melody_mode == "add" else {}))
    melody = torch.cat([tune([60, 64], 0.4), tune([67, 71], 0.4)])[:, None]  # (2, 1, N)
    results = []
    for cfg_coef, wav in ((3.0, melody), (1.0, melody), (3.0, melody.flip(0))):
        kw = dict(duration=0.3, cfg_coef=cfg_coef, top_k=1, progress=False, melody=wav,
                  melody_sample_rate=ToyCodec.sample_rate)
        plain = mg.generate_codes(["rock", "jazz"], **kw)
        assert torch.equal(mg.generate_codes(["rock", "jazz"], fast=True, **kw), plain)
        results.append(plain)
    assert not torch.equal(results[0], results[2])  # the melody matters (and rides in the prefix)
    long = dict(duration=0.6, top_k=1, progress=False, melody=melody[:1], melody_sample_rate=ToyCodec.sample_rate)
    assert torch.equal(mg.generate_codes(["rock"], fast=True, **long), mg.generate_codes(["rock"], **long))


# ------------------------------------------------------------------------------ sampling

def test_fast_sampling_is_seeded_and_no_step_waits_for_the_host():
    mg = toy_musicgen()
    for kw in (dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(top_k=0)):
        a = mg.generate_codes(TEXTS, duration=0.3, seed=1, progress=False, fast=True, **kw)
        b = mg.generate_codes(TEXTS, duration=0.3, seed=1, progress=False, fast=True, **kw)
        c = mg.generate_codes(TEXTS, duration=0.3, seed=2, progress=False, fast=True, **kw)
        assert torch.equal(a, b) and not torch.equal(a, c), kw
    wav = mg.generate(TEXTS, duration=0.3, seed=2, top_k=0, progress=False, fast=True)  # generate() passes fast on
    torch.testing.assert_close(wav, mg.codec.decode(c))

    class CountSyncs(TorchDispatchMode):  # .item(), int(t), bool(t) all go through _local_scalar_dense
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
            return func(*args, **(kwargs or {}))

    counts = []
    for duration in (0.1, 0.3):  # 5 and 15 frames: 8 and 18 steps in one window
        mg.generate_codes(TEXTS, duration=duration, progress=False, fast=True)  # the pattern's tables, once per T
        with CountSyncs() as mode:
            mg.generate_codes(TEXTS, duration=duration, seed=0, top_k=5, progress=False, fast=True)
        counts.append(mode.n)
    assert counts[0] == counts[1]  # setup only: nothing per step


def test_device_sampler_keeps_to_the_top_k_and_follows_the_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=gen) * 1.5
    n = 40_000
    rows = logits.expand(n, 8)
    sampler = sampling.NoiseSampler((n,), 8, temperature=0.8, top_k=3, generator=gen)
    sampler.refill()
    tokens = sampler(rows)  # (n,)
    top = logits.topk(3).indices
    assert torch.isin(tokens, top).all()  # never outside the top 3
    expected = sampling.top_k_filter(logits / 0.8, 3).softmax(-1)
    freq = torch.bincount(tokens, minlength=8) / n
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)
    reference = sampling.sample_next(rows, 0.8, 3, generator=gen)  # the plain sampler: same law
    torch.testing.assert_close(freq, torch.bincount(reference, minlength=8) / n, rtol=0, atol=0.02)
    # no filter: every token, with the softmax's frequencies
    free = sampling.NoiseSampler((n,), 8, generator=gen)
    free.refill()
    freq = torch.bincount(free(rows), minlength=8) / n
    torch.testing.assert_close(freq, logits.softmax(-1), rtol=0, atol=0.015)


def test_device_sampler_top_p_and_greedy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    n = 40_000
    sampler = sampling.NoiseSampler((n,), 6, top_p=0.8, generator=gen)
    sampler.refill()
    tokens = sampler(logits.expand(n, 6))
    expected = sampling.top_p_filter(logits, 0.8).softmax(-1)
    assert expected[3:].sum() == 0 and (expected[:3] > 0).all()  # the nucleus: the first three tokens
    torch.testing.assert_close(torch.bincount(tokens, minlength=6) / n, expected, rtol=0, atol=0.015)
    batch = torch.randn(4, K, 6, generator=gen)
    for kw in (dict(top_k=1), dict(temperature=0.0)):
        greedy = sampling.NoiseSampler((4, K), 6, generator=gen, **kw)
        assert greedy.noise is None and torch.equal(greedy(batch), batch.argmax(-1))
    assert sampling.num_candidates(2048, top_k=250) == 250 and sampling.num_candidates(2048, top_p=0.9) == 2048
    with pytest.raises(ValueError, match="noise must end in 3 candidates"):
        sampling.sample_with_noise(batch, torch.ones(4, K, 6), top_k=3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling.NoiseSampler((4,), 6, temperature=-1.0)


def test_fast_errors():
    mg = toy_musicgen()
    with pytest.raises(ValueError, match="two_pass_cfg=False"):
        mg.generate_codes(TEXTS, duration=0.1, fast=True, two_pass_cfg=True, progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        mg.generate_codes(TEXTS, duration=0.1, fast=True, cuda_graph=True, progress=False)
