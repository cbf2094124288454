"""Melody conditioning: the MusicGen-melody port against transformers, the prefix LM, the chroma conditioner."""
from __future__ import annotations

import math

import pytest
import torch

from musicgen_lite.audio import AudioError, save_audio
from musicgen_lite.conditioning import MelodyConditioner, make_tiny_t5
from musicgen_lite.generation import MusicGen, from_transformers_musicgen, from_transformers_musicgen_melody
from musicgen_lite.lm import MusicLM, lm_config
from musicgen_lite.patterns import get_pattern

V, K, SR, CL = 32, 4, 2000, 8  # bins, codebooks, codec sample rate, chroma prefix length
RADIX = 9  # chroma STFT of 512 samples, hop 128: 15.6 chroma frames/s at 2 kHz
CAPTIONS = ["a sad piano piece at 70 bpm", "an energetic rock song with drums at 150 bpm",
            "calm jazz guitar in c major"] * 30
TEXTS = ["a sad piano piece", "an energetic rock song with drums at 150 bpm"]


def tones(midis, seconds: float, sr: int = SR) -> torch.Tensor:
    """A melody ``[N]``: one sine (plus an octave) per midi note, ``seconds`` each."""
    t = torch.arange(int(seconds * sr)) / sr
    return torch.cat([0.3 * torch.sin(2 * math.pi * 440 * 2 ** ((m - 69) / 12) * t)
                      + 0.1 * torch.sin(4 * math.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midis])


@pytest.fixture(scope="module")
def hf_melody():
    from transformers import (EncodecConfig, MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration)

    t5, tok = make_tiny_t5(CAPTIONS)  # d_model 32: projected to the decoder's 24
    enc = EncodecConfig(sampling_rate=SR, upsampling_ratios=[2, 2], num_filters=4, hidden_size=16, codebook_size=V,
                        codebook_dim=16, num_residual_layers=1, num_lstm_layers=1, target_bandwidths=[10.0],
                        normalize=False)  # 2 kHz, hop 4 -> 500 frames/s
    dec = MusicgenMelodyDecoderConfig(vocab_size=V, num_codebooks=K, hidden_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, ffn_dim=48, max_position_embeddings=128,
                                      pad_token_id=V, bos_token_id=V, initializer_factor=0.2)
    torch.manual_seed(0)
    config = MusicgenMelodyConfig(text_encoder=t5.config, audio_encoder=enc, decoder=dec, chroma_length=CL)
    hf = MusicgenMelodyForConditionalGeneration(config).eval()
    hf.text_encoder.load_state_dict(t5.state_dict())
    with torch.no_grad():  # transformers initialises the projections with std 0.02: make the condition matter
        for proj in (hf.enc_to_dec_proj, hf.audio_enc_to_dec_proj):
            proj.weight.normal_(0, 0.5)
        for layer in hf.audio_encoder.quantizer.layers:  # zero codebooks would decode every code alike
            layer.codebook.embed.normal_()
    hf.generation_config.decoder_start_token_id = V
    hf.generation_config.pad_token_id = V
    return hf, tok


@pytest.fixture(scope="module")
def ported(hf_melody):
    hf, tok = hf_melody
    return from_transformers_musicgen_melody(hf, tokenizer=tok, radix2_exp=RADIX)


def melodies(seconds: float) -> torch.Tensor:
    """Two different melodies ``[2, 1, N]`` at ``SR``."""
    n = int(seconds * SR)
    return torch.stack([tones([60, 64, 67, 72], seconds / 4)[:n], tones([62, 69, 65, 71], seconds / 4)[:n]])[:, None]


# ---------------------------------------------------------------------------------- parity

def test_port_gives_transformers_logits_for_text_chroma_and_tokens(hf_melody, ported):
    hf, tok = hf_melody
    assert ported.lm.config.condition_mode == "prepend"
    assert not any("cross" in name for name in ported.lm.state_dict())  # no cross-attention weights
    assert from_transformers_musicgen(hf, tokenizer=tok).melody_conditioner is not None  # dispatch on the class
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # padded text in the prefix
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (2, K, 6), generator=gen)
    seq[:, :, 0] = V  # start token
    mc = ported.melody_conditioner
    for seconds in (0.3, 1.2):  # 5 chroma frames (looped to 8) and 19 (cut to 8)
        wav = melodies(seconds)
        chroma = mc.chroma(wav)  # (2, T, 12) at the chroma frame rate: what transformers takes
        assert (chroma.shape[1] < CL) == (seconds < 1)
        with torch.no_grad():
            ref = hf(**inputs, input_features=chroma, decoder_input_ids=seq.reshape(2 * K, -1)).logits
            cond, mask = ported.condition(TEXTS, melody=wav, melody_sample_rate=SR)
            ours = ported.lm(seq, cond, mask)
        assert cond.shape[1] == CL + inputs["input_ids"].shape[1]  # [chroma | text]
        torch.testing.assert_close(ours, ref.view(2, K, -1, V)[:, :, -6:], rtol=1e-4, atol=1e-5)
    # the melody matters: the two rows swapped give other logits
    with torch.no_grad():
        swapped = ported.lm(seq, *ported.condition(TEXTS, melody=wav.flip(0), melody_sample_rate=SR))
    assert (swapped - ours).abs().max() > 1e-2


