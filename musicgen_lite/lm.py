"""The multi-stream transformer LM: K token streams in, K distributions over the codebook out.

MusicGen's language model reads a pattern-interleaved sequence ``seq[B, K, S]`` (see
:mod:`musicgen_lite.patterns`): at every step it holds one token per codebook (or the
special token ``bins`` where the pattern leaves a gap). The model

1. embeds each stream with its own table (``bins + 1`` rows, the last one for the special
   token) and *sums* the K embeddings, so one position costs one transformer step however
   many codebooks it carries;
2. adds sinusoidal positions in MusicGen's layout (``[cos | sin]``, not interleaved);
3. runs pre-norm blocks: causal self-attention, cross-attention to the condition (text
   states, padding masked), a GELU feed-forward; no bias in any linear layer;
4. normalises once more and applies one linear head per codebook:
   ``logits[B, K, S, bins]``.

The condition reaches the model in one of two ways (``LMConfig.condition_mode``):

- ``"cross"`` (MusicGen): every block cross-attends to ``cond[B, L, dim]``;
- ``"prepend"`` (MusicGen-melody): no cross-attention at all; ``cond`` is a *prefix* of
  ``L`` input vectors placed before the token embeddings, ``[cond | tokens]``, and the
  causal self-attention reads it. Positions count the prefix (the first token sits at
  position ``L``, as in transformers' ``MusicgenMelodyForConditionalGeneration``), padded
  prefix states are zero vectors that are still attended to (transformers and audiocraft do
  the same: the released weights learned with it), and only the token positions get logits.

A melody (MusicGen-melody's chroma rows, the first ``melody_rows`` rows of ``cond``) is read
in one of two ways (``LMConfig.melody_mode``):

- ``"prefix"`` (MusicGen-melody, the default): the chroma rows are part of the prefix like the
  text, and attention has to learn which row describes the frame being predicted;
- ``"add"`` (frame-aligned, ours; not MusicGen's layout, not portable to transformers): the
  chroma row of each token frame is *added* to that step's input, ``x[s] += chroma[i(s)]``
  with ``i(s) = floor(max(s - 1, 0) / melody_ratio)`` (``melody_ratio``: token frames per
  chroma frame, 6.4 for 50 Hz tokens and 7.8125 Hz chroma), and only the rest of ``cond``
  (the text) stays a prefix. Nothing has to be looked up. Measured on our lite LM (notebook
  06's solutions): after 250 steps the melody saved 0.033 nats per token this way, 0.0007 as
  a prefix whose rows sat at their frames' positions, and MusicGen's counted prefix still
  only 0.0004 after 1,500 steps.

A beat clock (``LMConfig.beat_clock``; ours, not MusicGen's) gives every step the phase of
a tempo's beats: ``forward(..., clock=beat_clock(bpm, frame_rate))`` adds to step ``s`` a
learned map (``self.beat``, zero at init) of the sines and cosines of the beat count at the
frame it predicts, over a half beat, a beat, two beats and a bar of four
(:func:`clock_features`). Holding a steady pulse from its own past is what our small LM did
not learn; with a clock, "a note starts now" is a function of one input. The clock is a
condition like the text: the null rows of guidance go without it.

A key condition (``LMConfig.key_condition``, ours too) rides on the clock: its columns after
the two beat columns hold the clip's mode and tonic (:func:`key_features`), and a learned map
(``self.key``, zero at init) of them is added to every step. Our LMs did not learn the mode
from the caption's words, nor from a row of its own in the cross-attention (the same fate the
bpm had before the clock).

For generation, :class:`KVCache` holds every layer's keys and values in buffers allocated
once for the whole length (no concatenation per step), and the cross-attention keys and
values of the condition are computed once per generation, at the first step; in prepend
mode the prefix is read once, at the first step, and stays in the cache like any position.

A cached forward of one position without gradients (every step of generation after the
prefill) runs :meth:`MusicLM._lean_blocks`: the blocks' arithmetic as one flat loop, and the
cross-attention's query and output projections folded into the condition once per
generation. A small LM's step is bound by how many operations it launches, not by its
weights; tests hold it to the modules' path and to the full forward. A big LM's step is
bound by streaming its weights, and which matrix kernel streams them fastest past one or two
rows depends on the CPU: at its first decoding step the model times its candidates on its
own weights and keeps the fastest (:meth:`MusicLM.tune_decode_kernel`; in bf16 the
``"packed"`` kernel also fuses fc1's GELU and makes the heads one matrix).

:meth:`MusicLM.decode_step` is the same decoding step with *static shapes*, for CUDA graphs:
the write position is a device tensor (``index_copy_`` into the cache), attention reads the
whole cache with a mask built from that tensor, so no shape, address or Python number
changes from one step to the next and one captured graph replays every step. On a CPU the
same static step can be compiled instead (:class:`CompiledStep`, ``torch.compile`` with the
weights frozen in): generated C++ in place of about 30 tensor operations a layer, each
launched from Python.

Sizes (:func:`lm_config`): ``tiny`` (tests, CI), ``lite`` (a laptop CPU), and MusicGen's
``small`` (1024 x 24 layers x 16 heads, ffn 4096, ~300M parameters), ``medium`` (1536 x 48
x 24) and ``large`` (2048 x 48 x 32); ``full`` is ``small``.
"""
from __future__ import annotations

import math
import time
import types
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LMConfig:
    """Sizes of a :class:`MusicLM`."""

    num_codebooks: int = 4  # K parallel token streams
    bins: int = 2048  # codebook size; token id ``bins`` is the special (start / gap) token
    dim: int = 1024  # model width
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096  # hidden width of the feed-forward
    cross_attention: bool = True  # False: an unconditional LM (no cross-attention weights)
    condition_mode: str = "cross"  # "cross": cross-attention to cond; "prepend": cond is a prefix
    #                                (MusicGen-melody; no cross-attention weights, cross_attention ignored)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    max_period: float = 10_000.0  # of the sinusoidal positions
    # prepend mode, how the melody is read: "prefix" (MusicGen-melody: the chroma rows are prefix rows) or
    # "add" (frame-aligned: the first ``melody_rows`` rows of ``cond`` are the chroma, and row
    # ``floor(max(s - 1, 0) / melody_ratio)`` is added to token step ``s``; see :func:`melody_index`)
    melody_mode: str = "prefix"
    melody_rows: int = 0  # "add": chroma rows at the head of cond (one training segment's chroma frames)
    melody_ratio: float = 0.0  # "add": token frames per chroma frame (50 Hz / 7.8125 Hz = 6.4)
    # a beat clock (ours, not MusicGen's): the phase of a stated tempo's beats, added to every step's
    # input through a learned map (:func:`clock_features`); ``forward(..., clock=...)``
    beat_clock: bool = False
    # a key condition (ours; needs beat_clock): the clock carries the clip's key after its two beat
    # columns, ``clock[B, 2 + KEY_FEATURES]`` (:func:`key_features`), added to every step through a
    # learned map that starts at zero
    key_condition: bool = False

    @property
    def special(self) -> int:
        return self.bins

    @property
    def has_cross_attention(self) -> bool:
        """Whether the blocks hold cross-attention layers."""
        return self.cross_attention and self.condition_mode == "cross"

    def to_dict(self) -> dict:
        return asdict(self)


