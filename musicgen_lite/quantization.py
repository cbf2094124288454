"""Residual vector quantization (RVQ): how EnCodec turns latents into MusicGen's tokens.

A codebook is a table of ``bins`` vectors; quantizing a latent frame means replacing it by
its nearest entry and keeping only the entry's index (a code). One codebook of 2048 entries
spends 11 bits per frame and leaves a large error. RVQ quantizes that error again with a
second codebook, the error of the error with a third, and so on: ``n_q`` levels, ``n_q``
codes per frame, and the decoder simply adds the chosen entries up. EnCodec at 32 kHz, as
used by MusicGen, has dim 128, ``n_q = 4`` levels of 2048 entries at 50 frames/s:
4 x 11 bits x 50 Hz = 2.2 kbps.

Three classes, nested as in EnCodec so that its weights load by name:

- :class:`Codebook`: the table and the rules that teach it (k-means initialisation on the
  first training batch, exponential moving averages (EMA) with Laplace smoothing, dead-code
  replacement, DDP synchronisation). Buffers ``embed``, ``embed_avg``, ``cluster_size``,
  ``inited`` carry EnCodec's names.
- :class:`VectorQuantizer`: one level: an optional low-dimensional projection (DAC), the
  nearest-entry search, the straight-through estimator and the commitment loss.
- :class:`ResidualVectorQuantizer`: ``n_q`` levels, quantizer dropout, ``encode`` / ``decode``.

The state dict of ``ResidualVectorQuantizer`` is ``layers.{i}.codebook.{embed, embed_avg,
cluster_size, inited}``, the same names as transformers' ``EncodecModel.quantizer``; so
``rvq.load_state_dict(hf_model.quantizer.state_dict())`` loads real EnCodec codebooks, and
audiocraft's checkpoints need only ``vq.layers.{i}._codebook.`` -> ``layers.{i}.codebook.``.

Shapes: latents ``x`` are ``[B, D, T]`` floats, codes ``[B, K, T]`` integers in ``[0, bins)``.
Inside, frames are flattened to rows ``(N, D)`` with ``N = B * T``, so that every step is a
matrix operation over all frames at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- bandwidth

def bits_per_second(n_q: int, bins: int, frame_rate: float) -> float:
    """Bitrate of ``n_q`` codebooks of ``bins`` entries at ``frame_rate`` frames/s, in bits/s.

    Each frame sends one code per level, ``log2(bins)`` bits each. EnCodec 32 kHz:
    ``bits_per_second(4, 2048, 50) == 2200.0``.
    """
    return n_q * math.log2(bins) * frame_rate


def num_quantizers_for_bandwidth(bps: float, bins: int, frame_rate: float, n_q_max: int | None = None) -> int:
    """The most levels whose bitrate stays within ``bps`` bits/s (at least 1, at most ``n_q_max``)."""
    n = max(1, int(math.floor(bps / bits_per_second(1, bins, frame_rate) + 1e-9)))
    return n if n_q_max is None else min(n, n_q_max)


def codebook_stats(codes: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Usage and perplexity of each level in ``codes`` ``[B, K, T]`` (or ``[K, N]``).

    Returns ``(usage, perplexity)``, each ``[K]`` floats: usage is the fraction of the
    ``bins`` entries used at least once; perplexity is ``exp(entropy)`` of the code
    histogram, the "effective number of entries" (``bins`` when all are used equally, 1 when
    one entry takes every frame).
    """
    flat = codes.transpose(0, 1).reshape(codes.shape[1], -1) if codes.dim() == 3 else codes  # (K, N)
    K = flat.shape[0]
    # one bincount for all levels: shift level k's codes by k * bins
    offsets = torch.arange(K, device=flat.device).unsqueeze(1) * bins
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=K * bins).view(K, bins).float()
    probs = counts / counts.sum(1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return (counts > 0).float().mean(1), entropy.exp()


# --------------------------------------------------------------------------- distributed

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def _broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    if _distributed():
        for t in tensors:
            torch.distributed.broadcast(t, src)


# --------------------------------------------------------------------------- nearest entry

def nearest(x: torch.Tensor, embed: torch.Tensor, cosine: bool = False, block_rows: int | None = None) -> torch.Tensor:
    """Index of the nearest row of ``embed`` (bins, d) for every row of ``x`` (N, d) -> (N,) int64.

    Euclidean: ``argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c)`` since ``||x||^2`` is the
    same for every entry; one ``addmm`` per block of rows, in fp32 even under autocast (a bf16
    distance mixes up entries closer than its ~3 significant digits). ``cosine`` compares
    directions only (both sides L2-normalised). Ties go to the lowest index, as in EnCodec.

    Rows are processed in blocks so that the (rows, bins) distance matrix stays in cache on a
    CPU and within memory on a GPU; each block is one matrix product over many frames.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        embed = embed.float()
        if cosine:
            x = F.normalize(x, dim=1)
            embed = F.normalize(embed, dim=1)
            neg_half_sq = torch.zeros(embed.shape[0], device=x.device)
        else:
            # minimise ||c||^2/2 - x.c: the same argmin with one less multiply per distance
            neg_half_sq = embed.pow(2).sum(1).mul_(0.5)  # (bins,)
        if block_rows is None:  # about 4 MB of distances per block on a CPU (cache), 256 MB on a GPU
            block_rows = max(256, (1 << 20 if x.device.type == "cpu" else 1 << 26) // embed.shape[0])
        N = x.shape[0]
        if N <= block_rows:
            return torch.addmm(neg_half_sq, x, embed.t(), alpha=-1).argmin(1)
        codes = torch.empty(N, dtype=torch.long, device=x.device)
        embed_t = embed.t()
        for start in range(0, N, block_rows):  # blocks of frames, not single frames
            rows = x[start:start + block_rows]
            torch.argmin(torch.addmm(neg_half_sq, rows, embed_t, alpha=-1), 1, out=codes[start:start + block_rows])
        return codes


def kmeans(x: torch.Tensor, k: int, iters: int = 50, cosine: bool = False,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows ``x`` (N, d): returns ``(centroids (k, d), counts (k,))``.

    Starts from ``k`` rows drawn from ``x`` (without replacement when ``N >= k``), then
    alternates assignment (nearest centroid) and update (mean of the assigned rows); a
    centroid that loses all its rows keeps its place. ``generator`` makes it deterministic.
    """
    x = x.float()
    N = x.shape[0]
    if N >= k:
        start = torch.randperm(N, generator=generator, device="cpu")[:k]
    else:
        start = torch.randint(N, (k,), generator=generator, device="cpu")
    centroids = x[start.to(x.device)].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest(x, centroids, cosine=cosine)  # (N,)
        counts = torch.bincount(assign, minlength=k).float()  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, d)
        means = sums / counts.clamp_min(1).unsqueeze(1)
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
    return centroids, counts


