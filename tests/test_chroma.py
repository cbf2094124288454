"""Melody representation: our chromagram equals librosa's, and the chroma cosine metric behaves."""
from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import torch

from musicgen_lite.conditioning import ChromaExtractor
from musicgen_lite.metrics import chroma_cosine_similarity

SR = 16_000


def tone(midi: int, seconds: float = 1.0, sr: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    f = 440.0 * 2 ** ((midi - 69) / 12)
    return 0.3 * torch.sin(2 * math.pi * f * t) + 0.1 * torch.sin(2 * math.pi * 2 * f * t)


def test_chroma_equals_librosa():
    gen = torch.Generator().manual_seed(0)
    wav = torch.cat([tone(60), tone(64), tone(67)]) + 0.01 * torch.randn(3 * SR, generator=gen)
    ours = ChromaExtractor(SR, radix2_exp=11, argmax=False)(wav[None, None])[0]  # (T, 12)
    ref = librosa.feature.chroma_stft(y=wav.numpy(), sr=SR, n_fft=2048, hop_length=512, win_length=2048,
                                      window="hann", center=True, pad_mode="constant", tuning=0.0, norm=np.inf)
    assert ours.shape == (ref.shape[1], 12)
    np.testing.assert_allclose(ours.numpy(), ref.T, rtol=1e-4, atol=1e-5)


def test_argmax_one_hot_follows_the_melody_and_matches_token_frames():
    wav = torch.cat([tone(60), tone(62), tone(64), tone(65)])[None, None]  # C D E F, 1 s each
    chroma = ChromaExtractor(SR, radix2_exp=12)(wav, frames=200)  # 50 Hz token frames for 4 s
    assert chroma.shape == (1, 200, 12) and torch.equal(chroma.sum(-1), torch.ones(1, 200))
    notes = chroma[0].argmax(-1)
    for second, pc in enumerate([0, 2, 4, 5]):  # away from the note boundaries
        assert (notes[second * 50 + 10:second * 50 + 40] == pc).all()


def test_chroma_cosine_similarity():
    melody = torch.cat([tone(m, 0.5) for m in [60, 64, 67, 72, 67, 64, 60, 62]])[None, None]
    other = torch.cat([tone(m, 0.5) for m in [61, 66, 70, 61, 66, 70, 61, 66]])[None, None]
    octave_up = torch.cat([tone(m + 12, 0.5) for m in [60, 64, 67, 72, 67, 64, 60, 62]])[None, None]
    assert chroma_cosine_similarity(melody, melody, SR) == pytest.approx(1.0)
    assert chroma_cosine_similarity(melody, octave_up, SR) > 0.9  # pitch class, not pitch
    assert chroma_cosine_similarity(melody, other, SR) < 0.2
    silent_tail = torch.cat([melody, torch.zeros(1, 1, SR)], dim=-1)
    # 1 s of silence against 1 s of C#: a fifth of the frames; counted, they would pull it under 0.8
    assert chroma_cosine_similarity(silent_tail, torch.cat([melody, tone(61)[None, None]], -1), SR) > 0.95
    with pytest.raises(ValueError, match="no frame"):
        chroma_cosine_similarity(torch.zeros(1, 1, SR), melody, SR)
