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

For LM training, ``build_token_cache`` encodes every clip once with the codec (and, for
MusicGen-melody, stores each clip's melody chromagram as one pitch class per chroma frame);
``TokenDataset`` reads segments of it: codes, and the chroma aligned with them.
"""
from __future__ import annotations

import hashlib
import json
import math
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
SOURCES = ("synth", "corpus", "mix")  # mix: synthetic clips with every 4th one a corpus tune
MIX_CORPUS_EVERY = 4


def caption_for_training(info: dict, p: float, seed) -> str:
    """The clip's caption, with its key and its bpm each added (when the caption does not already
    say them) with probability ``p``: ``"... , in D minor"``, ``"..., 71 bpm"``.

    Our captions name the key in about a third of the clips and a bpm in under half, so an LM
    sees the words that carry the mode and the exact tempo too rarely to learn them (the shipped
    default ignores both). MusicGen's data pipeline does the same kind of thing: it merges the
    clip's other metadata (key, bpm, genre, moods ...) into the text description with some
    probability. The draws come from ``random.Random(seed)`` (any hashable: one stream per item);
    ``p = 0`` returns the caption unchanged without building one.
    """
    text = info.get("description", "")
    if not p:
        return text
    from ..evaluation import caption_states

    rng = random.Random(seed)

    said = caption_states(text)
    key = info.get("key") or (f"{info['tonic']} {info['mode']}" if info.get("tonic") and info.get("mode") else None)
    extras = []
    if key and rng.random() < p and not said["mode"]:
        extras.append(f"in {key}")
    if info.get("bpm") and rng.random() < p and not said["bpm"]:
        extras.append(f"{int(round(float(info['bpm'])))} bpm")
    return ", ".join([text.rstrip(" .,;")] + extras) if extras and text else (text or ", ".join(extras))


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
    out_dir, index, seed, seconds, sample_rate, source, renderer, stems, exclude = job
    from .corpus import compose_corpus
    from .render import render
    from .synth import compose

    cs = clip_seed(seed, index)
    if source == "mix":  # every MIX_CORPUS_EVERY-th clip a corpus tune, the others synthetic
        source = "corpus" if index % MIX_CORPUS_EVERY == MIX_CORPUS_EVERY - 1 else "synth"
    comp = compose(cs, seconds) if source == "synth" else compose_corpus(cs, seconds, exclude_titles=exclude)
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
                 renderer: str = "auto", progress: bool = True, exclude_tunes_of=None) -> Path:
    """Write ``n`` captioned clips of ``seconds`` to ``out_dir`` (audio, sidecar JSON, manifest).

    Same arguments, same bytes. A folder already holding this exact dataset is reused as is;
    ``out_dir=None`` picks a folder under the cache (``data/cache/`` in a checkout).
    ``exclude_tunes_of``: a dataset folder (e.g. the training set) whose corpus tunes this one
    must not use: a held-out set of melodies never heard in training.
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
    exclude = frozenset()
    if exclude_tunes_of is not None:
        exclude = frozenset(corpus_titles(exclude_tunes_of))
        params["exclude_tunes"] = {"of": Path(exclude_tunes_of).name, "count": len(exclude),
                                   "sha256": hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()[:16]}
    if out_dir is None:
        out_dir = cache_root() / f"{source}-n{n}-{seconds:g}s-seed{seed}-{sample_rate // 1000}k-{used}"
    out = Path(out_dir)
    manifest = out / "data.jsonl"
    marker = out / "dataset.json"
    if manifest.exists() and marker.exists() and json.loads(marker.read_text()) == params:
        return out
    (out / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, seed, float(seconds), sample_rate, source, used, melody_stems, exclude) for i in range(n)]
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


def corpus_titles(folder) -> list[str]:
    """The titles of the corpus tunes a dataset folder made by :func:`make_dataset` used (sorted)."""
    folder = Path(folder)
    if not (folder / "data.jsonl").is_file():
        raise FileNotFoundError(f"{folder}: not a dataset folder (no data.jsonl)")
    titles = set()
    for p in (folder / "audio").glob("corpus_*.json"):
        title = json.loads(p.read_text()).get("title")
        if title:
            titles.add(title)
    return sorted(titles)


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
CHROMA_VERSION = 1  # bump when the cached chroma's computation changes
SILENT = -1  # the cached pitch class of a silent chroma frame (read back as the null melody)


