"""The compiled decoding step (``generate(..., fast=True, compile_step=True)`` on a CPU).

``MusicLM.compiled_decode_step`` runs ``decode_step`` through ``torch.compile`` with the
weights frozen in as constants. Its tokens must be the eager fast loop's (which the other
tests tie to the plain loop and to transformers), and a compiled step must never answer with
weights that are not the model's own: another model's, or the ones it had before an edit.
Each compile takes about 10 s here, so the tests share as few shapes as they can.
"""
from __future__ import annotations

import pytest
import torch
from test_fast_generation import toy_melody_musicgen, tune
from test_generation import V, ToyCodec, toy_musicgen

from musicgen_lite.lm import CompiledStep, MusicLM, lm_config

TEXTS = ["a sad piano piece", "", "an energetic rock song with drums at 150 bpm"]  # "": a null row


def test_compiled_step_gives_the_fast_loops_tokens():
    mg = toy_musicgen()  # 20-frame windows: every window has the same shapes, so one compile serves all
    for kw in (dict(duration=0.3, top_k=1),  # greedy: the plain loop's tokens
               dict(duration=1.0, top_k=1),  # four windows, each prompted by the last
               dict(duration=0.3, top_k=5, seed=3)):  # sampled: the same noise, so the same draws
        fast = mg.generate_codes(TEXTS, progress=False, fast=True, **kw)
        compiled = mg.generate_codes(TEXTS, progress=False, fast=True, compile_step=True, **kw)
        assert torch.equal(compiled, fast), kw
        if kw.get("top_k") == 1:
            assert torch.equal(compiled, mg.generate_codes(TEXTS, progress=False, **kw)), kw
    assert isinstance(mg.lm.__dict__["_compiled_step"], CompiledStep)  # kept on the model, reused


def test_compiled_step_reads_the_melody_rows_of_a_melody_model():
    """``melody_mode="add"``: the step itself picks each frame's chroma row (inside the compiled code)."""
    mg = toy_melody_musicgen(melody_mode="add", melody_rows=6, melody_ratio=2.0)
    melody = torch.cat([tune([60, 64], 0.4), tune([67, 71], 0.4)])[:, None]  # (2, 1, N)
    kw = dict(duration=0.6, top_k=1, progress=False, melody=melody, melody_sample_rate=ToyCodec.sample_rate)
    fast = mg.generate_codes(["rock", "jazz"], fast=True, **kw)  # two windows: the melody moves on
    assert torch.equal(mg.generate_codes(["rock", "jazz"], fast=True, compile_step=True, **kw), fast)


def _prefilled(lm: MusicLM, seed: int):
    """A cache after a one-position prefill with a condition, and the next step's input."""
    g = torch.Generator().manual_seed(seed)
    c = lm.config
    cond = torch.randn(2, 5, c.dim, generator=g).to(torch.bfloat16)
    cache = lm.new_cache(2, 16)
    x = torch.randint(0, c.bins, (2, c.num_codebooks, 1), generator=g)
    with torch.no_grad():
        lm(torch.full_like(x, c.special), cond, torch.ones(2, 5, dtype=torch.long), cache=cache, last_only=True)
    return cache, x


def test_a_compiled_step_holds_its_own_models_weights_as_they_are():
    """bf16, where freezing packs the weights into the compiled code as constants."""
    def model(seed):
        torch.manual_seed(seed)
        return MusicLM(lm_config("tiny", bins=V)).eval().to(torch.bfloat16)

    a, b = model(0), model(1)
    pos = torch.tensor([1])
    with torch.no_grad():
        cache_a, x = _prefilled(a, 0)
        cache_b, _ = _prefilled(b, 0)
        step_a, step_b = a.compiled_decode_step(), b.compiled_decode_step()
        eager_a, eager_b = a.decode_step(x, pos, cache_a), b.decode_step(x, pos, cache_b)
        # the same shapes and the same code: each must still answer with its own model's weights
        torch.testing.assert_close(step_a(x, pos, cache_a), eager_a, rtol=0, atol=0.1)  # bf16 rounding
        torch.testing.assert_close(step_b(x, pos, cache_b), eager_b, rtol=0, atol=0.1)
        assert (eager_a - eager_b).abs().max() > 1.0
        assert a.compiled_decode_step() is step_a  # unchanged weights: the same compiled step

        a.heads[0].weight.neg_()  # an in-place edit: codebook 0's logits change sign
        edited = a.decode_step(x, pos, cache_a)
        assert (step_a(x, pos, cache_a) - edited).abs().max() > 1.0  # the old step is frozen: why it is replaced
        step_a2 = a.compiled_decode_step()
        assert step_a2 is not step_a
        torch.testing.assert_close(step_a2(x, pos, cache_a), edited, rtol=0, atol=0.1)


def test_compiled_step_errors():
    mg = toy_musicgen()
    with pytest.raises(ValueError, match="pass fast=True too"):
        mg.generate_codes(TEXTS, duration=0.1, compile_step=True, progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        mg.generate_codes(TEXTS, duration=0.1, fast=True, compile_step=True, cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="compiled_decode_step is for a model on the CPU"):
        MusicLM(lm_config("tiny", bins=V)).to("meta").compiled_decode_step()
    lm = MusicLM(lm_config("tiny", bins=V)).eval()  # a bad argument: the step's own error, not a tracing error
    with torch.no_grad(), pytest.raises(ValueError, match=r"seq must be \[B, K=4, 1\]"):
        lm.compiled_decode_step()(torch.zeros(2, 4, 2, dtype=torch.long), torch.tensor([1]), lm.new_cache(2, 8))
    def no_compiler(*args):
        raise OSError("no C++ compiler")

    step = lm.compiled_decode_step()  # good arguments, but compiling fails
    step._step = no_compiler
    with torch.no_grad(), pytest.raises(RuntimeError, match="generate with compile_step=False"):
        step(torch.zeros(2, 4, 1, dtype=torch.long), torch.tensor([0]), lm.new_cache(2, 8))


def test_a_model_made_under_inference_mode_gets_a_compiled_step():
    """Its weights keep no version counter: the weights' key must not ask for one."""
    with torch.inference_mode():
        lm = MusicLM(lm_config("tiny", bins=V)).eval()
        step = lm.compiled_decode_step()
        assert isinstance(step, CompiledStep) and lm.compiled_decode_step() is step
