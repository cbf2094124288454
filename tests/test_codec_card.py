"""The codec report card: effective bandwidth, the Opus round trip, shared-band mel distance."""
import shutil

import pytest
import torch

from musicgen_lite.codec_card import codec_report, effective_bandwidth, opus_roundtrip, write_codec_card


def test_effective_bandwidth_finds_a_lowpass():
    sr = 16_000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, sr, generator=g)
    spec = torch.fft.rfft(noise)
    spec[..., int(3000 / (sr / 2) * spec.shape[-1]):] = 0  # nothing above 3 kHz
    low = torch.fft.irfft(spec, n=sr)
    assert 2700 < effective_bandwidth(low, sr) <= 3100
    assert effective_bandwidth(noise, sr) > 7500


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_opus_roundtrip_keeps_length_and_limits_the_band():
    sr = 16_000
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(1, 2 * sr, generator=g)
    out = opus_roundtrip(wav, sr, 6.0)
    assert out.shape == wav.shape
    assert effective_bandwidth(out, sr) < 0.8 * effective_bandwidth(wav, sr)  # 6 kbps drops the highs


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_report_and_card(tmp_path):
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.data import synth_clip

    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny"))
    clips = torch.stack([synth_clip(seed=i, seconds=1.0, sample_rate=16_000)[0][:1] for i in range(2)])
    with torch.no_grad():
        codec.train()(clips)  # k-means codebooks from these clips
    codec.eval()
    report = codec_report(codec, clips, heard=True)
    names = [r["system"] for r in report["rows"]]
    for r in report["rows"]:  # melody and onsets, as measured listening proxies
        assert all(0 <= r[k] <= 1 for k in ("melody_pitch", "melody_chroma", "onset_f1"))
        assert r["melody_chroma"] >= r["melody_pitch"]  # forgiving octaves can only add
    assert names == ["1 codebook", "2 codebooks", "3 codebooks", "4 codebooks", "Opus 6 kbps"]
    assert all(torch.isfinite(torch.tensor([r["si_snr"], r["mel"]])).all() for r in report["rows"])
    assert report["rows"][3]["kbps"] == pytest.approx(4 * 8 * 50 / 1000)  # tiny: 256 entries = 8 bits
    card = write_codec_card(tmp_path, report, {"title": "tiny codec", "steps": 0, "_probe": clips[0]})
    text = card.read_text()
    assert "Opus 6 kbps" in text and "| 4 codebooks |" in text and (tmp_path / "spectrograms.png").is_file()
    assert "onsets kept (F1, 50 ms) |" in text and text.count("\n|---") == 1 and "\n|" + "---|" * 9 + "\n" in text


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_export_with_card_from_a_training_run(tmp_path, synth_dataset):
    import json

    from musicgen_lite.codec_card import export_with_card
    from musicgen_lite.hub import load_codec
    from musicgen_lite.training import train_codec

    train_codec(tmp_path / "run", scale="tiny", steps=3, data=synth_dataset, progress=False)
    out = export_with_card(tmp_path / "run", tmp_path / "codec", command="musicgen-lite train codec RUN --scale tiny",
                           n_heldout=2, heldout_seconds=2.0, roundtrip_n=3, roundtrip_captions=synth_dataset)
    card = (out / "README.md").read_text()
    assert "**steps**: 3" in card and "Opus 6 kbps" in card and "fp16" in card and "melody kept" in card
    assert "Through the evaluation models (3 held-out" in card and "| mode |" in card
    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 5 and report["clips"] == 4
    rt = report["roundtrip"]
    assert rt["n"] == 3 and 0 <= rt["attribute_accuracy"]["mean"] <= 1 and rt["real"]["attribute_accuracy"]["mean"] > 0
    assert load_codec(out).num_codebooks == 4


def test_roundtrip_evaluation_of_a_lossless_codec_is_the_real_audio(synth_dataset):
    """A codec that changes nothing scores exactly what the real clips score."""
    from musicgen_lite.codec_card import roundtrip_evaluation

    class Identity:
        sample_rate = 16_000

        def encode(self, wav, sample_rate=None):
            return wav

        def decode(self, codes):
            return codes

    rt = roundtrip_evaluation(Identity(), n=4, duration=2.0, captions=synth_dataset)
    assert rt["attribute_accuracy"]["per_attribute"] == rt["real"]["attribute_accuracy"]["per_attribute"]
    assert rt["clap"] == pytest.approx(rt["real"]["clap"])
    assert abs(rt["fad"]) < 1e-3 < rt["noise_fad"]
