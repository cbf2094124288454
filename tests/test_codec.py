"""The codec: shapes and padding, parity with transformers' EnCodec, inference paths, bad input, checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch

from musicgen_lite.audio import AudioError
from musicgen_lite.codec import (CODEC_PRESETS, ChromaLoss, CodecConfig, CompressionModel, MultiResolutionSTFTLoss,
                                 MultiScaleMelLoss, codec_config,
                                 receptive_field, si_snr)
from musicgen_lite.hub import from_transformers, load_checkpoint, load_codec, save_checkpoint

transformers = pytest.importorskip("transformers")


def _hf_encodec(causal: bool, ratios=(4, 2, 3), lstm=1, shortcut=None, sr=8000, seed=0):
    """A tiny random transformers EncodecModel with random (non-zero) codebooks."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    hop = math.prod(ratios)
    n_q, bins = 3, 32
    bw = n_q * math.log2(bins) * math.ceil(sr / hop) / 1000
    cfg = EncodecConfig(sampling_rate=sr, audio_channels=1, hidden_size=16, num_filters=4,
                        upsampling_ratios=list(ratios), num_lstm_layers=lstm, codebook_size=bins,
                        target_bandwidths=[bw], use_causal_conv=causal,
                        use_conv_shortcut=causal if shortcut is None else shortcut, normalize=False)
    hf = EncodecModel(cfg).eval()
    with torch.no_grad():
        for k, layer in enumerate(hf.quantizer.layers):
            layer.codebook.embed.normal_().mul_(0.5 ** k)
    return hf, bw


@pytest.mark.parametrize("causal,ratios,lstm", [(False, (4, 2, 3), 1), (True, (5, 2), 2), (False, (2, 2), 2)])
def test_port_matches_transformers(causal, ratios, lstm):
    hf, bw = _hf_encodec(causal, ratios, lstm)
    ours = from_transformers(hf)
    assert ours.frame_rate == pytest.approx(8000 / math.prod(ratios))
    wav = torch.randn(2, 1, 1003, generator=torch.Generator().manual_seed(1)) * 0.3
    with torch.no_grad():
        out = hf.encode(wav, bandwidth=bw)
        their_codes = out.audio_codes[0]
        their_wav = hf.decode(out.audio_codes, out.audio_scales).audio_values
    codes = ours.encode(wav)
    assert codes.shape == (2, 3, math.ceil(1003 / math.prod(ratios)))
    assert torch.equal(codes, their_codes)
    torch.testing.assert_close(ours.decode(codes), their_wav, atol=1e-5, rtol=1e-4)
    # the training forward (gradients on, parametrized weights, generic transposed conv) agrees too
    with torch.no_grad():
        latents = hf.encoder(wav)
    torch.testing.assert_close(ours.encoder(wav), latents, atol=1e-5, rtol=1e-4)


def test_port_accepts_old_weight_norm_names():
    """Checkpoints saved with nn.utils.weight_norm carry weight_g / weight_v: they map too."""
    hf, bw = _hf_encodec(False)
    ours = from_transformers(hf)
    state = {}
    for k, v in hf.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                "weight_v")
        state[k] = v

    class Fake(torch.nn.Module):  # quacks like EncodecModel with the old names
        def __init__(self):
            super().__init__()
            self.config = hf.config
            self.p = torch.nn.Parameter(torch.zeros(1))

        def state_dict(self, *a, **k):
            return state

    Fake.__name__ = "EncodecModel"
    again = from_transformers(Fake())
    wav = torch.randn(1, 1, 500)
    assert torch.equal(again.encode(wav), ours.encode(wav))


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(TypeError, match="no port"):
        from_transformers(torch.nn.Linear(2, 2))


def test_presets_and_shapes():
    full = codec_config("full")
    assert (full.sample_rate, full.n_filters, full.ratios, full.dimension, full.n_q, full.bins) == (
        32_000, 64, [8, 5, 4, 4], 128, 4, 2048)
    assert full.hop_length == 640 and full.frame_rate == 50
    for name in CODEC_PRESETS:
        assert codec_config(name).frame_rate == 50
    model = CompressionModel(codec_config("tiny"))
    assert (model.sample_rate, model.num_codebooks, model.cardinality, model.frame_rate) == (16_000, 4, 256, 50)
    for n in (320, 321, 1000, 16_000):
        codes = model.encode(torch.randn(3, 1, n))
        assert codes.shape == (3, 4, math.ceil(n / 320)) and codes.dtype == torch.long
        assert model.decode(codes).shape == (3, 1, codes.shape[-1] * 320)
    assert model.bits_per_second() == 4 * 8 * 50
    assert receptive_field(full) > 640  # a frame sees more than its own hop


