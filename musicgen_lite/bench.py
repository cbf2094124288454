"""Side-by-side benchmarks: ours against a peer, same input, same process.

``musicgen-lite bench NAME [--json]`` runs one benchmark (``all`` runs every one). Each
benchmark returns rows ``{"bench", "config", "ours", "peer", "peer_name", "unit", "ratio"}``
where ``ratio = ours / peer`` for throughputs (higher is better). Timings are medians of
several runs after a warm-up; the README's Performance section records them with the
machine they ran on. Tests never assert on these numbers.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

BENCHES: dict[str, Callable[..., list[dict]]] = {}


def register(name: str):
    def deco(fn):
        BENCHES[name] = fn
        return fn
    return deco


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_seconds(a: Callable[[], object], b: Callable[[], object], rounds: int = 4,
                        warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``a()`` and ``b()`` timed in turn, ``rounds`` times each, the first
    ``warmup`` pairs dropped: alternating, so that load changes on the machine hit both."""
    t_a, t_b = [], []
    for _ in range(rounds):
        t_a.append(median_seconds(a, repeats=1, warmup=0))
        t_b.append(median_seconds(b, repeats=1, warmup=0))
    return statistics.median(t_a[warmup:]), statistics.median(t_b[warmup:])


def row(bench: str, config: str, ours: float, peer: float | None, peer_name: str, unit: str) -> dict:
    return {"bench": bench, "config": config, "ours": round(ours, 3),
            "peer": None if peer is None else round(peer, 3), "peer_name": peer_name, "unit": unit,
            "ratio": None if not peer else round(ours / peer, 2)}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


# --------------------------------------------------------------------- benchmarks, one per area
# (each area adds its function below with @register("name"))


def _audiocraft_patterns_module():
    """audiocraft's ``codebooks_patterns.py`` loaded alone (its package imports far more), or None."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("audiocraft")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "modules" / "codebooks_patterns.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("audiocraft_codebooks_patterns", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@register("patterns")
def bench_patterns(args=None) -> list[dict]:
    """Build + revert of a [64, 4, 1500] batch (30 s at 50 Hz) per pattern, in ms (lower is better).

    Peers, same input, same process: transformers' ``build_delay_pattern_mask`` plus the pad
    filter its ``generate`` reverts with (delay); audiocraft's ``build_pattern_sequence`` +
    ``revert_pattern_sequence`` for the other patterns where audiocraft is installed. For ms
    rows the ratio ours / peer below 1 means we are faster. The last row is the one-time cost
    of a new length (layout + index tables), which later calls skip.
    """
    from .patterns import PATTERNS, get_pattern

    B, T, special = 64, 1500, 2048
    gen = torch.Generator().manual_seed(0)
    ac = _audiocraft_patterns_module()
    ac_providers = {} if ac is None else {
        "flatten": lambda: ac.UnrolledPatternProvider(4),
        "partial_delay": lambda: ac.DelayedPatternProvider(4, delays=[0, 2, 2, 2]),
        "parallel": lambda: ac.ParallelPatternProvider(4),
        "coarse_first": lambda: ac.CoarseFirstPattern(4),
        "partial_flatten": lambda: ac.UnrolledPatternProvider(4, flattening=[0, 1, 1, 1]),
    }
    rows = []
    for name in PATTERNS:
        K = 8 if name == "stereo_delay" else 4
        codes = torch.randint(0, special, (B, K, T), generator=gen)
        pattern = get_pattern(name, K)

        def ours():
            seq, _ = pattern.build(codes, special)
            return pattern.revert(seq)

        assert torch.equal(ours(), codes)
        t_ours = median_seconds(ours, repeats=15, warmup=3) * 1e3
        t_peer, peer_name = None, "-"
        if name == "delay":
            t_peer, peer_name = _bench_transformers_delay(codes, special), "transformers build_delay_pattern_mask"
        elif name in ac_providers:
            their = ac_providers[name]().get_pattern(T)

            def peer():
                seq, _, _ = their.build_pattern_sequence(codes, special)
                return their.revert_pattern_sequence(seq, special)[0]

            assert torch.equal(peer(), codes)
            t_peer, peer_name = median_seconds(peer, repeats=15, warmup=3) * 1e3, "audiocraft Pattern"
        rows.append(row("patterns", f"{name} build+revert [{B},{K},{T}]", t_ours, t_peer, peer_name, "ms"))

    def cold():  # a fresh pattern: layout in Python + index tables, once per new T
        get_pattern("delay", 4).num_steps(T)

    rows.append(row("patterns", f"delay first call, T={T} (tables)", median_seconds(cold, 7, 1) * 1e3,
                    None, "-", "ms"))
    return rows


def _bench_transformers_delay(codes: torch.Tensor, special: int) -> float | None:
    """ms for transformers' delay build (prompt [BOS] + codes) + its pad-filter revert."""
    try:
        from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    except ImportError:
        return None
    B, K, T = codes.shape
    config = MusicgenDecoderConfig(vocab_size=special, num_codebooks=K, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, ffn_dim=16, pad_token_id=special, bos_token_id=special)
    model = MusicgenForCausalLM(config).eval()  # tiny: only its pattern method is timed
    prompt = torch.cat([codes.new_full((B, K, 1), special), codes], dim=2).reshape(B * K, T + 1)

    def peer():
        _, seq = model.build_delay_pattern_mask(prompt, pad_token_id=special, max_length=T + K)
        return seq[seq != special].reshape(B, K, T)

    assert torch.equal(peer(), codes)
    return median_seconds(peer, repeats=15, warmup=3) * 1e3


