"""MusicLM: parity with transformers' MusicGen decoder, the KV cache, the loss, and sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from musicgen_lite import sampling
from musicgen_lite.lm import MusicLM, from_transformers_decoder, lm_config, sinusoidal_positions
from musicgen_lite.patterns import get_pattern

V, K, D = 32, 4, 32


def tiny_hf_decoder(seed: int = 0):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(seed)
    config = MusicgenDecoderConfig(vocab_size=V, num_codebooks=K, hidden_size=D, num_hidden_layers=2,
                                   num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                                   pad_token_id=V, bos_token_id=V, decoder_start_token_id=V)
    hf = MusicgenForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so that a swapped norm cannot pass unseen
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.normal_()
    return hf


@pytest.fixture(scope="module")
def hf_and_ours():
    hf = tiny_hf_decoder()
    return hf, from_transformers_decoder(hf)


def hf_logits(hf, seq, cond, mask):
    B, K_, S = seq.shape
    with torch.no_grad():
        out = hf(input_ids=seq.reshape(B * K_, S), encoder_hidden_states=cond, encoder_attention_mask=mask)
    return out.logits.reshape(B, K_, S, -1)


def test_positions_match_transformers():
    from transformers.models.musicgen.modeling_musicgen import MusicgenSinusoidalPositionalEmbedding

    theirs = MusicgenSinusoidalPositionalEmbedding(50, 64).weights
    torch.testing.assert_close(sinusoidal_positions(torch.arange(50), 64), theirs)


def test_logits_match_transformers_with_padded_condition(hf_and_ours):
    hf, lm = hf_and_ours
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V + 1, (3, K, 12), generator=g)  # special tokens included
    cond = torch.randn(3, 6, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ours = lm(seq, cond, mask)
    torch.testing.assert_close(ours, hf_logits(hf, seq, cond, mask), rtol=1e-5, atol=1e-5)
    # the padding is really ignored: garbage there changes nothing
    cond2 = cond.clone()
    cond2[mask == 0] = 1e3
    with torch.no_grad():
        torch.testing.assert_close(lm(seq, cond2, mask), ours)


def test_null_condition_adds_nothing(hf_and_ours):
    """transformers' CFG null input: zero states, all-zero mask. Ours: no NaN, equal to no cross-attention."""
    hf, lm = hf_and_ours
    seq = torch.randint(0, V, (2, K, 7))
    cond, mask = torch.zeros(2, 5, D), torch.zeros(2, 5, dtype=torch.long)
    with torch.no_grad():
        ours = lm(seq, cond, mask)
        random_states = lm(seq, torch.randn(2, 5, D), mask)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, hf_logits(hf, seq, cond, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(random_states, ours)  # masked states are never read


def test_parameter_count_equals_transformers(hf_and_ours):
    hf, lm = hf_and_ours
    assert lm.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_kv_cache_decoding_equals_full_forward(hf_and_ours):
    _, lm = hf_and_ours
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, V + 1, (2, K, 11), generator=g)
    cond = torch.randn(2, 4, D, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    calls = []
    hooks = [b.cross.kv.register_forward_hook(lambda *a: calls.append(1)) for b in lm.blocks]
    with torch.no_grad():
        full = lm(seq, cond, mask)
        calls.clear()
        cache = lm.new_cache(2, max_len=16)
        ptr = cache.self_k[0].data_ptr()
        parts = [lm(seq[..., :4], cond, mask, cache=cache)]  # prefill 4 positions at once
        parts.append(lm(seq[..., 4:7], cache=cache))  # a block after a prefix (masked)
        parts += [lm(seq[..., s:s + 1], cache=cache) for s in range(7, 11)]  # one step at a time
    for h in hooks:
        h.remove()
    torch.testing.assert_close(torch.cat(parts, dim=2), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 11 and cache.self_k[0].data_ptr() == ptr  # preallocated, written in place
    assert len(calls) == lm.config.num_layers  # condition keys/values computed once per generation
    with pytest.raises(ValueError, match="KV cache holds 16"):
        lm(seq[..., :6], cache=cache)


@pytest.mark.parametrize("L", [6, 40])  # 6 <= head dim 16: the folded cross-attention; 40: the plain one
def test_lean_decoding_step_equals_the_modules(L):
    """A one-position cached step without gradients runs ``_lean_blocks`` (a flat loop, the
    cross-attention's projections folded into the condition): the same logits as the
    modules' path and as one full forward, in fp32 to rounding, with a padded condition row
    and a null one (CFG), across the 32-key switch of ``attention``; bf16 stays as close
    to the full forward as the modules' path does."""
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", num_heads=4)).eval()  # dim 64: head dim 16
    g = torch.Generator().manual_seed(5)
    S = 40
    seq = torch.randint(0, lm.config.bins + 1, (2, lm.config.num_codebooks, S), generator=g)
    cond = torch.randn(2, L, lm.config.dim, generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, L // 2:] = 0  # padded
    mask[1] = 0  # the null condition
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        lm = lm.to(dtype)
        c = cond.to(dtype)
        outs = {}
        with torch.no_grad():
            full = lm(seq, c, mask).float()
            for lean in (True, False):
                lm.lean_decode = lean
                cache = lm.new_cache(2, S)
                steps = [lm(seq[..., :3], c, mask, cache=cache)]
                steps += [lm(seq[..., s:s + 1], cache=cache) for s in range(3, S)]
                outs[lean] = torch.cat(steps, dim=2).float()
                folded = cache.cross_folded
                assert (folded is not None and all(f is not None for f in folded)) == (lean and L <= 16)
        if tol is not None:
            torch.testing.assert_close(outs[True], outs[False], rtol=tol, atol=tol)
            torch.testing.assert_close(outs[True], full, rtol=tol, atol=tol)
        else:
            err_lean, err_modules = (outs[True] - full).abs().max(), (outs[False] - full).abs().max()
            assert err_lean <= 2 * err_modules + 1e-2, (err_lean, err_modules)
            agree = (outs[True].argmax(-1) == full.argmax(-1)).float().mean()
            assert agree > 0.9, agree
    lm.lean_decode = True
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache holds 40"):
        lm(seq[..., :1], cache=cache)


def test_bf16_decoding_with_packed_weights_equals_the_plain_matmul():
    """bf16 decoding on a CPU multiplies by weights packed once in oneDNN's layout; the logits
    equal the plain ``F.linear`` ones, and a weight change repacks (no stale copy)."""
    from musicgen_lite.lm import Linear

    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny")).eval().to(torch.bfloat16)
    lm.set_decode_kernel("packed")  # whichever kernel this machine would choose
    lm.lean_decode = False  # the modules' path in both (the lean step regroups the sums: test_lean_decoding_step)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, lm.config.bins, (2, lm.config.num_codebooks, 5), generator=g)
    cond = torch.randn(2, 3, lm.config.dim, generator=g).to(torch.bfloat16)

    def decode():
        cache = lm.new_cache(2, 8)
        return torch.cat([lm(seq[..., :1], cond, cache=cache)] + [lm(seq[..., s:s + 1], cache=cache)
                                                                  for s in range(1, 5)], dim=2)

    with torch.no_grad():  # packed path (no gradient, a few rows)
        packed = decode()
    linears = [m for m in lm.modules() if isinstance(m, Linear)]
    if all(m.__dict__.get("_packed", (None, None))[1] is None for m in linears):
        pytest.skip("this PyTorch build cannot pack bf16 weights for oneDNN")
    with torch.enable_grad():  # F.linear path
        plain = decode().detach()
    torch.testing.assert_close(packed.float(), plain.float(), rtol=0, atol=0)
    with torch.no_grad():
        lm.heads[0].weight.mul_(-1)  # in place: same storage, new version
        flipped = decode()
    with torch.enable_grad():
        expected = decode().detach()
    torch.testing.assert_close(flipped.float(), expected.float(), rtol=0, atol=0)
    assert not torch.equal(flipped, packed)


def test_decoding_attention_in_bf16_agrees_with_the_kernel_and_exact_elsewhere():
    """One query row in bf16 against 32+ keys is computed in fp32; it agrees with the exact
    attention (fp32 from the same bf16 numbers) as closely as the kernel does."""
    from musicgen_lite.lm import attention

    g = torch.Generator().manual_seed(4)
    for L in (32, 300):
        q, k, v = (torch.randn(2, 4, n, 32, generator=g).to(torch.bfloat16) for n in (1, L, L))
        mask = torch.rand(2, 1, 1, L, generator=g) > 0.3
        mask[..., 0] = True
        for m in (None, mask):
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m)
            kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=m).float()
            ours = attention(q, k, v, m).float()
            assert ours.shape == exact.shape
            assert (ours - exact).abs().max() <= 1.5 * (kernel - exact).abs().max() + 1e-6
    # anything else is the kernel itself: fp32, fewer keys, several queries, causal
    q, k, v = (torch.randn(2, 4, n, 32, generator=g) for n in (1, 64, 64))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    qb, kb, vb = q.bfloat16(), k[..., :16, :].bfloat16(), v[..., :16, :].bfloat16()
    assert torch.equal(attention(qb, kb, vb), F.scaled_dot_product_attention(qb, kb, vb))
    q3 = torch.randn(2, 4, 3, 32, generator=g).bfloat16()
    assert torch.equal(attention(q3, k.bfloat16(), v.bfloat16()),
                       F.scaled_dot_product_attention(q3, k.bfloat16(), v.bfloat16()))


def test_kv_cache_matches_transformers_cache(hf_and_ours):
    """Step-by-step with transformers' own cache vs ours: the same last-position logits."""
    hf, lm = hf_and_ours
    seq = torch.randint(0, V, (1, K, 6))
    cond, mask = torch.randn(1, 3, D), torch.ones(1, 3, dtype=torch.long)
    cache, past = lm.new_cache(1, 8), None
    with torch.no_grad():
        for s in range(6):
            out = hf(input_ids=seq[..., s:s + 1].reshape(K, 1), encoder_hidden_states=cond,
                     encoder_attention_mask=mask, cache=past, use_cache=True)
            past = out.cache if hasattr(out, "cache") else out.past_key_values
            ours = lm(seq[..., s:s + 1], cond, mask, cache=cache)
            torch.testing.assert_close(ours, out.logits.reshape(1, K, 1, V), rtol=1e-5, atol=1e-5)


def test_loss_per_codebook_equals_explicit_sum():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=16, cross_attention=False)).eval()
    pattern = get_pattern("delay", K)
    codes = torch.randint(0, 16, (2, K, 5))
    with torch.no_grad():
        loss, per_cb = lm.compute_loss(codes, pattern)
        seq, _ = pattern.build(codes, 16)
        logits = lm(seq[..., :-1])
    # explicit: token (t, k) sits at step t + k + 1 (delay), predicted by position t + k
    for k in range(K):
        ce = [F.cross_entropy(logits[b, k, t + k], codes[b, k, t]) for b in range(2) for t in range(5)]
        torch.testing.assert_close(per_cb[k], torch.stack(ce).mean())
    torch.testing.assert_close(loss, per_cb.mean())


