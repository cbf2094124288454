"""Datasets on disk in audiocraft's format, and a torch Dataset that reads any such folder.

A dataset folder holds::

    data.jsonl            one line per clip: {"path", "duration", "sample_rate", ...}
    audio/<id>.wav        the clip
    audio/<id>.json       its metadata (description, bpm, key, genre, moods, instruments, ...)
    stems/<id>.melody.wav the melody line alone (our generated sets)
    dataset.json          how it was made (used to reuse a cached set)

``make_dataset`` writes such a folder, deterministically from a seed, in parallel, with a
progress bar; ``write_manifest`` turns a folder of a user's own music into one;
``AudioDataset`` yields fixed-length segments with their metadata.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..audio import AUDIO_EXTENSIONS, AudioError, audio_info, check_rate, load_audio, save_audio

FORMAT_VERSION = 1  # bump when the generator changes what a seed produces
SOURCES = ("synth", "corpus")


def cache_root() -> Path:
    """``$MUSICGEN_LITE_CACHE``, else ``data/cache`` of a source checkout, else ``~/.cache/musicgen-lite``."""
    if os.environ.get("MUSICGEN_LITE_CACHE"):
        root = Path(os.environ["MUSICGEN_LITE_CACHE"])
    else:
        repo = Path(__file__).resolve().parents[2]
        root = repo / "data" / "cache" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "musicgen-lite"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def clip_seed(seed: int, index: int) -> int:
    """An independent 63-bit seed for clip ``index`` of a dataset drawn with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _render_one(job: tuple) -> dict:
    out_dir, index, seed, seconds, sample_rate, source, renderer, stems = job
    from .corpus import compose_corpus
    from .render import render
    from .synth import compose

    cs = clip_seed(seed, index)
    comp = compose(cs, seconds) if source == "synth" else compose_corpus(cs, seconds)
    name = f"{source}_{index:06d}"
    audio_path = Path(out_dir) / "audio" / f"{name}.wav"
    wav = render(comp, sample_rate, renderer=renderer)
    save_audio(audio_path, wav[None], sample_rate)
    meta = dict(comp.meta, name=name, sample_rate=sample_rate, seed=cs, index=index)
    if stems:
        stem_path = Path(out_dir) / "stems" / f"{name}.melody.wav"
        save_audio(stem_path, render(comp.only("melody"), sample_rate, renderer=renderer)[None], sample_rate)
        meta["melody_path"] = f"../stems/{name}.melody.wav"
    _write_text_atomic(audio_path.with_suffix(".json"), json.dumps(meta, indent=1))
    return {"path": f"audio/{name}.wav", "duration": float(seconds), "sample_rate": sample_rate,
            "amplitude": None, "weight": None, "info_path": None}


