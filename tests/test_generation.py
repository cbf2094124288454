"""MusicGen end to end: parity with transformers' generate, continuation, windows, seeds, errors."""
from __future__ import annotations

import pytest
import torch

from musicgen_lite.conditioning import LearnedTextConditioner
from musicgen_lite.generation import MusicGen, from_transformers_musicgen
from musicgen_lite.lm import MusicLM, lm_config

V, K = 32, 4
CAPTIONS = ["a sad piano piece at 70 bpm", "an energetic rock song with drums at 150 bpm",
            "calm jazz guitar in c major"] * 30


class ToyCodec:
    """A stand-in with the codec interface: 32 samples per frame, the frame mean quantised."""

    sample_rate, frame_rate, num_codebooks, cardinality, hop = 1600, 50, K, V, 32

    def encode(self, wav):  # (B, 1, N) -> (B, K, T)
        T = wav.shape[-1] // self.hop
        level = wav[..., : T * self.hop].reshape(*wav.shape[:2], T, self.hop).mean(-1)  # (B, 1, T)
        code = ((level.clamp(-1, 1) + 1) / 2 * (V - 1)).round().long()
        return torch.cat([(code + k) % V for k in range(K)], dim=1)

    def decode(self, codes):  # (B, K, T) -> (B, 1, N)
        return (codes[:, :1].float() / (V - 1) * 2 - 1).repeat_interleave(self.hop, dim=-1)


def toy_musicgen(max_duration=0.4, extend_stride=0.24, conditioned=True):
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=V, dim=32, cross_attention=conditioned)).eval()
    cond = LearnedTextConditioner(output_dim=32, dim=32).eval() if conditioned else None
    return MusicGen(ToyCodec(), lm, cond, "delay", max_duration=max_duration, extend_stride=extend_stride)


@pytest.fixture(scope="module")
def hf_musicgen():
    from conftest import make_tiny_hf_musicgen

    return make_tiny_hf_musicgen(CAPTIONS, V, K)


def test_a_ported_model_guides_as_its_generation_config_says(hf_musicgen):
    hf, tok = hf_musicgen
    before = hf.generation_config.guidance_scale
    try:
        hf.generation_config.guidance_scale = 4.5
        assert from_transformers_musicgen(hf, tokenizer=tok).cfg_coef == 4.5
        hf.generation_config.guidance_scale = None  # not set: MusicGen's 3
        assert from_transformers_musicgen(hf, tokenizer=tok).cfg_coef == 3.0
    finally:
        hf.generation_config.guidance_scale = before


def test_greedy_tokens_and_audio_equal_transformers_generate(hf_musicgen):
    hf, tok = hf_musicgen
    ours = from_transformers_musicgen(hf, tokenizer=tok)
    assert ours.codec.num_codebooks == K and ours.frame_rate == 500
    texts = ["a sad piano piece", "an energetic rock song with drums at 150 bpm"]
    inputs = tok(texts, padding=True, return_tensors="pt")
    seen = []
    decode = hf.audio_encoder.decode
    hf.audio_encoder.decode = lambda codes, *a, **kw: seen.append(codes[0].clone()) or decode(codes, *a, **kw)
    try:
        results = {}
        for g in (1.0, 3.0):
            with torch.no_grad():
                wav_hf = hf.generate(**inputs, do_sample=False, guidance_scale=g, max_new_tokens=20)
            T = 20 - (K - 1)  # 20 steps after the start token: T + K - 1 with the delay pattern
            codes = ours.generate_codes(texts, duration=T / 500, cfg_coef=g, top_k=1, progress=False)
            assert torch.equal(codes, seen[-1]), f"tokens differ at cfg {g}"
            wav = ours.codec.decode(codes)
            torch.testing.assert_close(wav, wav_hf)
            results[g] = codes, wav
    finally:
        hf.audio_encoder.decode = decode
    assert not torch.equal(results[1.0][0], results[3.0][0])  # guidance really changed the choice
    assert (results[1.0][1] - results[3.0][1]).abs().max() > 1e-2  # and other codes sound different


def test_codec_adapter_round_trip_matches_transformers(hf_musicgen):
    hf, tok = hf_musicgen
    ours = from_transformers_musicgen(hf, tokenizer=tok)
    wav = torch.randn(2, 1, 400)
    with torch.no_grad():
        ref = hf.audio_encoder.encode(wav, bandwidth=10.0).audio_codes[0]
    assert torch.equal(ours.codec.encode(wav), ref) and ref.shape == (2, K, 100)
    # the port is a copy: the transformers model keeps its own (trainable) text encoder
    assert all(p.requires_grad for p in hf.text_encoder.parameters())


