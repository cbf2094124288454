"""GPU check for fast generation (issue #10): 30 s of musicgen-small audio, ours vs transformers.

What it does, in about 2-4 minutes on one H100 (nothing is downloaded: the weights are random):

1. builds a transformers ``MusicgenForConditionalGeneration`` with musicgen-small's decoder
   (1024 x 24 layers x 16 heads, 4 x 2048 tokens) and the 32 kHz EnCodec (random weights,
   codebooks filled so codes decode apart), a tiny T5 for the text, and ports it into our
   modules (:func:`musicgen_lite.generation.from_transformers_musicgen`);
2. checks tokens in fp32 on a short greedy run with guidance: our fast loop (CUDA graph) vs
   our plain loop vs transformers' ``generate``, and the fast loop with and without the
   graph under seeded sampling (fractions of equal tokens, 1.0 expected);
3. times 30 s of audio (1500 frames, 1503 steps with the delay pattern, CFG 3, top-k 250,
   EnCodec decoding in fp32 included on both sides) with the LM and T5 in bf16: ours fast (CUDA graph), ours fast
   without the graph, our plain loop, and transformers' ``generate``, all on this GPU;
4. prints one JSON line per check or measurement, each naming the GPU, and a summary line
   with the speed-up over transformers and whether the 5 s target was met.

Run: ``python scripts/gpu_check.py`` (a CUDA machine). Without CUDA it stops with a message;
``python scripts/gpu_check.py --tiny --device cpu`` is the dry run of the same code at toy
sizes (seconds on a CPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

CAPTIONS = ["a sad piano piece at 70 bpm", "an energetic rock song with drums at 150 bpm",
            "calm jazz guitar in c major"] * 30
TEXTS = ["an energetic rock song with drums at 150 bpm"]  # one description: B = 1, 2 rows with guidance


def build(tiny: bool, device: torch.device):
    """(transformers model, tokenizer, our MusicGen) with the same random weights, fp32, on ``device``."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration
    from transformers.utils import logging

    from musicgen_lite.conditioning import make_tiny_t5
    from musicgen_lite.generation import from_transformers_musicgen

    logging.set_verbosity_error()  # the special token (= vocab size) is "outside the vocabulary": as in MusicGen
    t5, tok = make_tiny_t5(CAPTIONS)
    if tiny:  # 2 kHz, hop 4 -> 500 frames/s; 4 codebooks of 32 entries = 10 kbps
        bins = 32
        enc = EncodecConfig(sampling_rate=2000, upsampling_ratios=[2, 2], num_filters=4, hidden_size=16,
                            codebook_size=bins, codebook_dim=16, num_residual_layers=1, num_lstm_layers=1,
                            target_bandwidths=[10.0], normalize=False)
        dec = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256)
    else:  # facebook/musicgen-small: EnCodec 32 kHz (hop 640 -> 50 frames/s, 4 x 2048 at 2.2 kbps)
        bins = 2048
        enc = EncodecConfig(sampling_rate=32_000, upsampling_ratios=[8, 5, 4, 4], num_filters=64, hidden_size=128,
                            codebook_size=bins, codebook_dim=128, num_residual_layers=1, num_lstm_layers=2,
                            target_bandwidths=[2.2], normalize=False, use_causal_conv=False, use_conv_shortcut=False,
                            norm_type="weight_norm", pad_mode="reflect", compress=2, kernel_size=7,
                            last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2)
        dec = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096)
    dec = MusicgenDecoderConfig(vocab_size=bins, num_codebooks=4, max_position_embeddings=2048, pad_token_id=bins,
                                bos_token_id=bins, decoder_start_token_id=bins, **dec)
    torch.manual_seed(0)
    hf = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=t5.config, audio_encoder=enc, decoder=dec))
    hf.text_encoder.load_state_dict(t5.state_dict())
    with torch.no_grad():  # transformers starts the codebooks at zero: every code would decode alike
        for layer in hf.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    hf.generation_config.decoder_start_token_id = bins
    hf.generation_config.pad_token_id = bins
    hf = hf.to(device).eval()
    ours = from_transformers_musicgen(hf, tokenizer=tok, max_duration=30.0)
    return hf, tok, ours