def _rvq_peers(dim: int, n_q: int, bins: int, codebooks: torch.Tensor) -> dict:
    """Peer encoders holding ``codebooks`` (n_q, bins, dim): name -> fn(x [B, D, T]) -> codes [B, K, T]."""
    import math

    peers = {}
    try:
        from transformers import EncodecConfig
        from transformers.models.encodec.modeling_encodec import EncodecResidualVectorQuantizer

        # 32 kHz, hop 640 -> 50 Hz; 2.2 kbps / (50 Hz x 11 bits) = 4 codebooks, as in MusicGen
        config = EncodecConfig(sampling_rate=32_000, upsampling_ratios=[8, 5, 4, 4], codebook_size=bins,
                               hidden_size=dim, target_bandwidths=[n_q * math.log2(bins) * 50 / 1000])
        hf = EncodecResidualVectorQuantizer(config).eval()
        for layer, book in zip(hf.layers, codebooks):
            layer.codebook.embed.copy_(book)
        peers["transformers EncodecResidualVectorQuantizer"] = lambda x: hf.encode(x).transpose(0, 1)
    except ImportError:
        peers["transformers EncodecResidualVectorQuantizer"] = None
    try:
        from vector_quantize_pytorch import ResidualVQ

        vqp = ResidualVQ(dim=dim, num_quantizers=n_q, codebook_size=bins, kmeans_init=False).eval()
        for layer, book in zip(vqp.layers, codebooks):
            layer._codebook.embed.copy_(book.unsqueeze(0))
        peers["vector-quantize-pytorch ResidualVQ"] = lambda x: vqp(x.transpose(1, 2))[1].transpose(1, 2)
    except ImportError:
        peers["vector-quantize-pytorch ResidualVQ (not installed)"] = None
    return peers


