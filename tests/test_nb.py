"""nb.py and config.py: scale and device choice, seeding, plots and players that never fail."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musicgen_lite import nb
from musicgen_lite.config import PRESETS, SCALES, get_config


def test_scale_choice(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("MUSICGEN_LITE_SCALE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert nb.pick_scale(cpu) == "lite" and nb.pick_scale(gpu) == "full"
    monkeypatch.setenv("CI", "true")
    assert nb.pick_scale(gpu) == "tiny"
    monkeypatch.setenv("MUSICGEN_LITE_SCALE", "full")
    assert nb.pick_scale(cpu) == "full"  # the environment variable wins


def test_setup_seeds_and_summarises(monkeypatch, capsys):
    monkeypatch.setenv("MUSICGEN_LITE_SCALE", "tiny")
    env = nb.setup(seed=3)
    line = capsys.readouterr().out.strip()
    assert line.startswith("musicgen-lite | scale=tiny | device=") and "seed=3" in line
    assert env.tiny and env.config.name == "tiny" and env.device == nb.pick_device()
    a = torch.rand(3), np.random.rand(2)
    nb.setup(seed=3, quiet=True)
    b = torch.rand(3), np.random.rand(2)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_presets():
    assert set(PRESETS) == set(SCALES)
    assert get_config("full").data.sample_rate == 32_000
    assert get_config("tiny").data.n_clips < get_config("lite").data.n_clips < get_config("full").data.n_clips
    cfg = get_config("tiny")
    cfg.data.n_clips = 1  # a copy: the preset is untouched
    assert PRESETS["tiny"].data.n_clips != 1
    with pytest.raises(ValueError, match="scale must be one of"):
        get_config("huge")


def test_plots_and_player_run_headless():
    import matplotlib

    matplotlib.use("Agg")
    wav = 0.3 * torch.sin(torch.linspace(0, 2000, 16_000))[None]
    assert nb.plot_waveform(wav, 16_000, title="w") is not None
    assert nb.plot_mel(wav, 16_000, title="m") is not None
    ax = nb.plot_tokens(torch.randint(0, 2048, (1, 4, 50)), frame_rate=50)
    assert ax.get_ylabel() == "codebook"
    import base64
    import io

    import soundfile as sf

    page = nb.audio_html(wav, 48_000, caption="a <tone>")  # resampled to 32 kHz, embedded as mp3
    assert page.startswith("<div><b>a &lt;tone&gt;</b></div><audio") and "data:audio/mpeg;base64," in page
    mp3 = base64.b64decode(page.split("base64,")[1].split('"')[0])
    heard, rate = sf.read(io.BytesIO(mp3))
    assert rate == 32_000 and abs(len(heard) - 32_000 * 16_000 // 48_000) < 2_000
    raw = nb.audio_html(wav, 16_000, fmt="wav")
    pcm, rate = sf.read(io.BytesIO(base64.b64decode(raw.split("base64,")[1].split('"')[0])))
    assert rate == 16_000 and len(pcm) == 16_000 and abs(pcm.max() - 0.3) < 1e-3
    assert len(mp3) < len(base64.b64decode(raw.split("base64,")[1].split('"')[0])) / 3
    nb.play(wav, 16_000)  # displays (prints a repr outside Jupyter) without error
    assert not nb.has_widget_frontend()  # no kernel here: widgets fall back to static output