def capture_hf_generate(hf, **kw) -> torch.Tensor:
    """transformers' generated codes ``[B, K, T]``, captured at its codec's decode call."""
    seen, decode = [], hf.audio_encoder.decode
    hf.audio_encoder.decode = lambda codes, *a, **k: seen.append(codes[0].clone()) or decode(codes, *a, **k)
    try:
        with torch.no_grad():
            hf.generate(do_sample=False, **kw)
    finally:
        hf.audio_encoder.decode = decode
    return seen[-1]


def test_greedy_tokens_equal_transformers_generate_with_and_without_guidance(hf_melody, ported):
    hf, tok = hf_melody
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    wav = melodies(0.4)
    chroma = ported.melody_conditioner.chroma(wav)
    steps = 16
    T = steps - (K - 1)  # delay pattern: T + K - 1 steps after the start token
    results = {}
    for g in (1.0, 3.0):
        ref = capture_hf_generate(hf, **inputs, input_features=chroma, guidance_scale=g, max_new_tokens=steps)
        codes = ported.generate_codes(TEXTS, duration=T / 500, cfg_coef=g, top_k=1, progress=False,
                                      melody=wav, melody_sample_rate=SR)
        assert torch.equal(codes, ref), f"tokens differ at cfg {g}"
        results[g] = codes
    assert not torch.equal(results[1.0], results[3.0])  # guidance changed the choice
    # no melody at all: transformers' null melody (one-hot C) in both
    ref = capture_hf_generate(hf, **inputs, guidance_scale=3.0, max_new_tokens=steps)
    codes = ported.generate_codes(TEXTS, duration=T / 500, cfg_coef=3.0, top_k=1, progress=False)
    assert torch.equal(codes, ref) and not torch.equal(codes, results[3.0])


def test_null_condition_drops_text_and_melody(ported):
    cond, mask = ported.condition(TEXTS, melody=melodies(0.4), melody_sample_rate=SR)
    null, null_mask = ported.null_condition(cond, mask)
    mc = ported.melody_conditioner
    one_hot_c = torch.zeros(12)
    one_hot_c[0] = 1
    torch.testing.assert_close(null[:, :CL], mc.proj(one_hot_c).expand(2, CL, -1))  # the chroma of silence
    assert (null[:, CL:] == 0).all() and (null_mask[:, CL:] == 0).all()
    # the null rows hold what a None melody and empty texts give
    none_cond, none_mask = ported.condition(["", None], melody=[None, None])
    torch.testing.assert_close(none_cond[:, :CL], null[:, :CL])
    assert (none_cond[:, CL:] == 0).all() and (none_mask[:, CL:] == 0).all()