LM_PRESETS: dict[str, LMConfig] = {
    "tiny": LMConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256),
    "lite": LMConfig(dim=256, num_layers=6, num_heads=8, ffn_dim=1024),
    "small": LMConfig(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "medium": LMConfig(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144),
    "large": LMConfig(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192),
}
LM_PRESETS["full"] = LM_PRESETS["small"]


def lm_config(name: str = "tiny", **overrides) -> LMConfig:
    """The preset ``name`` (tiny | lite | full | small | medium | large), with fields overridden."""
    if name not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; choose from: {', '.join(LM_PRESETS)}")
    unknown = sorted(set(overrides) - set(LMConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"LMConfig has no field {unknown[0]!r}")
    return replace(LM_PRESETS[name], **overrides)


def melody_index(steps: torch.Tensor, melody_rows: int, melody_ratio: float) -> torch.Tensor:
    """Frame-aligned melody (``melody_mode="add"``): token steps ``[...]`` -> the chroma row each one reads.

    Step ``s`` of the pattern sequence carries the tokens of frame ``s - 1`` (step 0 is the
    start token), and chroma row ``i`` covers token frames ``[i * ratio, (i + 1) * ratio)``; so
    ``floor(max(s - 1, 0) / ratio)``, clamped to the last row (a chroma shorter than the
    sequence holds its last row)."""
    return ((steps - 1).clamp(min=0) / melody_ratio).floor().long().clamp(max=melody_rows - 1)


CLOCK_PERIODS = (0.5, 1.0, 2.0, 4.0)  # beats: the half beat, the beat, two beats, a bar of four
CLOCK_FEATURES = 2 * len(CLOCK_PERIODS) + 1  # sin and cos per period, and 1 where a clock is given
CLOCK_PATTERNS = ("delay", "parallel")  # the clock counts one step per frame: patterns that keep to that


def beat_clock(bpm, frame_rate: float, start_frame=0) -> torch.Tensor:
    """Rows of the ``clock[B, 2]`` that :meth:`MusicLM.forward` takes: ``(beats per step, beats
    at step 0)`` for tempos ``bpm`` (a number or one per row; None, 0 or NaN: no clock for that
    row, the row ``(0, 0)``), with the first step at token frame ``start_frame`` (a number or
    one per row) of a clip whose beats start at its time 0. Step ``s`` predicts (codebook 0 of)
    frame ``start_frame + s``, at ``(start_frame + s) / frame_rate`` seconds: beat
    ``(start_frame + s) * bpm / 60 / frame_rate``."""
    bpm = [bpm] if bpm is None or isinstance(bpm, (int, float)) else list(bpm)
    bpm = torch.tensor([float(b) if b is not None and math.isfinite(float(b)) and float(b) > 0 else 0.0
                        for b in bpm], dtype=torch.float64)
    start = torch.as_tensor(start_frame, dtype=torch.float64).expand_as(bpm)
    per_step = bpm / 60.0 / frame_rate
    return torch.stack([per_step, per_step * start], dim=1)  # (B, 2), fp64: the phase stays exact for hours


KEY_FEATURES = 2 + 12  # major, minor, then the tonic's pitch class one-hot; all zeros: no key


def key_features(keys) -> torch.Tensor:
    """``keys``: one ``(tonic, mode)`` per row (tonic 0-11 or None, mode "major" / "minor" or
    None) -> ``[B, KEY_FEATURES]`` fp64, the columns a key-conditioned LM's clock carries after
    its two beat columns (``torch.cat([beat_clock(...), key_features(...)], 1)``). An unknown
    tonic or mode leaves its columns at zero; ``(None, None)``: no key."""
    out = torch.zeros(len(keys), KEY_FEATURES, dtype=torch.float64)
    for r, (tonic, mode) in enumerate(keys):
        if mode is not None:
            if mode not in ("major", "minor"):
                raise ValueError(f"mode must be 'major', 'minor' or None, got {mode!r}")
            out[r, 0 if mode == "major" else 1] = 1.0
        if tonic is not None:
            if isinstance(tonic, bool) or not isinstance(tonic, int) or not 0 <= tonic < 12:
                raise ValueError(f"tonic must be a pitch class 0-11 or None, got {tonic!r}")
            out[r, 2 + tonic] = 1.0
    return out


def clock_features(clock: torch.Tensor, steps: torch.Tensor, periods: torch.Tensor | None = None) -> torch.Tensor:
    """``clock[B, 2]`` (:func:`beat_clock`) at token steps ``steps[S]`` -> ``[B, S, CLOCK_FEATURES]``:
    ``sin, cos(2 pi beats / p)`` for the periods ``p`` of :data:`CLOCK_PERIODS` (in beats) and a
    1; all zeros for a row without a clock (beats per step 0). Computed in fp64 for the
    phase (a float32 beat count grows coarser as the clip goes on), returned in fp32. ``periods``:
    :data:`CLOCK_PERIODS` as a tensor on the device (made here if not given; a CUDA graph
    cannot copy a new one from the host)."""
    beats = clock[:, 1:2].double() + steps.double().view(1, -1) * clock[:, 0:1].double()  # (B, S)
    if periods is None:
        periods = torch.tensor(CLOCK_PERIODS, dtype=torch.float64, device=clock.device)
    periods = periods.double()
    angles = 2 * math.pi * torch.remainder(beats.unsqueeze(-1) / periods, 1.0)  # (B, S, P)
    on = (clock[:, 0] > 0).view(-1, 1, 1).double()
    feats = torch.cat([angles.sin(), angles.cos(), torch.ones_like(beats).unsqueeze(-1)], dim=-1) * on
    return feats.float()


def sinusoidal_positions(positions: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """MusicGen's position embedding: ``positions[S]`` -> ``[S, dim]`` as ``[cos | sin]``.

    Frequencies ``max_period ** (-i / (dim/2 - 1))`` for ``i < dim/2``: the first half of the
    vector holds the cosines, the second the sines (audiocraft and transformers agree).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32)
                      * (-math.log(max_period) / (half - 1)))
    angles = positions.float().unsqueeze(1) * freqs  # (S, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (S, dim)


class Linear(nn.Linear):
    """``nn.Linear`` without bias, with a choice of CPU kernels for the few rows of a decoding step.

    Which kernel streams a matrix fastest past one or two vectors depends on the CPU, so a
    :class:`MusicLM` measures its candidates once (:meth:`MusicLM.tune_decode_kernel`) and sets
    :attr:`decode_kernel` on all its projections (``DECODE_KERNELS``):

    - ``"linear"``: ``F.linear`` (PyTorch's own path, as transformers uses it); the default,
      and the only kernel for anything but a decoding step's few rows on a CPU;
    - ``"wx"`` (fp32): ``W @ x^T``, a matrix times a few vectors, which MKL runs on a
      different path than ``x @ W^T``;
    - ``"packed"`` (bf16, no gradient): the weight packed once into oneDNN's preferred layout
      (cached per parameter version), and fc1's GELU fused into the same call
      (:func:`linear_gelu`).

    Measured on two 2-core cloud hosts (2 rows x 24 separate 4096 x 1024 weights, as
    ``musicgen-lite bench lm``'s roofline probe): on an AMD EPYC with AVX512-BF16, ``"wx"``
    streamed fp32 at 19 against 7 GB/s for ``"linear"`` (one thread) and packing sped bf16
    up; on an Intel Cascade Lake (no AVX512-BF16), ``"linear"`` streamed 15 against 7 GB/s,
    and packing kept the plain layout and slowed bf16 down (0.92 against 1.4 ms a matrix).
    Same result up to rounding, same state-dict names.
    """

    decode_kernel = "linear"  # set per module by MusicLM.set_decode_kernel / tune_decode_kernel

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def _packed_bf16(self):
        """The bf16 weight in oneDNN's blocked layout (:func:`_pack_bf16`)."""
        return _pack_bf16(self, "_packed", [self.weight])

    def _bf16_step(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor | None:
        """``x @ W^T`` (then ``activation``, oneDNN's name: ``"none"`` or ``"gelu"``) through the
        packed weight, for a decoding step's few rows in bf16 on a CPU without gradients when this
        module's kernel is ``"packed"``; None where that path does not apply."""
        if (self.decode_kernel == "packed" and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and self.weight.dtype == torch.bfloat16 and x.numel() <= 8 * self.in_features
                and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):  # a compiled step: inductor packs its own weights
            packed = self._packed_bf16()
            if packed is not None:
                return _packed_linear(x, packed, self.out_features, activation)
        return None

    def __getstate__(self):  # copies and pickles leave the packed cache behind
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.decode_kernel
        if kernel == "wx" and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 \
                and x.numel() <= 8 * self.in_features and not torch.compiler.is_compiling():
            flat = x.reshape(-1, self.in_features)
            # contiguous: attention kernels want unit-stride rows (else SDPA takes its slow path)
            return (self.weight @ flat.T).T.contiguous().view(*x.shape[:-1], self.out_features)
        y = self._bf16_step(x)  # None unless the kernel is "packed" and applies
        return y if y is not None else F.linear(x, self.weight)


# the decoding kernels :meth:`MusicLM.tune_decode_kernel` chooses among, per weight dtype (CPU);
# the first is the plain path, kept unless another is clearly faster (KERNEL_MARGIN)
DECODE_KERNELS = {torch.float32: ("linear", "wx"), torch.bfloat16: ("linear", "packed")}
KERNEL_MARGIN = 0.9  # another kernel must take under 90% of the plain one's time
_TUNED: dict[tuple, dict[str, float]] = {}  # this process's measurements, per MusicLM._tuning_key


def _pack_bf16(owner: nn.Module, slot: str, weights: list[torch.Tensor]):
    """``weights`` stacked along the output rows, in oneDNN's blocked layout for a few-row bf16
    matmul, cached in ``owner.__dict__[slot]`` and packed again only when a weight changes
    (its version, storage or identity). None where this PyTorch build cannot pack, or for a
    weight created under ``torch.inference_mode``, which keeps no version to notice in-place
    edits by: cast models outside it."""
    if any(w.is_inference() for w in weights):
        return None
    key = tuple((w._version, w.data_ptr(), w.dtype) for w in weights)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key or any(a is not b for a, b in zip(cached[2], weights)):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), 2)
        except (AttributeError, RuntimeError):
            packed = None
        cached = owner.__dict__[slot] = (key, packed, list(weights))
    return cached[1]


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, activation: str = "none"):
    """``x[..., in]`` through a :func:`_pack_bf16` weight (one oneDNN call, ``activation`` fused)."""
    algorithm = "none" if activation == "gelu" else ""  # GELU's exact (erf) form, as F.gelu
    flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, activation, [], algorithm)
    return flat.view(*x.shape[:-1], out_features)


def linear_gelu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu(linear(x))``; in bf16 on a CPU for a decoding step's few rows, one oneDNN call
    with the GELU applied to the fp32 accumulator (saves a pass and a rounding: 25 against
    38 us for the lite 256 -> 1024 projection, 2 rows, 2 threads)."""
    y = linear._bf16_step(x, "gelu") if isinstance(linear, Linear) else None
    return y if y is not None else F.gelu(linear(x))


class KVCache:
    """Preallocated keys and values of every layer, for step-by-step decoding.

    ``self_k[i]`` / ``self_v[i]``: ``[B, H, max_len, hd]``, written in place at positions
    ``pos .. pos + S`` by each forward; ``pos`` counts the positions already seen. Each layer's
    is a tensor of its own (not a view of one stack): a compiled step
    (:meth:`MusicLM.compiled_decode_step`) then writes one row in place, where a view of a
    stack made it copy the whole stack every step. The
    cross-attention keys and values (and the condition mask) are filled at the first
    forward that brings a condition, and reused by every later step.
    """

    def __init__(self, config: LMConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        H, hd = config.num_heads, config.dim // config.num_heads
        shape = (batch, H, max_len, hd)
        self.self_k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.self_v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * config.num_layers
        self.cross_mask: torch.Tensor | None = None  # (B, 1, 1, L) bool, or None: attend to all
        self.cross_gate: torch.Tensor | None = None  # (B, 1, 1) 0 where no condition token is valid
        self.cross_bias: torch.Tensor | None = None  # cross_mask as an additive float mask (the lean step's)
        self.cross_folded: list | None = None  # per layer, the lean step's folded cross-attention
        self.batch, self.max_len, self.pos = batch, max_len, 0
        self.prefix = 0  # positions taken by a prepended condition (prepend mode), counted in pos
        self.melody: torch.Tensor | None = None  # melody_mode "add": the chroma rows [B, melody_rows, D]
        self.clock: torch.Tensor | None = None  # beat_clock: the rows' clock [B, 2] (beat_clock())
        self.key_bias: torch.Tensor | None = None  # key_condition: the key's map [B, 1, D], the same every step

    @property
    def tokens(self) -> int:
        """Token positions seen so far (``pos`` without the condition prefix)."""
        return self.pos - self.prefix

    def reset(self) -> None:
        self.pos = self.prefix = 0
        self.melody = self.clock = self.key_bias = None
        self.cross = [None] * len(self.cross)
        self.cross_mask = self.cross_gate = self.cross_bias = self.cross_folded = None


def _cross_mask(cond_mask: torch.Tensor | None, B: int, L: int):
    """``cond_mask[B, L]`` -> (SDPA mask ``[B, 1, 1, L]`` bool, gate ``[B, 1, 1]``) or (None, None).

    A row without any valid token (the null condition of classifier-free guidance) would
    make softmax over nothing (NaN); it attends to everything instead and its output is
    gated to zero: a missing condition contributes nothing.
    """
    if cond_mask is None:
        return None, None
    if cond_mask.shape != (B, L):
        raise ValueError(f"cond_mask must be [B={B}, L={L}], got {list(cond_mask.shape)}")
    valid = cond_mask.bool()
    has_any = valid.any(dim=1)  # (B,)
    if bool(has_any.all()):
        return valid.view(B, 1, 1, L), None
    valid = valid | ~has_any.unsqueeze(1)
    return valid.view(B, 1, 1, L), has_any.view(B, 1, 1)


def attention(q, k, v, mask=None, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except for one query row in bf16 / fp16 on a CPU
    against 32 keys or more (a decoding step): there it is computed in fp32, two matrix
    products and a softmax.

    PyTorch's CPU kernel for that case grows far faster with the keys than the work does:
    one step of 2 x 16 heads x 64 dims in bf16 took 445 us against 136 this way at 250 keys,
    and 1,780 against 408 at 1,000 (2 threads): at 30 s of context the kernel's attention would
    cost more than the weights. Upcast, the result is as close to exact attention as the
    kernel's (max error 9.6e-4 against 9.9e-4 at 250 keys). fp32 inputs are left to the
    kernel (as fast or faster).
    ``mask``: bool, True where a key may be seen, or a float mask added to the scores
    (broadcast like SDPA's).
    """
    if (q.shape[-2] == 1 and k.shape[-2] >= 32 and not causal and dropout_p == 0.0 and q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16)):
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (..., 1, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; q, k, v from one fused projection."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.H, self.dim = config.num_heads, config.dim
        self.qkv = Linear(config.dim, 3 * config.dim)
        self.proj = Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                static: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        mask, causal = None, True
        if static is not None:  # static shapes (MusicLM.decode_step): S = 1, written at a device position
            pos, visible = static  # (1,) long; (1, 1, 1, max_len) bool: positions <= pos
            cache.self_k[layer].index_copy_(2, pos, k)
            cache.self_v[layer].index_copy_(2, pos, v)
            k, v, mask, causal = cache.self_k[layer], cache.self_v[layer], visible, False  # (B, H, max_len, hd)
        elif cache is not None:
            p = cache.pos
            if p + S > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {p} used, {S} more asked")
            cache.self_k[layer][:, :, p:p + S] = k
            cache.self_v[layer][:, :, p:p + S] = v
            k, v = cache.self_k[layer][:, :, :p + S], cache.self_v[layer][:, :, :p + S]  # (B, H, p+S, hd)
            if S == 1:  # one new position sees everything cached: no mask at all
                causal = False
            elif p > 0:  # a block after a prefix: position i sees the prefix and block[:i+1]
                causal = False
                mask = torch.ones(S, p + S, dtype=torch.bool, device=x.device).tril(diagonal=p)
        y = attention(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class CrossAttention(nn.Module):
    """Attention from the sequence to the condition states ``cond[B, L, dim]``, padding masked."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.H, self.dim = config.num_heads, config.dim
        self.q = Linear(config.dim, config.dim)
        self.kv = Linear(config.dim, 2 * config.dim)
        self.proj = Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def keys_values(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, D = cond.shape
        k, v = self.kv(cond).view(B, L, 2, self.H, D // self.H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, hd)
        return k, v

    def forward(self, x, k, v, mask=None, gate=None) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.H, D // self.H).transpose(1, 2)  # (B, H, S, hd)
        y = attention(q, k, v, mask, False, self.dropout if self.training else 0.0)
        y = self.proj(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)
        return y if gate is None else y * gate.to(y.dtype)


class Block(nn.Module):
    """Pre-norm block: x + SelfAttn(LN x); x + CrossAttn(LN x, cond); x + FFN(LN x)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = SelfAttention(config)
        if config.has_cross_attention:
            self.norm_cross = nn.LayerNorm(config.dim, eps=config.norm_eps)
            self.cross = CrossAttention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.fc1 = Linear(config.dim, config.ffn_dim)
        self.fc2 = Linear(config.ffn_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cross_kv=None, mask=None, gate=None, cache=None, layer=0, static=None):
        x = x + self.dropout(self.attn(self.norm1(x), cache, layer, static))
        if cross_kv is not None:
            x = x + self.dropout(self.cross(self.norm_cross(x), *cross_kv, mask, gate))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class MusicLM(nn.Module):
    """The multi-stream decoder. ``forward(seq[B, K, S], cond, cond_mask) -> logits[B, K, S, bins]``."""

    lean_decode = True  # one-position cached steps without gradients take _lean_blocks (False: the modules)

    def __init__(self, config: LMConfig | None = None):
        super().__init__()
        self.config = config = config or LMConfig()
        if config.dim % config.num_heads or config.dim % 2:
            raise ValueError(f"dim {config.dim} must be even and divisible by num_heads {config.num_heads}")
        if config.condition_mode not in ("cross", "prepend"):
            raise ValueError(f"condition_mode must be 'cross' or 'prepend', got {config.condition_mode!r}")
        if config.melody_mode not in ("prefix", "add"):
            raise ValueError(f"melody_mode must be 'prefix' or 'add', got {config.melody_mode!r}")
        if config.melody_mode == "add" and (config.condition_mode != "prepend" or config.melody_rows < 1
                                            or not config.melody_ratio > 0):
            raise ValueError("melody_mode='add' needs condition_mode='prepend', melody_rows >= 1 and melody_ratio > 0, "
                             f"got {config.condition_mode!r}, {config.melody_rows}, {config.melody_ratio}")
        self.emb = nn.ModuleList(nn.Embedding(config.bins + 1, config.dim) for _ in range(config.num_codebooks))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.heads = nn.ModuleList(Linear(config.dim, config.bins)
                                   for _ in range(config.num_codebooks))
        # the beat clock's map into the stream; zero at init, so adding it to a trained LM changes nothing
        self.beat = Linear(CLOCK_FEATURES, config.dim) if config.beat_clock else None
        if config.key_condition and not config.beat_clock:
            raise ValueError("key_condition rides on the beat clock's input: it needs beat_clock=True")
        self.key = Linear(KEY_FEATURES, config.dim) if config.key_condition else None  # zero at init too
        self.register_buffer("clock_periods", torch.tensor(CLOCK_PERIODS), persistent=False)  # exact in bf16
        self._pos_table: torch.Tensor | None = None  # a cache, not state: see positions()
        self.reset_parameters()

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, 1/sqrt(dim)); the projections back into the residual stream (attention
        output, fc2) of block ``i`` further divided by sqrt(2 (i + 1)), so that the residual
        stream's variance grows slowly with depth (audiocraft's "current" depthwise init)."""
        std = self.config.dim ** -0.5
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        for i, block in enumerate(self.blocks):
            out = [block.attn.proj, block.fc2] + ([block.cross.proj] if self.config.has_cross_attention else [])
            for linear in out:
                nn.init.normal_(linear.weight, std=std / math.sqrt(2 * (i + 1)))
        for clock_map in (self.beat, self.key):
            if clock_map is not None:
                nn.init.zeros_(clock_map.weight)

    def positions(self, n: int, device) -> torch.Tensor:
        """The first ``n`` (at least) rows of the position table ``[n, dim]``, fp32, computed once
        per device and grown by doubling: a decoding step then costs a slice, not cos/sin."""
        table = self._pos_table
        if table is None or table.shape[0] < n or table.device != torch.device(device):
            size = max(n, 2 * table.shape[0] if table is not None else 1024)
            table = sinusoidal_positions(torch.arange(size, device=device), self.config.dim, self.config.max_period)
            self._pos_table = table
        return table

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ decoding kernels
    @property
    def decode_kernel(self) -> str:
        """The kernel the projections use for a decoding step's few rows (:class:`Linear`):
        ``"linear"``, ``"wx"`` (fp32) or ``"packed"`` (bf16)."""
        return self.heads[0].decode_kernel if type(self.heads[0]) is Linear else "linear"

    def set_decode_kernel(self, kernel: str = "auto") -> None:
        """Pin the decoding kernel of every projection (``"linear"``, ``"wx"``, ``"packed"``; a
        kernel meant for another dtype falls back to ``"linear"``), or ``"auto"`` (the default):
        measure the candidates of the weights' dtype at the first decoding step on a CPU
        (:meth:`tune_decode_kernel`), and again after a cast or a change of thread count.
        Pin a kernel for bit-exact reruns across processes: kernels round differently in fp32."""
        names = {"auto"} | {k for ks in DECODE_KERNELS.values() for k in ks}
        if kernel not in names:
            raise ValueError(f"kernel must be one of {sorted(names)}, got {kernel!r}")
        self.__dict__["_kernel_mode"] = kernel
        self.__dict__.pop("_kernel_for", None)
        self._apply_decode_kernel("linear" if kernel == "auto" else kernel)

    def _apply_decode_kernel(self, kernel: str, free: bool = True) -> None:
        for module in self.modules():
            if type(module) is Linear:
                module.decode_kernel = kernel
                if kernel != "packed" and free:
                    module.__dict__.pop("_packed", None)  # free the packed copies
        if kernel != "packed" and free:
            self.__dict__.pop("_heads_packed", None)

    def _ensure_decode_kernel(self, x: torch.Tensor) -> None:
        """Tune at the first decoding step of ``x``'s dtype and this thread count (``"auto"``)."""
        if (not torch.compiler.is_compiling() and x.device.type == "cpu"
                and self.__dict__.get("_kernel_mode", "auto") == "auto"
                and self.__dict__.get("_kernel_for") != (x.dtype, torch.get_num_threads())):
            self.tune_decode_kernel(rows=x.shape[0] * x.shape[1])

    def _tuning_key(self, rows: int) -> tuple:
        """What a kernel measurement holds for: device, dtype, rows, threads and the projections' shapes."""
        weight = self.emb[0].weight
        return (weight.device.type, weight.dtype, rows, torch.get_num_threads(),
                tuple(tuple(m.weight.shape) for m in self.modules() if type(m) is Linear))

    @torch.no_grad()
    def tune_decode_kernel(self, rows: int = 2, rounds: int = 3) -> dict[str, float]:
        """Time each candidate kernel of the weights' dtype (``DECODE_KERNELS``) on this model's
        own projections, as a decoding step runs them (``rows`` rows through every block's
        qkv, output, fc1 + GELU and fc2 projections, then the heads: the weights streamed from
        memory as a step streams them), ``rounds`` times in turn after one untimed pass; keep
        the fastest (the plain ``"linear"`` unless another takes under ``KERNEL_MARGIN`` of its
        time) and set it on every projection. Returns the best seconds of a pass per kernel.
        Measured once per process for each device, dtype, row count, thread count and set of shapes,
        so models of one architecture agree; inputs are constant (the random state is left
        alone). Only the CPU has candidates."""
        weight = self.emb[0].weight  # the model's dtype and device (int8 heads have no weight tensor)
        dtype, threads = weight.dtype, torch.get_num_threads()
        kernels = DECODE_KERNELS.get(dtype, ("linear",)) if weight.device.type == "cpu" else ("linear",)
        key = self._tuning_key(rows)
        times = _TUNED.get(key)
        if times is None:
            times = {kernels[0]: 0.0}
            if len(kernels) > 1:
                x = torch.ones(rows, 1, self.config.dim, dtype=dtype, device=weight.device)

                def one_pass():
                    for block in self.blocks:
                        block.attn.qkv(x), block.attn.proj(x), block.fc2(linear_gelu(block.fc1, x))
                    self._heads(x)

                times = {k: float("inf") for k in kernels}
                for r in range(rounds + 1):
                    for k in kernels:
                        self._apply_decode_kernel(k, free=False)  # packed once, kept until the choice
                        start = time.perf_counter()
                        one_pass()
                        if r:  # the first round packs weights: untimed
                            times[k] = min(times[k], time.perf_counter() - start)
            _TUNED[key] = times
        plain, best = kernels[0], min(kernels, key=times.get)
        self._apply_decode_kernel(best if times[best] < KERNEL_MARGIN * times[plain] else plain)
        self.__dict__["_kernel_for"] = (dtype, threads)
        return dict(times)

    # ----------------------------------------------------------------------------- forward
    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, clock: torch.Tensor | None = None) -> torch.Tensor:
        """``seq[B, K, S]`` token ids (``bins`` = special) -> ``logits[B, K, S, bins]``.

        ``cond[B, L, dim]``: condition states for cross-attention (None: unconditional);
        ``cond_mask[B, L]``: True / 1 for valid condition tokens (None: all valid). A row with
        no valid token is the null condition: its cross-attention adds nothing.
        In prepend mode ``cond`` is the prefix (``cond_mask`` only zeroes padded states, which
        stay in the sequence); the logits are still those of the ``S`` token positions.
        ``cache``: decode with a :class:`KVCache`; ``seq`` then holds the new positions only
        (positions ``cache.pos ..``), and the condition is read at the first call only.
        ``last_only``: apply the heads to the last position only (``S`` = 1 in the output),
        what a decoding step needs after a long prefill.
        ``clock[B, 2]`` (an LM with ``beat_clock``; :func:`beat_clock`): each row's beat clock,
        whose features (:func:`clock_features`) go through ``self.beat`` and are added to every
        token step; a row ``(0, 0)`` or ``clock=None``: no clock. With a cache it is read at the
        first call and kept for the later steps. An LM with ``key_condition`` takes
        ``clock[B, 2 + KEY_FEATURES]``: the key's columns (:func:`key_features`) after the beat's.
        """
        cfg = self.config
        if seq.dim() != 3 or seq.shape[1] != cfg.num_codebooks:
            raise ValueError(f"seq must be [B, K={cfg.num_codebooks}, S], got {list(seq.shape)}")
        B, K, S = seq.shape
        start = cache.pos if cache is not None else 0
        x = sum(self.emb[k](seq[:, k]) for k in range(K))  # (B, S, D)
        if cfg.melody_mode == "add":  # the chroma rows leave cond and are added to the steps they describe
            x, cond, cond_mask = self._add_melody(x, cond, cond_mask, cache, start)
        if clock is not None or (cache is not None and cache.clock is not None):
            x = self._add_clock(x, clock, cache, start)

        prefix = 0  # prepend mode: the condition goes before the tokens, once (first call with a cache)
        if cfg.condition_mode == "prepend" and cond is not None and start == 0:
            if cond.dim() != 3 or cond.shape[0] != B or cond.shape[2] != cfg.dim:
                raise ValueError(f"cond must be [B={B}, L, dim={cfg.dim}], got {list(cond.shape)}")
            cond = cond.to(x.dtype)
            if cond_mask is not None:
                if cond_mask.shape != cond.shape[:2]:
                    raise ValueError(f"cond_mask must be [B={B}, L={cond.shape[1]}], got {list(cond_mask.shape)}")
                cond = cond * cond_mask.unsqueeze(-1).to(x.dtype)  # padding: zero states, still attended
            prefix = cond.shape[1]
            x = torch.cat([cond, x], dim=1)  # (B, L + S, D)
            if cache is not None:
                cache.prefix = prefix
        n = x.shape[1]
        x = x + self.positions(start + n, seq.device)[start:start + n].to(x.dtype)

        # condition: keys/values per layer, from the cache after the first step
        cross, mask, gate = [None] * cfg.num_layers, None, None
        if cfg.has_cross_attention:
            if cache is not None and cache.cross[0] is not None:
                cross, mask, gate = cache.cross, cache.cross_mask, cache.cross_gate
            elif cond is not None:
                if cond.dim() != 3 or cond.shape[0] != B or cond.shape[2] != cfg.dim:
                    raise ValueError(f"cond must be [B={B}, L, dim={cfg.dim}], got {list(cond.shape)}")
                cond = cond.to(x.dtype)
                mask, gate = _cross_mask(cond_mask, B, cond.shape[1])
                cross = [block.cross.keys_values(cond) for block in self.blocks]
                if cache is not None:
                    cache.cross, cache.cross_mask, cache.cross_gate = cross, mask, gate
        elif cond is not None and cfg.condition_mode == "cross":
            raise ValueError("this LM has no cross-attention (config.cross_attention=False); pass cond=None")

        if cache is not None and n == 1 and self.lean_decode and not self.training and not torch.is_grad_enabled():
            self._ensure_decode_kernel(x)
            x = self._lean_blocks(x, cross, mask, gate, cache)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, cross[i], mask, gate, cache, i)
        if cache is not None:
            cache.pos += n
        return self._heads(self.out_norm(x[:, -1:] if last_only else x[:, prefix:]))  # token positions only

    def _lean_blocks(self, x: torch.Tensor, cross, mask, gate, cache: KVCache) -> torch.Tensor:
        """The blocks for one new position ``x[B, 1, D]`` after the cache's ``cache.pos``: the
        same computation as the modules' (:class:`Block`), written as one flat loop of tensor
        operations for inference. A decoding step of a small LM is bound by the number of
        operations, not by the bytes of its weights. This drops the module calls, the dropouts
        and the head reshuffles; fuses fc1's GELU into its oneDNN call (bf16); reads the
        condition mask as an additive float mask made once per generation (SDPA converts a
        bool mask on every call); and folds the cross-attention's projections into the
        condition (:meth:`_folded_cross`)."""
        B, _, D = x.shape
        H, p = self.config.num_heads, cache.pos
        if p + 1 > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {p} used, 1 more asked")
        bias = None
        if mask is not None:
            if cache.cross_bias is None or cache.cross_bias.dtype != x.dtype:
                cache.cross_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~mask, float("-inf"))
            bias = cache.cross_bias
        for i, block in enumerate(self.blocks):
            n1, attn = block.norm1, block.attn
            h = F.layer_norm(x, (D,), n1.weight, n1.bias, n1.eps)
            q, k, v = attn.qkv.forward(h).view(B, 3, H, 1, D // H).unbind(1)  # 3 x (B, H, 1, hd)
            cache.self_k[i][:, :, p:p + 1] = k
            cache.self_v[i][:, :, p:p + 1] = v
            y = attention(q, cache.self_k[i][:, :, :p + 1], cache.self_v[i][:, :, :p + 1])  # one query: no mask
            x = x + attn.proj.forward(y.reshape(B, 1, D))  # (B, H, 1, hd) -> (B, 1, D): heads in order
            if cross[i] is not None:
                nc, ca = block.norm_cross, block.cross
                h = F.layer_norm(x, (D,), nc.weight, nc.bias, nc.eps)
                folded = self._folded_cross(i, cross[i], bias, cache)
                if folded is not None:  # scores = (K Wq) h, out = p (V Wproj^T): two small products, fp32
                    kq, vp, b = folded  # (B, H*L, D), (B, H*L, D), (B, H*L, 1)
                    scores = torch.baddbmm(b, kq, h.float().transpose(1, 2)).view(B, H, -1)  # (B, H, L)
                    y = torch.bmm(scores.softmax(dim=-1).view(B, 1, -1), vp).to(x.dtype)  # (B, 1, D)
                else:
                    y = ca.proj.forward(attention(ca.q.forward(h).view(B, H, 1, D // H), *cross[i], bias)
                                        .reshape(B, 1, D))
                x = x + (y if gate is None else y * gate.to(y.dtype))
            n2 = block.norm2
            x = x + block.fc2.forward(linear_gelu(block.fc1, F.layer_norm(x, (D,), n2.weight, n2.bias, n2.eps)))
        return x

    def _folded_cross(self, i: int, kv, bias, cache: KVCache):
        """Block ``i``'s cross-attention with its query and output projections folded into the
        condition's keys and values, once per generation: ``(K_h Wq_h / sqrt(hd), V_h Wproj_h^T,
        mask)`` over all heads as ``[B, H*L, D]`` fp32 matrices (Wq_h: the query projection's
        rows of head h; Wproj_h: the output projection's columns). One step then costs two small
        batched products and a softmax instead of two projections and an attention call: the
        same arithmetic regrouped (exact in real numbers; in fp32, so a bf16 model only gains
        accuracy). Worth it while the condition is short, ``L <= hd`` (then ``H*L*D <= D*D``,
        fewer multiplies than the two projections); None otherwise, or when the projections
        are not plain :class:`Linear` (int8)."""
        k, v = kv  # (B, H, L, hd)
        B, H, L, hd = k.shape
        ca = self.blocks[i].cross
        if L > hd or not (type(ca.q) is Linear and type(ca.proj) is Linear):
            return None
        if cache.cross_folded is None:
            cache.cross_folded = [None] * len(self.blocks)
        folded = cache.cross_folded
        if folded[i] is None or folded[i][0] is not k:
            D = H * hd
            kq = torch.einsum("bhlj,hjd->bhld", k.float(), ca.q.weight.float().view(H, hd, D)) * hd ** -0.5
            vp = torch.einsum("bhlj,ehj->bhle", v.float(), ca.proj.weight.float().view(D, H, hd))
            b = torch.zeros(B, H, L, 1, device=k.device) if bias is None else \
                bias.float().view(B, 1, L, 1).expand(B, H, L, 1)
            folded[i] = (k, (kq.reshape(B, H * L, D), vp.reshape(B, H * L, D), b.reshape(B, H * L, 1)))
        return folded[i][1]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, S, D]`` (normalised) -> ``logits[B, K, S, bins]``. In bf16 on a CPU for a
        decoding step's few rows with the ``"packed"`` kernel, the K heads are one packed matrix
        and one oneDNN call (packed once per weight version): K calls cost K call overheads."""
        B, S, D = x.shape
        if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and B * S <= 8 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()
                and all(type(h) is Linear and h.weight.dtype == torch.bfloat16 and h.decode_kernel == "packed"
                        for h in self.heads)):
            packed = _pack_bf16(self, "_heads_packed", [h.weight for h in self.heads])
            if packed is not None:
                K, bins = len(self.heads), self.heads[0].out_features
                return _packed_linear(x, packed, K * bins).view(B, S, K, bins).transpose(1, 2)  # (B, K, S, bins)
        return torch.stack([head(x) for head in self.heads], dim=1)  # (B, K, S, bins)

    def __getstate__(self):  # copies and pickles leave the packed heads and the compiled step behind
        state = dict(super().__getstate__())
        state.pop("_heads_packed", None)
        state.pop("_compiled_step", None)
        return state

    def _add_melody(self, x, cond, cond_mask, cache, start):
        """``melody_mode="add"``: split the chroma rows off ``cond`` (at the first call; kept in
        ``cache.melody`` for the decoding steps) and add to each token step of ``x`` the row it
        describes (:func:`melody_index`). Returns ``(x, cond, cond_mask)`` without the chroma
        rows (None when nothing else is left)."""
        cfg, rows = self.config, self.config.melody_rows
        if cond is not None and start == 0:
            if cond.dim() != 3 or cond.shape[0] != x.shape[0] or cond.shape[1] < rows:
                raise ValueError(f"melody_mode='add': cond must be [B={x.shape[0]}, L >= {rows}, dim] with the "
                                 f"{rows} chroma rows first, got {list(cond.shape)}")
            melody, cond = cond[:, :rows], cond[:, rows:]
            cond_mask = None if cond_mask is None else cond_mask[:, rows:]
            if cond.shape[1] == 0:
                cond = cond_mask = None
            if cache is not None:
                cache.melody = melody
        elif cache is not None and cache.melody is not None:
            melody = cache.melody
        else:  # no condition at all: an unconditional call
            return x, cond, cond_mask
        first = cache.tokens if cache is not None and start > 0 else 0  # token steps seen before this call
        steps = torch.arange(first, first + x.shape[1], device=x.device)
        return x + melody.index_select(1, melody_index(steps, rows, cfg.melody_ratio)).to(x.dtype), cond, cond_mask

    def _add_clock(self, x, clock, cache, start):
        """``x[B, S, D]`` (token steps) + the beat clock's map of each step's features. The clock
        comes with the first call (kept in ``cache.clock``) or from the cache afterwards."""
        if self.beat is None:
            raise ValueError("this LM has no beat clock (config.beat_clock=False); pass clock=None")
        if cache is not None and start > 0:
            if clock is not None:
                raise ValueError("the clock is given at the first call of a cached generation only")
            clock, first = cache.clock, cache.tokens
        else:
            first = 0
            width = self.clock_width
            if clock.dim() != 2 or clock.shape != (x.shape[0], width):
                what = "beats per step, beats at step 0" + (", the key's columns" if self.key is not None else "")
                raise ValueError(f"clock must be [B={x.shape[0]}, {width}] ({what}), got {list(clock.shape)}")
            clock = clock.to(x.device, torch.float64)
            if cache is not None:
                cache.clock, cache.key_bias = clock, None
        steps = torch.arange(first, first + x.shape[1], device=x.device)
        return self._key(x + self.beat(clock_features(clock, steps, self.clock_periods).to(x.dtype)), clock, cache)

    @property
    def clock_width(self) -> int:
        """Columns of the ``clock`` :meth:`forward` takes: 2, or ``2 + KEY_FEATURES`` with a key condition."""
        return 2 + (KEY_FEATURES if self.key is not None else 0)

    def _key(self, x, clock, cache: KVCache | None = None):
        """``x[B, S, D]`` + the key condition's map of the clock's key columns: the same at every
        step, so a cached generation computes it once (``cache.key_bias``)."""
        if self.key is None:
            return x
        bias = cache.key_bias if cache is not None else None
        if bias is None or bias.dtype != x.dtype:
            bias = self.key(clock[:, 2:].to(x.dtype)).unsqueeze(1)  # (B, 1, D)
            if cache is not None:
                cache.key_bias = bias
        return x + bias

    def decode_step(self, seq: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step with static shapes: ``seq[B, K, 1]`` at cache position ``pos`` -> ``logits[B, K, bins]``.

        The same computation as ``forward(seq, cache=cache, last_only=True)[:, :, -1]`` after a
        prefill, written so that it can be captured once in a CUDA graph and replayed for every
        step: ``pos`` is a ``(1,)`` long tensor on the model's device (not ``cache.pos``), the
        keys and values go to ``cache`` with ``index_copy_``, and attention reads all
        ``cache.max_len`` positions with a mask ``position <= pos`` (the rest is zeros or stale,
        and masked). Nothing here reads a tensor's value on the host. The caller advances
        ``pos`` (``cache.pos`` is left alone) and must have filled the condition (the
        cross-attention keys and values, or the prepended prefix) with an ordinary cached
        forward first: the prefill.
        """
        cfg = self.config
        if seq.dim() != 3 or seq.shape[1:] != (cfg.num_codebooks, 1):
            raise ValueError(f"seq must be [B, K={cfg.num_codebooks}, 1], got {list(seq.shape)}")
        if seq.shape[0] != cache.batch:
            raise ValueError(f"seq has {seq.shape[0]} rows, the cache {cache.batch}")
        x = sum(self.emb[k](seq[:, k]) for k in range(cfg.num_codebooks))  # (B, 1, D)
        self._ensure_decode_kernel(x)
        if cfg.melody_mode == "add" and cache.melody is not None:  # the chroma row of this step's frame
            row = melody_index(pos - cache.prefix, cfg.melody_rows, cfg.melody_ratio)  # (1,), on the device
            x = x + cache.melody.index_select(1, row).to(x.dtype)
        if cache.clock is not None:  # this step's beat phase (its token step: pos less the prefix)
            feats = clock_features(cache.clock, pos - cache.prefix, self.clock_periods)  # (B, 1, F)
            x = self._key(x + self.beat(feats.to(x.dtype)), cache.clock, cache)
        x = x + self.positions(cache.max_len, seq.device).index_select(0, pos).to(x.dtype)  # + (1, D)
        positions = torch.arange(cache.max_len, device=seq.device)
        visible = (positions <= pos).view(1, 1, 1, cache.max_len)  # this step sees the prefix and itself
        cross, mask, gate = [None] * cfg.num_layers, None, None
        if cfg.has_cross_attention and cache.cross[0] is not None:
            cross, mask, gate = cache.cross, cache.cross_mask, cache.cross_gate
        for i, block in enumerate(self.blocks):
            x = block(x, cross[i], mask, gate, cache, i, static=(pos, visible))
        return self._heads(self.out_norm(x))[:, :, 0]  # (B, K, bins)

    def compiled_decode_step(self) -> "CompiledStep":
        """:meth:`decode_step` compiled (:class:`CompiledStep`) for this model as it is now: the CPU's
        counterpart of the CUDA graph (``MusicGen.generate(..., fast=True, compile_step=True)``).
        Kept and reused while the weights stay the same (the same tensors, unchanged in place);
        compiled again when they are not, since the compiled step holds them as constants."""
        device = next(self.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"compiled_decode_step is for a model on the CPU (this one is on {device}); on CUDA "
                             "the CUDA graph does this: generate(..., fast=True)")
        step = self.__dict__.get("_compiled_step")
        if step is None or step.weights_key != CompiledStep.key(self):
            step = self.__dict__["_compiled_step"] = CompiledStep(self)
        return step

    def prefix_length(self, cond: torch.Tensor | None) -> int:
        """Positions that ``cond[B, L, D]`` takes before the first token: ``L`` in prepend mode
        (less the ``melody_rows`` chroma rows that ``melody_mode="add"`` adds to the steps instead),
        0 with cross-attention or no condition."""
        if cond is None or self.config.condition_mode != "prepend":
            return 0
        return cond.shape[1] - (self.config.melody_rows if self.config.melody_mode == "add" else 0)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` positions."""
        p = next(self.parameters())
        return KVCache(self.config, batch, max_len, device=p.device, dtype=p.dtype)

    # -------------------------------------------------------------------------------- loss
    def compute_loss(self, codes: torch.Tensor, pattern, cond=None, cond_mask=None, clock=None):
        """Teacher-forced cross-entropy of ``codes[B, K, T]`` under ``pattern``.

        Builds ``seq`` (special token at step 0 and in the pattern's gaps), reads
        ``seq[..., :-1]``, and maps the outputs back to frames with
        :meth:`Pattern.revert_logits`, so that every real token is scored exactly once and no
        gap is (nor a prefix position in prepend mode: :meth:`forward` returns token logits only). Returns ``(loss, per_codebook[K])``: the mean over codebooks, and each
        codebook's mean cross-entropy in nats. ``clock``: the beat clock (:meth:`forward`).
        """
        B, K, T = codes.shape
        seq, _ = pattern.build(codes, self.config.special)  # (B, K, S + 1)
        logits = self(seq[..., :-1], cond, cond_mask, clock=clock)  # (B, K, S, bins)
        per_token = pattern.revert_logits(logits, T)  # (B, K, T, bins)
        ce = F.cross_entropy(per_token.flatten(0, 2).float(), codes.flatten(), reduction="none")
        per_codebook = ce.view(B, K, T).mean(dim=(0, 2))  # (K,)
        return per_codebook.mean(), per_codebook


class CompiledStep:
    """``MusicLM.decode_step`` through ``torch.compile`` (inductor), for one model on a CPU.

    A decoding step of a small LM costs the dispatch of its operations more than their
    arithmetic (the lite LM: about 30 tensor operations a layer). Compiled, the step becomes
    generated C++ (the C++ wrapper: no Python between kernels) with the weights frozen in as
    constants and the element-wise work between the projections fused; in bf16 freezing also
    lets inductor pack every projection for oneDNN once (fp32 keeps plain matrix products). The first call compiles (about 20 s for the lite LM on 2
    cores) and needs a C++ compiler; so does each new shape (batch or cache length).

    The weights are constants of the compiled code, so this object belongs to one model and
    its weights as they were (:attr:`weights_key`; :meth:`MusicLM.compiled_decode_step`
    builds a new one when they change). It compiles a private copy of ``decode_step``'s code:
    torch.compile keeps its compiled versions per code object, and two models sharing one would
    share each other's frozen weights. ``fullgraph=True``: a graph break would compile part of
    the step under the shared code of a function it calls."""

    def __init__(self, lm: MusicLM):
        self.weights_key = self.key(lm)
        fn = MusicLM.decode_step
        private = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
        self._step = torch.compile(types.MethodType(private, lm), dynamic=False, fullgraph=True)
        self._eager = lm.decode_step
        import torch._inductor.config as inductor_config  # here, not at import: 1.3 s on 2 cores

        self._config = inductor_config  # read by inductor when a shape compiles

    @staticmethod
    def key(lm: nn.Module) -> tuple:
        """What the compiled code assumed of ``lm``'s weights: each tensor and its in-place version
        (None for a weight made under ``torch.inference_mode``, which keeps no version: an
        in-place edit of one goes unseen, so make models outside it)."""
        return tuple((id(p), None if p.is_inference() else p._version, p.data_ptr(), p.dtype)
                     for p in lm.parameters())

    def __call__(self, seq: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        config = self._config
        saved = config.freezing, config.cpp_wrapper
        config.freezing = config.cpp_wrapper = True  # read when a shape compiles (the first call, or a new shape)
        try:
            return self._step(seq, pos, cache)
        except Exception as error:  # a bad argument surfaces as a tracing error: let the eager step name it
            self._eager(seq, pos, cache)
            raise RuntimeError("torch.compile could not compile the decoding step (see above); "
                               "generate with compile_step=False") from error
        finally:
            config.freezing, config.cpp_wrapper = saved


# ------------------------------------------------------------------------- transformers port

def from_transformers_decoder(hf) -> MusicLM:
    """A :class:`MusicLM` holding the weights of transformers' ``MusicgenForCausalLM`` or
    ``MusicgenMelodyForCausalLM``.

    Names map one to one, except that we fuse q/k/v (self-attention) and k/v (cross-
    attention) into one projection each. The result computes the same logits (fp32,
    allclose) for the same ``seq``, ``encoder_hidden_states`` and mask. The melody decoder has
    no cross-attention: it becomes a ``condition_mode="prepend"`` LM, whose ``cond`` is the
    ``encoder_hidden_states`` transformers concatenates before the token embeddings.
    """
    c = hf.config
    if c.hidden_size % 2 or c.hidden_size % c.num_attention_heads:
        raise ValueError("unsupported MusicGen decoder size")
    if getattr(c, "activation_function", "gelu") != "gelu":
        raise ValueError(f"only the GELU feed-forward is supported, got {c.activation_function!r}")
    if getattr(c, "audio_channels", 1) != 1:
        raise ValueError("only mono MusicGen decoders are supported")
    dec = hf.model.decoder
    prepend = not hasattr(dec.layers[0], "encoder_attn")  # MusicGen-melody: the condition is a prefix
    config = LMConfig(num_codebooks=c.num_codebooks, bins=c.vocab_size, dim=c.hidden_size,
                      num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, ffn_dim=c.ffn_dim,
                      cross_attention=not prepend, condition_mode="prepend" if prepend else "cross", dropout=0.0)
    device = next(hf.parameters()).device
    with torch.device("meta"):  # no random init: every tensor is copied below
        lm = MusicLM(config)
    lm = lm.to_empty(device=device)
    lm.clock_periods.copy_(torch.tensor(CLOCK_PERIODS))  # a buffer, not a weight: to_empty left it unset
    with torch.no_grad():
        for ours, theirs in zip(lm.emb, dec.embed_tokens):
            ours.weight.copy_(theirs.weight)
        for block, layer in zip(lm.blocks, dec.layers):
            sa = layer.self_attn
            block.attn.qkv.weight.copy_(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]))
            block.attn.proj.weight.copy_(sa.out_proj.weight)
            norms = [(block.norm1, layer.self_attn_layer_norm), (block.norm2, layer.final_layer_norm)]
            if not prepend:
                ca = layer.encoder_attn
                block.cross.q.weight.copy_(ca.q_proj.weight)
                block.cross.kv.weight.copy_(torch.cat([ca.k_proj.weight, ca.v_proj.weight]))
                block.cross.proj.weight.copy_(ca.out_proj.weight)
                norms.append((block.norm_cross, layer.encoder_attn_layer_norm))
            for ours, theirs in norms:
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
                ours.eps = theirs.eps
            block.fc1.weight.copy_(layer.fc1.weight)
            block.fc2.weight.copy_(layer.fc2.weight)
        lm.out_norm.weight.copy_(dec.layer_norm.weight)
        lm.out_norm.bias.copy_(dec.layer_norm.bias)
        for ours, theirs in zip(lm.heads, hf.lm_heads):
            ours.weight.copy_(theirs.weight)
    return lm.to(next(hf.parameters()).dtype).eval()
