"""Notebook helpers: ``setup()``, audio players, plots and widgets that degrade gracefully.

Every notebook starts with::

    from musicgen_lite import nb
    env = nb.setup()

which detects Colab (and installs the system packages there), picks the device
(cuda > mps > cpu) and the scale (``$MUSICGEN_LITE_SCALE``, else ``tiny`` under CI, ``lite``
without a GPU, ``full`` with one), seeds every generator and prints one summary line.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .config import ScaleConfig, get_config

#: Where the project lives; the Colab cells of every notebook install from here.
REPO_URL = "https://github.com/musicgen-lite/musicgen-lite"


@dataclass
class NotebookEnv:
    """What ``setup()`` decided: read ``env.device``, ``env.scale``, ``env.config``."""

    scale: str
    device: torch.device
    seed: int
    colab: bool
    ci: bool
    config: ScaleConfig

    @property
    def tiny(self) -> bool:
        return self.scale == "tiny"

    def summary(self) -> str:
        return (f"musicgen-lite | scale={self.scale} | device={self.device.type} | "
                f"torch {torch.__version__.split('+')[0]} | seed={self.seed}"
                f"{' | colab' if self.colab else ''}{' | CI' if self.ci else ''}")


def in_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def pick_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_scale(device: torch.device) -> str:
    """``$MUSICGEN_LITE_SCALE`` wins; else CI -> tiny, GPU -> full, otherwise lite."""
    if os.environ.get("MUSICGEN_LITE_SCALE"):
        return os.environ["MUSICGEN_LITE_SCALE"]
    if os.environ.get("CI"):
        return "tiny"
    return "full" if device.type == "cuda" else "lite"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _install_colab_extras() -> None:
    """Colab has torch, torchaudio and librosa; add FluidSynth and its soundfont."""
    if shutil.which("fluidsynth") is None or not os.path.exists("/usr/share/sounds/sf2/FluidR3_GM.sf2"):
        subprocess.run("apt-get -qq update && apt-get -qq install -y fluidsynth fluid-soundfont-gm",
                       shell=True, check=False, stdout=subprocess.DEVNULL)
    try:
        import fluidsynth  # noqa: F401
    except Exception:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pyfluidsynth"], check=False)


def setup(seed: int = 0, scale: str | None = None, quiet: bool = False) -> NotebookEnv:
    """Prepare a notebook: install on Colab, pick device and scale, seed, print a summary."""
    colab = in_colab()
    if colab:
        _install_colab_extras()
    device = pick_device()
    name = scale or pick_scale(device)
    env = NotebookEnv(scale=name, device=device, seed=seed, colab=colab,
                      ci=bool(os.environ.get("CI")), config=get_config(name))
    seed_everything(seed)
    _configure_matplotlib()
    _quiet_libraries()
    if not quiet:
        print(env.summary())
    return env


# ----------------------------------------------------------------------------- audio players

def audio_html(wav, sample_rate: int, caption: str | None = None, max_rate: int | None = 32_000,
               fmt: str = "mp3") -> str:
    """The HTML of an audio player with the sound embedded (see ``play``)."""
    import base64
    import html
    import io

    import soundfile as sf

    x = torch.as_tensor(wav).detach().float().cpu()
    while x.dim() > 2:
        x = x[0]
    if x.dim() == 2:
        x = x.mean(0)
    rate = sample_rate
    if max_rate and sample_rate > max_rate:
        import torchaudio.functional as AF

        x = AF.resample(x, sample_rate, max_rate)
        rate = max_rate
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak > 1:
        x = x / peak
    title = f"<div><b>{html.escape(caption)}</b></div>" if caption else ""
    buf = io.BytesIO()
    mime = {"mp3": "audio/mpeg", "wav": "audio/wav"}[fmt]
    try:
        sf.write(buf, x.numpy(), rate, format=fmt.upper(), **({"subtype": "PCM_16"} if fmt == "wav" else {}))
    except Exception:  # an old libsndfile without MP3: fall back to WAV
        buf, mime = io.BytesIO(), "audio/wav"
        sf.write(buf, x.numpy(), rate, format="WAV", subtype="PCM_16")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'{title}<audio controls preload="none" src="data:{mime};base64,{data}"></audio>'


def play(wav, sample_rate: int, caption: str | None = None, max_rate: int | None = 32_000, fmt: str = "mp3"):
    """Show an audio player for ``wav`` (``[N]``, ``[C, N]`` or ``[1, C, N]``, floats in [-1, 1]).

    The sound is embedded compressed (``fmt="mp3"``, about 10x smaller than WAV) so that
    notebooks with committed outputs stay small; ``fmt="wav"`` embeds every sample as is.
    Audio above ``max_rate`` Hz is resampled for the player only; louder than full scale is
    scaled down.
    """
    from IPython.display import HTML, display

    display(HTML(audio_html(wav, sample_rate, caption, max_rate, fmt)))


# ----------------------------------------------------------------------------------- plots

def _quiet_libraries() -> None:
    """No weight-loading progress bars from transformers (they store as empty widgets)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # transformers missing or a different version: nothing to quiet
        pass