def hf_codes(hf, inputs, **kw) -> torch.Tensor:
    """transformers' generated codes ``[B, K, T]``, caught at its codec's decode call."""
    seen, decode = [], hf.audio_encoder.decode
    hf.audio_encoder.decode = lambda codes, *a, **k: seen.append(codes[0].clone()) or decode(codes, *a, **k)
    try:
        with torch.no_grad():
            hf.generate(**inputs, **kw)
    finally:
        hf.audio_encoder.decode = decode
    return seen[-1]


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of equal tokens (0 when the shapes differ)."""
    return round(float((a == b).float().mean()), 4) if a.shape == b.shape else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a dry run)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks the script itself in seconds")
    ap.add_argument("--seconds", type=float, default=None, help="audio to time (default 30; 0.2 with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="precision of the timed runs (the token checks run in fp32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of our fast loop (the median is reported)")
    ap.add_argument("--skip-slow", action="store_true", help="time only our fast loop (not plain / transformers)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or dry-run the same code at toy sizes: python scripts/gpu_check.py --tiny --device cpu",
              file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({platform.processor() or platform.machine()})"
    seconds = args.seconds if args.seconds is not None else (0.2 if args.tiny else 30.0)
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 token checks in true fp32

    def emit(**row):
        print(json.dumps({"gpu": gpu, "torch": torch.__version__, **row}), flush=True)

    def timed(fn):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    t_build, (hf, tok, ours) = timed(lambda: build(args.tiny, device))
    K, fr = ours.lm.config.num_codebooks, ours.frame_rate
    emit(check="build", preset="tiny" if args.tiny else "musicgen-small", lm_parameters=ours.lm.num_parameters(),
         frame_rate=fr, wall_s=round(t_build, 2))
    inputs = tok(TEXTS, padding=True, return_tensors="pt").to(device)

    # ---- tokens (fp32): fast == plain == transformers (greedy, CFG), graph == eager (sampling)
    T = min(47, int(round(seconds * fr)))
    short = dict(duration=T / fr, cfg_coef=3.0, progress=False)
    plain = ours.generate_codes(TEXTS, top_k=1, **short)
    fast = ours.generate_codes(TEXTS, top_k=1, fast=True, **short)
    ref = hf_codes(hf, inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=T + K - 1)
    emit(check="greedy_tokens", dtype="float32", frames=T, fast_vs_plain=agree(fast, plain),
         fast_vs_transformers=agree(fast, ref), plain_vs_transformers=agree(plain, ref))
    if on_gpu:
        graph = ours.generate_codes(TEXTS, top_k=250, seed=0, fast=True, **short)
        eager = ours.generate_codes(TEXTS, top_k=250, seed=0, fast=True, cuda_graph=False, **short)
        again = ours.generate_codes(TEXTS, top_k=250, seed=0, fast=True, **short)
        emit(check="sampled_tokens", dtype="float32", frames=T, graph_vs_eager=agree(graph, eager),
             graph_same_seed=agree(graph, again))

    # ---- timing: `seconds` of audio, CFG 3, top-k 250, EnCodec decoding included
    hf.to(dtype)
    hf.audio_encoder.float()  # EnCodec decodes in fp32 on both sides (codes in, audio out): the LMs are timed in dtype
    ours.lm.to(dtype)
    ours.conditioner.to(dtype)
    frames = int(round(seconds * fr))
    steps = ours.pattern.num_steps(frames)
    opts = dict(cfg_coef=3.0, top_k=250, seed=0, progress=False)

    def measure(name: str, fn, runs: int = 1, **extra):
        times = [timed(fn)[0] for _ in range(runs)]
        wall = statistics.median(times)
        emit(measure=name, dtype=args.dtype, audio_s=seconds, frames=frames, steps=steps, wall_s=round(wall, 3),
             runs=[round(t, 3) for t in times], steps_per_s=round(steps / wall, 1),
             realtime_x=round(seconds / wall, 2), **extra)
        return wall

    ours.generate(TEXTS, duration=min(seconds, 1.0), fast=True, **opts)  # warm-up: kernels, allocator
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t_fast = measure("ours_fast" + ("_cuda_graph" if on_gpu else "_eager"),
                     lambda: ours.generate(TEXTS, duration=seconds, fast=True, **opts), runs=args.repeats,
                     peak_gib=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if on_gpu else None)
    t_hf = None
    if not args.skip_slow:
        if on_gpu:
            measure("ours_fast_no_graph", lambda: ours.generate(TEXTS, duration=seconds, fast=True, cuda_graph=False,
                                                                **opts))
        measure("ours_plain", lambda: ours.generate(TEXTS, duration=seconds, **opts))
        gen = dict(do_sample=True, top_k=250, guidance_scale=3.0)
        with torch.no_grad():
            hf.generate(**inputs, max_new_tokens=8, **gen)  # warm-up
            t_hf = measure("transformers_generate", lambda: hf.generate(**inputs, max_new_tokens=steps, **gen))
    emit(measure="summary", dtype=args.dtype, audio_s=seconds, ours_fast_s=round(t_fast, 3),
         transformers_s=None if t_hf is None else round(t_hf, 3),
         speedup_vs_transformers=None if t_hf is None else round(t_hf / t_fast, 2),
         target="30 s of audio in <= 5 s (musicgen-small, one H100)",
         target_met=(t_fast <= 5.0) if (on_gpu and not args.tiny and seconds >= 30) else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
