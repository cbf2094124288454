"""Evaluating a text-to-music model the way the MusicGen paper does, offline.

``evaluate(model)`` takes held-out captions whose attributes are known (style, mood, tempo,
instruments, drums, mode), asks the model for one clip per caption, and measures:

- ``fad``: Fréchet Audio Distance between generated and real held-out audio in the embedding
  space of our attribute tagger (the paper: VGGish). Lower is better.
- ``kl``: KL divergence between the tagger's label distributions on the real clip and on the
  clip generated from that clip's caption (the paper: PaSST's labels), both directions, per
  attribute and averaged over attributes. Lower is better.
- ``clap``: cosine similarity of the generated audio and its caption in our CLAP-style model.
  Higher is better.
- ``chroma_cosine``: for melody-conditioned models, how often the generated audio's dominant
  pitch class agrees with the melody's, frame by frame. Higher is better. Its references: the
  same model without the melody (``text_only``) and the audio against another clip's melody.
- ``attribute_accuracy``: does the tagger hear what the caption asked for? Only possible
  because our captions come from known attributes.
- ``caption_gain``: does the LM read its caption at all? Its loss on the held-out clips' own
  tokens with their own caption, another clip's and none (:func:`caption_gain`), no sampling.

A number alone says little ("FAD 3.2": good?), so ``result["reference"]`` gives the same
metrics for three stand-ins for the model: ``real`` (the held-out audio itself: the best one
can do), ``shuffled`` (real audio paired with another clip's caption: the chance level of
every paired metric) and ``noise`` (white noise: the floor). Every value names the reference
model that produced it (``"embedder": "musicgen-lite-tagger@d1dee38a"``: model name and the
first 8 hex digits of the SHA-256 of its weights), so numbers from different taggers are
never compared by mistake.

The default held-out set is synthetic: ``make_dataset(None, n, seconds=duration,
seed=HELDOUT_SEED, source="synth", sample_rate=16_000)``, seed 999_001, a seed no training
or reference set uses (those use small seeds: 0, 1, 100, 101, 200, 201). Its first ``n``
clips are the same whatever ``n``, so a larger evaluation extends a smaller one. Everything
is measured at 16 kHz, the rate of both reference models.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import re
import time
from pathlib import Path

import torch

from .metrics import (HEADS, attribute_accuracy, chroma_cosine_similarity, clap_score, family_top1,
                      frechet_distance, kl_divergence, targets_from_info)

HELDOUT_SEED = 999_001  # the default held-out set: no training or reference-model set uses it
EVAL_RATE = 16_000  # Hz: the tagger's and the CLAP model's rate
TEMPO_TOLERANCE = 0.10  # a tempo bucket counts when the caption's bpm, +-10%, falls in it
CHROMA_EXTRACTOR = "musicgen-lite ChromaExtractor (argmax, 4096-point STFT at 16 kHz)"
ATTRIBUTES = tuple(HEADS)  # family, style, mood, tempo, drums, mode


def reference_model_id(model) -> str:
    """``name@hash``: the model's name and the first 8 hex digits of the SHA-256 of its weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    text = getattr(model, "_text_encoder", None)
    suffix = f" + {text.name}" if text is not None else ""
    return f"{model.name}@{h.hexdigest()[:8]}{suffix}"


# --------------------------------------------------------------------------- the held-out set

def heldout_set(n: int, seconds: float, seed: int = HELDOUT_SEED, out_dir=None, progress: bool = True) -> Path:
    """The default held-out folder: ``n`` synthetic captioned clips at 16 kHz, with melody stems."""
    from .data.dataset import make_dataset

    return make_dataset(out_dir, n=n, seconds=seconds, seed=seed, source="synth", sample_rate=EVAL_RATE,
                        melody_stems=True, progress=progress)