# --------------------------------------------------------------------------- one codebook

class Codebook(nn.Module):
    """A table of ``bins`` vectors of size ``dim`` and the rules that teach it.

    Args:
        dim: size of each entry (the latent size, or ``codebook_dim`` under projection).
        bins: number of entries (EnCodec: 2048 for MusicGen, 1024 for the 24 kHz model).
        cosine: find entries by direction (L2-normalised), as DAC does.
        ema: learn entries by exponential moving averages of their assigned frames
            (EnCodec, SoundStream); ``False`` makes ``embed`` a parameter learned by the
            codebook loss (VQ-VAE, DAC).
        decay: EMA decay per training step (EnCodec: 0.99).
        epsilon: Laplace smoothing of the EMA counts, so no entry divides by zero.
        kmeans_init: initialise from k-means on the first training batch (else random).
        kmeans_iters: k-means iterations (EnCodec: 50).
        threshold_ema_dead_code: an entry whose EMA count falls below this is dead and is
            replaced by a random frame of the batch (EnCodec: 2; 0 disables).
        dead_code_relative: when set, the threshold is this fraction of the expected count
            per entry, ``frames per batch / bins``, instead of the fixed number above. With
            few frames per batch and many entries a fixed 2 exceeds the expected count, so
            nearly every entry is "dead" and the codebook is re-drawn every step.
        seed: seeds k-means and the random initialisation, so they are reproducible.

    Buffers (EnCodec's names): ``embed`` (bins, dim), ``embed_avg`` (bins, dim) the EMA of
    the sum of assigned frames, ``cluster_size`` (bins,) the EMA of the count of assigned
    frames, ``inited`` (1,) 1.0 once initialised.
    """

    def __init__(self, dim: int, bins: int, *, cosine: bool = False, ema: bool = True, decay: float = 0.99,
                 epsilon: float = 1e-5, kmeans_init: bool = True, kmeans_iters: int = 50,
                 threshold_ema_dead_code: float = 2.0, dead_code_relative: float | None = None, seed: int = 0):
        super().__init__()
        self.dim, self.bins, self.cosine, self.ema = dim, bins, cosine, ema
        self.decay, self.epsilon = decay, epsilon
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.threshold_ema_dead_code, self.dead_code_relative = threshold_ema_dead_code, dead_code_relative
        self.seed = seed
        if kmeans_init:
            embed = torch.zeros(bins, dim)
        else:
            embed = torch.empty(bins, dim)
            nn.init.kaiming_uniform_(embed, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("inited", torch.tensor([0.0 if kmeans_init else 1.0]))
        self.register_buffer("cluster_size", torch.zeros(bins))
        if ema:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("embed_avg", embed.clone())

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, bins={self.bins}, cosine={self.cosine}, ema={self.ema}, decay={self.decay}, "
                f"threshold_ema_dead_code={self.threshold_ema_dead_code}, dead_code_relative={self.dead_code_relative}")

    # -- inference ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` (N, dim) -> codes (N,) int64."""
        return nearest(x, self.embed, cosine=self.cosine)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any shape) -> entries (..., dim)."""
        return F.embedding(codes, self.embed)

    # -- training -----------------------------------------------------------------------
    @torch.no_grad()
    def init_(self, x: torch.Tensor) -> None:
        """k-means on the rows ``x`` (N, dim) of the first training batch; rank 0's result wins."""
        generator = torch.Generator().manual_seed(self.seed)
        centroids, counts = kmeans(x, self.bins, self.kmeans_iters, cosine=self.cosine, generator=generator)
        self.embed.data.copy_(centroids)
        self.embed_avg.copy_(centroids * counts.unsqueeze(1))
        self.cluster_size.copy_(counts)
        self.inited.fill_(1.0)
        _broadcast_(self.embed.data, self.embed_avg, self.cluster_size)

    @torch.no_grad()
    def update_(self, x: torch.Tensor, codes: torch.Tensor) -> int:
        """One training step's statistics: EMA update, then dead-code replacement.

        ``x`` (N, dim) rows, ``codes`` (N,) their entries. Under DDP the counts and sums are
        summed over processes first, so every process makes the same update and takes the
        same dead-code decision; replacements come from rank 0's batch. Returns the number
        of entries replaced.
        """
        x = x.float()
        counts = torch.bincount(codes, minlength=self.bins).float()  # (bins,)
        sums = torch.zeros(self.bins, self.dim, device=x.device).index_add_(0, codes, x)  # (bins, dim)
        _all_reduce_sum_(counts, sums)
        frames = counts.sum()  # over all processes
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing: (n_i + eps) / (n + bins * eps) * n keeps rarely used entries finite
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.epsilon) / (total + self.bins * self.epsilon) * total
            self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        return self.expire_(x, frames)

    def dead_threshold(self, frames: float) -> float:
        """EMA count under which an entry is dead, for a batch of ``frames`` frames (all processes)."""
        if self.dead_code_relative is not None:
            return self.dead_code_relative * float(frames) / self.bins
        return self.threshold_ema_dead_code

    @torch.no_grad()
    def expire_(self, x: torch.Tensor, frames: float) -> int:
        """Replace entries whose EMA count is under the threshold by random rows of ``x``.

        The replaced entry's statistics restart as if it had the threshold's count of
        frames at the new position, so the next EMA step keeps it there instead of pulling
        it back to its old average.
        """
        threshold = self.dead_threshold(frames)
        if threshold <= 0:
            return 0
        dead = self.cluster_size < threshold  # (bins,), the same on every process
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        picks = torch.randint(x.shape[0], (n_dead,), device=x.device)
        fresh = x[picks]  # (n_dead, dim)
        self.embed.data[dead] = fresh
        self.embed_avg[dead] = fresh * threshold
        self.cluster_size[dead] = threshold
        _broadcast_(self.embed.data, self.embed_avg, self.cluster_size)
        return n_dead