# ---------------------------------------------------------------------------- prefix LM

def test_frame_aligned_melody_adds_each_chroma_row_to_the_steps_it_describes():
    from musicgen_lite.lm import melody_index

    # step s carries frame s - 1; chroma row i covers frames [i * ratio, (i + 1) * ratio); clamped to the last row
    assert melody_index(torch.arange(10), 3, 2.5).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert melody_index(torch.tensor([0, 1, 7, 8, 14, 1000]), 79, 6.4).tolist() == [0, 0, 0, 1, 2, 78]
    torch.manual_seed(0)
    rows, ratio, B, L, S = 3, 2.0, 2, 2, 9  # cond = [chroma 3 | text 2]
    lm = MusicLM(lm_config("tiny", bins=16, dim=32, condition_mode="prepend", melody_mode="add", melody_rows=rows,
                           melody_ratio=ratio)).eval()
    cond, seq = torch.randn(B, rows + L, 32), torch.randint(0, 17, (B, K, S))
    reads = melody_index(torch.arange(S), rows, ratio)  # [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert lm.prefix_length(cond) == L  # only the text is a prefix
    with torch.no_grad():
        full = lm(seq, cond)
        # by hand: the same weights as a plain prefix LM over the text, each step's input plus its chroma row
        plain = MusicLM(lm_config("tiny", bins=16, dim=32, condition_mode="prepend")).eval()
        plain.load_state_dict(lm.state_dict())
        hooked = plain.emb[0].register_forward_hook(lambda m, i, out: out + cond[:, :rows][:, reads])
        torch.testing.assert_close(plain(seq, cond[:, rows:]), full, rtol=1e-5, atol=1e-5)
        hooked.remove()
        # a chroma row reaches only the steps that read it, and the ones after them (causal attention)
        for row in range(rows):
            changed = cond.clone()
            changed[:, row] += torch.randn(32)  # not a constant: the layer norms would cancel it
            moved = (lm(seq, changed) - full).abs().amax(dim=(0, 1, 3)) > 1e-5  # (S,)
            first = int((reads == row).nonzero()[0])
            assert not moved[:first].any() and moved[first:].all(), (row, moved.tolist())
        # the cached path (prefill, then one step at a time) reads the same rows
        cache = lm.new_cache(B, L + S)
        torch.testing.assert_close(lm(seq[..., :4], cond, cache=cache), full[:, :, :4], rtol=1e-4, atol=1e-5)
        for s in range(4, S):
            step = lm(seq[..., s:s + 1], cache=cache, last_only=True)
            torch.testing.assert_close(step[:, :, 0], full[:, :, s], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="melody_mode"):
        MusicLM(lm_config("tiny", melody_mode="add", melody_rows=3, melody_ratio=2.0))  # cross mode: no prefix
    with pytest.raises(ValueError, match="melody_mode"):
        MusicLM(lm_config("tiny", condition_mode="prepend", melody_mode="aligned"))
    with pytest.raises(ValueError, match="chroma rows first"):
        lm(seq, cond[:, :2])