def _configure_matplotlib() -> None:
    import matplotlib

    matplotlib.rcParams.update({"figure.dpi": 80, "figure.figsize": (9, 3),
                                "axes.spines.top": False, "axes.spines.right": False})


def _mono(wav) -> np.ndarray:
    x = torch.as_tensor(wav).detach().float().cpu()
    while x.dim() > 1:
        x = x.mean(0) if x.dim() == 2 else x[0]
    return x.numpy()


def plot_waveform(wav, sample_rate: int, ax=None, title: str | None = None):
    """Waveform against time in seconds."""
    import matplotlib.pyplot as plt

    x = _mono(wav)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2))
    ax.plot(np.arange(len(x)) / sample_rate, x, linewidth=0.5)
    ax.set(xlabel="time (s)", ylabel="amplitude", xlim=(0, len(x) / sample_rate))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_mel(wav, sample_rate: int, ax=None, title: str | None = None, n_mels: int = 80,
             hop_length: int = 512):
    """Log-mel spectrogram (dB) through ``librosa.display.specshow``."""
    import librosa
    import librosa.display
    import matplotlib.pyplot as plt

    x = _mono(wav)
    mel = librosa.feature.melspectrogram(y=x, sr=sample_rate, n_mels=n_mels, hop_length=hop_length)
    db = librosa.power_to_db(mel, ref=np.max(mel) if mel.max() > 0 else 1.0)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2.5))
    librosa.display.specshow(db, sr=sample_rate, hop_length=hop_length, x_axis="time",
                             y_axis="mel", ax=ax, cmap="magma")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_tokens(codes, ax=None, title: str | None = None, frame_rate: float | None = None,
                cmap: str = "tab20"):
    """A token grid: codebooks on the y axis, frames (or seconds) on the x axis.

    ``codes`` is ``[K, T]`` (or ``[1, K, T]``) integers; each cell is coloured by its id.
    """
    import matplotlib.pyplot as plt

    c = torch.as_tensor(codes).detach().cpu()
    while c.dim() > 2:
        c = c[0]
    K, T = c.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.4 * K + 1))
    extent = (0, T / frame_rate if frame_rate else T, K - 0.5, -0.5)
    ax.imshow(c.numpy() % 20, aspect="auto", cmap=cmap, interpolation="nearest", extent=extent)
    ax.set(xlabel="time (s)" if frame_rate else "frame", ylabel="codebook", yticks=range(K))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def has_widget_frontend() -> bool:
    """True when ipywidgets can render (a live Jupyter/Colab frontend), False under nbval/CI."""
    if os.environ.get("CI") or os.environ.get("MUSICGEN_LITE_NO_WIDGETS"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except Exception:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


# ----------------------------------------------------------------------------- shipped models

def checkpoints_dir():
    """``data/checkpoints`` of this checkout: the shipped models."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "data" / "checkpoints"


def notebook_codec(quiet: bool = False):
    """The codec the notebooks turn music into tokens with: the shipped lite codec
    (``data/checkpoints/codec_lite``) when present, else an *untrained* lite codec, with a note.

    The untrained stand-in gets its codebooks from k-means on a few clips (a fresh codec's are
    empty until its first training batch, and would map all audio to code 0): its tokens are a
    deterministic function of the audio (an LM can learn them), but they decode to noise. The
    sounds in a notebook are only meaningful with the trained codec. Returns ``(codec, description)``.
    """
    from .codec import CompressionModel, codec_config
    from .hub import load_codec

    path = checkpoints_dir() / "codec_lite"
    if (path / "model.safetensors").is_file():
        import json

        extra = json.loads((path / "config.json").read_text()).get("extra", {})
        what = f"shipped lite codec ({extra.get('step', '?')} training steps)"
        codec = load_codec(path)
    else:
        from .data import synth_clip

        torch.manual_seed(0)
        codec = CompressionModel(codec_config("lite"))
        # the codebooks start empty and are initialised by k-means on the first training batch:
        # one forward pass on a few synthetic clips, so that codes depend on the audio
        clips = torch.stack([synth_clip(seed=1000 + i, seconds=4.0, sample_rate=codec.sample_rate)[0][:1]
                             for i in range(8)])  # (8, 1, N)
        codec.eval().init_codebooks(clips)
        what = ("UNTRAINED lite codec (no trained codec in data/checkpoints/codec_lite yet; codebooks set by "
                "k-means on a few clips): tokens follow the audio, but sounds decode to noise")
    if not quiet:
        print("codec:", what)
    return codec, what