# --------------------------------------------------------------------------- one level

@dataclass
class QuantizedResult:
    """What a quantizer's forward returns.

    quantized: ``[B, D, T]`` the sum of the chosen entries; in training its gradient to the
        input is the identity (straight-through estimator).
    codes: ``[B, K, T]`` int64, ``K`` the levels run this step.
    commitment_losses: ``[K]`` one ``mse(residual_k, entry_k)`` per level.
    codebook_losses: ``[K]`` one ``mse(entry_k, residual_k)`` per level (zero for EMA codebooks).
    loss: scalar to add to the training loss (``commitment_weight`` x mean commitment + mean
        codebook loss).
    n_q: levels used: an int, or ``[B]`` per sample under per-sample quantizer dropout.
    metrics: ``usage`` and ``perplexity`` ``[K]`` of this batch's codes, ``replaced`` ``[K]``
        dead entries replaced this step.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment_losses: torch.Tensor
    codebook_losses: torch.Tensor
    loss: torch.Tensor
    n_q: int | torch.Tensor
    metrics: dict = field(default_factory=dict)



def _mse(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over rows (N, d), counting only rows with ``keep == 1`` when given."""
    if keep is None:
        return F.mse_loss(a, b)
    per_row = (a - b).pow(2).mean(1)  # (N,)
    return (per_row * keep).sum() / keep.sum().clamp_min(1)