def test_prefix_lm_with_kv_cache_equals_full_forward():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=16, dim=32, condition_mode="prepend")).eval()
    assert not hasattr(lm.blocks[0], "cross")
    B, P, S = 2, 5, 9
    cond = torch.randn(B, P, 32)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, 3:] = 0  # padded prefix positions: zero states, still in the sequence
    seq = torch.randint(0, 17, (B, K, S))
    with torch.no_grad():
        full = lm(seq, cond, mask)  # (B, K, S, bins): token positions only
        assert full.shape == (B, K, S, 16)
        zeroed = cond.clone()
        zeroed[1, 3:] = 0
        torch.testing.assert_close(lm(seq, zeroed), full)
        cache = lm.new_cache(B, P + S)
        first = lm(seq[..., :4], cond, mask, cache=cache)  # prefill: prefix + 4 tokens
        torch.testing.assert_close(first, full[:, :, :4], rtol=1e-4, atol=1e-5)
        assert (cache.pos, cache.prefix, cache.tokens) == (P + 4, P, 4)
        for s in range(4, S):
            # a condition after the first call is ignored, as in cross-attention mode
            step = lm(seq[..., s:s + 1], cond if s == 4 else None, cache=cache, last_only=True)
            torch.testing.assert_close(step[:, :, 0], full[:, :, s], rtol=1e-4, atol=1e-5)
        assert cache.pos == P + S and cache.tokens == S
        # the prefix really conditions: another prefix, other logits
        assert (lm(seq, torch.randn(B, P, 32)) - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match="condition_mode"):
        MusicLM(lm_config("tiny", condition_mode="sum"))
    with pytest.raises(ValueError, match="cond must be"):
        lm(seq, torch.randn(B, P, 8))


def test_compute_loss_counts_only_audio_positions(hf_melody, ported):
    hf, _ = hf_melody
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, V, (2, K, 7), generator=gen)
    cond, mask = ported.condition(TEXTS, melody=melodies(0.4), melody_sample_rate=SR)
    pattern = get_pattern("delay", K)
    seq, _ = pattern.build(codes, V)  # (B, K, S + 1)
    labels = seq[..., 1:].transpose(1, 2)  # (B, S, K): transformers masks the special token (= pad)
    with torch.no_grad():
        ref = hf.decoder(input_ids=seq[..., :-1].reshape(2 * K, -1), encoder_hidden_states=cond, labels=labels).loss
        loss, per_codebook = ported.lm.compute_loss(codes, pattern, cond, mask)
        unconditioned, _ = ported.lm.compute_loss(codes, pattern)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert per_codebook.shape == (K,) and abs(float(loss - unconditioned)) > 1e-4


# ---------------------------------------------------------------------------- conditioner

def test_melody_conditioner_chroma_fallbacks_and_null():
    torch.manual_seed(0)
    mc = MelodyConditioner(SR, output_dim=8, length=CL, radix2_exp=RADIX).eval()
    assert mc.chroma.hop_length == 128 and mc.frame_rate == SR / 128
    assert MelodyConditioner(32_000, 8).length == 235  # MusicGen: 30 s of 7.8 Hz chroma
    null = mc.null_chroma(1, CL)
    # a 5-frame melody (C E) is looped to 8 frames
    wav = torch.cat([tones([60], 0.16), tones([64], 0.16)])[:600]
    chroma = mc.chromagram(mc.prepare(wav[None, None]))[0]
    native = mc.chroma(wav.view(1, 1, -1))[0]
    assert native.shape[0] == 5 and torch.equal(chroma[:5], native) and torch.equal(chroma[5:], native[:3])
    assert chroma[1].argmax() == 0 and chroma[3].argmax() == 4  # C, then E
    # shorter than one window (512) but not than one hop (128): padded with silence, the note survives
    short = mc.chromagram(mc.prepare([tones([67], 0.1)]))[0]  # 200 samples of G
    assert short[0].argmax() == 7
    # resampled from the given rate: the same G at 4 kHz
    at_4k = mc.chromagram(mc.prepare([tones([67], 0.1, sr=4000)], sample_rate=4000))[0]
    assert at_4k[0].argmax() == 7
    # silence and None rows are the null melody; [B, N] and [B, 1, N] agree
    emb, mask = mc([torch.zeros(1000), None, wav])
    torch.testing.assert_close(emb[0], mc.proj(null[0]))
    torch.testing.assert_close(emb[1], emb[0])
    assert mask.shape == (3, CL) and (mask == 1).all()
    torch.testing.assert_close(mc(wav[None]), mc(wav[None, None]))
    torch.testing.assert_close(mc(torch.stack([wav, wav])[:, None].repeat(1, 2, 1))[0][0], emb[2])  # stereo -> mono
    # an offset starts the (looping) melody later: 2 hops in, the chroma is shifted by 2 frames
    shifted = mc.chromagram(mc.prepare([wav]), offset=256 / SR)[0]
    assert torch.equal(shifted[1:3].argmax(-1), chroma[3:5].argmax(-1))
    # condition dropout: the whole batch gets the null melody in training, never in eval
    drop = MelodyConditioner(SR, output_dim=8, length=CL, radix2_exp=RADIX, dropout=1.0)
    drop.proj.load_state_dict(mc.proj.state_dict())
    torch.testing.assert_close(drop.train()([wav])[0][0], emb[0])
    torch.testing.assert_close(drop.eval()([wav])[0][0], emb[2])