def make_dataset(out_dir, n: int, seconds: float = 10.0, seed: int = 0, source: str = "synth",
                 sample_rate: int = 32_000, workers: int | None = None, melody_stems: bool = True,
                 renderer: str = "auto", progress: bool = True) -> Path:
    """Write ``n`` captioned clips of ``seconds`` to ``out_dir`` (audio, sidecar JSON, manifest).

    Same arguments, same bytes. A folder already holding this exact dataset is reused as is;
    ``out_dir=None`` picks a folder under the cache (``data/cache/`` in a checkout).
    """
    from tqdm.auto import tqdm

    from .render import which_renderer

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of clips, got {n!r}")
    if not (isinstance(seconds, (int, float)) and 0.5 <= seconds <= 600):
        raise ValueError(f"seconds must be between 0.5 and 600, got {seconds!r}")
    sample_rate = check_rate(sample_rate)
    used = which_renderer(renderer)
    params = {"version": FORMAT_VERSION, "n": n, "seconds": float(seconds), "seed": seed, "source": source,
              "sample_rate": sample_rate, "renderer": used, "melody_stems": melody_stems}
    if out_dir is None:
        out_dir = cache_root() / f"{source}-n{n}-{seconds:g}s-seed{seed}-{sample_rate // 1000}k-{used}"
    out = Path(out_dir)
    manifest = out / "data.jsonl"
    marker = out / "dataset.json"
    if manifest.exists() and marker.exists() and json.loads(marker.read_text()) == params:
        return out
    (out / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, seed, float(seconds), sample_rate, source, used, melody_stems) for i in range(n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    bar = tqdm(total=n, desc=f"rendering {source} clips", disable=not progress, unit="clip")
    rows: list[dict] = []
    if workers > 1 and n >= 4 * workers:
        # "spawn": forking a process that holds threads or sockets (a Jupyter kernel does) can hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for row in pool.map(_render_one, jobs, chunksize=max(1, min(16, n // (4 * workers)))):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(_render_one(job))
            bar.update()
    bar.close()
    _write_text_atomic(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    _write_text_atomic(marker, json.dumps(params, indent=1))
    return out


# ---------------------------------------------------------------------------- manifests

@dataclass
class AudioMeta:
    """One manifest line: where the clip is, how long, at what rate."""

    path: Path
    duration: float
    sample_rate: int
    info_path: Path | None = None


def write_manifest(folder, out=None, skip_bad: bool = False) -> Path:
    """Scan ``folder`` (recursively) for audio and write its ``data.jsonl``.

    For a user's own music. Unreadable files raise :class:`AudioError` naming the file, or
    are skipped with ``skip_bad=True``. Paths are stored relative to the manifest's folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AudioError(folder, "not a folder")
    out = Path(out) if out else folder / "data.jsonl"
    rows = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in AUDIO_EXTENSIONS or p.name.startswith(".") or "stems" in p.parts:
            continue
        try:
            info = audio_info(p)
        except AudioError:
            if skip_bad:
                continue
            raise
        rel = os.path.relpath(p, out.parent)
        rows.append({"path": rel, "duration": info["duration"], "sample_rate": info["sample_rate"],
                     "amplitude": None, "weight": None, "info_path": None})
    if not rows:
        raise AudioError(folder, f"no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    _write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def read_manifest(path) -> list[AudioMeta]:
    """Read ``data.jsonl`` (or a folder holding one); relative paths resolve against its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.exists():
        raise AudioError(path, "manifest not found (make one with write_manifest(folder))")
    metas = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            p = Path(d["path"])
            p = p if p.is_absolute() else path.parent / p
            info = d.get("info_path")
            metas.append(AudioMeta(p, float(d["duration"]), int(d["sample_rate"]), Path(info) if info else None))
        except (KeyError, ValueError, TypeError) as e:
            raise AudioError(f"{path}:{i}", f"bad manifest line ({e})") from None
    if not metas:
        raise AudioError(path, "manifest is empty")
    return metas


def read_info(meta: AudioMeta) -> dict:
    """The clip's sidecar metadata (``info_path`` or ``<audio>.json``); ``{}`` when there is none."""
    side = meta.info_path or meta.path.with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else {}


class AudioDataset(torch.utils.data.Dataset):
    """Fixed-length segments of every clip in a manifest, with their metadata.

    ``segment_seconds=None`` yields whole clips. Otherwise each clip is cut into consecutive
    segments (``random_segments=False``: item ``i`` is always the same segment) or one segment
    at a seeded random offset per clip (``random_segments=True``; call ``set_epoch`` to draw
    anew). Short audio is zero-padded; ``info["n_samples"]`` says how much of it is real.

    Item: ``(wav [1, N] float32, info dict)``; ``collate`` stacks a batch.
    """

    def __init__(self, root, segment_seconds: float | None = None, sample_rate: int = 32_000,
                 random_segments: bool = False, seed: int = 0, min_segment_ratio: float = 0.5):
        self.metas = read_manifest(root)
        self.sample_rate = check_rate(sample_rate)
        if segment_seconds is not None and segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be positive, got {segment_seconds!r}")
        self.segment_seconds = segment_seconds
        self.random_segments = random_segments
        self.seed = seed
        self.epoch = 0
        self.index: list[tuple[int, float]] = []  # (clip, start seconds)
        for ci, m in enumerate(self.metas):
            if segment_seconds is None or random_segments:
                self.index.append((ci, 0.0))
            else:
                n = max(1, int(m.duration / segment_seconds + (1 - min_segment_ratio)))
                self.index += [(ci, k * segment_seconds) for k in range(n)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        ci, start = self.index[i]
        meta = self.metas[ci]
        wav, _ = load_audio(meta.path, self.sample_rate)
        if self.segment_seconds is not None:
            seg = int(round(self.segment_seconds * self.sample_rate))
            if self.random_segments:
                rng = random.Random(hash((self.seed, self.epoch, i)) & 0xFFFFFFFF)
                start = rng.uniform(0, max(0.0, wav.shape[-1] / self.sample_rate - self.segment_seconds))
            s = int(round(start * self.sample_rate))
            chunk = wav[:, s:s + seg]
            n_real = chunk.shape[-1]
            if n_real < seg:
                chunk = torch.nn.functional.pad(chunk, (0, seg - n_real))
            wav = chunk
        else:
            n_real = wav.shape[-1]
        info = read_info(meta)
        info.update(path=str(meta.path), seek_time=float(start), n_samples=int(n_real), sample_rate=self.sample_rate)
        return wav, info

    @staticmethod
    def collate(batch):
        """``[(wav, info), ...] -> (wav [B, 1, N], [info, ...])``; items must share a length."""
        wavs, infos = zip(*batch)
        return torch.stack(wavs), list(infos)


# ---------------------------------------------------------------------------- token cache

TOKEN_CACHE_VERSION = 1


def codec_fingerprint(codec) -> str:
    """A hash of a codec's configuration and weights: a token cache is valid for exactly one codec."""
    import hashlib

    h = hashlib.sha256()
    config = getattr(codec, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else str(config), sort_keys=True,
                            default=str).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _manifest_fingerprint(root: Path) -> str:
    import hashlib

    manifest = root / "data.jsonl" if root.is_dir() else root
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def build_token_cache(root, codec, out=None, clips_per_shard: int = 512, chunk_seconds: float | None = 30.0,
                      progress: bool = True) -> Path:
    """Encode every clip of a dataset folder once with ``codec``; store the codes memory-mappable.

    LM training then reads integer tokens and never runs the codec. The cache folder holds
    ``shard_NNNNN.npy`` (codes of many clips concatenated along time, ``[K, frames]`` int16)
    and ``index.json`` (per clip: shard, offset, frames, metadata path; plus the codec's and the
    manifest's fingerprints). A cache whose fingerprints match is reused as is; otherwise it is
    rebuilt (in a temporary folder renamed into place, so an interrupted build leaves nothing).
    """
    import shutil

    from tqdm.auto import tqdm

    root = Path(root)
    metas = read_manifest(root)
    fingerprint = {"version": TOKEN_CACHE_VERSION, "codec": codec_fingerprint(codec),
                   "manifest": _manifest_fingerprint(root), "num_codebooks": int(codec.num_codebooks),
                   "cardinality": int(codec.cardinality), "frame_rate": float(codec.frame_rate),
                   "sample_rate": int(codec.sample_rate)}
    out = Path(out) if out else (root / "tokens" if root.is_dir() else root.parent / "tokens")
    index_path = out / "index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("fingerprint") == fingerprint:
        return out
    if codec.cardinality > 32_767:
        raise ValueError(f"codec cardinality {codec.cardinality} does not fit the cache's int16 tokens")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    clips, shard, buffer, offset = [], 0, [], 0

    def flush():
        nonlocal shard, buffer, offset
        if buffer:
            np.save(tmp / f"shard_{shard:05d}.npy", np.concatenate(buffer, axis=1))
            shard, buffer, offset = shard + 1, [], 0

    try:
        for meta in tqdm(metas, desc="tokenizing", disable=not progress, unit="clip"):
            wav, _ = load_audio(meta.path, codec.sample_rate)
            with torch.inference_mode():
                codes = codec.encode(wav[None], chunk_seconds=chunk_seconds)[0]  # (K, T)
            arr = codes.cpu().numpy().astype(np.int16)
            side = meta.info_path or meta.path.with_suffix(".json")
            clips.append({"shard": shard, "offset": offset, "frames": int(arr.shape[1]),
                          "path": os.path.relpath(meta.path, out), "info": os.path.relpath(side, out)
                          if side.exists() else None})
            buffer.append(arr)
            offset += arr.shape[1]
            if len(buffer) >= clips_per_shard:
                flush()
        flush()
        _write_text_atomic(tmp / "index.json", json.dumps({"fingerprint": fingerprint, "clips": clips}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Segments of cached codes: item ``i`` -> ``(codes [K, S] int64, info dict)``.

    ``segment_frames=None`` yields whole clips. Otherwise each clip is cut into consecutive
    segments (the last one zero-padded, ``info["n_frames"]`` counting the real ones) or, with
    ``random_segments``, one seeded random window per clip (``set_epoch`` draws anew). Shards
    are memory-mapped: nothing is read until asked for.
    """

    def __init__(self, cache, segment_frames: int | None = None, random_segments: bool = False, seed: int = 0):
        self.root = Path(cache)
        index_path = self.root / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{self.root}: no token cache here (build one with build_token_cache)")
        index = json.loads(index_path.read_text())
        self.fingerprint, self.clips = index["fingerprint"], index["clips"]
        self.segment_frames, self.random_segments, self.seed, self.epoch = segment_frames, random_segments, seed, 0
        self._shards: dict[int, np.ndarray] = {}
        self.items: list[tuple[int, int]] = []  # (clip, start frame)
        for ci, clip in enumerate(self.clips):
            if segment_frames is None or random_segments:
                self.items.append((ci, 0))
            else:
                self.items += [(ci, s) for s in range(0, max(clip["frames"], 1), segment_frames)]

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = np.load(self.root / f"shard_{k:05d}.npy", mmap_mode="r")
        return self._shards[k]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        ci, start = self.items[i]
        clip = self.clips[ci]
        n = clip["frames"] if self.segment_frames is None else self.segment_frames
        if self.random_segments and self.segment_frames is not None:
            rng = random.Random(hash((self.seed, self.epoch, i)) & 0xFFFFFFFF)
            start = rng.randint(0, max(0, clip["frames"] - n))
        real = max(0, min(n, clip["frames"] - start))
        data = self._shard(clip["shard"])[:, clip["offset"] + start: clip["offset"] + start + real]
        codes = torch.zeros(data.shape[0], n, dtype=torch.long)
        codes[:, :real] = torch.from_numpy(np.asarray(data, dtype=np.int64))
        info = {}
        if clip.get("info"):
            side = self.root / clip["info"]
            if side.exists():
                info = json.loads(side.read_text())
        info.update(start_frame=int(start), n_frames=int(real))
        return codes, info