class VectorQuantizer(nn.Module):
    """One level of quantization: latents ``[B, D, T]`` -> nearest codebook entries.

    Args:
        dim: latent size ``D``.
        bins: codebook entries.
        codebook_dim: when set (and smaller than ``dim``), search a low-dimensional codebook:
            project ``D -> codebook_dim`` in, ``codebook_dim -> D`` out (DAC uses 8).
        cosine: compare directions only (L2-normalised); DAC pairs it with ``codebook_dim``.
        commitment_weight: scale of the commitment loss in ``loss``.
        **codebook_options: passed to :class:`Codebook` (``ema``, ``decay``, ``epsilon``,
            ``kmeans_init``, ``kmeans_iters``, ``threshold_ema_dead_code``,
            ``dead_code_relative``, ``seed``).

    Without projection, a level is EnCodec's: the quantized value is the entry itself, the
    commitment loss ``mse(x, entry)`` pulls the input towards its entry, and the gradient
    reaches the input through the residual quantizer's straight-through estimator. With a
    projection (DAC), the straight-through estimator sits in the small space,
    ``out(z_e + (z_q - z_e).detach())``, so both projections learn.
    """

    def __init__(self, dim: int, bins: int, *, codebook_dim: int | None = None, cosine: bool = False,
                 commitment_weight: float = 1.0, **codebook_options):
        super().__init__()
        self.dim, self.bins = dim, bins
        self.projected = codebook_dim is not None and codebook_dim != dim
        self.codebook_dim = codebook_dim if self.projected else dim
        self.commitment_weight = commitment_weight
        if self.projected:
            self.in_proj = nn.Linear(dim, self.codebook_dim)
            self.out_proj = nn.Linear(self.codebook_dim, dim)
        self.codebook = Codebook(self.codebook_dim, bins, cosine=cosine, **codebook_options)

    # rows (N, D) in, rows out: what ResidualVectorQuantizer calls
    def encode_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (N, D) -> codes (N,)."""
        z = self.in_proj(x) if self.projected else x
        return self.codebook.encode(z)

    def decode_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N,) -> quantized rows (N, D)."""
        z_q = self.codebook.decode(codes)
        return self.out_proj(z_q) if self.projected else z_q

    def quantize_rows(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> dict:
        """One level's forward on rows ``x`` (N, D).

        ``keep`` (N,) optional 0/1 weights: rows with 0 (samples whose quantizer dropout
        stopped before this level) count in no loss and get a zero quantized value; their
        frames still feed the codebook statistics, since they are genuine residuals.
        Returns a dict: ``quantized`` (N, D) (with gradient paths only under projection),
        ``codes`` (N,), ``commitment`` and ``codebook`` losses (scalars), ``replaced``
        (entries replaced this step). Training mode initialises and updates the codebook.
        """
        z_e = self.in_proj(x) if self.projected else x  # (N, d)
        book = self.codebook
        if self.training and not bool(book.inited):
            book.init_(z_e.detach())
        codes = book.encode(z_e.detach())  # (N,)
        z_q = book.decode(codes)  # (N, d), the entries before this step's update
        replaced = book.update_(z_e.detach(), codes) if self.training else 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            z_e32, z_q32 = z_e.float(), z_q.float()
            commitment = _mse(z_e32, z_q32.detach(), keep)
            codebook_loss = _mse(z_q32, z_e32.detach(), keep) if not book.ema else z_e32.new_zeros(())
        if self.projected:
            if z_e.requires_grad:
                z_q = z_e + (z_q - z_e).detach()
            quantized = self.out_proj(z_q)
        else:
            quantized = z_q
        if keep is not None:
            quantized = quantized * keep.unsqueeze(1).to(quantized.dtype)
        return {"quantized": quantized, "codes": codes, "commitment": commitment,
                "codebook": codebook_loss, "replaced": replaced}

    # latents [B, D, T] in and out: for a single level on its own
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, D, T]`` -> codes ``[B, T]``."""
        B, D, T = x.shape
        return self.encode_rows(x.transpose(1, 2).reshape(B * T, D)).view(B, T)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, T]`` -> quantized latents ``[B, D, T]``."""
        return self.decode_rows(codes).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        """Quantize latents ``[B, D, T]`` with this one level (an RVQ with ``n_q = 1``)."""
        return _quantize_levels([self], x, 1)


