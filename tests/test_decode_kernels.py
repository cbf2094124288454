"""The decoding kernels of the LM's projections (``Linear.decode_kernel``) and their tuner.

Which kernel streams a weight fastest past a decoding step's one or two rows depends on the
CPU (``musicgen_lite.lm.Linear``), so a model times its candidates at its first decoding step.
These tests hold every kernel to the plain ``F.linear`` result, and the tuner to its rule:
measured once per architecture and dtype, the plain kernel unless another is clearly faster,
nothing drawn from the random state."""
import pytest
import torch
import torch.nn.functional as F

import musicgen_lite.lm as lm_module
from musicgen_lite.lm import DECODE_KERNELS, KERNEL_MARGIN, Linear, MusicLM, lm_config


@pytest.fixture
def fresh_tuning(monkeypatch):
    """An empty table of measurements (other tests' models measured the same shapes)."""
    table = {}
    monkeypatch.setattr(lm_module, "_TUNED", table)
    return table


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MusicLM(lm_config("tiny")).eval().to(dtype)


def _decode(lm, steps=4, static=False):
    """Logits of a conditioned prefill then ``steps`` cached one-position steps, batch 2 (CFG's
    rows): through ``forward`` (the lean step) or ``decode_step`` (the static one)."""
    c = lm.config
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, c.bins, (2, c.num_codebooks, steps + 1), generator=g)
    cond = torch.randn(2, 3, c.dim, generator=g).to(lm.emb[0].weight.dtype)
    cache = lm.new_cache(2, steps + 1)
    with torch.no_grad():
        out = [lm(seq[..., :1], cond, cache=cache)[:, :, -1]]
        for s in range(1, steps + 1):
            if static:
                out.append(lm.decode_step(seq[..., s:s + 1], torch.tensor([s]), cache))
            else:
                out.append(lm(seq[..., s:s + 1], cache=cache)[:, :, -1])
    return torch.stack(out, dim=2).float()  # (B, K, steps + 1, bins)


