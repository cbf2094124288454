"""Residual vector quantization: invariants, the learning rules, and parity with EnCodec.

Every test is seeded. Outside references: transformers' EncodecModel (codes, decoding,
bandwidth arithmetic), scikit-learn's KMeans (Lloyd iterations), brute-force distances.
"""
from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.nn.functional as F

from musicgen_lite.quantization import (
    ResidualVectorQuantizer,
    VectorQuantizer,
    bits_per_second,
    codebook_stats,
    kmeans,
    nearest,
    num_quantizers_for_bandwidth,
)


def clustered(B=4, D=8, T=64, centers=16, seed=0, spread=0.05):
    """Latents [B, D, T] scattered around a few centres: data that k-means can fit."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, D, generator=g) * 2
    pick = torch.randint(centers, (B, T), generator=g)
    x = means[pick] + spread * torch.randn(B, T, D, generator=g)  # (B, T, D)
    return x.transpose(1, 2).contiguous()  # (B, D, T)


def fitted_rvq(x, n_q=4, bins=32, steps=5, **kw):
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(x.shape[1], n_q, bins, kmeans_iters=20, **kw)
    for _ in range(steps):
        rvq(x)
    return rvq.eval()


# ----------------------------------------------------------------------------- arithmetic

def test_bandwidth_matches_the_paper_and_transformers():
    assert bits_per_second(4, 2048, 50) == 2200.0  # MusicGen's EnCodec: 4 x 11 bits x 50 Hz
    assert ResidualVectorQuantizer(8, 4, 2048).bits_per_second(50, n_q=2) == 1100.0
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(sampling_rate=24_000, upsampling_ratios=[8, 5, 4, 2], codebook_size=1024,
                           target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], hidden_size=8, num_filters=2,
                           num_lstm_layers=1)
    hf = EncodecModel(config).quantizer
    for kbps in [0.7, 1.5, 3.0, 6.0, 7.4, 12.0, 24.0]:
        ours = num_quantizers_for_bandwidth(kbps * 1000, 1024, config.frame_rate, n_q_max=hf.num_quantizers)
        assert ours == min(hf.get_num_quantizers_for_bandwidth(kbps), hf.num_quantizers), kbps


def test_codebook_stats_uniform_and_collapsed():
    bins = 8
    codes = torch.stack([torch.arange(64) % bins, torch.zeros(64, dtype=torch.long)]).unsqueeze(0)  # (1, 2, 64)
    usage, perplexity = codebook_stats(codes, bins)
    torch.testing.assert_close(usage, torch.tensor([1.0, 1 / bins]))
    torch.testing.assert_close(perplexity, torch.tensor([float(bins), 1.0]))


# ----------------------------------------------------------------------------- nearest entry

@pytest.mark.parametrize("n", [100, 1000])  # one block, and several blocks of rows
def test_nearest_is_the_brute_force_argmin(n):
    g = torch.Generator().manual_seed(1)
    x, embed = torch.randn(n, 16, generator=g), torch.randn(64, 16, generator=g)
    brute = torch.cdist(x.double(), embed.double()).argmin(1)
    assert torch.equal(nearest(x, embed), brute)
    cos = (F.normalize(x.double(), dim=1) @ F.normalize(embed.double(), dim=1).T).argmax(1)
    assert torch.equal(nearest(x, embed, cosine=True), cos)


def test_distances_stay_fp32_under_autocast():
    x = clustered(B=2, D=16, T=128, centers=64, spread=0.3)
    rvq = fitted_rvq(x, bins=64, steps=1)
    ref = rvq.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rvq.encode(x), ref)
        out = rvq(x)
    assert torch.equal(out.codes, ref)
    assert out.quantized.dtype == torch.float32


# ----------------------------------------------------------------------------- invariants

@pytest.mark.parametrize("options", [{}, {"codebook_dim": 4, "cosine": True}, {"ema": False}])
def test_eval_forward_equals_decode_of_encode(options):
    x = clustered()
    rvq = fitted_rvq(x, **options)
    with torch.no_grad():
        out = rvq(x)
    codes = rvq.encode(x)
    assert codes.shape == (4, 4, 64) and codes.dtype == torch.long
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.quantized, rvq.decode(codes), rtol=0, atol=0)
    for k in range(1, 5):  # every prefix of levels encodes and decodes on its own
        assert torch.equal(rvq.encode(x, n_q=k), codes[:, :k])
        with torch.no_grad():  # with gradients a projected level returns z_e + (z_q - z_e): z_q to a rounding
            prefix = rvq(x, n_q=k).quantized
        torch.testing.assert_close(prefix, rvq.decode(codes[:, :k]), rtol=0, atol=0)


def test_residual_error_does_not_increase_with_levels():
    x = clustered(B=8, D=8, T=64, centers=64, spread=0.5)
    rvq = fitted_rvq(x, n_q=6, bins=16)
    codes = rvq.encode(x)
    errors = [x.pow(2).mean().item()] + [(x - rvq.decode(codes[:, :k])).pow(2).mean().item() for k in range(1, 7)]
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.2 * errors[1]  # the later levels do real work


def test_gradient_to_the_input_is_the_identity():
    x = clustered().requires_grad_(True)
    rvq = fitted_rvq(x.detach()).train()
    out = rvq(x)
    upstream = torch.randn_like(x)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def test_every_level_commitment_loss_has_its_own_gradient():
    x = clustered().requires_grad_(True)
    rvq = fitted_rvq(x.detach())
    out = rvq(x)  # eval mode: no codebook updates, so the codes below are the ones used
    codes = out.codes
    for k in range(4):
        (grad,) = torch.autograd.grad(out.commitment_losses[k], x, retain_graph=True)
        # d/dx mse(r_k, q_k) with r_k = x - (detached entries of levels < k): 2 (r_k - q_k) / numel
        before = rvq.decode(codes[:, :k]) if k else torch.zeros_like(x)
        residual = x.detach() - before
        entry = rvq.decode(codes[:, :k + 1]) - before
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, 2 * (residual - entry) / x.numel())


# ----------------------------------------------------------------------------- learning rules

def test_kmeans_matches_scikit_learn_lloyd():
    from sklearn.cluster import KMeans

    x = clustered(B=1, D=4, T=400, centers=6, spread=0.4)[0].T.contiguous()  # (400, 4)
    k, iters = 6, 30
    ours, counts = kmeans(x, k, iters, generator=torch.Generator().manual_seed(3))
    start = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:k]]
    ref = KMeans(k, init=start.numpy(), n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x.numpy())
    torch.testing.assert_close(ours, torch.from_numpy(ref.cluster_centers_), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts.long(), torch.bincount(torch.from_numpy(ref.labels_).long(), minlength=k))


def test_kmeans_init_is_deterministic_by_seed():
    x = clustered()
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed + 100)  # the global generator must not matter
        rvq = ResidualVectorQuantizer(8, 3, 32, kmeans_iters=10, seed=seed, threshold_ema_dead_code=0)
        rvq(x)
        states.append(rvq.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    assert not torch.equal(states[0]["layers.0.codebook.embed"], states[2]["layers.0.codebook.embed"])
    assert all(bool(states[0][f"layers.{k}.codebook.inited"]) for k in range(3))


def test_ema_update_with_laplace_smoothing():
    vq = VectorQuantizer(4, 8, kmeans_init=False, threshold_ema_dead_code=0, decay=0.9, epsilon=1e-5)
    book = vq.codebook
    book.cluster_size.fill_(3.0)
    book.embed_avg.copy_(book.embed * 3.0)
    size0, avg0 = book.cluster_size.clone(), book.embed_avg.clone()
    x = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(0))
    rows = x.transpose(1, 2).reshape(-1, 4)
    codes = torch.cdist(rows, book.embed).argmin(1)
    vq.train()(x)
    onehot = F.one_hot(codes, 8).float()  # (N, bins)
    size = 0.9 * size0 + 0.1 * onehot.sum(0)
    avg = 0.9 * avg0 + 0.1 * onehot.T @ rows
    smoothed = (size + 1e-5) / (size.sum() + 8 * 1e-5) * size.sum()
    torch.testing.assert_close(book.cluster_size, size)
    torch.testing.assert_close(book.embed, avg / smoothed.unsqueeze(1))


def test_dead_codes_are_replaced_by_batch_frames():
    x = clustered(B=2, D=8, T=64, centers=4)
    rows = x.transpose(1, 2).reshape(-1, 8)
    vq = VectorQuantizer(8, 16, kmeans_init=False)
    book = vq.codebook
    book.embed.copy_(rows[:16] + 100.0)  # far from every frame: never chosen
    book.embed[:4] = rows[:4]  # 4 live entries
    book.cluster_size.fill_(10.0)
    book.cluster_size[4:] = 1.0  # dead under the default threshold of 2
    book.embed_avg.copy_(book.embed * book.cluster_size.unsqueeze(1))
    torch.manual_seed(0)
    out = vq.train()(x)
    assert out.metrics["replaced"].tolist() == [12]
    # every replaced entry is now one of the batch's frames, and stays there after the EMA step
    dist = torch.cdist(book.embed[4:], rows).min(1).values
    assert dist.max() < 1e-5
    torch.testing.assert_close(book.cluster_size[4:], torch.full((12,), 2.0))


def test_relative_dead_code_threshold_spares_a_small_batch():
    # 384 frames for 256 entries: 1.5 expected hits per entry, under the fixed threshold of 2,
    # so over a hundred fitted entries are "dead" and re-drawn every step; a threshold of a
    # tenth of the expected count re-draws none of them, yet still catches a dead entry.
    x = clustered(B=1, D=8, T=384, centers=64, spread=0.5)
    replaced = {}
    for name, kw in {"fixed": {}, "relative": {"dead_code_relative": 0.1}}.items():
        torch.manual_seed(0)
        vq = VectorQuantizer(8, 256, kmeans_iters=10, **kw).train()
        replaced[name] = [int(vq(x).metrics["replaced"][0]) for _ in range(4)]
    assert min(replaced["fixed"]) > 100, replaced
    assert replaced["relative"] == [0, 0, 0, 0], replaced
    assert vq.codebook.dead_threshold(384) == pytest.approx(0.1 * 384 / 256)
    vq.codebook.cluster_size[:3] = 0.0
    assert int(vq(x).metrics["replaced"][0]) == 3


def test_codebook_loss_trains_a_learned_codebook():
    x = clustered()
    rvq = ResidualVectorQuantizer(8, 2, 16, ema=False, kmeans_iters=5).train()
    out = rvq(x)
    out.loss.backward()
    for layer in rvq.layers:
        assert isinstance(layer.codebook.embed, torch.nn.Parameter)
        assert layer.codebook.embed.grad.abs().sum() > 0
    assert out.codebook_losses.shape == (2,) and (out.codebook_losses > 0).all()


def test_cosine_low_dimensional_codebooks():
    x = clustered(D=16)
    rvq = ResidualVectorQuantizer(16, 3, 32, codebook_dim=4, cosine=True, kmeans_iters=5).train()
    x.requires_grad_(True)
    out = rvq(x)
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert rvq.layers[0].codebook.embed.shape == (32, 4)
    assert rvq.layers[0].in_proj.weight.grad.abs().sum() > 0
    assert rvq.layers[0].out_proj.weight.grad.abs().sum() > 0
    rvq.eval()
    codes = rvq.encode(x.detach(), n_q=1)[:, 0]  # (B, T)
    z = rvq.layers[0].in_proj(x.detach().transpose(1, 2))  # (B, T, 4)
    sims = F.normalize(z, dim=-1) @ F.normalize(rvq.layers[0].codebook.embed, dim=-1).T
    assert torch.equal(codes, sims.argmax(-1))


# ----------------------------------------------------------------------------- quantizer dropout

def test_dropout_draws_every_level_count_per_batch():
    x = clustered(B=2, T=8)
    rvq = ResidualVectorQuantizer(8, 4, 16, quantizer_dropout=1.0, kmeans_iters=2)
    torch.manual_seed(0)
    drawn = [rvq(x).n_q for _ in range(60)]
    assert set(drawn) == {1, 2, 3, 4}
    assert rvq.eval()(x).n_q == 4  # eval mode uses every level


def test_dropout_per_sample_keeps_each_samples_prefix():
    x = clustered(B=16, T=8)
    rvq = ResidualVectorQuantizer(8, 4, 16, quantizer_dropout=1.0, dropout_per_sample=True, kmeans_iters=2)
    torch.manual_seed(0)
    seen = set()
    for _ in range(5):
        before = copy.deepcopy(rvq).eval()  # the codebooks this step's codes come from
        out = rvq(x)
        seen |= set(out.n_q.tolist())
    assert seen == {1, 2, 3, 4}
    for b, n in enumerate(out.n_q.tolist()):  # sample b gets exactly its first n levels
        expected = before.decode(out.codes[b:b + 1, :n])
        torch.testing.assert_close(out.quantized[b:b + 1], expected, rtol=0, atol=0)
    # the deepest level's loss counts only the samples that reached it
    keep = out.n_q == 4
    residual = x - before.decode(out.codes[:, :3])
    entry = before.decode(out.codes) - before.decode(out.codes[:, :3])
    torch.testing.assert_close(out.commitment_losses[3], (residual - entry)[keep].pow(2).mean())


# ----------------------------------------------------------------------------- EnCodec parity

def test_encodec_codebooks_give_transformers_codes():
    from transformers import EncodecConfig, EncodecModel

    # MusicGen's EnCodec in miniature: 32 kHz, hop 640 -> 50 Hz, 4 codebooks (1.2 kbps / 6 bits / 50 Hz)
    config = EncodecConfig(sampling_rate=32_000, upsampling_ratios=[8, 5, 4, 4], codebook_size=64,
                           target_bandwidths=[1.2], hidden_size=16, num_filters=4, num_lstm_layers=1,
                           num_residual_layers=1)
    torch.manual_seed(0)
    hf = EncodecModel(config).eval()
    assert hf.quantizer.num_quantizers == 4
    for k, layer in enumerate(hf.quantizer.layers):  # random codebooks, shrinking like real residuals
        layer.codebook.embed.copy_(torch.randn(64, 16) * 0.5 ** k)
    rvq = ResidualVectorQuantizer(16, 4, 64)
    rvq.load_state_dict(hf.quantizer.state_dict())  # the same names, nothing to map
    wav = torch.randn(2, 1, 32_000)
    with torch.no_grad():
        latents = hf.encoder(wav)  # (B, D, T)
        ref = hf.encode(wav, bandwidth=1.2).audio_codes[0]  # (B, K, T)
        ours = rvq.encode(latents)
        assert torch.equal(ours, ref)
        assert torch.equal(rvq.encode(latents, n_q=2), hf.quantizer.encode(latents, bandwidth=0.6).transpose(0, 1))
        torch.testing.assert_close(rvq.decode(ours), hf.quantizer.decode(ours.transpose(0, 1)))
        torch.testing.assert_close(rvq(latents).quantized, hf.quantizer.decode(ref.transpose(0, 1)))


def test_bad_shapes_name_the_argument():
    rvq = ResidualVectorQuantizer(8, 2, 16)
    with pytest.raises(ValueError, match="latents"):
        rvq.encode(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="n_q"):
        rvq.encode(torch.randn(2, 8, 5), n_q=3)
    with pytest.raises(ValueError, match="codes"):
        rvq.decode(torch.zeros(2, 3, 5, dtype=torch.long))


# ----------------------------------------------------------------------------- DDP

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(rank)  # different random draws on each process
    data = [clustered(B=2, D=8, T=32, centers=24, seed=10 * step + rank) for step in range(4)]
    # k-means, dead codes, EMA, and quantizer dropout (the levels drawn must agree too)
    synced = ResidualVectorQuantizer(8, 3, 32, kmeans_iters=5, quantizer_dropout=1.0)
    big = ResidualVectorQuantizer(8, 2, 32, kmeans_init=False, threshold_ema_dead_code=0)
    levels = []
    for x in data:
        levels.append(synced(x).n_q)
        big(x)
    torch.save({"synced": synced.state_dict(), "big": big.state_dict(), "levels": torch.tensor(levels)},
               os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_processes_agree_and_ema_sees_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["levels"], r1["levels"])
    for name in r0["synced"]:
        assert torch.equal(r0["synced"][name], r1["synced"][name]), name
    # without k-means or dead codes, the all-reduced EMA equals one process on both batches
    single = ResidualVectorQuantizer(8, 2, 32, kmeans_init=False, threshold_ema_dead_code=0)
    for step in range(4):
        single(torch.cat([clustered(B=2, D=8, T=32, centers=24, seed=10 * step + r) for r in range(2)]))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(r0["big"][name], value, msg=name)
