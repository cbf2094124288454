"""int8 dynamic quantisation of the LM's linear layers: close to fp32, a quarter of the weight bytes."""
import pytest
import torch

from musicgen_lite.conditioning import LearnedTextConditioner
from musicgen_lite.generation import MusicGen
from musicgen_lite.int8 import quantize_int8, token_agreement, weight_bytes
from musicgen_lite.lm import MusicLM, lm_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _lm():
    torch.manual_seed(0)
    return MusicLM(lm_config("tiny", dim=128, num_heads=4, ffn_dim=512, bins=256)).eval()


def test_int8_logits_follow_fp32():
    lm = _lm()
    q = quantize_int8(lm)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 256, (2, 4, 24), generator=g)
    cond = torch.randn(2, 5, 128, generator=g)
    with torch.no_grad():
        a, b = lm(seq, cond), q(seq, cond)
    rel = (a - b).norm() / a.norm()
    assert rel < 0.05, rel  # 8-bit weights and activations: a few percent of the logits' size
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert agree > 0.85, agree
    # the original is untouched (a copy was quantised)
    assert type(lm.blocks[0].fc1).__name__ == "Linear" and lm.blocks[0].fc1.weight.dtype == torch.float32


def test_int8_linear_weights_take_a_quarter_of_the_bytes():
    lm = _lm()
    q = quantize_int8(lm)
    linear = sum(m.weight.numel() * 4 for m in lm.modules() if isinstance(m, torch.nn.Linear))
    saved = weight_bytes(lm) - weight_bytes(q)
    # fp32 (4 bytes) -> int8 (1 byte) + one 8-byte scale/zero-point pair per output row
    rows = sum(m.weight.shape[0] for m in lm.modules() if isinstance(m, torch.nn.Linear))
    assert saved == linear - linear // 4 - 8 * rows


class ToyCodec:
    """The codec interface on a token grid: 32 samples per frame, tokens as levels."""

    sample_rate, frame_rate, num_codebooks, cardinality, hop = 1600, 50, 4, 32, 32

    def decode(self, codes):  # (B, K, T) -> (B, 1, N)
        return (codes[:, :1].float() / 31 * 2 - 1).repeat_interleave(self.hop, dim=-1)


def test_int8_musicgen_generates_and_mostly_agrees():
    torch.manual_seed(0)
    lm = MusicLM(lm_config("tiny", bins=32, dim=64)).eval()
    cond = LearnedTextConditioner(output_dim=64, dim=32).eval()
    model = MusicGen(ToyCodec(), lm, cond, "delay", max_duration=2.0, extend_stride=1.0)
    q = quantize_int8(model)
    assert getattr(q, "int8", False) and not getattr(model, "int8", False)
    wav = q.generate(["a sad piano piece"], duration=0.2, seed=0, progress=False)
    assert torch.isfinite(wav).all()
    agree = token_agreement(model, q, ["a sad piano piece", "rock with drums"], duration=0.4)
    assert agree > 0.5, agree  # greedy: one early flip changes the rest, so this is a strict number


def test_int8_report_evaluates_both_side_by_side(synth_dataset):
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.int8 import int8_report

    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()
    lm = MusicLM(lm_config("tiny", bins=codec.cardinality, dim=32)).eval()
    model = MusicGen(codec, lm, LearnedTextConditioner(output_dim=32, dim=32).eval())
    r = int8_report(model, captions=synth_dataset, n=3, duration=1.0, agreement_captions=2, batch_size=3,
                    progress=False, top_k=20)
    assert set(r) >= {"fp32", "int8", "token_agreement", "speedup", "setup"}
    assert r["int8"]["weight_bytes"] < r["fp32"]["weight_bytes"]
    assert 0.0 <= r["token_agreement"] <= 1.0 and r["speedup"] > 0
    for name in ("fp32", "int8"):
        assert all(isinstance(r[name][k], float) for k in ("fad", "kl", "clap", "attribute_accuracy"))