def test_training_step_lowers_loss_and_gaps_get_no_gradient():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=16, cross_attention=False))
    pattern = get_pattern("delay", K)
    codes = torch.randint(0, 16, (4, K, 6))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    seen = []
    hook = lm.register_forward_hook(lambda m, i, out: out.retain_grad() or seen.append(out))
    losses = []
    for _ in range(12):
        loss, _ = lm.compute_loss(codes, pattern)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    hook.remove()
    assert losses[-1] < 0.7 * losses[0]
    # outputs at positions whose next step is a gap for codebook k are never scored
    _, mask = pattern.build(codes, 16)
    grad = seen[0].grad.abs().sum(dim=(0, 3))  # (K, S)
    target_real = mask[:, 1:]  # position s predicts step s + 1
    assert (grad[~target_real] == 0).all() and (grad[target_real] > 0).all()


def test_presets_and_conditioning_errors():
    small = lm_config("small")
    assert (small.dim, small.num_layers, small.num_heads, small.ffn_dim) == (1024, 24, 16, 4096)
    assert (lm_config("medium").dim, lm_config("medium").num_layers, lm_config("medium").num_heads) == (1536, 48, 24)
    assert (lm_config("large").dim, lm_config("large").num_layers, lm_config("large").num_heads) == (2048, 48, 32)
    assert lm_config("full") == small
    with torch.device("meta"):
        n = MusicLM(small).num_parameters()
    assert 400e6 < n < 430e6  # 24 blocks of ~16.8M + 4 embeddings and 4 heads of 2M each
    with pytest.raises(ValueError, match="unknown LM preset"):
        lm_config("huge")
    lm = MusicLM(lm_config("tiny", bins=16))
    with pytest.raises(ValueError, match="seq must be"):
        lm(torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cond must be"):
        lm(torch.zeros(1, K, 4, dtype=torch.long), torch.zeros(1, 2, 7))


# ------------------------------------------------------------------------------- sampling

def test_top_k_keeps_exactly_k():
    logits = torch.randn(3, 4, 50)
    out = sampling.top_k_filter(logits, 7)
    assert (torch.isfinite(out).sum(-1) == 7).all()
    kept = torch.isfinite(out)
    assert (logits[kept].view(3, 4, 7).min(-1).values >= logits.masked_fill(kept, -1e9).max(-1).values).all()
    torch.testing.assert_close(out[kept], logits[kept])


def test_top_p_boundary():
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])  # sorted: 0.5, 0.25, 0.15, 0.1
    logits = probs.log()
    kept = lambda p: torch.isfinite(sampling.top_p_filter(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [1]  # the top token alone already holds 0.5 >= 0.4
    assert kept(0.6) == [1, 2]  # 0.5 < 0.6: add the next one
    assert kept(0.74) == [1, 2]
    assert kept(0.76) == [1, 2, 3]
    assert kept(0.95) == [0, 1, 2, 3]


def test_greedy_is_argmax_and_sampling_follows_the_distribution():
    logits = torch.randn(2, 4, 30)
    assert torch.equal(sampling.sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sampling.sample_next(logits, top_k=1), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.7, 0.2, 0.1])
    draws = sampling.sample_next(probs.log().expand(20000, 3), generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities (renormalised); top-k 2 drops the last one
    draws = sampling.sample_next(probs.log().expand(20000, 3), temperature=0.5, top_k=2, generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.49, 0.04, 0.0]) / 0.53, atol=0.015, rtol=0)
    a = sampling.sample_next(logits, generator=torch.Generator().manual_seed(3), top_k=10)
    b = sampling.sample_next(logits, generator=torch.Generator().manual_seed(3), top_k=10)
    assert torch.equal(a, b)