@register("rvq")
def bench_rvq(args=None) -> list[dict]:
    """RVQ encode throughput (frames/s) at EnCodec 32 kHz's size: dim 128, 4 x 2048, eval, fp32.

    One input of 4 clips x 30 s (4 x 1500 frames) for every encoder, the same random
    codebooks in each (shrinking per level like real residuals), codes checked equal. Peers:
    transformers' EnCodec quantizer, and vector-quantize-pytorch's ResidualVQ when installed.
    """
    from .quantization import ResidualVectorQuantizer

    dim, n_q, bins, B, T = 128, 4, 2048, 4, 1500
    g = torch.Generator().manual_seed(0)
    codebooks = torch.randn(n_q, bins, dim, generator=g) * (0.5 ** torch.arange(n_q)).view(n_q, 1, 1)
    x = torch.randn(B, dim, T, generator=g)
    ours = ResidualVectorQuantizer(dim, n_q, bins).eval()
    for layer, book in zip(ours.layers, codebooks):
        layer.codebook.embed.copy_(book)
        layer.codebook.inited.fill_(1.0)
    config = f"dim{dim} {n_q}x{bins} B{B} T{T} fp32 eval"
    rows = []
    with torch.inference_mode():
        codes = ours.encode(x)
        for name, peer in _rvq_peers(dim, n_q, bins, codebooks).items():
            # ours is timed next to each peer, so that both see the same machine load
            t_ours = median_seconds(lambda: ours.encode(x), repeats=7, warmup=2)
            if peer is None:
                rows.append(row("rvq", config, B * T / t_ours, None, name, "frames/s"))
                continue
            agree = (peer(x) == codes).float().mean().item()
            if agree < 0.999:  # same work: the same nearest entries, up to float near-ties
                raise RuntimeError(f"{name} disagrees with ours on {1 - agree:.2%} of the codes")
            t_peer = median_seconds(lambda: peer(x), repeats=7, warmup=2)
            rows.append(row("rvq", config, B * T / t_ours, B * T / t_peer, name, "frames/s"))
    return rows


@register("codec")
def bench_codec(args=None) -> list[dict]:
    """EnCodec 32 kHz (MusicGen's size) encode + decode real-time factor, ours vs transformers.

    transformers' ``EncodecModel`` with MusicGen's config and random weights (random
    codebooks too) is ported into ours with :func:`musicgen_lite.hub.from_transformers`;
    both code the same 10 s clip under ``torch.inference_mode``, fp32. Codes are checked
    equal and audio close before timing. Ours and the peer alternate run by run so that both
    see the same machine load. Unit: seconds of audio coded per second (higher is better).
    """
    try:
        from transformers import EncodecConfig, EncodecModel
    except ImportError:
        return [row("codec", "encodec 32 kHz", float("nan"), None, "transformers (not installed)", "x realtime")]
    from .hub import from_transformers

    seconds = float(getattr(args, "seconds", None) or 10.0)
    torch.manual_seed(0)
    config = EncodecConfig(sampling_rate=32_000, audio_channels=1, hidden_size=128, num_filters=64,
                           upsampling_ratios=[8, 5, 4, 4], num_residual_layers=1, num_lstm_layers=2,
                           codebook_size=2048, target_bandwidths=[2.2], use_causal_conv=False,
                           use_conv_shortcut=False, normalize=False, pad_mode="reflect")
    hf = EncodecModel(config).eval()
    g = torch.Generator().manual_seed(0)
    for k, layer in enumerate(hf.quantizer.layers):
        layer.codebook.embed.copy_(torch.randn(2048, 128, generator=g) * 0.5 ** k)
    ours = from_transformers(hf)
    wav = torch.randn(1, 1, int(seconds * 32_000), generator=g) * 0.1

    def peer():
        with torch.inference_mode():
            out = hf.encode(wav, bandwidth=2.2)
            return out.audio_codes[0], hf.decode(out.audio_codes, out.audio_scales).audio_values

    def mine():
        codes = ours.encode(wav)
        return codes, ours.decode(codes)

    (pc, pa), (oc, oa) = peer(), mine()
    agree = (pc == oc).float().mean().item()
    if agree < 0.999 or not torch.allclose(pa, oa, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"ours and transformers disagree: codes {agree:.2%} equal, "
                           f"audio max diff {(pa - oa).abs().max().item():.2e}")
    t_ours, t_peer = interleaved_seconds(mine, peer, rounds=5, warmup=0)  # the check above warmed both
    cfg = f"32 kHz, 64 filters, ratios 8-5-4-4, 4x2048, {seconds:g} s, B1 fp32"
    return [row("codec", f"encode+decode {cfg}", seconds / t_ours, seconds / t_peer,
                "transformers EncodecModel", "x realtime")]