def test_causal_encoder_never_looks_ahead():
    model = CompressionModel(codec_config("tiny", causal=True, pad_mode="constant"))
    wav = torch.randn(1, 1, 3200)
    later = wav.clone()
    later[..., 1600:] = torch.randn(1, 1, 1600)
    with torch.no_grad():
        a, b = model.encoder(wav), model.encoder(later)
    torch.testing.assert_close(a[..., :5], b[..., :5])  # frames 0..4 end at sample 1600
    assert not torch.allclose(a[..., -1], b[..., -1])


def test_inference_folds_weight_norm_and_tracks_updates():
    model = CompressionModel(codec_config("tiny")).eval()
    wav = torch.randn(2, 1, 1600)
    with torch.no_grad():
        reference = model.decoder(model.encoder(wav))  # parametrized weights (grad mode off, no fold)
    with torch.inference_mode():
        folded = model.decoder(model.encoder(wav))
    torch.testing.assert_close(folded, reference, atol=1e-6, rtol=1e-5)
    # a parameter update must invalidate the cached folded weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
        reference = model.decoder(model.encoder(wav))
    with torch.inference_mode():
        torch.testing.assert_close(model.decoder(model.encoder(wav)), reference, atol=1e-6, rtol=1e-5)
    codes = model.encode(wav)
    model.fold_weight_norm()
    assert not any("original0" in k for k in model.state_dict())
    assert torch.equal(model.encode(wav), codes)


@pytest.mark.parametrize("act,causal,pad_mode", [("elu", False, "reflect"), ("elu", True, "constant"),
                                                 ("snake", False, "reflect"), ("snake", True, "reflect")])
@pytest.mark.parametrize("n", [1600, 37, 5])
def test_fused_inference_path_matches_the_layer_by_layer_one(act, causal, pad_mode, n):
    """At inference an activation is written into its conv's padded buffer, runs in place where
    the loop owns the tensor, the skip is added in place and the transposed conv is one matmul:
    the same numbers as applying the layers one by one (grad mode on: the training path), and
    the caller's input is never modified."""
    torch.manual_seed(0)
    model = CompressionModel(codec_config("tiny", activation=act, causal=causal, pad_mode=pad_mode)).eval()
    if act == "snake":  # away from the initial 1, so the frequency matters
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "alpha"):
                    m.alpha.uniform_(0.5, 3.0)
    wav = torch.randn(2, 1, n)
    keep = wav.clone()
    with torch.enable_grad():
        lat_ref = model.encoder(wav)
        out_ref = model.decoder(lat_ref.detach())
    with torch.inference_mode():
        lat = model.encoder(wav)
        out = model.decoder(lat_ref.detach())
    assert torch.equal(wav, keep)
    torch.testing.assert_close(lat, lat_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, out_ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("act,causal", [("elu", False), ("snake", True)])
def test_tiled_conv_stacks_match_one_pass(monkeypatch, act, causal):
    """At inference the conv stacks run in tiles with a halo of real neighbours: the same
    latents, codes and audio as one pass over the whole clip, whatever the tile size; a halo
    of zero frames would not be (the check can fail)."""
    import musicgen_lite.codec as codec_module

    torch.manual_seed(0)
    model = CompressionModel(codec_config("tiny", activation=act, causal=causal)).eval()
    hop = model.hop_length
    for n in (hop * 40, hop * 63 + 7, hop * 101 + 1):
        wav = torch.randn(1, 1, n) * 0.1
        monkeypatch.setattr(codec_module, "TILE_ACTIVATIONS", 10 ** 12)  # one pass
        with torch.inference_mode():
            whole = model.encoder(wav)
            whole_codes = model.encode(wav)
            whole_audio = model.decode(whole_codes)
        for tile in (1, 17 * hop * model.config.n_filters):  # 12- and 17-frame tiles
            monkeypatch.setattr(codec_module, "TILE_ACTIVATIONS", tile)
            step, halo = codec_module._tile_frames(model.config)
            assert n > 2 * step * hop and step == (12 if tile == 1 else 17)  # really tiled, two sizes
            with torch.inference_mode():
                torch.testing.assert_close(model.encoder(wav), whole, atol=1e-6, rtol=1e-5)
                assert torch.equal(model.encode(wav), whole_codes)
                torch.testing.assert_close(model.decode(whole_codes), whole_audio, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(codec_module, "_tile_frames", lambda cfg: (16, 0))
    with torch.inference_mode():
        assert (model.encoder(wav) - whole).abs().max() > 1e-4


def test_activation_written_into_the_padded_buffer():
    from musicgen_lite.codec import Snake1d, _act_pad1d, _pad1d

    x = torch.randn(2, 3, 50)
    snake = Snake1d(3)
    with torch.no_grad():
        snake.alpha.uniform_(0.5, 3.0)
    for act in (torch.nn.ELU(), snake):
        for mode in ("reflect", "constant"):
            for left, right in ((3, 3), (4, 0), (0, 2), (0, 0), (60, 1)):
                with torch.no_grad():
                    fused = _act_pad1d(x, act, left, right, mode)
                    reference = _pad1d(act(x), left, right, mode)
                if isinstance(act, Snake1d):
                    assert torch.equal(fused, reference), (mode, left, right)
                else:  # ELU runs over the padded buffer: PyTorch's vectorised and scalar (tail)
                    # expm1 may differ in the last bit, so the same up to one float32 ulp
                    ulp = torch.finfo(torch.float32).eps * reference.abs().clamp_min(1e-30)
                    assert ((fused - reference).abs() <= ulp).all(), (mode, left, right)


def test_chunked_encode_decode_matches_whole():
    model = CompressionModel(codec_config("tiny", lstm_layers=0))  # convs only: finite receptive field
    wav = torch.randn(1, 1, 16_000 * 3, generator=torch.Generator().manual_seed(3)) * 0.3
    codes = model.encode(wav)
    chunked = model.encode(wav, chunk_seconds=1.0, context_seconds=0.5)
    assert torch.equal(chunked, codes)
    whole = model.decode(codes)
    torch.testing.assert_close(model.decode(codes, chunk_seconds=0.5, context_seconds=0.3), whole,
                               atol=1e-5, rtol=1e-4)


def test_bad_input():
    model = CompressionModel(codec_config("tiny"))
    T = 50
    with pytest.warns(UserWarning, match="resampled"):
        codes = model.encode(torch.randn(1, 1, 32_000), sample_rate=32_000)
    assert codes.shape[-1] == T  # 1 s at 32 kHz -> 1 s at 16 kHz
    assert model.encode(torch.randn(2, 2, 16_000)).shape == (2, 4, T)  # stereo downmixed
    assert model.encode(torch.randn(1, 1, 10)).shape == (1, 4, 1)  # shorter than a hop: padded
    assert model.encode(torch.randn(16_000)).shape == (1, 4, T)  # [N] accepted
    silence = model.reconstruct(torch.zeros(1, 1, 1600))
    assert torch.isfinite(silence).all()
    bad = torch.randn(1, 1, 1600)
    bad[0, 0, 7] = float("nan")
    with pytest.raises(AudioError, match="NaN or infinite"):
        model.encode(bad)
    bad[0, 0, 7] = float("inf")
    with pytest.raises(AudioError, match="NaN or infinite"):
        model.encode(bad)
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 4, 3), 256))
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(torch.zeros(1, 5, 3, dtype=torch.long))


