"""int8 for CPU decoding: the LM's linear layers with 8-bit weights (dynamic quantisation).

A decoding step multiplies a couple of rows by every weight matrix of the model, so its time
is the time to stream the weights from memory. Stored as int8 (one scale per output row),
the weights take a quarter of the bytes of fp32; activations are quantised on the fly to
8 bits per call ("dynamic") and the product runs in PyTorch's fbgemm int8 kernels, then is
rescaled to fp32.

What changes: every ``nn.Linear`` inside the LM (attention projections, feed-forward, the
per-codebook heads). What does not: embeddings, norms, attention itself, the text encoder,
the codec. Quality is measured, not assumed: :func:`token_agreement` and the benchmark
(``musicgen-lite bench lm``) report how often greedy decoding picks the same token as fp32.

PyTorch marks its eager quantisation API as deprecated in favour of the separate ``torchao``
package; it still ships and works in torch 2.x, and this module is the one place that uses
it, so moving later touches nothing else.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def _quantized_linear(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    plain.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
    if linear.bias is not None:
        plain.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    plain.qconfig = per_channel_dynamic_qconfig  # one int8 scale per output row; activations per call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DynamicLinear.from_float(plain)


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (fp32, CPU) whose ``nn.Linear`` layers hold int8 weights.

    Works on a :class:`~musicgen_lite.lm.MusicLM` or a whole
    :class:`~musicgen_lite.generation.MusicGen` (then only ``model.lm`` is quantised).
    Inference only: the quantised layers have no gradients.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines and \
            "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("int8 needs PyTorch's x86 quantised kernels (fbgemm), not available on this CPU build")
    target = model if inplace else copy.deepcopy(model)
    lm = getattr(target, "lm", target)
    if next(lm.parameters()).device.type != "cpu":
        raise ValueError("int8 dynamic quantisation runs on the CPU: move the model with .cpu() first")
    lm.float().eval()
    swaps = [(parent, name, child) for parent in lm.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, _quantized_linear(child))
    target.int8 = True
    return target


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward reads (int8 layers counted at one byte per weight + scales)."""
    total = 0
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for module in model.modules():
        if isinstance(module, DynamicLinear):
            w = module.weight()
            total += w.numel() + (8 * w.shape[0] if w.qscheme() == torch.per_channel_affine else 8)
        elif not type(module).__module__.startswith("torch.ao.nn.quantized"):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


@torch.no_grad()
def token_agreement(reference, candidate, descriptions, duration: float, seed: int = 0) -> float:
    """Share of greedy tokens (top-k 1, guidance 3) where ``candidate`` picks what ``reference`` picks.

    Both models decode the same text, each its own continuation: a first disagreement changes
    the context, so later tokens compare different histories. This is the number a listener
    cares about (how different the music is), and a strict one.
    """
    a = reference.generate_codes(descriptions, duration=duration, top_k=1, seed=seed, progress=False)
    b = candidate.generate_codes(descriptions, duration=duration, top_k=1, seed=seed, progress=False)
    return float((a == b).float().mean())


def int8_report(model, captions=None, n: int = 100, duration: float = 6.0, seed: int = 0,
                agreement_captions: int = 8, **evaluate_kw) -> dict:
    """What int8 costs and gives on a trained model: the same evaluation
    (:func:`musicgen_lite.evaluation.evaluate`: FAD, KL, CLAP, attribute accuracy) of the fp32
    model and of its int8 copy, same captions and seed, each with its generation wall time,
    plus greedy :func:`token_agreement` on the first ``agreement_captions`` captions.

    Returns ``{"fp32": {...}, "int8": {...}, "token_agreement", "speedup", "weight_bytes"}``.
    """
    import time

    from .evaluation import evaluate

    q = quantize_int8(model)
    out = {}
    for name, m in (("fp32", model), ("int8", q)):
        t0 = time.perf_counter()
        r = evaluate(m, captions=captions, n=n, duration=duration, seed=seed, **evaluate_kw)
        out[name] = {"fad": r["fad"]["value"], "kl": r["kl"]["kl_ref_gen"], "clap": r["clap"]["value"],
                     "attribute_accuracy": (r["attribute_accuracy"] or {}).get("mean"),
                     "seconds": time.perf_counter() - t0, "weight_bytes": weight_bytes(getattr(m, "lm", m))}
        out.setdefault("setup", r["setup"])
    texts = _captions(captions, n, duration)[:agreement_captions]
    out["token_agreement"] = token_agreement(model, q, texts, duration=duration, seed=seed)
    out["speedup"] = out["fp32"]["seconds"] / out["int8"]["seconds"]
    return out


def _captions(captions, n: int, duration: float) -> list[str]:
    from .evaluation import heldout_set, load_clips

    folder = captions if captions is not None else heldout_set(n, duration, progress=False)
    return [i["description"] for i in load_clips(folder, n, duration)[1]]