def portable_path(path) -> str:
    """``path`` as a result file should record it: relative to the working directory when it
    lies under it (``data/cache/...``), else its last two parts. Results are committed and
    shared, so they carry no machine's absolute paths."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(*p.parts[-2:]).as_posix() if len(p.parts) >= 2 else p.as_posix()


def _fit(wav: torch.Tensor, n: int) -> torch.Tensor:
    """Crop or zero-pad the last axis to ``n`` samples."""
    return wav[..., :n] if wav.shape[-1] >= n else torch.nn.functional.pad(wav, (0, n - wav.shape[-1]))


def load_clips(folder, n: int | None, seconds: float) -> tuple[torch.Tensor, list[dict]]:
    """The first ``n`` clips of a dataset folder at 16 kHz: ``(wav [n, 1, N], infos)``.

    Each clip is cropped (or zero-padded) to ``seconds``; ``infos[i]`` is its sidecar metadata
    (``description`` and, for our data, the attributes).
    """
    from .audio import load_audio
    from .data.dataset import read_info, read_manifest

    metas = read_manifest(folder)
    metas = metas[:n] if n else metas
    N = int(round(seconds * EVAL_RATE))
    wavs, infos = [], []
    for m in metas:
        wav, _ = load_audio(m.path, EVAL_RATE)  # (1, N')
        wavs.append(_fit(wav, N))
        info = read_info(m)
        if not info.get("description"):
            raise ValueError(f"{m.path}: no caption (its sidecar JSON needs a 'description')")
        infos.append(info)
    return torch.stack(wavs), infos


def load_melodies(melodies, seconds: float, sample_rate: int) -> list[torch.Tensor]:
    """Melodies as ``[1, N]`` tensors at ``sample_rate``, ``seconds`` long.

    ``melodies``: a folder (every audio file under it, sorted by path) or a list of
    ``(wav, sample_rate)`` pairs.
    """
    from .audio import AUDIO_EXTENSIONS, AudioError, load_audio, resample

    N = int(round(seconds * sample_rate))
    if isinstance(melodies, (str, Path)):
        folder = Path(melodies)
        if not folder.is_dir():
            raise AudioError(folder, "melodies: not a folder")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise AudioError(folder, f"melodies: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
        return [_fit(load_audio(p, sample_rate)[0], N) for p in files]
    out = []
    for i, item in enumerate(melodies):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"melodies[{i}] must be a (wav, sample_rate) pair")
        wav, sr = torch.as_tensor(item[0]).float(), int(item[1])
        wav = wav.reshape(-1, wav.shape[-1]).mean(0, keepdim=True)  # (1, N') mono
        out.append(_fit(resample(wav, sr, sample_rate) if sr != sample_rate else wav, N))
    if not out:
        raise ValueError("melodies is empty")
    return out


# --------------------------------------------------------------------------- generation

def generate_all(model, captions: list[str], duration: float, seed: int = 0, batch_size: int = 8,
                 melodies: list[torch.Tensor] | None = None, progress: bool = True, **generate_kw) -> torch.Tensor:
    """One clip per caption from ``model.generate``: ``wav [n, 1, N]`` at 16 kHz.

    Batch ``b`` is generated with ``seed + b``, so the same arguments give the same audio.
    With ``melodies`` (``[1, N]`` each, at the model's rate; ``melodies[i]`` goes with caption
    ``i``) the model's ``generate_with_chroma(descriptions, melody_wavs [B, 1, N],
    melody_sample_rate, duration=..., ...)`` is called instead (audiocraft's name).
    """
    from tqdm.auto import tqdm

    from .audio import resample

    if melodies is not None and not hasattr(model, "generate_with_chroma"):
        raise ValueError(f"melodies given, but {type(model).__name__} has no melody conditioning "
                         "(no generate_with_chroma method)")
    fn = model.generate if melodies is None else model.generate_with_chroma
    params = inspect.signature(fn).parameters
    if "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        generate_kw.setdefault("progress", False)  # one bar here, not one per batch
    N = int(round(duration * EVAL_RATE))
    out = []
    starts = range(0, len(captions), batch_size)
    for b, i in enumerate(tqdm(starts, desc="evaluate: generating", unit="batch", disable=not progress)):
        texts = captions[i:i + batch_size]
        if melodies is None:
            wav = fn(texts, duration=duration, seed=seed + b, **generate_kw)
        else:
            mel = torch.stack(melodies[i:i + batch_size])  # (B, 1, N)
            wav = fn(texts, mel, model.sample_rate, duration=duration, seed=seed + b, **generate_kw)
        if not torch.is_tensor(wav) or wav.dim() != 3 or wav.shape[0] != len(texts):
            raise ValueError(f"the model must return wav [B, C, N] with B = {len(texts)}, "
                             f"got {getattr(wav, 'shape', type(wav))}")
        wav = wav.detach().float().cpu().mean(1, keepdim=True)  # (B, 1, N') mono
        if model.sample_rate != EVAL_RATE:
            wav = resample(wav, model.sample_rate, EVAL_RATE)
        out.append(_fit(wav, N))
    wav = torch.cat(out)
    if not torch.isfinite(wav).all():
        raise ValueError("the model generated non-finite audio (NaN or inf)")
    return wav


def caption_gain(model, wavs: torch.Tensor, sample_rate: int, captions: list[str], seconds: float = 4.0,
                 batch_size: int = 8) -> dict | None:
    """What the captions are worth to ``model``'s LM, in nats per clip.

    The first ``seconds`` of each clip ``wavs[i]`` (``[n, 1, N]`` at ``sample_rate``), encoded
    by the model's own codec, scored by the LM (teacher forcing, no dropout) with caption ``i``,
    with caption ``i + 1`` (``other``) and with the null condition (``null``): mean loss per
    token times the tokens of one clip. ``gain_null = null - own`` is what the caption saves,
    ``gain_other = other - own`` what a wrong caption costs. A caption holds a few dozen nats
    (style, instruments, tempo, key, drums); a model that ignores it scores about 0. None for a
    model without a text conditioner or with a melody conditioner (its LM also expects chroma).
    """
    if getattr(model, "conditioner", None) is None or getattr(model, "melody_conditioner", None) is not None:
        return None
    if len(captions) < 2 or len(captions) != wavs.shape[0]:
        raise ValueError(f"caption_gain needs one caption per clip and at least 2 clips, got {len(captions)} "
                         f"captions for {wavs.shape[0]} clips")
    other = list(captions[1:]) + list(captions[:1])
    per_clip, tokens = _caption_losses(model, wavs, sample_rate, {"own": captions, "other": other, "null": None},
                                       seconds, batch_size)
    return {**{k: round(v, 3) for k, v in per_clip.items()},
            "gain_null": round(per_clip["null"] - per_clip["own"], 3),
            "gain_other": round(per_clip["other"] - per_clip["own"], 3),
            "clips": len(captions), "seconds": float(seconds), "tokens_per_clip": tokens,
            "note": "nats per clip: the LM's loss on real clips with their own caption, the next clip's, and "
                    "the null condition"}


def _caption_losses(model, wavs: torch.Tensor, sample_rate: int, caption_sets: dict, seconds: float,
                    batch_size: int) -> tuple[dict, int]:
    """The LM's teacher-forced loss on the first ``seconds`` of ``wavs`` (its own codec's tokens)
    under each list of captions in ``caption_sets`` (None: the null condition), as nats per clip
    (mean loss per token times the tokens of one clip), averaged over the clips."""
    from .audio import resample
    from .training import LMTask

    wav = wavs.float().mean(1, keepdim=True)
    if sample_rate != model.sample_rate:
        wav = resample(wav, sample_rate, model.sample_rate)
    wav = _fit(wav, int(round(seconds * model.sample_rate)))
    modes = [(m, m.training) for m in (model.lm, model.conditioner)]  # restored after: a fresh LMTask trains
    task = LMTask(model.lm, model.conditioner, model.pattern).eval()
    device = next(model.lm.parameters()).device
    totals = dict.fromkeys(caption_sets, 0.0)
    first = next(texts for texts in caption_sets.values() if texts is not None)
    n, tokens = wav.shape[0], None
    with torch.no_grad():
        for i in range(0, n, batch_size):
            codes = model.codec.encode(wav[i:i + batch_size].to(device))  # (B, K, T)
            tokens = codes.shape[1] * codes.shape[2]
            b = codes.shape[0]
            for name, texts in caption_sets.items():
                if texts is None:  # the null condition: the first set's texts, dropped
                    loss = task(codes, list(first[i:i + batch_size]), drop=True)[0]
                else:
                    loss = task(codes, list(texts[i:i + batch_size]))[0]
                totals[name] += float(loss) * b
    for module, training in modes:
        module.train(training)
    return {k: v / n * tokens for k, v in totals.items()}, tokens


_MODE_SWAP = {"major": "minor", "minor": "major", "Major": "Minor", "Minor": "Major"}


def mode_swapped(caption: str) -> str:
    """``caption`` with the words major and minor exchanged (unchanged when it names neither)."""
    return re.sub(r"\b(major|minor|Major|Minor)\b", lambda m: _MODE_SWAP[m.group(1)], caption)


def bpm_changed(caption: str) -> str:
    """``caption`` with each stated bpm moved out of the +-10% window and off half/double: x1.5
    below 110 bpm, x2/3 from 110 up (so 120 -> 80 and 80 -> 120, both outside any tolerance)."""
    def move(m):
        bpm = float(m.group(1))
        return f"{int(round(bpm * 1.5 if bpm < 110 else bpm * 2 / 3))}{m.group(2)}{m.group(3)}"

    return re.sub(r"\b(\d+(?:\.\d+)?)(\s*)(bpm)\b", move, caption, flags=re.IGNORECASE)


def word_gain(model, wavs: torch.Tensor, sample_rate: int, captions: list[str], seconds: float = 4.0,
              batch_size: int = 8) -> dict | None:
    """Does the LM read the mode word and the bpm number? On the clips whose caption states
    them (:func:`caption_states`), the LM's loss with the true caption against the same caption
    with major and minor swapped (:func:`mode_swapped`) or the bpm moved (:func:`bpm_changed`),
    in nats per clip: ``{"mode": {"clips", "gain"}, "bpm": {...}}``, ``gain`` = wrong - true
    (about 0 when the word is ignored; positive when it is followed). None as :func:`caption_gain`.
    """
    if getattr(model, "conditioner", None) is None or getattr(model, "melody_conditioner", None) is not None:
        return None
    if len(captions) != wavs.shape[0]:
        raise ValueError(f"word_gain needs one caption per clip, got {len(captions)} for {wavs.shape[0]} clips")
    out = {"seconds": float(seconds)}
    for name, change in (("mode", mode_swapped), ("bpm", bpm_changed)):
        idx = [i for i, c in enumerate(captions) if caption_states(c)[name]]
        if not idx:
            out[name] = {"clips": 0, "gain": None}
            continue
        own = [captions[i] for i in idx]
        losses, _ = _caption_losses(model, wavs[idx], sample_rate, {"own": own, "wrong": [change(c) for c in own]},
                                    seconds, batch_size)
        out[name] = {"clips": len(idx), "gain": round(losses["wrong"] - losses["own"], 3)}
    return out


def white_noise(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Gaussian white noise shaped like ``like [n, 1, N]``, at the set's mean RMS level."""
    rms = like.pow(2).mean().sqrt().clamp_min(1e-4)
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed)) * rms