def test_cfg_formula_and_the_two_variants(hf_and_ours):
    cond, uncond = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    torch.testing.assert_close(sampling.cfg(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(sampling.cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(sampling.cfg_from_batch(torch.cat([cond, uncond]), 2.5),
                               uncond + 2.5 * (cond - uncond))
    # one batch of 2B rows == two passes of B rows, for the LM
    _, lm = hf_and_ours
    seq = torch.randint(0, V, (2, K, 5))
    c, m = torch.randn(2, 3, D), torch.tensor([[1, 1, 0], [1, 1, 1]])
    null, null_m = torch.zeros(2, 3, D), torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        one = sampling.cfg_from_batch(lm(seq.repeat(2, 1, 1), torch.cat([c, null]), torch.cat([m, null_m])), 3.0)
        two = sampling.cfg_two_pass(lm, seq, c, m, null, null_m, 3.0)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


def test_position_table_grows_and_matches_the_formula():
    lm = MusicLM(lm_config("tiny", bins=16))
    torch.testing.assert_close(lm.positions(3000, "cpu")[:3000], sinusoidal_positions(torch.arange(3000), 64))


def test_bench_decoders_run_for_both_models_deep_into_a_clip_and_compiled():
    """`bench lm`'s runners at a tiny size: the context variant prefills once, then every run
    decodes after the same context (ours resets its position, transformers' cache is cut back)."""
    from musicgen_lite.bench import _lm_decoders, _lm_models

    ours, hf = _lm_models("tiny")
    with torch.inference_mode():
        for context in (0, 40):
            run_ours, run_hf, step_bytes = _lm_decoders(ours, hf, 3, context=context)
            for _ in range(2):
                run_ours(), run_hf()
            assert step_bytes > 0
        # the compiled step's runner: the same draws as the eager one (each runner seeds its own sampler)
        eager = _lm_decoders(ours, hf, 6)[0]()
        compiled = _lm_decoders(ours, hf, 6, compiled=True)[0]()
        assert torch.equal(compiled, eager)
        with pytest.raises(ValueError, match="pass context=0"):
            _lm_decoders(ours, hf, 3, context=40, compiled=True)