def test_training_forward_and_losses():
    model = CompressionModel(codec_config("tiny")).train()
    wav = torch.randn(2, 1, 1000) * 0.1
    out = model(wav)
    assert out.wav.shape == wav.shape and out.codes.shape[1] <= 4
    mel = MultiScaleMelLoss(16_000, windows=(64, 256))
    loss = mel(out.wav, wav) + (out.wav - wav).abs().mean() + out.vq_loss
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert mel(wav, wav).item() == 0.0
    # SI-SNR: a scaled copy is perfect, noise is bad
    assert si_snr(wav * 3, wav).min() > 60
    assert si_snr(torch.randn_like(wav), wav).max() < 0


def test_stft_loss_values_and_pitch_resolution():
    sr = 16_000
    t = torch.arange(sr) / sr
    wav = (0.3 * torch.sin(2 * math.pi * 220 * t)).view(1, 1, -1)
    stft = MultiResolutionSTFTLoss(windows=(512, 2048))
    assert stft(wav, wav).item() == 0.0
    # spectral convergence by hand for one window: a half-amplitude copy gives exactly 0.5
    one = MultiResolutionSTFTLoss(windows=(1024,))
    mag = torch.stft(wav.flatten(0, 1), 1024, 256, window=torch.hann_window(1024), return_complex=True).abs()
    expected = 0.5 + float((torch.log(0.5 * mag + 1e-5) - torch.log(mag + 1e-5)).abs().mean())
    assert one(0.5 * wav, wav).item() == pytest.approx(expected, rel=1e-5)
    # a semitone up (233 Hz) against the 220 Hz tone: the linear-frequency loss and the
    # proportional mel filterbank see it more than a fixed 64-filter mel does
    up = (0.3 * torch.sin(2 * math.pi * 220 * 2 ** (1 / 12) * t)).view(1, 1, -1)
    wide = MultiScaleMelLoss(sr, windows=(2048,), n_mels=64)
    fine = MultiScaleMelLoss(sr, windows=(2048,), n_mels=None)
    assert fine.mels[0].n_mels == 256 and wide.mels[0].n_mels == 64
    assert fine(up, wav) > 1.4 * wide(up, wav)  # measured: 0.434 vs 0.293
    assert stft(up, wav) > stft(1.2 * wav, wav)