# ---------------------------------------------------------------------------- the measures

def _batched(fn, wav: torch.Tensor, batch_size: int = 16):
    """``fn`` over ``wav [n, 1, N]`` in chunks; tensors concatenated, dicts of tensors per key."""
    parts = [fn(wav[i:i + batch_size]) for i in range(0, len(wav), batch_size)]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


class _Measures:
    """The reference models and the real set, computed once; each ``*_of`` scores one audio set."""

    def __init__(self, real: torch.Tensor, infos: list[dict], tagger, clap, seed: int):
        self.tagger, self.clap, self.infos = tagger, clap, infos
        self.tagger_id, self.clap_id = reference_model_id(tagger), None
        self.captions = [i["description"] for i in infos]
        n = len(infos)
        # a random derangement: clip perm[j] gets the caption of clip perm[j + 1] (never its own)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.shuffled = torch.empty(n, dtype=torch.long)
        self.shuffled[perm] = torch.roll(perm, -1)
        self.real = real
        self.real_emb = self.embed(real)  # (n, T', D)
        self.real_probs = self.probs(real)
        self.has_attributes = all(_has_attributes(i) for i in infos)
        self._text = None

    # tagger
    def embed(self, wav):
        return _batched(lambda x: self.tagger.embed(x, EVAL_RATE), wav)

    def probs(self, wav):
        return _batched(lambda x: self.tagger.predict(x, EVAL_RATE), wav)

    def fad_of(self, emb_a, emb_b) -> dict:
        D = emb_a.shape[-1]
        a, b = emb_a.reshape(-1, D), emb_b.reshape(-1, D)  # every ~0.26 s window is one sample
        return {"value": frechet_distance(a, b), "embedder": self.tagger_id, "windows": [len(a), len(b)]}

    def kl_of(self, probs_ref: dict, probs_gen: dict) -> dict:
        per = {}
        for k, (_, multi) in HEADS.items():
            p, q = probs_ref[k], probs_gen[k]
            if multi:  # each instrument family is its own yes/no distribution
                p = torch.stack([p, 1 - p], -1).reshape(-1, 2)
                q = torch.stack([q, 1 - q], -1).reshape(-1, 2)
            per[k] = kl_divergence(p, q)
        mean = {d: sum(v[d] for v in per.values()) / len(per) for d in ("kl_ref_gen", "kl_gen_ref")}
        return {**mean, "per_attribute": per, "classifier": self.tagger_id}

    def accuracy_of(self, probs: dict, infos: list[dict], bpms: list[float] | None = None) -> dict | None:
        """Per-attribute accuracy of the tagger's reading of some audio against ``infos``;
        ``bpms``: librosa's tempo of the same audio, scored as ``tempo_bpm`` (see :func:`_bpm_ok`).
        ``family_top1``: the most probable family is one the caption names (:func:`~musicgen_lite.metrics.family_top1`;
        ``family`` scores nine yes/no decisions, whose floor is high). Neither enters the mean."""
        if not self.has_attributes:
            return None
        targets = _stack_targets([targets_from_info(i) for i in infos])
        per = attribute_accuracy(probs, targets)
        per["family_top1"] = family_top1(probs["family"], targets["family"])
        pred_tempo = probs["tempo"].argmax(-1)
        per["tempo"] = _mean([_tempo_ok(int(t), i) for t, i in zip(pred_tempo, infos)])
        if bpms is not None and all(i.get("bpm") for i in infos):
            per["tempo_bpm"] = _mean([_bpm_ok(b, i["bpm"]) for b, i in zip(bpms, infos)])
        # the same two scores on the clips whose caption says it: a model cannot follow what it is not told
        states = [caption_states(i.get("description", "")) for i in infos]
        stated = {"mode": sum(s["mode"] for s in states), "bpm": sum(s["bpm"] for s in states)}
        pred_mode = probs["mode"].argmax(-1)
        if stated["mode"]:
            per["mode_stated"] = _mean([int(p) == int(t) for p, t, s in zip(pred_mode, targets["mode"], states)
                                        if s["mode"]])
        if "tempo_bpm" in per and stated["bpm"]:
            per["tempo_bpm_stated"] = _mean([_bpm_ok(b, i["bpm"]) for b, i, s in zip(bpms, infos, states) if s["bpm"]])
        return {"mean": _mean([per[k] for k in ATTRIBUTES]), "per_attribute": per, "classifier": self.tagger_id,
                "stated": {**stated, "clips": len(infos)}}

    # CLAP
    def text_emb(self):
        if self._text is None:
            self._text = torch.cat([self.clap.embed_text(self.captions[i:i + 64])
                                    for i in range(0, len(self.captions), 64)])
            self.clap_id = reference_model_id(self.clap)  # after embed_text: names the text encoder too
        return self._text

    def clap_of(self, wav, order=None) -> dict:
        audio = _batched(lambda x: self.clap.embed_audio(x, EVAL_RATE), wav)
        text = self.text_emb() if order is None else self.text_emb()[order]
        return {"value": clap_score(text, audio), "model": self.clap_id}




