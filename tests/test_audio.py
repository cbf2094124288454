"""audio.py: formats round-trip, and every bad input raises AudioError naming file and problem."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from musicgen_lite.audio import (AudioError, audio_info, check_rate, load_audio, loudness, normalize_loudness,
                                 normalize_peak, resample, save_audio, to_mono)

SR = 16_000


def tone(seconds=1.0, sr=SR, freq=440.0, amp=0.5, channels=1):
    t = torch.arange(int(seconds * sr)) / sr
    x = amp * torch.sin(2 * math.pi * freq * t)
    return x.repeat(channels, 1)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_round_trip_formats(tmp_path, ext):
    x = tone()
    path = save_audio(tmp_path / f"a.{ext}", x, SR)
    wav, sr = load_audio(path)
    assert sr == SR and wav.dtype == torch.float32 and wav.shape[0] == 1
    n = min(wav.shape[-1], x.shape[-1])
    assert abs(wav.shape[-1] - x.shape[-1]) <= 2048  # lossy codecs pad a little
    if ext in ("wav", "flac"):  # lossless up to 16-bit quantisation
        torch.testing.assert_close(wav[:, :n], x[:, :n], atol=1 / 32768 + 1e-6, rtol=0)
    else:  # lossy: the tone's energy survives
        assert wav.pow(2).mean().sqrt().item() == pytest.approx(x.pow(2).mean().sqrt().item(), rel=0.1)


def test_load_resamples_and_mixes_to_mono(tmp_path):
    stereo = torch.stack([tone(sr=48_000)[0], -0.5 * tone(sr=48_000)[0]])
    save_audio(tmp_path / "s.wav", stereo, 48_000)
    wav, sr = load_audio(tmp_path / "s.wav", sample_rate=SR)
    assert sr == SR and wav.shape == (1, 48_000 // 3)
    both, sr2 = load_audio(tmp_path / "s.wav", mono=False)
    assert both.shape == (2, 48_000) and sr2 == 48_000
    # mono == mean of channels, resampled by torchaudio
    ref = torchaudio.functional.resample(both.mean(0, keepdim=True), 48_000, SR)
    torch.testing.assert_close(wav, ref)


def test_missing_file():
    with pytest.raises(AudioError, match=r"nope\.wav: file not found"):
        load_audio("nope.wav")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty"):
        load_audio(tmp_path / "empty.wav")


def test_corrupt_file(tmp_path):
    good = save_audio(tmp_path / "good.wav", tone(), SR).read_bytes()
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + good[64:200])
    with pytest.raises(AudioError, match=r"corrupt\.wav: not a readable audio file"):
        load_audio(tmp_path / "corrupt.wav")


def test_not_audio(tmp_path):
    (tmp_path / "notes.mp3").write_text("these are my lyrics, not a song\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.mp3: not a readable audio file"):
        load_audio(tmp_path / "notes.mp3")


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_no_samples(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), SR)
    with pytest.raises(AudioError, match=r"zero\.wav: contains no samples"):
        load_audio(tmp_path / "zero.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_samples(tmp_path, bad):
    x = np.zeros((SR, 1), np.float32)
    x[100] = bad
    sf.write(tmp_path / "bad.wav", x, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"bad\.wav: contains 1 NaN or infinite samples"):
        load_audio(tmp_path / "bad.wav")


@pytest.mark.parametrize("rate", [0, -16000, 10**9, 44100.5, "44100", None.__class__, True])
def test_impossible_rate(tmp_path, rate):
    path = save_audio(tmp_path / "ok.wav", tone(), SR)
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(path, sample_rate=rate)


def test_save_rejects_nan_and_bad_rate(tmp_path):
    x = tone()
    x[0, 5] = float("nan")
    with pytest.raises(AudioError, match="wav: contains 1 NaN"):
        save_audio(tmp_path / "x.wav", x, SR)
    with pytest.raises(AudioError, match="impossible sample rate"):
        save_audio(tmp_path / "x.wav", tone(), 10)
    with pytest.raises(AudioError, match="unsupported extension"):
        save_audio(tmp_path / "x.aac", tone(), SR)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "a.wav"
    save_audio(path, tone(amp=0.1), SR)
    save_audio(path, tone(amp=0.2), SR)
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]
    assert load_audio(path)[0].abs().max().item() == pytest.approx(0.2, abs=1e-3)


def test_info_without_decoding(tmp_path):
    path = save_audio(tmp_path / "a.flac", tone(2.5, channels=2), SR)
    info = audio_info(path)
    assert info["duration"] == pytest.approx(2.5) and info["sample_rate"] == SR and info["channels"] == 2


def test_peak_normalisation():
    x = tone(amp=0.1)
    y = normalize_peak(x, peak_db=-1.0)
    assert y.abs().max().item() == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    assert torch.equal(normalize_peak(torch.zeros(1, 100)), torch.zeros(1, 100))


def test_loudness_normalisation_matches_bs1770():
    x = tone(3.0, amp=0.05) + 0.01 * torch.randn(1, 3 * SR)
    y = normalize_loudness(x, SR, target_lufs=-20.0)
    assert torchaudio.functional.loudness(y, SR).item() == pytest.approx(-20.0, abs=0.05)
    assert loudness(y, SR).item() == pytest.approx(-20.0, abs=0.05)
    loud = normalize_loudness(tone(3.0, amp=0.01), SR, target_lufs=0.0, peak_db=-1.0)
    assert loud.abs().max().item() <= 10 ** (-1 / 20) + 1e-6  # the peak limiter wins over the target
    with pytest.raises(AudioError, match="at least 0.4 s"):
        loudness(tone(0.1), SR)


def test_resample_and_mono():
    x = tone(1.0, channels=2)
    assert resample(x, SR, 8_000).shape == (2, 8_000)
    assert resample(x, SR, SR) is x
    assert to_mono(x).shape == (1, SR)
    assert check_rate(32000.0) == 32000