def test_kv_cache_generation_equals_recomputing_everything():
    """Greedy with the cache == a naive loop that reruns the whole prefix each step."""
    mg = toy_musicgen()
    texts = ["rock song", "sad piano"]
    codes = mg.generate_codes(texts, duration=0.2, cfg_coef=2.0, top_k=1, progress=False)  # 10 frames
    cond, mask = mg.condition(texts)
    null, null_mask = torch.zeros_like(cond), torch.zeros_like(mask)
    T, special = 10, V
    S = mg.pattern.num_steps(T)
    seq = torch.full((2, K, S + 1), special)
    real = mg.pattern.mask(T)
    with torch.no_grad():
        for s in range(1, S + 1):
            both = mg.lm(seq[..., :s].repeat(2, 1, 1), torch.cat([cond, null]), torch.cat([mask, null_mask]))[:, :, -1]
            c, u = both.chunk(2)
            tokens = (u + 2.0 * (c - u)).argmax(-1)
            seq[:, :, s] = torch.where(real[:, s], tokens, seq[:, :, s])
    assert torch.equal(codes, mg.pattern.revert(seq))
    two = mg.generate_codes(texts, duration=0.2, cfg_coef=2.0, top_k=1, progress=False, two_pass_cfg=True)
    assert torch.equal(two, codes)


def test_generate_shapes_seeds_and_progress(capsys):
    mg = toy_musicgen()
    wav = mg.generate(["rock song", "", None], duration=0.3, seed=1, progress=False)
    assert wav.shape == (3, 1, 15 * 32)  # 0.3 s = 15 frames of 32 samples
    again = mg.generate(["rock song", "", None], duration=0.3, seed=1, progress=False)
    other = mg.generate(["rock song", "", None], duration=0.3, seed=2, progress=False)
    assert torch.equal(wav, again) and not torch.equal(wav, other)
    mg.generate(["rock"], duration=0.1, top_p=0.9, temperature=0.8, seed=0, progress=True)
    assert "generating" in capsys.readouterr().err
    unconditional = toy_musicgen(conditioned=False)
    assert unconditional.generate(None, duration=0.1, num_samples=2, progress=False).shape == (2, 1, 160)


def test_continuation_keeps_the_prompt():
    mg = toy_musicgen()
    prompt = torch.linspace(-1, 1, 8 * 32).view(1, 1, -1).repeat(2, 1, 1)  # 8 frames
    prompt_codes = mg.codec.encode(prompt)
    codes = mg.generate_codes(["rock", "piano"], duration=0.3, prompt_codes=prompt_codes, seed=0, progress=False)
    assert codes.shape == (2, K, 15) and torch.equal(codes[..., :8], prompt_codes)
    wav = mg.generate_continuation(prompt, descriptions=["rock", "piano"], duration=0.3, seed=0, progress=False)
    torch.testing.assert_close(wav, mg.codec.decode(codes))
    # a prompt at another sample rate is resampled first
    wav2 = mg.generate_continuation(prompt[0].repeat_interleave(2, -1), prompt_sample_rate=3200, duration=0.3,
                                    seed=0, progress=False)
    assert wav2.shape == (1, 1, 15 * 32)


def test_long_durations_are_windowed_with_bounded_memory():
    mg = toy_musicgen(max_duration=0.4, extend_stride=0.24)  # 20-frame windows, 8-frame context
    assert mg.plan_windows(50) == [(0, 20), (8, 12), (8, 12), (8, 6)]
    sizes = []
    new_cache = mg.lm.new_cache
    mg.lm.new_cache = lambda b, n: sizes.append(n) or new_cache(b, n)
    codes = mg.generate_codes(["rock"], duration=1.0, top_k=1, progress=False)
    assert codes.shape == (1, K, 50)
    assert max(sizes) == mg.pattern.num_steps(20)  # never more than one window's cache
    first = mg.generate_codes(["rock"], duration=0.4, top_k=1, progress=False)
    assert torch.equal(codes[..., :20], first)  # greedy: the first window is the short generation
    # the second window continues from the last 8 frames as a prompt
    second = mg.generate_codes(["rock"], duration=0.4, top_k=1, progress=False, prompt_codes=first[..., 12:])
    assert torch.equal(codes[..., 20:32], second[..., 8:])


def test_clear_errors():
    mg = toy_musicgen()
    with pytest.raises(ValueError, match="prompt_wav is empty"):
        mg.generate_continuation(torch.zeros(1, 1, 0), duration=0.2)
    with pytest.raises(ValueError, match="shorter than one codec frame"):
        mg.generate_continuation(torch.zeros(1, 1, 20), duration=0.2)
    with pytest.raises(ValueError, match="not shorter than the requested duration"):
        mg.generate_continuation(torch.zeros(1, 1, 320), duration=0.2)
    for bad in (0, -1.0, float("nan"), float("inf"), "10"):
        with pytest.raises(ValueError, match="duration must be a positive number"):
            mg.generate(["rock"], duration=bad, progress=False)
    with pytest.raises(ValueError, match="shorter than one frame"):
        mg.generate(["rock"], duration=0.001, progress=False)
    with pytest.raises(ValueError, match="descriptions is empty"):
        mg.generate([], duration=0.1, progress=False)
    with pytest.raises(ValueError, match="extend_stride"):
        MusicGen(ToyCodec(), mg.lm, None, max_duration=1.0, extend_stride=1.0)
    with pytest.raises(ValueError, match="does not match the codec"):
        MusicGen(ToyCodec(), MusicLM(lm_config("tiny", bins=16)))
    with pytest.raises(ValueError, match="no text conditioner"):
        toy_musicgen(conditioned=False).generate(["rock"], duration=0.1, progress=False)