def caption_states(caption: str) -> dict:
    """Which of the hard-to-hear attributes a caption spells out: ``{"mode": bool, "bpm": bool}``
    (the word major or minor; a number followed by bpm). Of our 100 held-out captions 40 name a
    mode and 40 a bpm, so ``mode_stated`` and ``tempo_bpm_stated`` score only the clips whose
    caption says it."""
    from .conditioning import caption_facts

    facts = caption_facts(caption)
    return {"mode": facts["mode"] is not None, "bpm": facts["bpm"] is not None}


def _has_attributes(info: dict) -> bool:
    return all(k in info for k in ("instrument_families", "style", "mood", "tempo_bucket", "drums", "mode"))


def _stack_targets(items: list[dict]) -> dict:
    return {k: (torch.stack([t[k] for t in items]) if HEADS[k][1] else torch.tensor([t[k] for t in items]))
            for k in HEADS}


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs))


def _tempo_ok(pred: int, info: dict) -> bool:
    """Is tempo bucket ``pred`` right for this caption?

    The tagger hears a tempo *bucket* (slow < 90 bpm <= medium < 125 bpm <= fast), not a bpm.
    A bucket counts when the caption's bpm, give or take 10%, falls in it (so 88 bpm heard as
    "medium" is right). The bpm itself is judged by :func:`_bpm_ok`.
    """
    from .data.music import TEMPO_BUCKETS, tempo_bucket

    bpm = info.get("bpm")
    if bpm is None:
        return TEMPO_BUCKETS[pred] == info["tempo_bucket"]
    return TEMPO_BUCKETS[pred] in {tempo_bucket(bpm * f) for f in (1 - TEMPO_TOLERANCE, 1.0, 1 + TEMPO_TOLERANCE)}