@pytest.mark.parametrize("static", [False, True])
def test_every_kernel_gives_the_plain_logits_and_is_the_one_that_runs(monkeypatch, static):
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or real_linear(*a, **k))
    for dtype, kernels in DECODE_KERNELS.items():
        lm = _model(dtype)
        results = {}
        for kernel in kernels:
            lm.set_decode_kernel(kernel)
            calls.clear()
            results[kernel] = _decode(lm, static=static)
            assert lm.decode_kernel == kernel  # pinned: no tuning overrode it
            if kernel == "linear":
                assert calls, "the plain kernel goes through F.linear"
                assert "_heads_packed" not in lm.__dict__  # nor packs any weight
                assert all("_packed" not in m.__dict__ for m in lm.modules() if isinstance(m, Linear))
            else:  # the step's projections and heads never reach F.linear (the prefill's 3 rows may)
                calls.clear()
                cache = lm.new_cache(2, 2)
                with torch.no_grad():
                    lm(torch.zeros(2, lm.config.num_codebooks, 1, dtype=torch.long), cache=cache)
                    lm.decode_step(torch.zeros(2, lm.config.num_codebooks, 1, dtype=torch.long),
                                   torch.tensor([1]), cache)
                assert not calls, (dtype, kernel, len(calls))
        plain = results["linear"]
        for kernel, logits in results.items():
            if dtype == torch.float32:  # the same sums, accumulated in another order
                torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
            else:  # bf16: fc1's GELU applied before rounding (packed) or after (plain)
                assert (logits - plain).abs().max() <= 0.05 * plain.abs().max(), kernel
                assert (logits.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9
    lm = _model(torch.bfloat16)
    lm.set_decode_kernel("packed")
    _decode(lm)
    if lm.__dict__.get("_heads_packed", (None, None))[1] is not None:  # this build packs bf16 weights
        lm.set_decode_kernel("linear")  # leaving the packed kernel frees the packed copies
        assert "_heads_packed" not in lm.__dict__
        assert all("_packed" not in m.__dict__ for m in lm.modules() if isinstance(m, Linear))


def test_auto_measures_at_the_first_decoding_step_without_touching_the_random_state(fresh_tuning):
    lm = _model()
    assert lm.decode_kernel == "linear" and "_kernel_for" not in lm.__dict__  # nothing measured at build
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    times = lm.tune_decode_kernel(rows=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(times) == set(DECODE_KERNELS[torch.float32]) and all(0 < t < 1 for t in times.values())
    chosen = lm.decode_kernel
    best = min(times, key=times.get)
    assert chosen == (best if times[best] < KERNEL_MARGIN * times["linear"] else "linear")
    assert all(m.decode_kernel == chosen for m in lm.modules() if isinstance(m, Linear))

    other = _model(seed=1)  # same shapes: the decoding step reads the process's measurement
    _decode(other, steps=1)
    assert list(fresh_tuning) == [other._tuning_key(2)] and other.decode_kernel == chosen
    assert other.__dict__["_kernel_for"] == (torch.float32, torch.get_num_threads())


@pytest.mark.parametrize("dtype,times,expected", [
    (torch.float32, {"linear": 1.0, "wx": 0.85}, "wx"),
    (torch.float32, {"linear": 1.0, "wx": 0.95}, "linear"),  # within the margin: the plain kernel
    (torch.float32, {"linear": 0.5, "wx": 1.0}, "linear"),
    (torch.bfloat16, {"linear": 1.0, "packed": 0.5}, "packed"),
    (torch.bfloat16, {"linear": 0.7, "packed": 1.0}, "linear"),
])
def test_the_choice_follows_the_measured_times(fresh_tuning, dtype, times, expected):
    lm = _model(dtype)
    fresh_tuning[lm._tuning_key(2)] = times
    logits = _decode(lm, steps=2)  # tunes at the prefill's one-position step, from the table
    assert lm.decode_kernel == expected
    assert len(fresh_tuning) == 1  # read, not measured again
    lm.set_decode_kernel("linear")
    torch.testing.assert_close(_decode(lm, steps=2), logits, rtol=1e-5 if dtype == torch.float32 else 0.05,
                               atol=1e-5 if dtype == torch.float32 else 0.05 * logits.abs().max().item())


def test_a_cast_or_another_thread_count_measures_again_and_a_pinned_kernel_stays(fresh_tuning):
    lm = _model()
    _decode(lm, steps=1)
    assert lm.__dict__["_kernel_for"][0] == torch.float32
    lm.to(torch.bfloat16)
    _decode(lm, steps=1)
    assert lm.__dict__["_kernel_for"][0] == torch.bfloat16
    assert lm.decode_kernel in DECODE_KERNELS[torch.bfloat16]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        _decode(lm, steps=1)
        assert lm.__dict__["_kernel_for"] == (torch.bfloat16, torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)
    assert len(fresh_tuning) == 3

    lm.set_decode_kernel("packed")
    _decode(lm, steps=1)
    assert lm.decode_kernel == "packed" and len(fresh_tuning) == 3  # pinned: nothing measured
    lm.set_decode_kernel("auto")  # back to measuring: at the next step
    assert lm.decode_kernel == "linear"
    _decode(lm, steps=1)
    assert lm.__dict__["_kernel_for"] == (torch.bfloat16, torch.get_num_threads())


def test_set_decode_kernel_names_the_choices():
    with pytest.raises(ValueError, match="kernel must be one of .*'packed'.*got 'fast'"):
        _model().set_decode_kernel("fast")


def test_tuning_packs_each_weight_once(fresh_tuning, monkeypatch):
    """The packed kernel's copies are made in the untimed first pass and kept through the timed
    rounds (freeing them between rounds would time the packing, not the kernel)."""
    packs = []
    real = lm_module._pack_bf16

    def counting(owner, slot, weights):
        if owner.__dict__.get(slot) is None:
            packs.append((id(owner), slot))
        return real(owner, slot, weights)

    monkeypatch.setattr(lm_module, "_pack_bf16", counting)
    lm = _model(torch.bfloat16)
    lm.tune_decode_kernel(rows=2, rounds=3)
    assert packs and len(packs) == len(set(packs)), (len(packs), len(set(packs)))


def test_a_measurement_holds_for_its_device_only(fresh_tuning):
    """Off the CPU there is one kernel and nothing is timed; that entry must not stand in for a
    CPU model of the same shapes."""
    with torch.device("meta"):
        meta = MusicLM(lm_config("tiny"))
    assert meta.tune_decode_kernel(rows=2) == {"linear": 0.0} and meta.decode_kernel == "linear"
    assert set(_model().tune_decode_kernel(rows=2)) == set(DECODE_KERNELS[torch.float32])
    assert len(fresh_tuning) == 2
