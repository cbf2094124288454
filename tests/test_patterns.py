"""Codebook interleaving patterns: exact step counts, transformers' delay pattern, round
trips and the dependencies each pattern promises (hypothesis), errors that name the problem.

Outside references: the MusicGen paper / audiocraft step counts for 30 s at 50 Hz,
transformers' ``MusicgenForCausalLM.build_delay_pattern_mask`` (a tiny random model built
here), and, where audiocraft is installed (``pip install --no-deps audiocraft``; optional),
audiocraft's own pattern providers.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musicgen_lite.patterns import PATTERNS, Pattern, delay_layout, get_pattern

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def n_q_for(name: str, k: int) -> int:
    """stereo_delay needs an even number of codebooks."""
    return 2 * ((k + 1) // 2) if name == "stereo_delay" else k


@st.composite
def pattern_cases(draw, names=PATTERNS, max_T=200):
    name = draw(st.sampled_from(names))
    K = n_q_for(name, draw(st.integers(1, 8)))
    T = draw(st.integers(1, max_T))
    return get_pattern(name, K), K, T


# --------------------------------------------------------------------------- step counts

def test_steps_for_30_seconds_match_the_paper_and_audiocraft():
    T = 30 * 50  # 30 s at EnCodec's 50 frames/s
    steps = {name: get_pattern(name, 4).num_steps(T) for name in
             ("flatten", "delay", "parallel", "coarse_first", "partial_flatten")}
    assert steps == {"flatten": 6000, "delay": 1503, "parallel": 1500, "coarse_first": 3000,
                     "partial_flatten": 3000}
    assert get_pattern("partial_delay", 4, delays=[0, 2, 2, 2]).num_steps(T) == 1502
    assert get_pattern("stereo_delay", 8).num_steps(T) == 1503


@given(pattern_cases())
@SETTINGS
def test_num_steps_formulas(case):
    pattern, K, T = case
    expected = {
        "flatten": K * T,
        "delay": T + K - 1,
        "partial_delay": T + (2 if K > 1 else 0),
        "parallel": T,
        "coarse_first": T + (T if K > 1 else 0),
        "partial_flatten": T * (2 if K > 1 else 1),
        "stereo_delay": T + K // 2 - 1,
    }[pattern.name]
    assert pattern.num_steps(T) == expected
    assert len(pattern.layout(T)) == expected + 1
    assert pattern.frames(expected) == T  # the inverse used by revert (cached) ...
    assert get_pattern(pattern.name, K).frames(expected) == T  # ... and found by bisection (cold)


# ------------------------------------------------------------------ transformers' delay pattern

@functools.lru_cache(maxsize=None)
def hf_decoder(num_codebooks: int, audio_channels: int):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(0)
    config = MusicgenDecoderConfig(vocab_size=32, num_codebooks=num_codebooks, audio_channels=audio_channels,
                                   hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16,
                                   max_position_embeddings=256, pad_token_id=32, bos_token_id=32)
    return MusicgenForCausalLM(config).eval()


@given(st.booleans(), st.integers(1, 8), st.integers(0, 60), st.integers(1, 3), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_delay_equals_transformers_build_delay_pattern_mask(stereo, k, extra, B, seed):
    """Our delay sequence == transformers' pattern mask for a prompt of [BOS] + codes.

    transformers places a prompt [BOS, c_0, ..., c_{T-1}] of codebook k at offset k, then
    overwrites steps <= k and >= T + 1 + k with the pad token: exactly our layout with the
    pad as ``special``. With no prompt its ``-1`` slots (to be generated) are our mask.
    transformers skips the pattern when max_length < 2 * K - 1, so T >= K - 1 here.
    """
    channels = 2 if stereo else 1
    K = k * channels  # stereo interleaves left/right: codebooks (2j, 2j+1) share delay j
    T = (k - 1) + extra if k > 1 else 1 + extra
    model = hf_decoder(K, channels)
    pad, bos = 32, 32
    codes = torch.randint(0, 32, (B, K, T), generator=torch.Generator().manual_seed(seed))
    pattern = get_pattern("stereo_delay" if stereo else "delay", K)
    seq, mask = pattern.build(codes, special=pad)
    S = pattern.num_steps(T) + 1
    assert S == T + k  # transformers' max_length for T frames

    prompt = torch.cat([torch.full((B, K, 1), bos), codes], dim=2).reshape(B * K, T + 1)
    _, pattern_mask = model.build_delay_pattern_mask(prompt, pad_token_id=pad, max_length=S)
    torch.testing.assert_close(seq, pattern_mask.reshape(B, K, S), rtol=0, atol=0)
    _, to_generate = model.build_delay_pattern_mask(torch.full((B * K, 1), bos), pad_token_id=pad, max_length=S)
    assert torch.equal(to_generate.reshape(B, K, S) == -1, mask.expand(B, K, S))
    # transformers reverts after generate() by dropping the pad tokens: same codes as ours
    assert torch.equal(pattern_mask[pattern_mask != pad].reshape(B, K, T), pattern.revert(seq))


# -------------------------------------------------------------------------------- round trips

@given(pattern_cases(), st.integers(1, 4), st.integers(0, 2**31 - 1))
@SETTINGS
def test_revert_build_is_identity(case, B, seed):
    pattern, K, T = case
    cardinality = 2048
    codes = torch.randint(0, cardinality, (B, K, T), generator=torch.Generator().manual_seed(seed))
    seq, mask = pattern.build(codes, special=cardinality)
    S = pattern.num_steps(T) + 1
    assert seq.shape == (B, K, S) and mask.shape == (K, S) and mask.dtype == torch.bool
    assert torch.equal(pattern.revert(seq), codes)
    longer = torch.cat([seq, torch.full((B, K, 3), cardinality)], dim=2)  # e.g. a padded batch
    assert torch.equal(pattern.revert(longer, T=T), codes)
    assert torch.equal(seq != cardinality, mask.expand(B, K, S))  # special exactly where mask is False
    assert int(mask.sum()) == K * T and not mask[:, 0].any()  # every token once; step 0 is the start
    assert torch.equal(seq[mask.expand(B, K, S)].sort().values, codes.flatten().sort().values)


@pytest.mark.parametrize("name", PATTERNS)
def test_build_keeps_dtype_and_revert_carries_trailing_dims(name):
    pattern = get_pattern(name, 4)
    codes = torch.randint(0, 100, (2, 4, 7), dtype=torch.int32)
    seq, _ = pattern.build(codes, special=100)
    assert seq.dtype == torch.int32 and torch.equal(pattern.revert(seq), codes)
    emb = torch.randn(2, 4, 7, 3)  # e.g. per-token embeddings: interleave by hand, revert with the pattern
    steps = pattern.steps(7)
    seq_emb = torch.zeros(2, 4, pattern.num_steps(7) + 1, 3)
    for k in range(4):
        seq_emb[:, k, steps[k]] = emb[:, k]
    torch.testing.assert_close(pattern.revert(seq_emb), emb, rtol=0, atol=0)


@given(pattern_cases(max_T=60), st.integers(0, 2**31 - 1))
@SETTINGS
def test_revert_logits_line_up_with_the_targets(case, seed):
    """An oracle whose output at position s is one-hot on the tokens of step s + 1 must, after
    revert_logits, predict every code exactly: the shift by one step is where it belongs."""
    pattern, K, T = case
    card = 16
    codes = torch.randint(0, card, (2, K, T), generator=torch.Generator().manual_seed(seed))
    seq, mask = pattern.build(codes, special=card)
    targets = seq[..., 1:]  # what the LM must predict from the inputs seq[..., :-1]
    oracle = torch.nn.functional.one_hot(targets, card + 1).float()  # (B, K, num_steps, card + 1)
    out = pattern.revert_logits(oracle)
    assert out.shape == (2, K, T, card + 1)
    assert torch.equal(out.argmax(-1), codes)
    # the same from logits of the whole sequence (one extra, unused position), T given
    full = torch.cat([oracle, torch.randn(2, K, 1, card + 1)], dim=2)
    assert torch.equal(pattern.revert_logits(full, T=T).argmax(-1), codes)
    # and it is the cross-entropy over the valid pattern positions, computed either way
    logits = torch.randn(2, K, pattern.num_steps(T), card, generator=torch.Generator().manual_seed(seed))
    ce_tokens = torch.nn.functional.cross_entropy(pattern.revert_logits(logits).flatten(0, 2), codes.flatten())
    valid = mask[:, 1:].expand(2, K, -1)
    ce_seq = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    torch.testing.assert_close(ce_tokens, ce_seq)


# ----------------------------------------------------------------------------- dependencies

def before_matrix(pattern: Pattern, T: int) -> torch.Tensor:
    """(K*T, K*T) bool: [i, j] True when token j = (t', k') is known before token i = (t, k)."""
    s = pattern.steps(T).flatten()  # index k * T + t
    return s[None, :] < s[:, None]


def expected_matrix(K: int, T: int, rule) -> torch.Tensor:
    k, t = torch.meshgrid(torch.arange(K), torch.arange(T), indexing="ij")
    k, t = k.flatten(), t.flatten()
    return rule(t[:, None], k[:, None], t[None, :], k[None, :])  # (t, k) sees (t2, k2)?


@given(pattern_cases(max_T=120))
@SETTINGS
def test_each_pattern_keeps_its_promised_dependencies(case):
    """The set of tokens known when (t, k) is predicted, stated per pattern from its definition."""
    pattern, K, T = case
    name = pattern.name
    if name == "flatten":
        rule = lambda t, k, t2, k2: (t2 < t) | ((t2 == t) & (k2 < k))  # noqa: E731 (raster order)
    elif name == "parallel":
        rule = lambda t, k, t2, k2: t2 < t  # noqa: E731
    elif name in ("delay", "partial_delay", "stereo_delay"):
        d = torch.tensor(pattern.options.get("delays", [j // 2 for j in range(K)]))
        rule = lambda t, k, t2, k2: t2 + d[k2] < t + d[k]  # noqa: E731
    elif name == "coarse_first":
        rule = lambda t, k, t2, k2: torch.where(k == 0, (k2 == 0) & (t2 < t), (k2 == 0) | (t2 < t))  # noqa: E731
    elif name == "partial_flatten":
        g = torch.tensor(pattern.options["flattening"])
        rule = lambda t, k, t2, k2: (t2 < t) | ((t2 == t) & (g[k2] < g[k]))  # noqa: E731
    assert torch.equal(before_matrix(pattern, T), expected_matrix(K, T, rule))

    steps = pattern.steps(T)
    assert bool((steps[:, 1:] > steps[:, :-1]).all())  # each stream goes forward in time
    t, k = T // 2, K - 1
    assert torch.equal(pattern.context(T, t, k), steps < steps[k, t])


@given(st.integers(2, 8), st.integers(2, 100), st.data())
@SETTINGS
def test_delay_dependencies_spelled_out(K, T, data):
    """MusicGen's delay: (t, k) comes after (t, k-1) and after frame t-1 of codebooks <= k;
    codebooks above k of frame t-1 are still to come (they lag more)."""
    pattern = get_pattern("delay", K)
    t = data.draw(st.integers(1, T - 1))
    k = data.draw(st.integers(1, K - 1))
    seen = pattern.context(T, t, k)  # (K, T)
    assert seen[k - 1, t] and seen[: k + 1, t - 1].all()
    assert not seen[k:, t].any() and not seen[k + 1:, t - 1].any()
    assert seen[:, : max(0, t - K + 1 + k)].all()  # frames far enough back: all codebooks


def test_coarse_first_fine_codebooks_see_the_whole_coarse_stream():
    pattern = get_pattern("coarse_first", 4)
    seen = pattern.context(50, 10, 2)
    assert seen[0].all() and seen[1:, :10].all() and not seen[1:, 10:].any()
    assert pattern.context(50, 10, 0).sum() == 10  # codebook 0 sees its own past only


def test_stereo_left_and_right_of_one_level_are_predicted_together():
    steps = get_pattern("stereo_delay", 8).steps(20)
    assert torch.equal(steps[0::2], steps[1::2])
    assert torch.equal(steps[0::2] - steps[0], torch.arange(4)[:, None].expand(4, 20))


# ------------------------------------------------------------------- structure and caching

def test_indexes_are_precomputed_once_per_length():
    calls = []

    def counting_layout(T):
        calls.append(T)
        return delay_layout(T, (0, 1, 2))

    pattern = Pattern(3, counting_layout, "counting")
    codes = torch.randint(0, 10, (4, 3, 25))
    for _ in range(3):
        seq, mask = pattern.build(codes, special=10)
        assert torch.equal(pattern.revert(seq), codes)
    pattern.revert_logits(torch.randn(4, 3, pattern.num_steps(25), 10))
    assert calls == [25] and pattern.mask(25) is mask


def test_a_custom_layout_works_like_the_builtin_ones():
    """A MusicLM-like order (all of codebook 0 and 1 frame by frame, then 2 and 3)."""
    def coarse_then_fine(T):
        return [[]] + [[(t, k)] for lo in (0, 2) for t in range(T) for k in (lo, lo + 1)]

    pattern = Pattern(4, coarse_then_fine, "coarse_then_fine")
    codes = torch.randint(0, 50, (3, 4, 11))
    seq, _ = pattern.build(codes, special=50)
    assert pattern.num_steps(11) == 44 and torch.equal(pattern.revert(seq), codes)
    assert pattern.context(11, 0, 2)[:2].all()


def test_layout_is_a_list_of_steps_of_coordinates():
    layout = get_pattern("delay", 3).layout(3)
    assert layout == [[], [(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1), (0, 2)], [(2, 1), (1, 2)], [(2, 2)]]
    assert get_pattern("partial_flatten", 3).layout(2) == [[], [(0, 0)], [(0, 1), (0, 2)], [(1, 0)], [(1, 1), (1, 2)]]
    assert get_pattern("coarse_first", 2).layout(2) == [[], [(0, 0)], [(1, 0)], [(0, 1)], [(1, 1)]]
    layout.append("mutable copy")  # a fresh list each call: the cached tables do not change
    assert len(get_pattern("delay", 3).layout(3)) == 6


def test_meta_device_tables_are_cached_separately():
    pattern = get_pattern("delay", 4)
    seq, mask = pattern.build(torch.zeros(2, 4, 9, dtype=torch.long, device="meta"), special=1)
    assert seq.device.type == "meta" and mask.device.type == "meta" and seq.shape == (2, 4, 13)
    assert pattern.mask(9).device.type == "cpu"


# ----------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, match", [
    (lambda: get_pattern("zigzag", 4), "unknown pattern 'zigzag'"),
    (lambda: get_pattern("delay", 4, delays=[0, 1]), "expected 4 delays"),
    (lambda: get_pattern("delay", 4, delays=[0, 1, -1, 2]), "must be >= 0"),
    (lambda: get_pattern("partial_flatten", 4, flattening=[0, 2, 2, 2]), r"group\(s\) \[1\] empty"),
    (lambda: get_pattern("stereo_delay", 3), "must be even"),
    (lambda: get_pattern("coarse_first", 4, delays=[0, 1]), "expected 3 delays"),
    (lambda: get_pattern("delay", 0), "n_q must be >= 1"),
    (lambda: get_pattern("delay", 4).build(torch.zeros(1, 3, 5, dtype=torch.long), 9), r"K=4.*\[1, 3, 5\]"),
    (lambda: get_pattern("delay", 4).build(torch.zeros(1, 4, 5), 9), "integer"),
    (lambda: get_pattern("delay", 4).num_steps(0), "positive int"),
    (lambda: get_pattern("flatten", 4).revert(torch.zeros(1, 4, 6, dtype=torch.long)), "no number of frames"),
    (lambda: get_pattern("delay", 4).revert(torch.zeros(1, 4, 6, dtype=torch.long), T=5), "need 9"),
    (lambda: get_pattern("delay", 4).revert_logits(torch.zeros(1, 4, 6, 8), T=5), "need 8"),
    (lambda: Pattern(2, lambda T: [[(0, 0)], [(0, 1)]]).num_steps(1), "step 0"),
    (lambda: Pattern(2, lambda T: [[], [(0, 0)], [(0, 0), (0, 1)]]).num_steps(1), r"\(t=0, k=0\) appears 2"),
    (lambda: Pattern(2, lambda T: [[], [(0, 0)]]).num_steps(1), r"\(t=0, k=1\) appears 0"),
    (lambda: Pattern(2, lambda T: [[], [(0, 0), (1, 0)], [(0, 1), (1, 1)]]).num_steps(2), "at most one token"),
    (lambda: Pattern(2, lambda T: [[], [(0, 0), (0, 2)]]).num_steps(1), "outside"),
])
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_option_names_the_option():
    with pytest.raises(TypeError, match="'flattening'"):
        get_pattern("delay", 4, flattening=[0, 1, 2, 3])


# ------------------------------------------------ audiocraft's providers (optional reference)

def _audiocraft_patterns():
    spec = importlib.util.find_spec("audiocraft")
    if spec is None or spec.origin is None:
        pytest.skip("audiocraft not installed (optional: pip install --no-deps audiocraft)")
    path = pathlib.Path(spec.origin).parent / "modules" / "codebooks_patterns.py"
    # Load the one file alone: the package's __init__ imports dependencies we do not need.
    module_spec = importlib.util.spec_from_file_location("audiocraft_codebooks_patterns", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["flatten", "delay", "partial_delay", "parallel", "coarse_first", "partial_flatten"])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_matches_audiocraft_providers(name, T):
    ac = _audiocraft_patterns()
    provider = {
        "flatten": lambda: ac.UnrolledPatternProvider(4),
        "delay": lambda: ac.DelayedPatternProvider(4),
        "partial_delay": lambda: ac.DelayedPatternProvider(4, delays=[0, 2, 2, 2]),
        "parallel": lambda: ac.ParallelPatternProvider(4),
        "coarse_first": lambda: ac.CoarseFirstPattern(4),
        "partial_flatten": lambda: ac.UnrolledPatternProvider(4, flattening=[0, 1, 1, 1]),
    }[name]()
    theirs = provider.get_pattern(T)
    ours = get_pattern(name, 4)
    # audiocraft keeps coordinates past the end in its layout and drops them when building
    their_layout = [[(c.t, c.q) for c in step if c.t < T] for step in theirs.layout]
    assert ours.layout(T) == their_layout
    assert ours.num_steps(T) == theirs.num_sequence_steps

    codes = torch.randint(0, 2048, (3, 4, T), generator=torch.Generator().manual_seed(T))
    their_seq, _, their_mask = theirs.build_pattern_sequence(codes, 2048)
    seq, mask = ours.build(codes, 2048)
    assert torch.equal(seq, their_seq) and torch.equal(mask, their_mask)
    logits = torch.randn(3, 4, ours.num_steps(T) + 1, 8)  # audiocraft feeds the whole sequence
    their_logits, _, _ = theirs.revert_pattern_logits(logits.permute(0, 3, 1, 2), float("nan"))
    torch.testing.assert_close(ours.revert_logits(logits, T=T), their_logits.permute(0, 2, 3, 1), rtol=0, atol=0)
