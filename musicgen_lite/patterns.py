"""Codebook interleaving patterns: how K parallel token streams become one LM sequence.

The codec turns audio into ``codes[B, K, T]``: K token streams (one per RVQ codebook) of T
frames each. A transformer predicts one sequence position per step, and at each position it
has one head per codebook, so it can emit up to one token of *each* codebook per step. A
*pattern* decides which token (frame ``t``, codebook ``k``) is predicted at which step, and
with that, two things at once:

- how many autoregressive steps generation takes (speed), and
- which tokens a prediction can condition on: only those of strictly earlier steps (quality).

=====================  ===================  ===============================================
name                   steps for T frames   token (t, k) is predicted after ...
=====================  ===================  ===============================================
``flatten``            K * T                every earlier token in (t, k) reading order
``delay``              T + max(delays)      all (t', k') with t' + d[k'] < t + d[k]
``partial_delay``      T + max(delays)      the same rule, e.g. with delays [0, 2, 2, 2]
``parallel``           T                    all tokens of frames t' < t, none of frame t
``coarse_first``       2 T (+ max delay)    k = 0: its own past; k > 0: all of codebook 0
                                            and (delays 0) every frame t' < t
``partial_flatten``    G * T                frames t' < t and earlier groups of frame t
``stereo_delay``       T + K / 2 - 1        delay with left and right sharing each delay
=====================  ===================  ===============================================

One data structure serves all of them: :class:`Pattern`. Its *layout* for T frames is a
list of sequence steps, each a list of ``(t, k)`` coordinates; step 0 is always empty and
holds the special start token. From the layout the pattern precomputes, once per
``(T, device)``, an index table ``steps[K, T]`` (the step at which each token sits), so
that building the interleaved sequence ``seq[B, K, S]`` (``S = num_steps(T) + 1``) is one
``scatter_`` and reverting it is one ``gather``: no Python loop over time at run time.

Conventions (the LM and the trainer rely on them):

- ``seq[:, k, s]`` holds the token of codebook ``k`` whose coordinate is in ``layout[s]``,
  or ``special`` where that step has none for ``k`` (``mask[k, s]`` is then False).
- The LM reads ``seq[..., :-1]`` (``num_steps(T)`` positions, starting with the all-special
  step 0) and its output at position ``s`` predicts the tokens of step ``s + 1``: targets
  are ``seq[..., 1:]``. :meth:`Pattern.revert_logits` maps those outputs back to ``[B, K,
  T, ...]`` so that they line up with ``codes`` for the loss.

Usage::

    pattern = get_pattern("delay", n_q=4)
    seq, mask = pattern.build(codes, special=2048)     # (B, 4, T + 4), (4, T + 4)
    assert torch.equal(pattern.revert(seq), codes)
    pattern.num_steps(1500)                            # 1503 for 30 s at 50 Hz
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch

Coord = tuple[int, int]  # (t, k): frame t of codebook k
Layout = list[list[Coord]]  # layout[s] = the coordinates predicted at sequence step s

PATTERNS = ("flatten", "delay", "partial_delay", "parallel", "coarse_first", "partial_flatten",
            "stereo_delay")


class _Tables(NamedTuple):
    """Index tables for one number of frames T on one device (S = num_steps(T) + 1)."""

    steps: torch.Tensor  # (K, T) long: the sequence step at which token (t, k) is predicted
    mask: torch.Tensor  # (K, S) bool: True where seq holds a real token
    num_steps: int  # S - 1


class Pattern:
    """A codebook interleaving pattern for ``n_q`` codebooks and any number of frames.

    Args:
        n_q: number of codebooks K.
        make_layout: ``T -> layout``, the list of sequence steps for T frames; each step is a
            list of ``(t, k)`` coordinates, step 0 is empty (the special start token), every
            coordinate with ``0 <= t < T``, ``0 <= k < n_q`` appears exactly once, and a step
            holds at most one coordinate per codebook (the LM has one head per codebook).
        name: a label for ``repr`` and plots.
        **options: the provider's options (e.g. ``delays``), kept for ``repr``.

    Layouts are built in Python once per T and turned into index tables, cached per
    ``(T, device)`` (the most recent ``cache_size`` of them).
    """

    cache_size = 64

    def __init__(self, n_q: int, make_layout: Callable[[int], Layout], name: str = "custom",
                 **options):
        if n_q < 1:
            raise ValueError(f"n_q must be >= 1, got {n_q}")
        self.n_q = n_q
        self.name = name
        self.options = options
        self._make_layout = make_layout
        self._cpu_tables: OrderedDict[int, _Tables] = OrderedDict()
        self._device_tables: OrderedDict[tuple[int, str], _Tables] = OrderedDict()

    def __repr__(self) -> str:
        opts = "".join(f", {k}={list(v) if isinstance(v, tuple) else v}" for k, v in self.options.items())
        return f"Pattern({self.name!r}, n_q={self.n_q}{opts})"

    # ------------------------------------------------------------------ layout and its tables
    def layout(self, T: int) -> Layout:
        """The list of sequence steps for ``T`` frames (a fresh list: yours to modify)."""
        T = self._check_frames(T)
        return [list(step) for step in self._make_layout(T)]

    def num_steps(self, T: int) -> int:
        """Autoregressive steps to generate ``T`` frames (the start step 0 not counted)."""
        return self._tables(T).num_steps

    def steps(self, T: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(K, T)`` long: the sequence step (1 .. num_steps) that predicts token (t, k)."""
        return self._tables(T, device).steps

    def mask(self, T: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(K, S)`` bool: True where the built sequence holds a real token (not ``special``)."""
        return self._tables(T, device).mask

    def context(self, T: int, t: int, k: int) -> torch.Tensor:
        """``(K, T)`` bool: the tokens already known when token (t, k) is predicted.

        These are the tokens of strictly earlier steps; tokens of the same step are sampled
        in parallel, independently of each other, so they cannot inform one another.
        """
        steps = self.steps(T)
        return steps < steps[k, t]

    def frames(self, num_steps: int) -> int:
        """The number of frames T whose sequence takes ``num_steps`` steps (the inverse).

        Raises ``ValueError`` if no T gives exactly that many steps.
        """
        for T, tab in self._cpu_tables.items():  # usually the sequence was just built
            if tab.num_steps == num_steps:
                return T
        # Every frame puts codebook 0 on its own step, so num_steps(T) >= T: search [1, n].
        lo, hi = 1, max(1, num_steps)
        while lo < hi:  # patterns take more steps for more frames: bisect
            mid = (lo + hi) // 2
            if self.num_steps(mid) < num_steps:
                lo = mid + 1
            else:
                hi = mid
        if self.num_steps(lo) != num_steps:
            raise ValueError(f"{self!r}: no number of frames gives a sequence of {num_steps} steps "
                             f"(T={lo} gives {self.num_steps(lo)}); pass T= explicitly")
        return lo

    @staticmethod
    def _check_frames(T: int) -> int:
        try:
            T = operator.index(T)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise ValueError(f"the number of frames T must be a positive int, got {T!r}") from None
        if T < 1:
            raise ValueError(f"the number of frames T must be a positive int, got {T!r}")
        return T

    def _tables(self, T: int, device: torch.device | str | None = None) -> _Tables:
        T = self._check_frames(T)
        if T in self._cpu_tables:
            self._cpu_tables.move_to_end(T)
            tab = self._cpu_tables[T]
        else:
            tab = self._compute_tables(T)
            self._cpu_tables[T] = tab
            if len(self._cpu_tables) > self.cache_size:
                self._cpu_tables.popitem(last=False)
        if device is None or torch.device(device).type == "cpu":
            return tab
        key = (T, str(torch.device(device)))
        if key not in self._device_tables:
            self._device_tables[key] = _Tables(*(x.to(device) if torch.is_tensor(x) else x for x in tab))
            if len(self._device_tables) > self.cache_size:
                self._device_tables.popitem(last=False)
        return self._device_tables[key]

    def _compute_tables(self, T: int) -> _Tables:
        """Check the layout for T frames and turn it into index tables (once per T)."""
        K = self.n_q
        layout = self._make_layout(T)
        S = len(layout)
        if S == 0 or len(layout[0]) != 0:
            raise ValueError(f"{self!r}: step 0 of a layout must be empty (it holds the start token)")
        flat = [(s, t, k) for s, step in enumerate(layout) for t, k in step]
        coords = torch.tensor(flat, dtype=torch.long).view(-1, 3)
        s, t, k = coords.unbind(1)  # each (N,)
        bad = (t < 0) | (t >= T) | (k < 0) | (k >= K)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{self!r}: step {int(s[i])} holds (t={int(t[i])}, k={int(k[i])}), "
                             f"outside T={T} frames x {K} codebooks")
        per_token = torch.bincount(k * T + t, minlength=K * T)  # each token exactly once
        if (per_token != 1).any():
            i = int((per_token != 1).nonzero()[0])
            raise ValueError(f"{self!r}: token (t={i % T}, k={i // T}) appears {int(per_token[i])} "
                             f"times in the layout for T={T}; every token must appear exactly once")
        per_slot = torch.bincount(k * S + s, minlength=K * S)  # one head per codebook per step
        if (per_slot > 1).any():
            i = int((per_slot > 1).nonzero()[0])
            raise ValueError(f"{self!r}: step {i % S} holds {int(per_slot[i])} tokens of codebook "
                             f"{i // S}; a step can predict at most one token per codebook")
        steps = torch.empty(K * T, dtype=torch.long)
        steps[k * T + t] = s
        steps = steps.view(K, T)  # (K, T)
        mask = torch.zeros(K * S, dtype=torch.bool)
        mask[k * S + s] = True
        return _Tables(steps, mask.view(K, S), S - 1)

    # ------------------------------------------------------------------ build and revert
    def _check_streams(self, x: torch.Tensor, what: str) -> None:
        if x.dim() < 3 or x.shape[1] != self.n_q:
            raise ValueError(f"{self!r}: {what} must be [B, K={self.n_q}, ...], got {list(x.shape)}")

    def build(self, codes: torch.Tensor, special: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleave ``codes[B, K, T]`` into ``seq[B, K, S]`` with ``S = num_steps(T) + 1``.

        Positions that hold no token (step 0 and the pattern's gaps) are set to ``special``.
        Returns ``(seq, mask)`` with ``mask[K, S]`` True where ``seq`` holds a real token.
        """
        self._check_streams(codes, "codes")
        if codes.dim() != 3 or codes.is_floating_point():
            raise ValueError(f"{self!r}: codes must be integer [B, K, T], got {codes.dtype} {list(codes.shape)}")
        B, K, T = codes.shape
        tab = self._tables(T, codes.device)
        # Fill with `special`, then scatter each stream's tokens to their steps along the last
        # dim (an expanded index costs no memory; ~3x faster on CPU than a flat index_copy_).
        seq = codes.new_full((B, K, tab.num_steps + 1), special)  # (B, K, S)
        seq.scatter_(2, tab.steps.expand(B, K, T), codes)
        return seq, tab.mask

    def revert(self, seq: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """Undo :meth:`build`: ``seq[B, K, S, ...]`` -> ``codes[B, K, T, ...]``.

        ``T`` defaults to the number of frames whose sequence has exactly ``S`` steps
        (``S = num_steps(T) + 1``); a longer ``seq`` needs ``T`` given. Trailing dimensions
        (e.g. per-token embeddings) are carried along.
        """
        self._check_streams(seq, "seq")
        B, K, S = seq.shape[:3]
        T = self.frames(S - 1) if T is None else T
        tab = self._tables(T, seq.device)
        if S < tab.num_steps + 1:
            raise ValueError(f"{self!r}: seq has {S} steps, T={T} frames need {tab.num_steps + 1}")
        return self._gather(seq, tab, shift=0)

    def revert_logits(self, logits: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """LM outputs in sequence order -> per token: ``[B, K, P, ...]`` -> ``[B, K, T, ...]``.

        ``logits[:, k, s]`` is the model's prediction for step ``s + 1`` (it has read steps
        ``0..s``), so the result ``out[:, k, t]`` is the prediction for ``codes[:, k, t]``,
        ready for ``cross_entropy(out.flatten(0, 2), codes.flatten())``. ``P`` is
        ``num_steps(T)`` when the LM read ``seq[..., :-1]`` (then ``T`` is inferred); with
        more positions (e.g. it read the whole ``seq``) pass ``T``: the extra ones are unused.
        """
        self._check_streams(logits, "logits")
        P = logits.shape[2]
        T = self.frames(P) if T is None else T
        tab = self._tables(T, logits.device)
        if P < tab.num_steps:
            raise ValueError(f"{self!r}: logits cover {P} positions, T={T} frames need {tab.num_steps}")
        return self._gather(logits, tab, shift=1)

    @staticmethod
    def _gather(x: torch.Tensor, tab: _Tables, shift: int) -> torch.Tensor:
        """``x[B, K, P, ...]`` -> ``[B, K, T, ...]``: position ``steps[k, t] - shift`` of stream k."""
        B, K, P = x.shape[:3]
        K, T = tab.steps.shape
        if x.dim() == 3:  # token ids: an element gather along the last dim is the fastest
            return torch.gather(x, 2, (tab.steps - shift).expand(B, K, T))
        # (B, K, P, D...): copy whole rows of D values, e.g. the logits over the codebook
        rest = x.shape[3:]
        rows = torch.arange(K, device=x.device).unsqueeze(1) * P + tab.steps - shift  # (K, T)
        return x.reshape(B, K * P, *rest).index_select(1, rows.view(-1)).view(B, K, T, *rest)


# ---------------------------------------------------------------------------------- layouts
# Each layout function is plain Python over frames: it runs once per T, then the tables above
# are cached, so generation and training never loop over time here.

def delay_layout(T: int, delays: Sequence[int]) -> Layout:
    """Codebook k's frame t at step ``t + delays[k] + 1``: T + max(delays) steps after the start."""
    layout: Layout = [[]]
    for s in range(T + max(delays)):
        layout.append([(s - d, k) for k, d in enumerate(delays) if 0 <= s - d < T])
    return layout


def flatten_layout(T: int, flattening: Sequence[int]) -> Layout:
    """Frame by frame, one step per group: codebook k in sub-step ``flattening[k]`` of its frame.

    ``flattening = range(K)`` is full flattening (K steps per frame); ``[0, 1, 1, 1]`` puts
    codebook 0 alone, then codebooks 1-3 together (2 steps per frame).
    """
    groups = [[k for k, g in enumerate(flattening) if g == i] for i in range(max(flattening) + 1)]
    return [[]] + [[(t, k) for k in group] for t in range(T) for group in groups]


def coarse_first_layout(T: int, delays: Sequence[int]) -> Layout:
    """Codebook 0 over all frames, then codebooks 1.. as a delay pattern with ``delays``."""
    layout: Layout = [[]] + [[(t, 0)] for t in range(T)]
    if delays:  # with one codebook there is nothing after the coarse pass
        layout += delay_layout(T, delays)[1:]
        layout[T + 1:] = [[(t, k + 1) for t, k in step] for step in layout[T + 1:]]
    return layout


# -------------------------------------------------------------------------------- providers

def _int_list(name: str, values, n: int, what: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} {what} (one per codebook), got {len(values)}: {list(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"{name}: {what} must be >= 0, got {list(values)}")
    return values


def get_pattern(name: str, n_q: int, **kw) -> Pattern:
    """The pattern called ``name`` for ``n_q`` codebooks.

    Names and options:
        ``flatten``: one token per step, frame by frame (K * T steps).
        ``delay``: ``delays`` (default ``[0, 1, ..., K-1]``): codebook k lags ``delays[k]``
            frames; T + max(delays) steps. MusicGen's default.
        ``partial_delay``: the delay pattern with ``delays`` defaulting to
            ``[0, 2, 2, ...]``: codebook 0 leads, the others follow together.
        ``parallel``: all codebooks of a frame at once (T steps).
        ``coarse_first``: VALL-E style: codebook 0 over all frames, then codebooks 1..K-1
            (``delays``, K - 1 of them, default all 0: in parallel); 2T steps by default.
        ``partial_flatten``: ``flattening`` (default ``[0, 1, 1, ...]``): sub-step of each
            codebook within its frame; (max(flattening) + 1) * T steps.
        ``stereo_delay``: delay over interleaved left/right codebooks (n_q even): delays
            ``[0, 0, 1, 1, 2, 2, ...]`` as transformers' stereo MusicGen.
    """
    if n_q < 1:
        raise ValueError(f"n_q must be >= 1, got {n_q}")
    allowed = {"flatten": (), "delay": ("delays",), "partial_delay": ("delays",), "parallel": (),
               "coarse_first": ("delays",), "partial_flatten": ("flattening",), "stereo_delay": ()}
    if name not in allowed:
        raise ValueError(f"unknown pattern {name!r}; choose from: {', '.join(PATTERNS)}")
    unknown = sorted(set(kw) - set(allowed[name]))
    if unknown:
        raise TypeError(f"pattern {name!r} takes no option {unknown[0]!r} "
                        f"(options: {', '.join(allowed[name]) or 'none'})")

    if name in ("flatten", "partial_flatten"):
        default = range(n_q) if name == "flatten" else [0] + [1] * (n_q - 1)
        flattening = _int_list(name, kw.get("flattening", default), n_q, "flattening groups")
        used = set(flattening)
        if used != set(range(max(flattening) + 1)):
            missing = sorted(set(range(max(flattening) + 1)) - used)
            raise ValueError(f"{name}: flattening {list(flattening)} leaves group(s) {missing} empty; "
                             "number the groups 0, 1, 2, ... without gaps")
        opts = {} if name == "flatten" else {"flattening": flattening}
        return Pattern(n_q, partial(flatten_layout, flattening=flattening), name, **opts)

    if name == "coarse_first":
        delays = _int_list(name, kw.get("delays", [0] * (n_q - 1)), n_q - 1, "delays for codebooks 1..K-1")
        return Pattern(n_q, partial(coarse_first_layout, delays=delays), name, delays=delays)

    if name == "parallel":
        delays, opts = (0,) * n_q, {}
    elif name == "stereo_delay":
        if n_q % 2:
            raise ValueError(f"stereo_delay: n_q must be even (left/right interleaved), got {n_q}")
        delays, opts = tuple(k // 2 for k in range(n_q)), {}
    else:
        default = range(n_q) if name == "delay" else [0] + [2] * (n_q - 1)
        delays = _int_list(name, kw.get("delays", default), n_q, "delays")
        opts = {"delays": delays}
    return Pattern(n_q, partial(delay_layout, delays=delays), name, **opts)