def test_melody_conditioner_errors():
    mc = MelodyConditioner(SR, output_dim=8, length=CL, radix2_exp=RADIX)
    ok = tones([60], 0.2)
    bad = ok.clone()
    bad[10] = float("nan")
    with pytest.raises(ValueError, match=r"melody\[1\] contains 1 NaN or infinite"):
        mc([ok, bad])
    bad[10] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        mc(bad[None, None])
    with pytest.raises(ValueError, match=r"melody\[0\] is empty \(0 samples\)"):
        mc(torch.zeros(1, 1, 0))
    with pytest.raises(ValueError, match="melody is empty"):
        mc([])
    with pytest.raises(ValueError, match=r"melody\[0\] is too short: 0.050 s.*0.064 s"):
        mc([ok[:100]])  # under one hop (128 samples)
    with pytest.raises(TypeError, match="melody must be a tensor"):
        mc("melody.wav")
    with pytest.raises(TypeError, match=r"melody\[0\] must be a tensor"):
        mc([[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"melody must be a tensor \[B, 1, N\]"):
        mc(torch.zeros(1, 1, 1, 400))
    with pytest.raises(AudioError, match="melody_sample_rate"):
        mc([ok], sample_rate=12.5)
    with pytest.raises(ValueError, match="frames must be a positive"):
        mc([ok], frames=0)


# ------------------------------------------------------------------------------ generation

def test_generate_with_chroma_from_files_and_tensors(ported, tmp_path):
    wav = tones([60, 64, 67], 0.2, sr=4000)  # at 4 kHz: resampled to the model's 2 kHz
    kw = dict(duration=0.02, top_k=1, progress=False)
    from_tensor = ported.generate_with_chroma(["calm jazz"], wav[None, None], 4000, **kw)
    assert from_tensor.shape == (1, 1, 40)
    for suffix in (".wav", ".flac"):
        path = save_audio(tmp_path / f"melody{suffix}", wav[None], 4000)
        from_file = ported.generate_with_chroma(["calm jazz"], path, **kw)
        torch.testing.assert_close(from_file, from_tensor)  # 16-bit samples, the same chromagram
        assert torch.equal(ported.generate_with_chroma(["calm jazz"], str(path), **kw), from_file)
    # one melody for several descriptions; [B, N] tensors; None: melody only
    both = ported.generate_with_chroma(["calm jazz", "rock song"], wav[None], 4000, **kw)
    assert both.shape == (2, 1, 40)
    torch.testing.assert_close(both[:1], from_tensor)
    assert ported.generate_with_chroma(None, [wav, None], 4000, **kw).shape == (2, 1, 40)
    # the same seed, the same sampled audio; the melody changes the result
    a = ported.generate_with_chroma(["rock"], wav[None], 4000, duration=0.05, seed=3, progress=False)
    b = ported.generate_with_chroma(["rock"], wav[None], 4000, duration=0.05, seed=3, progress=False)
    c = ported.generate_with_chroma(["rock"], tones([61, 66, 70], 0.2, sr=4000)[None], 4000, duration=0.05,
                                    seed=3, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_with_chroma_errors(ported, tmp_path):
    wav = tones([60], 0.3)
    with pytest.raises(ValueError, match="melody_sample_rate is needed"):
        ported.generate_with_chroma(["rock"], wav[None], duration=0.02)
    with pytest.raises(ValueError, match="3 melodies for 2 descriptions"):
        ported.generate_with_chroma(["rock", "jazz"], [wav, wav, wav], SR, duration=0.02, progress=False)
    with pytest.raises(TypeError, match="melody must be a tensor or a list"):
        ported.generate_with_chroma(["rock"], wav.numpy(), SR, duration=0.02)
    with pytest.raises(AudioError, match="file not found"):
        ported.generate_with_chroma(["rock"], tmp_path / "missing.wav", duration=0.02)
    with pytest.raises(ValueError, match="too short"):
        ported.generate_with_chroma(["rock"], wav[None, :50], SR, duration=0.02, progress=False)
    plain = MusicGen(ported.codec, ported.lm, ported.conditioner)  # no melody conditioner
    with pytest.raises(ValueError, match="needs a melody model"):
        plain.generate_with_chroma(["rock"], wav[None], SR, duration=0.02)
    with pytest.raises(ValueError, match="no melody conditioner"):
        plain.generate(["rock"], duration=0.02, melody=wav[None], melody_sample_rate=SR, progress=False)
    cross_lm = MusicLM(lm_config("tiny", bins=V, num_codebooks=K))
    with pytest.raises(ValueError, match="condition_mode='prepend'"):
        MusicGen(ported.codec, cross_lm, None, melody_conditioner=ported.melody_conditioner)


def test_long_generation_reads_the_melody_from_each_window_start(hf_melody):
    hf, tok = hf_melody
    mg = from_transformers_musicgen_melody(hf, tokenizer=tok, radix2_exp=RADIX, max_duration=0.04,
                                           extend_stride=0.02)  # 20-frame windows, 10-frame context
    assert mg.plan_windows(30) == [(0, 20), (10, 10)]
    offsets, chromagram = [], mg.melody_conditioner.chromagram
    mg.melody_conditioner.chromagram = lambda wavs, frames=None, offset=0.0: (
        offsets.append(offset) or chromagram(wavs, frames, offset))
    codes = mg.generate_codes(["rock"], duration=0.06, top_k=1, progress=False, melody=tones([60, 67], 0.3)[None],
                              melody_sample_rate=SR)
    assert codes.shape == (1, K, 30)
    assert offsets == [0.0, 0.02]  # the second window starts at frame 10 = 0.02 s


def test_rests_read_as_the_null_melody_like_the_token_cache():
    """A near-silent stretch (below -100 dBFS) is a rest: generation reads the null melody there,
    exactly what a token cache stores, not the pitch class of the noise."""
    import numpy as np

    from musicgen_lite.conditioning import MelodyConditioner
    from musicgen_lite.data.dataset import chroma_classes, chroma_one_hot

    sr = 16_000
    t = torch.arange(sr) / sr
    g = torch.Generator().manual_seed(0)
    tone = 0.5 * torch.sin(2 * torch.pi * 440 * t)  # A
    rest = 1e-6 * torch.randn(3 * sr, generator=g)  # -120 dBFS noise: argmax would pick a random class
    wav = torch.cat([tone, rest, tone])
    cond = MelodyConditioner(sr, output_dim=8, radix2_exp=13)
    classes = chroma_classes(wav, cond.chroma)
    assert (classes == -1).sum() >= 3 and (classes == 9).sum() >= 2  # rests and A both present
    ours = cond.chromagram([wav], frames=len(classes))[0]
    torch.testing.assert_close(ours, chroma_one_hot(torch.from_numpy(classes.astype(np.int64))))