def _bpm_ok(estimate: float, bpm: float) -> bool:
    """librosa's tempo within 10% of the caption's bpm, or of half or double it (beat trackers
    often lock onto the half or double pulse; this is how tempo estimates are usually scored)."""
    return any(abs(estimate - bpm * f) <= TEMPO_TOLERANCE * bpm * f for f in (0.5, 1.0, 2.0))


def _bpms(wav: torch.Tensor) -> list[float]:
    """librosa's beat-tracker tempo of each clip of ``wav`` ``[n, 1, N]`` (at the evaluation rate)."""
    from .data.analysis import estimate_tempo

    return [estimate_tempo(w, EVAL_RATE) for w in wav]


def _rhythm_of(wav: torch.Tensor | None, bpms: list[float], infos: list[dict]) -> dict:
    """How steady a beat the clips have (mean :func:`~musicgen_lite.metrics.pulse_clarity`) and how
    well their tempo ranks with the captions' bpm (Spearman, None without bpms): a model can only
    put a beat at the caption's bpm if it makes a beat at all. ``wav`` None: the correlation alone."""
    from .metrics import pulse_clarity, rank_correlation

    said = [i.get("bpm") for i in infos]
    return {"pulse_clarity": None if wav is None else _mean(pulse_clarity(w, EVAL_RATE) for w in wav),
            "tempo_rank_correlation": rank_correlation(bpms, said) if all(said) else None}