# --------------------------------------------------------------------------- residual levels

class ResidualVectorQuantizer(nn.Module):
    """``n_q`` codebooks, each quantizing what the previous ones left over.

    Args:
        dim: latent size ``D`` (EnCodec 32 kHz: 128).
        n_q: number of levels ``K`` (EnCodec 32 kHz: 4).
        bins: entries per codebook (EnCodec 32 kHz: 2048).
        quantizer_dropout: probability that a training batch (or sample) uses a random number
            of levels drawn uniformly from ``1..n_q`` inclusive, so one model serves every
            bitrate (EnCodec: always, i.e. 1.0; DAC: 0.5 per sample). 0 disables.
        dropout_per_sample: draw the number of levels per sample instead of per batch.
        seed: level ``k`` seeds its codebook with ``seed + k``.
        **options: passed to every :class:`VectorQuantizer`: ``codebook_dim``, ``cosine``,
            ``commitment_weight``, ``ema``, ``decay``, ``epsilon``, ``kmeans_init``,
            ``kmeans_iters``, ``threshold_ema_dead_code``, ``dead_code_relative``.

    Example::

        rvq = ResidualVectorQuantizer(dim=128, n_q=4, bins=2048)
        out = rvq(latents)              # latents (B, 128, T); training: k-means, EMA, losses
        codes = rvq.encode(latents)     # (B, 4, T) int64
        approx = rvq.decode(codes[:, :2])  # (B, 128, T) from the first two levels only
    """

    def __init__(self, dim: int, n_q: int, bins: int, *, quantizer_dropout: float = 0.0,
                 dropout_per_sample: bool = False, seed: int = 0, **options):
        super().__init__()
        self.dim, self.n_q, self.bins = dim, n_q, bins
        self.quantizer_dropout, self.dropout_per_sample = float(quantizer_dropout), dropout_per_sample
        self.layers = nn.ModuleList(VectorQuantizer(dim, bins, seed=seed + k, **options) for k in range(n_q))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_q={self.n_q}, bins={self.bins}, quantizer_dropout={self.quantizer_dropout}, "
                f"dropout_per_sample={self.dropout_per_sample}")

    def bits_per_second(self, frame_rate: float, n_q: int | None = None) -> float:
        """Bitrate of ``n_q`` levels (default all) at ``frame_rate`` frames/s."""
        return bits_per_second(n_q or self.n_q, self.bins, frame_rate)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.dim:
            raise ValueError(f"expected latents [B, {self.dim}, T], got {tuple(x.shape)}")

    def _levels(self, n_q: int | None) -> int:
        n_q = self.n_q if n_q is None else int(n_q)
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be in 1..{self.n_q}, got {n_q}")
        return n_q

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Latents ``[B, D, T]`` -> codes ``[B, n_q, T]`` int64 (default all levels)."""
        self._check(x)
        n_q = self._levels(n_q)
        B, D, T = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            residual = torch.empty(B * T, D, device=x.device)  # (N, D): our own copy, updated in place
            residual.view(B, T, D).copy_(x.transpose(1, 2))
            codes = torch.empty(n_q, B * T, dtype=torch.long, device=x.device)
            for k, layer in enumerate(self.layers[:n_q]):
                codes[k] = layer.encode_rows(residual)
                if k + 1 < n_q:
                    residual.sub_(layer.decode_rows(codes[k]))
        return codes.view(n_q, B, T).transpose(0, 1)  # (B, K, T)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, K, T]`` (any ``K <= n_q``: a prefix of the levels) -> latents ``[B, D, T]``."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(f"expected codes [B, K<={self.n_q}, T], got {tuple(codes.shape)}")
        B, K, T = codes.shape
        quantized = None
        for k in range(K):
            entries = self.layers[k].decode_rows(codes[:, k].reshape(B * T))  # (N, D)
            quantized = entries if quantized is None else quantized + entries
        return quantized.view(B, T, self.dim).transpose(1, 2).contiguous()

    def _draw_n_q(self, B: int, device) -> int | torch.Tensor:
        """Levels to use this training step: ``n_q``, or a draw from 1..n_q (quantizer dropout)."""
        p = self.quantizer_dropout
        if self.dropout_per_sample:
            n = torch.full((B,), self.n_q, device=device)
            if p > 0:
                drop = torch.rand(B, device=device) < p
                n = torch.where(drop, torch.randint(1, self.n_q + 1, (B,), device=device), n)
            return n
        if p <= 0:
            return self.n_q
        use = torch.rand((), device=device) < p
        n = torch.where(use, torch.randint(1, self.n_q + 1, (), device=device), torch.tensor(self.n_q, device=device))
        _broadcast_(n)  # under DDP every process must run the same levels (and the same collectives)
        return int(n)

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> QuantizedResult:
        """Quantize latents ``x`` ``[B, D, T]``.

        Training mode initialises codebooks (k-means on the first batch), updates them
        (EMA, dead codes) and applies quantizer dropout unless ``n_q`` is given. Every level
        ``k`` quantizes the residual ``x - sum_{j<k} q_j.detach()``, so its commitment loss
        has its own gradient path to ``x``; the sum is passed through a straight-through
        estimator ``x + (sum_k q_k - x).detach()``, whose gradient to ``x`` is the identity.
        In eval mode without gradients, ``forward(x).quantized == decode(encode(x))`` exactly.
        """
        self._check(x)
        B, D, T = x.shape
        if n_q is not None:
            n_levels = self._levels(n_q)
        elif self.training:
            n_levels = self._draw_n_q(B, x.device)
        else:
            n_levels = self.n_q
        return _quantize_levels(self.layers, x, n_levels)


def _quantize_levels(layers, x: torch.Tensor, n_levels: int | torch.Tensor) -> QuantizedResult:
    """The residual loop behind both forwards: ``layers`` quantize ``x`` ``[B, D, T]`` in turn.

    ``n_levels`` is an int, or a ``[B]`` tensor of per-sample level counts (then every level
    runs and each sample keeps its first ``n_levels[b]``).
    """
    B, D, T = x.shape
    per_sample = torch.is_tensor(n_levels)
    run = len(layers) if per_sample else n_levels  # levels computed
    with torch.autocast(device_type=x.device.type, enabled=False):
        rows = x.float().transpose(1, 2).reshape(B * T, D)  # (N, D)
        residual = rows
        quantized = None
        codes, commitment, codebook, replaced = [], [], [], []
        for k, layer in enumerate(layers[:run]):
            # samples whose drawn level count stops before level k get nothing from it
            keep = (n_levels > k).float().repeat_interleave(T) if per_sample else None  # (N,)
            out = layer.quantize_rows(residual, keep)
            q = out["quantized"]  # (N, D)
            quantized = q if quantized is None else quantized + q
            # the next level sees a residual built from a detached value: its loss reaches x
            # through `residual` (identity) only, never through the entries chosen above it
            residual = residual - q.detach()
            codes.append(out["codes"])
            commitment.append(out["commitment"])
            codebook.append(out["codebook"])
            replaced.append(out["replaced"])
        if rows.requires_grad and not layers[0].projected:
            # straight-through on the sum (not per level): d quantized / d x = identity
            quantized = rows + (quantized - rows).detach()
    quantized = quantized.to(x.dtype).view(B, T, D).transpose(1, 2).contiguous()  # (B, D, T)
    codes = torch.stack(codes).view(run, B, T).transpose(0, 1)  # (B, K, T)
    commitment, codebook = torch.stack(commitment), torch.stack(codebook)  # (K,), (K,)
    usage, perplexity = codebook_stats(codes, layers[0].bins)
    loss = layers[0].commitment_weight * commitment.mean() + codebook.mean()
    return QuantizedResult(quantized=quantized, codes=codes, commitment_losses=commitment,
                           codebook_losses=codebook, loss=loss, n_q=n_levels,
                           metrics={"usage": usage, "perplexity": perplexity,
                                    "replaced": torch.tensor(replaced)})
