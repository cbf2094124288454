"""Choosing the next token: temperature, top-k, top-p (nucleus), greedy; classifier-free guidance.

All functions act on the last dimension of ``logits[..., bins]`` (any leading shape, e.g.
``[B, K, bins]`` for one decoding step of K codebooks) and return logits with the removed
tokens set to ``-inf``, or token ids ``[...]``.

Classifier-free guidance (Ho & Salimans, 2022; MusicGen section 2.3) pushes the
conditional prediction away from the unconditional one::

    guided = uncond + cfg_coef * (cond - uncond)        # cfg_coef = 1: plain conditional

Two ways to get both predictions: *one batch* of ``2B`` rows (conditions then null
conditions; one forward, what MusicGen does) or *two passes* of B rows each (half the peak
activation memory, twice the weight reads).

Sampling on the device without waiting for it (:class:`NoiseSampler`, what fast generation
uses): ``torch.multinomial`` draws from a distribution; the *Gumbel-max trick* gets the same
draw from an argmax, ``argmax_i(logits_i - log E_i)`` with ``E_i ~ Exponential(1)`` picks
``i`` with probability ``softmax(logits)_i``. The noise ``E`` is drawn into a buffer that
stays in place, and every other operation (top-k, sort, argmax) keeps its shapes, so a
sampling step can run inside a captured CUDA graph and never asks the host for a number.
"""
from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (exactly k; ties broken by :func:`torch.topk`), ``-inf`` elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches ``p``.

    A token is kept when the mass of the tokens ranked above it is below ``p``, so the most
    likely token is always kept, and the token that crosses ``p`` is kept too.
    """
    if p <= 0 or p >= 1:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``logits[..., bins]`` -> token ids ``[...]``.

    ``temperature == 0`` or ``top_k == 1``: greedy (argmax). Otherwise the logits are divided
    by ``temperature``, then top-p (when ``0 < top_p < 1``, which wins as in audiocraft) or
    top-k (when ``top_k > 0``) filters them, and one token is drawn from the softmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_p < 1:
        logits = top_p_filter(logits, top_p)
    elif top_k > 0:
        logits = top_k_filter(logits, top_k)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def cfg(cond: torch.Tensor, uncond: torch.Tensor, cfg_coef: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + cfg_coef * (cond - uncond)``."""
    return uncond + cfg_coef * (cond - uncond)


def cfg_from_batch(logits: torch.Tensor, cfg_coef: float) -> torch.Tensor:
    """One-batch CFG: ``logits[2B, ...]`` with the conditional rows first -> guided ``[B, ...]``."""
    if logits.shape[0] % 2:
        raise ValueError(f"one-batch CFG needs 2B rows (conditional, then null), got {logits.shape[0]}")
    cond, uncond = logits.chunk(2, dim=0)
    return cfg(cond, uncond, cfg_coef)


def cfg_two_pass(model, seq, cond, cond_mask, null_cond, null_mask, cfg_coef: float, **kw) -> torch.Tensor:
    """Two-pass CFG: ``model(seq, cond, ...)`` and ``model(seq, null_cond, ...)`` separately, then guided.

    Extra keyword arguments (e.g. a pair of caches as ``caches=(c, u)``) go to the two calls.
    """
    caches = kw.pop("caches", (None, None))
    cond_logits = model(seq, cond, cond_mask, cache=caches[0], **kw)
    uncond_logits = model(seq, null_cond, null_mask, cache=caches[1], **kw)
    return cfg(cond_logits, uncond_logits, cfg_coef)


# ------------------------------------------------------------------- on the device, no host sync

def num_candidates(bins: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0) -> int:
    """How many tokens :func:`sample_with_noise` draws among: 0 when greedy (no noise needed),
    ``bins`` with top-p (the whole sorted vocabulary) or no filter, ``top_k`` with top-k."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 or top_k == 1:
        return 0
    if 0 < top_p < 1:
        return bins
    return top_k if 0 < top_k < bins else bins


def sample_with_noise(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 0.0) -> torch.Tensor:
    """``logits[..., bins]`` and ``noise[..., n]`` ~ Exponential(1) -> token ids ``[...]``, no host sync.

    The same distribution as :func:`sample_next` (temperature, then top-p, which wins, or
    top-k), drawn by the Gumbel-max trick among ``n =`` :func:`num_candidates` candidates:
    the top-k logits (:func:`torch.topk`), or the whole vocabulary sorted (top-p: those ranked
    after the nucleus get ``-inf``), or the raw logits. Greedy (``temperature == 0`` or
    ``top_k == 1``): the argmax, ``noise`` unused (None is fine).
    """
    bins = logits.shape[-1]
    n = num_candidates(bins, temperature, top_k, top_p)
    if n == 0:
        return logits.argmax(dim=-1)
    if noise is None or noise.shape[-1] != n:
        raise ValueError(f"noise must end in {n} candidates, got {None if noise is None else list(noise.shape)}")
    logits = logits.float() / temperature
    gumbel = -noise.log()  # (..., n): argmax(logits + gumbel) ~ softmax(logits)
    if 0 < top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)  # (..., bins)
        probs = ranked.softmax(dim=-1)
        ranked = ranked.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))  # outside the nucleus
        return order.gather(-1, (ranked + gumbel).argmax(dim=-1, keepdim=True)).squeeze(-1)
    if n < bins:
        values, idx = logits.topk(n, dim=-1)  # (..., k)
        return idx.gather(-1, (values + gumbel).argmax(dim=-1, keepdim=True)).squeeze(-1)
    return (logits + gumbel).argmax(dim=-1)


class NoiseSampler:
    """:func:`sample_with_noise` with its noise buffer: ``refill()`` then ``sampler(logits[*shape, bins])``.

    ``refill()`` draws fresh Exponential(1) noise in place (one kernel, with ``generator``:
    seeded, the same tokens every run); call it before each step, outside a captured graph,
    so that the graph only reads the buffer. ``__call__`` never syncs with the host.
    """

    def __init__(self, shape: tuple[int, ...], bins: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, generator: torch.Generator | None = None, device=None):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        n = num_candidates(bins, temperature, top_k, top_p)
        self.noise = torch.ones(*shape, n, device=device) if n else None  # (*shape, n)

    def refill(self) -> None:
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_with_noise(logits, self.noise, self.temperature, self.top_k, self.top_p)