def test_chroma_loss_hears_pitch_classes_as_librosa_does():
    """ChromaLoss's chroma is librosa's ``chroma_stft`` (same window, hop, power spectrum, no
    normalisation); the loss ignores level and octave and counts wrong notes: a C major triad
    against itself an octave up or at half level costs ~0, against C minor (E -> Eb) one third
    of the mass moved (2/3 in L1 for ideal filters; measured 0.51), against a semitone up
    everything."""
    import librosa
    import numpy as np

    sr = 16_000
    t = torch.arange(2 * sr) / sr

    def chord(*midi, scale=1.0):
        return (scale * sum(0.2 * torch.sin(2 * math.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midi)).view(1, 1, -1)

    loss = ChromaLoss(sr)
    major = chord(60, 64, 67)
    ours = loss.chroma(major)[0].numpy()
    theirs = librosa.feature.chroma_stft(y=major.flatten().numpy(), sr=sr, n_fft=4096, hop_length=1024,
                                         window="hann", center=True, norm=None, tuning=0.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.max())
    assert loss(major, major).item() == 0.0
    assert loss(chord(72, 76, 79), major).item() < 0.1  # the same triad an octave up
    assert loss(0.5 * major, major).item() < 0.01  # level hardly matters (measured 0.003: the silence floor)
    minor = loss(chord(60, 63, 67), major).item()
    assert 0.4 < minor < 0.8, minor  # one note of three moved
    off = loss(chord(61, 65, 68), major).item()  # every note a semitone off: 2 for ideal filters,
    assert off > 1.2 and off > 2 * minor, off  # measured 1.45 (librosa's filters overlap their neighbours)
    assert torch.isfinite(loss(torch.zeros_like(major), major)) and loss(major, torch.zeros_like(major)).item() == 0.0


def test_checkpoint_roundtrip_is_atomic_and_unpickled(tmp_path):
    model = CompressionModel(codec_config("tiny"))
    path = save_checkpoint(tmp_path / "ck", model, model.config.to_dict(), extra={"step": 3})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left
    state, config, extra = load_checkpoint(path)
    assert extra == {"step": 3} and CodecConfig.from_dict(config) == model.config
    assert set(state) == set(model.state_dict())
    again = load_codec(path)
    wav = torch.randn(1, 1, 1600)
    assert torch.equal(again.encode(wav), model.encode(wav))
    assert json.loads((path / "config.json").read_text())["config"]["bins"] == 256
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_snake_activation_codec_round_trips(tmp_path):
    from musicgen_lite.codec import Snake1d
    from musicgen_lite.hub import load_codec, save_checkpoint

    x = torch.linspace(-3, 3, 101).view(1, 1, -1)
    snake = Snake1d(1)
    with torch.no_grad():
        snake.alpha.fill_(2.0)
    torch.testing.assert_close(snake(x), x + torch.sin(2 * x) ** 2 / 2)
    torch.manual_seed(0)
    model = CompressionModel(codec_config("tiny", activation="snake"))
    assert sum(isinstance(m, Snake1d) for m in model.modules()) > 0
    wav = torch.randn(2, 1, 1600)
    out = model(wav)
    (out.wav.pow(2).mean() + out.vq_loss).backward()
    assert all(m.alpha.grad is not None for m in model.modules() if isinstance(m, Snake1d))
    save_checkpoint(tmp_path / "c", model, model.config.to_dict())
    back = load_codec(tmp_path / "c")
    model.eval()
    assert back.config.activation == "snake" and torch.equal(back.encode(wav), model.encode(wav))
    with pytest.raises(ValueError, match="activation"):
        CompressionModel(codec_config("tiny", activation="relu"))


def test_init_codebooks_makes_codes_follow_the_audio():
    torch.manual_seed(0)
    model = CompressionModel(codec_config("tiny")).eval()
    wav = torch.randn(8, 1, 32_000)  # 800 frames for 256 entries (fewer frames than entries leave no residual)
    assert model.encode(wav).unique().numel() == 1  # empty codebooks: every frame is code 0
    model.init_codebooks(wav)
    codes = model.encode(wav)
    assert all(codes[:, k].unique().numel() > 10 for k in range(model.num_codebooks))
    assert not model.training
