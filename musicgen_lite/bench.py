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