def _lm_models(size: str):
    """transformers' ``MusicgenForCausalLM`` at our preset ``size`` (random weights) and its port."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    from .lm import from_transformers_decoder, lm_config

    c = lm_config(size)
    torch.manual_seed(0)
    hf_config = MusicgenDecoderConfig(vocab_size=c.bins, num_codebooks=c.num_codebooks, hidden_size=c.dim,
                                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                      ffn_dim=c.ffn_dim, max_position_embeddings=2048, pad_token_id=c.bins,
                                      bos_token_id=c.bins, decoder_start_token_id=c.bins)
    hf = MusicgenForCausalLM(hf_config).eval()
    return from_transformers_decoder(hf), hf


def _lm_decoders(ours, hf, steps: int, L: int = 12, context: int = 0, compiled: bool = False):
    """``run()`` for each model: a one-position prefill with the condition, then ``steps`` cached
    decoding steps, CFG batch 2 (condition + null), guided logits -> top-k 250 sample -> next input.
    ``context`` > 0: the condition and ``context`` random tokens are prefilled once, untimed, and
    every ``run()`` decodes ``steps`` steps after them (the cache cut back to ``context`` first):
    decoding deep into a clip, where attention reads ``context`` cached positions per layer.
    ``compiled``: our steps after the prefill run :meth:`MusicLM.compiled_decode_step` (what
    ``generate(..., fast=True, compile_step=True)`` runs: static shapes, a cache of ``steps + 1``
    positions rounded up to 8, compiled on the first call, which a warm-up run should take).
    Also the weight bytes one decoding step reads (all but the embedding tables and the
    cross-attention key/value projections, which run once per generation)."""
    from .sampling import cfg_from_batch, sample_next

    if compiled and context:
        raise ValueError("compiled=True times the compiled step from the start of a clip; pass context=0")
    c, dtype = ours.config, next(ours.parameters()).dtype
    K, special = c.num_codebooks, c.special
    g = torch.Generator().manual_seed(0)
    cond = torch.cat([torch.randn(1, L, c.dim, generator=g), torch.zeros(1, L, c.dim)]).to(dtype)
    mask = torch.cat([torch.ones(1, L, dtype=torch.long), torch.zeros(1, L, dtype=torch.long)])

    def pick(logits):  # (2, K, bins) -> (1, K)
        return sample_next(cfg_from_batch(logits.float(), 3.0), top_k=250, generator=g)

    def hf_step(ids, past):
        out = hf(input_ids=ids.repeat(2, 1, 1).reshape(2 * K, ids.shape[-1]), encoder_hidden_states=cond,
                 encoder_attention_mask=mask, cache=past, use_cache=True)
        return out.logits.reshape(2, K, -1, out.logits.shape[-1])[:, :, -1], (
            out.cache if hasattr(out, "cache") else out.past_key_values)

    if context:
        seq = torch.randint(0, c.bins, (1, K, context), generator=g)
        cache = ours.new_cache(2, context + steps)
        ours(seq.repeat(2, 1, 1), cond, mask, cache=cache, last_only=True)
        past = hf_step(seq, None)[1]

        def run_ours():
            cache.pos, x = context, seq[..., -1:]
            for _ in range(steps):
                x = pick(ours(x.repeat(2, 1, 1), cache=cache, last_only=True)[:, :, -1]).unsqueeze(-1)

        def run_hf():
            extra = past.get_seq_length() - context
            if extra > 0:  # transformers >= 5 crops by a negative count: the tokens to drop
                past.crop(-extra)
            x = seq[..., -1:]
            for _ in range(steps):
                x = pick(hf_step(x, past)[0]).unsqueeze(-1)
    else:
        def run_hf():
            past, x = None, torch.full((1, K, 1), special)
            for _ in range(steps + 1):
                logits, past = hf_step(x, past)
                x = pick(logits).unsqueeze(-1)

        if compiled:
            step_fn = ours.compiled_decode_step()
            positions = [torch.tensor([p]) for p in range(1, steps + 1)]

            def run_ours():
                cache = ours.new_cache(2, -(-(steps + 1) // 8) * 8)
                x = torch.full((1, K, 1), special)
                x = pick(ours(x.repeat(2, 1, 1), cond, mask, cache=cache, last_only=True)[:, :, -1]).unsqueeze(-1)
                for p in positions:
                    x = pick(step_fn(x.repeat(2, 1, 1), p, cache)).unsqueeze(-1)
                return x  # the last tokens: the tests compare the two runners
        else:
            def run_ours():
                cache = ours.new_cache(2, steps + 1)
                x = torch.full((1, K, 1), special)
                for s in range(steps + 1):
                    first = s == 0
                    logits = ours(x.repeat(2, 1, 1), cond if first else None, mask if first else None, cache=cache,
                                  last_only=True)[:, :, -1]
                    x = pick(logits).unsqueeze(-1)
                return x

    per_step = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("emb.") and ".cross.kv." not in n)
    return run_ours, run_hf, per_step * torch.finfo(dtype).bits // 8


def _matvec_bandwidth() -> float:
    """Bytes/s streamed by 2 rows times each of 24 separate 4096 x 1024 weights (far beyond the
    caches): a decoding step's kind of work and shapes, the memory roof of this machine. The
    fastest of the kernels we know, in fp32 and bf16: ``x @ W^T``, ``W @ x^T`` and (bf16) oneDNN
    with weights packed once. The BLAS takes different paths: fp32 favours ``W @ x^T``, bf16
    the packed weights; a bytes/s is a bytes/s, so the roof is the best of all."""
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(4096, 1024).to(dtype) for _ in range(24)]
        x = torch.randn(2, 1024).to(dtype)
        runs = [lambda: [torch.nn.functional.linear(x, w) for w in ws], lambda: [w @ x.T for w in ws]]
        if dtype == torch.bfloat16:
            try:
                packed = [torch.ops.mkldnn._reorder_linear_weight(w, 2) for w in ws]
                runs.append(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed])
            except (AttributeError, RuntimeError):
                pass
        t = min(median_seconds(run, repeats=5, warmup=1) for run in runs)
        rates.append(sum(w.numel() * w.element_size() for w in ws) / t)
    return max(rates)


@register("lm")
def bench_lm(args=None) -> list[dict]:
    """Decode steps/s with a KV cache and CFG (batch 1, effective 2), ours vs transformers' MusicGen decoder.

    Same random weights in both (ours ported from theirs), a 12-token condition, top-k 250
    after guidance, 12 decoding steps (small; 32 at lite) after a one-position prefill;
    median of 3 runs after a warm-up, each model timed right after the other. Sizes:
    MusicGen small (1024 x 24 layers x 16 heads, ffn 4096) and our lite preset, fp32 then
    bf16 (the same models cast); at the lite size also our compiled step (:meth:`MusicLM.compiled_decode_step`,
    compiled once before timing). Kernel rows: the projections' kernel the model chose at its first
    decoding step (:meth:`MusicLM.tune_decode_kernel`, the fastest on this machine), in passes
    over the step's weights per second, against the other candidate. Roofline rows: this machine's matrix-vector rate (bytes/s) divided by the weight
    bytes one step reads, i.e. the most steps/s the weights allow; ratio = share reached.
    """
    rows = []
    for size, steps in (("small", 12), ("lite", 32)):
        ours, hf = _lm_models(size)
        for dtype in (torch.float32, torch.bfloat16):
            ours, hf = ours.to(dtype), hf.to(dtype)  # outside inference_mode: ordinary tensors, as a user's
            with torch.inference_mode():
                run_ours, run_hf, step_bytes = _lm_decoders(ours, hf, steps)
                t_ours, t_hf = interleaved_seconds(run_ours, run_hf)
                name = "fp32" if dtype == torch.float32 else "bf16"
                ours_sps, hf_sps = (steps + 1) / t_ours, (steps + 1) / t_hf
                rows.append(row("lm", f"{size} {name} decode, CFG B1 (2 rows)", ours_sps, hf_sps,
                                "transformers MusicgenForCausalLM", "steps/s"))
                kernels = ours.tune_decode_kernel(rows=2)  # what the first step measured (read back, not re-run)
                chosen = ours.decode_kernel
                other = min((k for k in kernels if k != chosen), key=kernels.get)
                rows.append(row("lm", f"{size} {name} decoding kernel chosen at the first step: {chosen!r}",
                                1 / kernels[chosen], 1 / kernels[other], f"the {other!r} kernel", "weight passes/s"))
                if size == "lite":  # the step compiled (compile_step=True), against the same eager peer
                    run_c, run_hf, _ = _lm_decoders(ours, hf, steps, compiled=True)
                    run_c()  # compiles: about 20 s
                    t_c, t_hf = interleaved_seconds(run_c, run_hf)
                    rows.append(row("lm", f"{size} {name} decode, compiled step (compile_step=True), CFG B1 (2 rows)",
                                    (steps + 1) / t_c, (steps + 1) / t_hf, "transformers MusicgenForCausalLM",
                                    "steps/s"))
                if dtype == torch.float32:  # int8 weights (dynamic quantisation), against transformers in fp32
                    from .int8 import quantize_int8

                    run_q, run_hf32, _ = _lm_decoders(quantize_int8(ours), hf, steps)
                    t_q, t_hf = interleaved_seconds(run_q, run_hf32)
                    rows.append(row("lm", f"{size} int8 decode, CFG B1 (2 rows)", (steps + 1) / t_q,
                                    (steps + 1) / t_hf, "transformers fp32", "steps/s"))
                if size == "small":
                    roof = _matvec_bandwidth() / step_bytes
                    rows.append(row("lm", f"{size} {name} roofline, {step_bytes / 1e6:.0f} MB/step", ours_sps, roof,
                                    "matvec bandwidth / weight bytes", "steps/s"))
                    # deep into a clip: 8 steps after 10 s (500 positions) of cached context
                    t_ours, t_hf = interleaved_seconds(*_lm_decoders(ours, hf, 8, context=500)[:2])
                    rows.append(row("lm", f"{size} {name} decode after 10 s of context (500 cached positions)",
                                    8 / t_ours, 8 / t_hf, "transformers MusicgenForCausalLM", "steps/s"))
        del ours, hf
    return rows


@register("train")
def bench_train(args=None) -> list[dict]:
    """LM training throughput: one optimizer-free step (forward, per-codebook cross-entropy,
    backward) on a batch of 4 x 250 frames (5 s at 50 Hz) with a 12-token condition, ours vs
    transformers' ``MusicgenForCausalLM`` (its loss from ``labels``) with the same random weights,
    at the lite size; fp32, then bf16 autocast (on a CPU: only where it has native bf16).
    Throughput in frames/s (each frame is K = 4 tokens); median of 3 after a warm-up, the two
    models timed alternately. Also the rate in GFLOP/s from 6 x (non-embedding parameters) per frame."""
    import torch.nn.functional as F

    B, S, L = 4, 250, 12
    rows = []
    ours, hf = _lm_models("lite")
    ours.train(), hf.train()
    c = ours.config
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, c.bins, (B, c.num_codebooks, S), generator=g)  # (B, K, S)
    cond = torch.randn(B, L, c.dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    flops_per_frame = 6 * sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("emb."))
    device_type = "cpu"
    dtypes = [torch.float32]
    from .training import _cpu_has_native_bf16

    if _cpu_has_native_bf16():
        dtypes.append(torch.bfloat16)

    for dtype in dtypes:
        amp = dict(device_type=device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

        def run_ours():
            ours.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                logits = ours(seq, cond, mask)  # (B, K, S, bins)
            loss = F.cross_entropy(logits.float().flatten(0, 2), seq.flatten())
            loss.backward()

        def run_hf():
            hf.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                out = hf(input_ids=seq.reshape(B * c.num_codebooks, S), encoder_hidden_states=cond,
                         encoder_attention_mask=mask, labels=seq.transpose(1, 2))
            out.loss.backward()

        t_ours, t_hf = interleaved_seconds(run_ours, run_hf)
        fps_ours, fps_hf = B * S / t_ours, B * S / t_hf
        name = "fp32" if dtype == torch.float32 else "bf16 autocast"
        rows.append(row("train", f"lite LM step (fwd + CE + bwd), B{B} x {S} frames, {name}", fps_ours, fps_hf,
                        "transformers MusicgenForCausalLM (labels)", "frames/s"))
        rows.append(row("train", f"lite LM step, {name}: model GFLOP/s (6 N per frame)",
                        fps_ours * flops_per_frame / 1e9, fps_hf * flops_per_frame / 1e9,
                        "transformers, same count", "GFLOP/s"))
    return rows
