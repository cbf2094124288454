"""Audio in and out: load, save, resample, mono, peak and loudness normalisation.

Every problem with a file or an argument raises :class:`AudioError`, whose message names the
file (or argument) and the problem::

    wav, sr = load_audio("song.mp3", sample_rate=32_000)   # wav: float32 [1, N], sr == 32000
    save_audio("out.wav", wav, 32_000)                     # atomic: temp file + rename

Reading goes through soundfile (wav, flac, ogg, mp3 with libsndfile >= 1.1); a format it
cannot read is handed to ffmpeg when that is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aiff", ".aif")
MIN_RATE, MAX_RATE = 1_000, 384_000


class AudioError(ValueError):
    """A file or argument that cannot be audio as asked; the message says which and why."""

    def __init__(self, where, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def check_rate(sample_rate, name: str = "sample_rate") -> int:
    """An integer rate in [1 kHz, 384 kHz], or AudioError naming the argument."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) and not (
            isinstance(sample_rate, float) and sample_rate.is_integer()):
        raise AudioError(name, f"sample rate must be a whole number of Hz, got {sample_rate!r}")
    rate = int(sample_rate)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(name, f"impossible sample rate {rate} Hz (expected {MIN_RATE}..{MAX_RATE})")
    return rate


def check_finite(wav: torch.Tensor, where) -> torch.Tensor:
    if wav.numel() == 0:
        raise AudioError(where, "contains no samples")
    if not torch.isfinite(wav).all():
        bad = int((~torch.isfinite(wav)).sum())
        raise AudioError(where, f"contains {bad} NaN or infinite samples")
    return wav


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    return data.T, int(sr)


def _read_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=sample_rate,channels", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True, timeout=60)
    fields = probe.stdout.strip().split(",")
    if probe.returncode != 0 or len(fields) < 2:
        raise RuntimeError(probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no audio stream")
    sr, ch = int(fields[0]), int(fields[1])
    out = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "f32le", "-acodec", "pcm_f32le",
                          "-"], capture_output=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode(errors="replace").strip().splitlines()[-1])
    data = np.frombuffer(out.stdout, dtype=np.float32)
    return data[: len(data) // ch * ch].reshape(-1, ch).T.copy(), sr


def load_audio(path, sample_rate: int | None = None, mono: bool = True) -> tuple[torch.Tensor, int]:
    """Read ``path`` as float32 ``[C, N]`` (``C = 1`` when ``mono``) at ``sample_rate`` Hz.

    Returns ``(wav, rate)``; ``rate`` is ``sample_rate`` when given, else the file's own.
    Raises :class:`AudioError` for a missing, empty, corrupt or non-audio file, for NaN or
    infinite samples, and for an impossible rate.
    """
    path = Path(path)
    if sample_rate is not None:
        sample_rate = check_rate(sample_rate)
    if not path.exists():
        raise AudioError(path, "file not found")
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        data, sr = _read_soundfile(path)
    except Exception as sf_err:  # not a format libsndfile knows: try ffmpeg
        if shutil.which("ffmpeg") is None:
            raise AudioError(path, f"not a readable audio file ({sf_err})") from None
        try:
            data, sr = _read_ffmpeg(path)
        except Exception as ff_err:
            raise AudioError(path, f"not a readable audio file (soundfile: {sf_err}; ffmpeg: {ff_err})") from None
    if sr <= 0:
        raise AudioError(path, f"impossible sample rate {sr} Hz in the file header")
    wav = torch.from_numpy(np.ascontiguousarray(data))
    check_finite(wav, path)
    if mono:
        wav = to_mono(wav)
    if sample_rate is not None and sample_rate != sr:
        wav = resample(wav, sr, sample_rate)
        sr = sample_rate
    return wav, sr


def save_audio(path, wav, sample_rate: int, subtype: str | None = None) -> Path:
    """Write ``wav`` (``[N]``, ``[C, N]`` or ``[1, C, N]``) atomically; format from the suffix.

    Samples are clipped to [-1, 1]; wav is written as 16-bit PCM unless ``subtype`` says otherwise.
    """
    import soundfile as sf

    path = Path(path)
    sample_rate = check_rate(sample_rate)
    x = torch.as_tensor(wav).detach().float().cpu()
    while x.dim() > 2:
        if x.shape[0] != 1:
            raise AudioError("wav", f"expected one item, got a batch of shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() == 1:
        x = x[None]
    check_finite(x, "wav")
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(path, f"unsupported extension {path.suffix!r} (use .wav, .flac, .ogg or .mp3)")
    if subtype is None:
        subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sf.write(tmp, x.clamp(-1, 1).numpy().T, sample_rate, format=fmt, subtype=subtype)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; audio is for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def audio_info(path) -> dict:
    """``{"path", "duration", "sample_rate", "channels"}`` from the header, without decoding."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        info = sf.info(str(path))
        return {"path": str(path), "duration": info.frames / info.samplerate, "sample_rate": int(info.samplerate),
                "channels": int(info.channels)}
    except Exception:
        wav, sr = load_audio(path, mono=False)  # decodes; raises AudioError if unreadable
        return {"path": str(path), "duration": wav.shape[-1] / sr, "sample_rate": sr, "channels": wav.shape[0]}


def to_mono(wav: torch.Tensor) -> torch.Tensor:
    """Average the channels: ``[..., C, N] -> [..., 1, N]``."""
    return wav.mean(dim=-2, keepdim=True)


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling along the last axis (torchaudio's windowed sinc)."""
    import torchaudio.functional as AF

    orig_rate, new_rate = check_rate(orig_rate, "orig_rate"), check_rate(new_rate, "new_rate")
    if orig_rate == new_rate:
        return wav
    return AF.resample(wav, orig_rate, new_rate)


def normalize_peak(wav: torch.Tensor, peak_db: float = -1.0) -> torch.Tensor:
    """Scale so that the largest absolute sample sits at ``peak_db`` dBFS (silence stays silent)."""
    m = wav.abs().amax(dim=(-2, -1), keepdim=True) if wav.dim() >= 2 else wav.abs().max()
    target = 10 ** (peak_db / 20)
    return torch.where(m > 0, wav * (target / m.clamp_min(1e-12)), wav)


def loudness(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Integrated loudness in LUFS (ITU-R BS.1770-4, through torchaudio); ``wav`` is ``[..., C, N]``."""
    import torchaudio.functional as AF

    if wav.shape[-1] < int(0.4 * sample_rate):
        raise AudioError("wav", f"loudness needs at least 0.4 s of audio, got {wav.shape[-1] / sample_rate:.3f} s")
    return AF.loudness(wav, check_rate(sample_rate))


def normalize_loudness(wav: torch.Tensor, sample_rate: int, target_lufs: float = -14.0,
                       peak_db: float = -1.0) -> torch.Tensor:
    """Scale to ``target_lufs`` integrated loudness, then limit peaks to ``peak_db`` dBFS.

    Silence (loudness of -inf) is returned unchanged.
    """
    lufs = loudness(wav, sample_rate)
    gain = torch.where(torch.isfinite(lufs), 10 ** ((target_lufs - lufs) / 20), torch.ones_like(lufs))
    out = wav * gain[..., None, None] if gain.dim() else wav * gain
    limit = 10 ** (peak_db / 20)
    m = out.abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where(m > limit, out * (limit / m.clamp_min(1e-12)), out)