def codec_fingerprint(codec) -> str:
    """A hash of what decides a codec's codes: its configuration, encoder weights and codebook
    entries. A token cache is valid for exactly the codecs that share it; the decoder and the
    codebooks' training statistics (EMA counts and sums) are left out, so a codec whose decoder
    kept training (``train_codec(..., freeze_encoder=True)``) still matches its tokens."""
    h = hashlib.sha256()
    config = getattr(codec, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else str(config), sort_keys=True,
                            default=str).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        if name.startswith("decoder.") or name.endswith(("embed_avg", "cluster_size")):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _manifest_fingerprint(root: Path) -> str:
    manifest = root / "data.jsonl" if root.is_dir() else root
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------- melody chroma

def chroma_radix2_exp(sample_rate: int) -> int:
    """The ``radix2_exp`` whose chroma window (``2 ** radix2_exp`` samples) lasts MusicGen's 0.512 s.

    MusicGen-melody's chroma (audiocraft ``radix2_exp=14``; transformers' feature extractor
    ``n_fft=16384, hop_length=4096``) at 32 kHz: a 16384-sample window = 0.512 s, hop a quarter
    = 0.128 s, so 7.8125 chroma frames per second. At 16 kHz (our tiny and lite codecs)
    ``2 ** 13 = 8192`` samples give exactly the same seconds; other rates get the nearest
    power of two (24 kHz: ``2 ** 14``, 0.68 s).
    """
    sample_rate = check_rate(sample_rate)
    return max(2, round(math.log2(0.512 * sample_rate)))


def melody_stem(meta: AudioMeta, root=None) -> Path | None:
    """The clip's melody line alone, if its dataset has one; else None.

    Our generated sets name it in the sidecar JSON (``"melody_path"``, relative to the sidecar's
    folder: ``../stems/<id>.melody.wav``); a user's dataset folder ``root`` may hold
    ``stems/<id>.melody.wav`` without saying so.
    """
    side = meta.info_path or meta.path.with_suffix(".json")
    candidates = []
    named = read_info(meta).get("melody_path")
    if named:
        candidates.append(Path(named) if Path(named).is_absolute() else side.parent / named)
    if root is not None:
        candidates.append(Path(root) / "stems" / f"{meta.path.stem}.melody.wav")
    return next((p for p in candidates if p.is_file()), None)