def _chroma_of(melodies: torch.Tensor, wav: torch.Tensor) -> dict | None:
    try:
        value = chroma_cosine_similarity(melodies, wav, EVAL_RATE, radix2_exp=12)
    except ValueError:  # nothing audible in both: no pitch to compare
        return {"value": None, "extractor": CHROMA_EXTRACTOR, "note": "no frame audible in both signals"}
    return {"value": value, "extractor": CHROMA_EXTRACTOR}


# ------------------------------------------------------------------------------- evaluate

def evaluate(model, captions=None, n: int = 100, duration: float = 6.0, seed: int = 0, melodies=None,
             batch_size: int = 8, tagger=None, clap=None, progress: bool = True, heldout_seed: int = HELDOUT_SEED,
             text_only: bool = True, caption_metadata: bool = False, **generate_kw) -> dict:
    """Generate one clip per held-out caption with ``model`` and score them (see the module doc).

    ``model``: anything with ``generate(descriptions, duration=..., seed=..., **kw) -> wav
    [B, 1, N]`` and ``sample_rate`` (a :class:`~musicgen_lite.generation.MusicGen`).
    ``captions``: a dataset folder (``data.jsonl`` + sidecar JSON with ``description`` and, for
    attribute accuracy, our attributes) whose first ``n`` clips are the real reference audio;
    None: the synthetic held-out set at ``heldout_seed`` (rendered once, cached).
    ``duration``: seconds per clip, generated and real (the tagger was trained on 4 s crops
    of 6 s clips: 4-10 s is its comfort zone). ``seed``: generation seed (batch ``b`` uses
    ``seed + b``), also the noise and the caption shuffle. ``melodies``: a folder of melody
    audio or a list of ``(wav, sample_rate)``; clip ``i`` gets melody ``i % len(melodies)``
    through the model's ``generate_with_chroma``; adds ``chroma_cosine``, and with ``text_only``
    the same captions are also generated without a melody (same seeds), scored as
    ``reference["text_only"]`` (FAD, KL, CLAP, chroma cosine, attribute accuracy): what the
    melody adds and what it costs (MusicGen-melody's comparison: the paper saw the objective
    metrics worsen slightly with the melody). ``caption_metadata``: every caption states the
    clip's key and bpm (added where it does not, as ``caption_for_training`` does with p = 1):
    a test of whether the model follows them, where the captions as written name a mode in
    only 40 of 100 clips and no model can know the others from the text. ``tagger`` /
    ``clap``: the reference models (default: the shipped ones). ``generate_kw``: passed to
    ``generate`` (``cfg_coef``, ``top_k``, ...; ``cfg_coef`` None or left out: the model's own).

    Returns a JSON-ready dict: ``fad``, ``kl``, ``clap``, ``chroma_cosine`` (None without
    melodies), ``attribute_accuracy`` (None when the captions lack attributes), ``reference``
    (the same metrics for ``real``, ``shuffled`` and ``noise``) and ``setup``.
    """
    from .metrics import load_clap, load_tagger

    if generate_kw.get("cfg_coef") is None and hasattr(model, "cfg_coef"):  # the model's own guidance, recorded
        generate_kw["cfg_coef"] = model.cfg_coef
    guide = getattr(model, "key_guide", None)
    for name, own in (("key_guidance", "strength"), ("key_candidates", "candidates")):  # recorded too
        if guide is not None and generate_kw.get(name) is None:
            generate_kw[name] = getattr(guide, own)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n must be at least 2 clips (FAD fits a covariance), got {n!r}")
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or not 0.5 <= duration <= 600:
        raise ValueError(f"duration must be between 0.5 and 600 seconds, got {duration!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    t0 = time.time()
    tagger = tagger or load_tagger()
    clap = clap or load_clap()
    folder = Path(captions) if captions is not None else heldout_set(n, duration, heldout_seed, progress=progress)
    real, infos = load_clips(folder, n, duration)  # (n, 1, N) at 16 kHz
    if len(infos) < 2:
        raise ValueError(f"{folder}: need at least 2 clips, found {len(infos)}")
    n = len(infos)
    if caption_metadata:
        from .data.dataset import caption_for_training

        infos = [{**info, "description": caption_for_training(info, 1.0, None)} for info in infos]
    m = _Measures(real, infos, tagger, clap, seed)

    mel_model = mel_eval = None
    if melodies is not None:
        mel = load_melodies(melodies, duration, model.sample_rate)
        mel_model = [mel[i % len(mel)] for i in range(n)]  # (1, N) each, at the model's rate
        mel_eval = torch.stack([_fit(_to_eval_rate(x, model.sample_rate), int(round(duration * EVAL_RATE)))
                                for x in mel_model])  # (n, 1, N) at 16 kHz

    gen = generate_all(model, m.captions, duration, seed=seed, batch_size=batch_size, melodies=mel_model,
                       progress=progress, **generate_kw)  # (n, 1, N)
    noise = white_noise(real, seed)
    gen_probs, noise_probs = m.probs(gen), m.probs(noise)
    gen_emb, noise_emb = m.embed(gen), m.embed(noise)
    gen_bpm, real_bpm, noise_bpm = _bpms(gen), _bpms(real), _bpms(noise)
    shuffled_infos = [infos[j] for j in m.shuffled.tolist()]
    half = n // 2

    result = {
        "fad": m.fad_of(gen_emb, m.real_emb),
        "kl": m.kl_of(m.real_probs, gen_probs),
        "clap": m.clap_of(gen),
        "chroma_cosine": _chroma_of(mel_eval, gen) if mel_eval is not None else None,
        "attribute_accuracy": m.accuracy_of(gen_probs, infos, gen_bpm),
        "rhythm": _rhythm_of(gen, gen_bpm, infos),
    }
    reference = {
        "real": {  # the held-out audio standing in for the model: the ceiling
            "fad": {**m.fad_of(m.real_emb[:half], m.real_emb[half:]),
                    "note": f"first {half} real clips vs the other {n - half}: the FAD of two real sets this small"},
            "clap": m.clap_of(real),
            "attribute_accuracy": m.accuracy_of(m.real_probs, infos, real_bpm),
            "rhythm": _rhythm_of(real, real_bpm, infos),
        },
        "shuffled": {  # real audio with another clip's caption: the chance level of paired metrics
            "kl": m.kl_of(m.real_probs, {k: v[m.shuffled] for k, v in m.real_probs.items()}),
            "clap": m.clap_of(real, order=m.shuffled),
            "attribute_accuracy": m.accuracy_of(m.real_probs, shuffled_infos, real_bpm),
            "rhythm": _rhythm_of(None, real_bpm, shuffled_infos),
        },
        "noise": {  # white noise at the real clips' level: the floor
            "fad": m.fad_of(noise_emb, m.real_emb),
            "kl": m.kl_of(m.real_probs, noise_probs),
            "clap": m.clap_of(noise),
            "attribute_accuracy": m.accuracy_of(noise_probs, infos, noise_bpm),
            "rhythm": _rhythm_of(noise, noise_bpm, infos),
        },
    }
    if mel_eval is not None:
        order = m.shuffled
        reference["shuffled"]["chroma_cosine"] = _chroma_of(mel_eval[order], gen)
        reference["noise"]["chroma_cosine"] = _chroma_of(mel_eval, noise)
        if text_only:  # the same model and seeds without the melody: what the text alone gives
            plain = generate_all(model, m.captions, duration, seed=seed, batch_size=batch_size, progress=progress,
                                 **generate_kw)
            plain_probs, plain_bpm = m.probs(plain), _bpms(plain)
            reference["text_only"] = {  # every metric, so that the melody's cost or gain reads off one table
                "fad": m.fad_of(m.embed(plain), m.real_emb),
                "kl": m.kl_of(m.real_probs, plain_probs),
                "chroma_cosine": _chroma_of(mel_eval, plain),
                "clap": m.clap_of(plain),
                "attribute_accuracy": m.accuracy_of(plain_probs, infos, plain_bpm),
                "rhythm": _rhythm_of(plain, plain_bpm, infos),
                "note": "the same captions and seeds generated without the melody",
            }
    k = min(n, 16)
    result["caption_gain"] = caption_gain(model, real[:k], EVAL_RATE, m.captions[:k], seconds=min(4.0, duration),
                                          batch_size=batch_size)
    result["word_gain"] = word_gain(model, real, EVAL_RATE, m.captions, seconds=min(4.0, duration),
                                    batch_size=batch_size)
    result["reference"] = reference
    result["setup"] = {
        "n": n, "duration": float(duration), "seed": seed, "captions": portable_path(folder),
        "heldout_seed": heldout_seed if captions is None else None, "eval_sample_rate": EVAL_RATE,
        "caption_metadata": bool(caption_metadata),
        "model_sample_rate": int(model.sample_rate), "batch_size": batch_size,
        "generate": {k: v for k, v in generate_kw.items() if k != "progress"},
        "kl_average": "mean over the six attributes of the mean per-clip KL; instrument families as "
                      "nine yes/no distributions",
        "tempo_rule": f"tempo: the tagger's bucket, right when the caption's bpm +-{TEMPO_TOLERANCE:.0%} falls "
                      f"in it; tempo_bpm: librosa's beat tracker within {TEMPO_TOLERANCE:.0%} of the bpm or of "
                      "half/double it (not in the mean); mode_stated / tempo_bpm_stated: the same scores on "
                      "only the clips whose caption names major/minor or a bpm (caption_states)",
        "wall_seconds": round(time.time() - t0, 1),
    }
    return result


def _to_eval_rate(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    from .audio import resample

    return wav if sample_rate == EVAL_RATE else resample(wav, sample_rate, EVAL_RATE)


# --------------------------------------------------------------------------------- table

def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def dig(d, *keys):
    """``d[k1][k2]...``, or None where a level is missing or None."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def systems(result: dict) -> list[tuple[str, dict]]:
    """``(name, metrics)`` of the model and each reference of an :func:`evaluate` result, in table order."""
    ref = result["reference"]
    return [("generated", result), *([("text-only", ref["text_only"])] if "text_only" in ref else []),
            ("real", ref["real"]), ("shuffled", ref["shuffled"]), ("noise", ref["noise"])]


def format_table(result: dict) -> str:
    """The result as a plain-text table: metrics down, generated / (text-only) / real / shuffled / noise across."""
    columns = systems(result)

    rows = [("FAD (lower better)", ("fad", "value")),
            ("KL ref||gen (lower better)", ("kl", "kl_ref_gen")),
            ("KL gen||ref", ("kl", "kl_gen_ref")),
            ("CLAP score (higher better)", ("clap", "value")),
            ("chroma cosine", ("chroma_cosine", "value")),
            ("attribute accuracy (mean)", ("attribute_accuracy", "mean"))]
    rows += [(f"  {k}", ("attribute_accuracy", "per_attribute", k))
             for k in (*ATTRIBUTES, "family_top1", "tempo_bpm", "mode_stated", "tempo_bpm_stated")]
    rows += [("pulse clarity (steady beat)", ("rhythm", "pulse_clarity")),
             ("tempo rank corr. with caption", ("rhythm", "tempo_rank_correlation"))]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{name:>11}" for name, _ in columns)]
    for label, path in rows:
        values = [dig(d, *path) for _, d in columns]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(v):>11}" for v in values))
    s = result.get("setup", {})
    lines.append("")
    lines.append(f"{s.get('n')} clips of {s.get('duration')} s from {Path(str(s.get('captions'))).name}; "
                 f"real = held-out audio (FAD: half vs half), shuffled = real audio with another clip's caption"
                 + (" (chroma: the generated audio against another clip's melody)" if result.get("chroma_cosine") else ""))
    gain = result.get("caption_gain")
    if gain:
        lines.append(f"caption gain: {gain['gain_null']:.1f} nats per clip saved by the caption (vs none), "
                     f"{gain['gain_other']:.1f} lost to another clip's caption ({gain['clips']} real clips, "
                     f"first {gain['seconds']:g} s)")
    words = result.get("word_gain")
    if words:
        said = []
        for name in ("mode", "bpm"):
            gain_w = words[name]["gain"]
            said.append(f"{name} {'-' if gain_w is None else format(gain_w, '.1f')} nats ({words[name]['clips']} clips)")
        lines.append("read the words? loss added by a wrong " + " and a wrong ".join(said)
                     + f" (true caption vs major/minor swapped, bpm moved; first {words['seconds']:g} s)")
    models = {result["fad"]["embedder"], result["clap"]["model"]}
    if result.get("chroma_cosine"):
        models.add(result["chroma_cosine"]["extractor"])
    lines.append("reference models: " + "; ".join(sorted(models)))
    return "\n".join(lines)