def _window_peaks(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Largest ``|sample|`` under each chroma frame's window ``[T]``: the frames of a centred STFT
    (``x [N]`` padded to ``n_fft`` if shorter, then ``n_fft // 2`` zeros each side)."""
    if x.shape[-1] < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.shape[-1]))
    padded = torch.nn.functional.pad(x.abs().view(1, 1, -1), (n_fft // 2, n_fft // 2))
    return torch.nn.functional.max_pool1d(padded, n_fft, hop)[0, 0]  # (1 + N // hop,)


def chroma_classes(wav: torch.Tensor, extractor) -> np.ndarray:
    """A melody ``wav [N]`` (or ``[C, N]``, averaged) at the extractor's rate -> ``int8 [T]`` pitch classes.

    ``extractor``: a :class:`~musicgen_lite.conditioning.ChromaExtractor`. Each chroma frame
    keeps only its dominant pitch class (``extractor(wav).argmax(-1)``): MusicGen-melody reads the
    argmax (one-hot) chroma, so one byte per frame holds everything the model sees. A frame whose
    whole window stays below :data:`~musicgen_lite.conditioning.SILENCE_PEAK` (-100 dBFS) is
    :data:`SILENT` instead: a rest in the melody, read back as the null melody (the chroma of
    silence), not as the pitch class of rounding noise.
    """
    from ..conditioning import SILENCE_PEAK

    x = wav.float().reshape(-1, wav.shape[-1]).mean(0)  # (N,) mono
    with torch.no_grad():
        classes = extractor(x.view(1, 1, -1))[0].argmax(-1)  # (T,)
        peaks = _window_peaks(x, extractor.n_fft, extractor.hop_length)  # (T,)
    if peaks.shape != classes.shape:  # the extractor's framing changed: keep the two in step
        raise RuntimeError(f"chroma frames {classes.shape[0]} != window peaks {peaks.shape[0]}")
    classes[peaks < SILENCE_PEAK] = SILENT
    return classes.numpy().astype(np.int8)


def chroma_one_hot(classes: torch.Tensor, n_chroma: int = 12) -> torch.Tensor:
    """Cached pitch classes ``[..., T]`` -> the chroma the LM reads ``[..., T, n_chroma]`` (float one-hot).

    :data:`SILENT` frames become the null melody: the argmax chroma of silence, a one-hot at
    pitch class 0 (C), exactly what :class:`~musicgen_lite.conditioning.ChromaExtractor` gives a
    silent frame and :meth:`~musicgen_lite.conditioning.MelodyConditioner.null_chroma` holds.
    """
    return torch.nn.functional.one_hot(classes.long().clamp(min=0), n_chroma).float()


def build_token_cache(root, codec, out=None, clips_per_shard: int = 512, chunk_seconds: float | None = 30.0,
                      progress: bool = True, chroma: bool | None = None, radix2_exp: int | None = None,
                      n_chroma: int = 12) -> Path:
    """Encode every clip of a dataset folder once with ``codec``; store the codes memory-mappable.

    LM training then reads integer tokens and never runs the codec. The cache folder holds
    ``shard_NNNNN.npy`` (codes of many clips concatenated along time, ``[K, frames]`` int16)
    and ``index.json`` (per clip: shard, offset, frames, metadata path; plus the codec's and the
    manifest's fingerprints). A cache whose fingerprints match is reused as is; otherwise it is
    rebuilt (in a temporary folder renamed into place, so an interrupted build leaves nothing).

    Melody (MusicGen-melody training), ``chroma``: True stores each clip's melody chromagram,
    None (default) does so when the dataset has melody stems, False never. Per clip, the
    chroma of its melody stem (:func:`melody_stem`) where there is one, else of the mix
    (index: ``chroma_source`` = ``"stem"`` | ``"mix"``; the fingerprint counts both), computed by
    :class:`~musicgen_lite.conditioning.ChromaExtractor` at the codec's sample rate with
    ``n_chroma`` bins and ``n_fft = 2 ** radix2_exp`` (default :func:`chroma_radix2_exp`: MusicGen's
    0.512 s window, hop 0.128 s), stored as :func:`chroma_classes` (one int8 pitch class per
    chroma frame, :data:`SILENT` for rests) in ``chroma_NNNNN.npy`` beside the code shards. The
    chroma settings and the list of stems are part of the fingerprint: change them and the
    cache is rebuilt.
    """
    import shutil

    from tqdm.auto import tqdm

    root = Path(root)
    metas = read_manifest(root)
    base = root if root.is_dir() else root.parent
    fingerprint = {"version": TOKEN_CACHE_VERSION, "codec": codec_fingerprint(codec),
                   "manifest": _manifest_fingerprint(root), "num_codebooks": int(codec.num_codebooks),
                   "cardinality": int(codec.cardinality), "frame_rate": float(codec.frame_rate),
                   "sample_rate": int(codec.sample_rate)}
    stems = [melody_stem(m, base) for m in metas]
    if chroma is None:
        chroma = any(s is not None for s in stems)
    extractor = None
    if chroma:
        from ..conditioning import SILENCE_PEAK, ChromaExtractor

        if not isinstance(n_chroma, int) or not 1 <= n_chroma <= 127:
            raise ValueError(f"n_chroma must be an int in [1, 127] (stored as int8), got {n_chroma!r}")
        radix2_exp = chroma_radix2_exp(codec.sample_rate) if radix2_exp is None else int(radix2_exp)
        if radix2_exp < 2:
            raise ValueError(f"radix2_exp must be at least 2 (n_fft = 2 ** radix2_exp, hop n_fft / 4), "
                             f"got {radix2_exp}")
        extractor = ChromaExtractor(int(codec.sample_rate), n_chroma, radix2_exp, argmax=True)
        sources = [os.path.relpath(s, base) if s is not None else None for s in stems]
        fingerprint["chroma"] = {
            "version": CHROMA_VERSION, "sample_rate": int(codec.sample_rate), "n_chroma": n_chroma,
            "radix2_exp": radix2_exp, "n_fft": extractor.n_fft, "hop_length": extractor.hop_length,
            "frame_rate": codec.sample_rate / extractor.hop_length, "argmax": True, "silence_peak": SILENCE_PEAK,
            "from_stem": sum(s is not None for s in stems), "from_mix": sum(s is None for s in stems),
            "sources": hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:16]}
    out = Path(out) if out else (root / "tokens" if root.is_dir() else root.parent / "tokens")
    index_path = out / "index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("fingerprint") == fingerprint:
        return out
    if codec.cardinality > 32_767:
        raise ValueError(f"codec cardinality {codec.cardinality} does not fit the cache's int16 tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    clips, shard, buffer, offset = [], 0, [], 0
    chroma_buffer, chroma_offset = [], 0

    def flush():
        nonlocal shard, buffer, offset, chroma_buffer, chroma_offset
        if buffer:
            np.save(tmp / f"shard_{shard:05d}.npy", np.concatenate(buffer, axis=1))
            if extractor is not None:
                np.save(tmp / f"chroma_{shard:05d}.npy", np.concatenate(chroma_buffer))
            shard, buffer, offset, chroma_buffer, chroma_offset = shard + 1, [], 0, [], 0

    try:
        for meta, stem in tqdm(list(zip(metas, stems)), desc="tokenizing", disable=not progress, unit="clip"):
            wav, _ = load_audio(meta.path, codec.sample_rate)
            with torch.inference_mode():
                codes = codec.encode(wav[None], chunk_seconds=chunk_seconds)[0]  # (K, T)
            arr = codes.cpu().numpy().astype(np.int16)
            side = meta.info_path or meta.path.with_suffix(".json")
            clip = {"shard": shard, "offset": offset, "frames": int(arr.shape[1]),
                    "path": os.path.relpath(meta.path, out), "info": os.path.relpath(side, out)
                    if side.exists() else None}
            if extractor is not None:
                melody = load_audio(stem, codec.sample_rate)[0] if stem is not None else wav  # (C, N)
                classes = chroma_classes(melody, extractor)  # (Tc,) int8
                clip.update(chroma_offset=chroma_offset, chroma_frames=int(classes.shape[0]),
                            chroma_source="stem" if stem is not None else "mix",
                            melody=os.path.relpath(stem, out) if stem is not None else None)
                chroma_buffer.append(classes)
                chroma_offset += classes.shape[0]
            clips.append(clip)
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

    Melody (a cache built with chroma; ``chroma=None`` reads it when there, True requires it,
    False skips it): ``info["chroma"]`` is the segment's chroma ``[Lc, n_chroma]`` (float
    one-hot, :func:`chroma_one_hot`; rests and frames past the clip's end are the null melody),
    ``Lc = ceil(S * chroma_rate / frame_rate)`` frames (:meth:`chroma_frames`, 8 for 1 s at
    7.8125 Hz; a whole clip: all its chroma frames) starting at chroma frame
    ``info["chroma_start"]``, the one nearest the codes' start time (:meth:`chroma_start`): the
    two rates rarely share a frame boundary (50 Hz codes, 7.8125 Hz chroma: every 0.64 s), so
    the chroma starts within half a chroma hop (64 ms) of the codes, less than one chroma
    frame's own 0.512 s window. ``info["chroma_source"]``:
    ``"stem"`` or ``"mix"``.
    """

    def __init__(self, cache, segment_frames: int | None = None, random_segments: bool = False, seed: int = 0,
                 chroma: bool | None = None):
        self.root = Path(cache)
        index_path = self.root / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{self.root}: no token cache here (build one with build_token_cache)")
        index = json.loads(index_path.read_text())
        self.fingerprint, self.clips = index["fingerprint"], index["clips"]
        self.chroma_settings: dict | None = self.fingerprint.get("chroma")
        if chroma and self.chroma_settings is None:
            raise ValueError(f"{self.root}: this token cache holds no melody chroma; rebuild it with "
                             "build_token_cache(..., chroma=True) (or `musicgen-lite tokenize --chroma`)")
        self.with_chroma = self.chroma_settings is not None if chroma is None else bool(chroma)
        self.segment_frames, self.random_segments, self.seed, self.epoch = segment_frames, random_segments, seed, 0
        self._shards: dict[int, np.ndarray] = {}
        self._chroma_shards: dict[int, np.ndarray] = {}
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

    def _chroma_shard(self, k: int) -> np.ndarray:
        if k not in self._chroma_shards:
            self._chroma_shards[k] = np.load(self.root / f"chroma_{k:05d}.npy", mmap_mode="r")
        return self._chroma_shards[k]

    def _chroma_ratio(self) -> float:
        if self.chroma_settings is None:
            raise ValueError(f"{self.root}: this token cache holds no melody chroma")
        return self.chroma_settings["frame_rate"] / self.fingerprint["frame_rate"]

    def chroma_frames(self, frames: int) -> int:
        """Chroma frames covering ``frames`` codec frames: ``ceil(frames * chroma_rate / frame_rate)``."""
        return max(1, math.ceil(frames * self._chroma_ratio() - 1e-9))

    def chroma_start(self, start_frame: int) -> int:
        """The chroma frame nearest in time to codec frame ``start_frame``."""
        return int(math.floor(start_frame * self._chroma_ratio() + 0.5))

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
        if self.with_chroma:
            if self.segment_frames is None:  # the whole clip: all its chroma frames
                c0, length = 0, clip["chroma_frames"]
            else:
                c0, length = self.chroma_start(start), self.chroma_frames(n)
            classes = np.full(length, SILENT, dtype=np.int8)  # past the clip's end: the null melody
            have = max(0, min(length, clip["chroma_frames"] - c0))
            at = clip["chroma_offset"] + c0
            classes[:have] = self._chroma_shard(clip["shard"])[at:at + have]
            info.update(chroma=chroma_one_hot(torch.from_numpy(classes), self.chroma_settings["n_chroma"]),
                        chroma_start=int(c0), chroma_source=clip["chroma_source"])
        return codes, info
