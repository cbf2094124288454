"""MusicGen end to end: descriptions -> condition states -> tokens (pattern + LM + CFG) -> audio.

:class:`MusicGen` holds four parts:

- ``codec``: anything with ``encode(wav[B, 1, N]) -> codes[B, K, T]``, ``decode(codes) ->
  wav[B, 1, N]``, ``sample_rate``, ``frame_rate``, ``num_codebooks``, ``cardinality`` (our
  ``CompressionModel``, or :class:`TransformersCodec` around transformers' ``EncodecModel``);
- ``pattern``: how the K streams interleave (``delay`` by default);
- ``lm``: the :class:`~musicgen_lite.lm.MusicLM`;
- ``conditioner``: a text conditioner (None: an unconditional model);
- ``melody_conditioner`` (MusicGen-melody only): a
  :class:`~musicgen_lite.conditioning.MelodyConditioner`; its chroma prefix goes before the
  text states, ``cond = [chroma | text]``, and the LM (``condition_mode="prepend"``) reads
  ``[cond | tokens]``. Without a melody every row gets the null melody.
- ``tempo`` (a beat-clock LM only, ``LMConfig.beat_clock``): a
  :class:`~musicgen_lite.conditioning.TempoPredictor` that gives a caption stating no bpm its
  likely one; each row's tempo becomes a beat clock (:func:`~musicgen_lite.lm.beat_clock`) whose
  phase the LM reads at every step, dropped with the other conditions in the null rows.
- ``mode_predictor`` (a key-conditioned LM only, ``LMConfig.key_condition``): a
  :class:`~musicgen_lite.conditioning.ModePredictor` that gives a caption stating no mode its
  likely one; each row's key rides on its beat clock. Any model may carry one: key guidance
  reads it too.
- ``key_guide`` (optional): a :class:`~musicgen_lite.key_guidance.KeyGuide` whose bias steers
  codebook 0's tokens toward each row's mode (the stated or predicted one) at every step, with
  the strength it was saved with unless ``key_guidance=`` says otherwise (0: off).

Generation fills a sequence ``seq[B, K, S + 1]`` step by step with a preallocated KV cache:
the LM reads position ``s`` and its K heads predict step ``s + 1``; where the pattern has a
gap the special token stays, and prompt tokens (a continuation) are kept, not sampled.
With classifier-free guidance the batch holds the conditions and then the null conditions
(``2B`` rows, one forward per step); ``two_pass_cfg=True`` runs them as two batches. The null
condition drops everything: zero text states and the null melody.

Durations beyond the model's context (``max_duration``) are generated window by window:
each new window is prompted with the last ``max_duration - extend_stride`` seconds of what
exists and adds ``extend_stride`` seconds (audiocraft's scheme), so memory stays bounded by
one window whatever the duration.

``fast=True`` runs the same loop with static shapes (:meth:`MusicGen._sample_window_static`):
one batch of ``2B`` rows for guidance, a decoding step whose tensors never change shape or
address (:meth:`MusicLM.decode_step`), sampling on the device from a noise buffer
(:class:`~musicgen_lite.sampling.NoiseSampler`), and the pattern's bookkeeping (which
positions to sample, which keep a prompt token or the special token) read from device
tensors by a step counter that lives on the device too. The host only launches work: on a
GPU the whole step is captured once in a CUDA graph and replayed (``cuda_graph``); on a CPU
the same step runs eagerly, or compiled by ``torch.compile`` with ``compile_step=True`` (C++
with the weights frozen in: the CPU's counterpart of the graph). Greedy decoding gives the
plain loop's tokens; sampling draws from the same distribution with other random numbers
(same seed, same tokens, within each path; the compiled step draws the eager fast loop's).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import sampling
from .lm import CLOCK_PATTERNS, MusicLM
from .patterns import Pattern, get_pattern


DEFAULT_CFG = 3.0  # classifier-free guidance when a model does not say otherwise (MusicGen's default)


class MusicGen(nn.Module):
    """Text-to-music: ``generate(descriptions, duration) -> wav[B, 1, N]`` at ``sample_rate``.

    With a ``melody_conditioner`` (and a prepend-mode LM), also text + melody to music:
    :meth:`generate_with_chroma`.
    """

    def __init__(self, codec, lm: MusicLM, conditioner=None, pattern: Pattern | str = "delay",
                 max_duration: float = 30.0, extend_stride: float = 18.0, melody_conditioner=None,
                 cfg_coef: float = DEFAULT_CFG, tempo=None, mode_predictor=None, key_guide=None):
        super().__init__()
        if melody_conditioner is not None and lm.config.condition_mode != "prepend":
            raise ValueError("a melody_conditioner needs an LM with condition_mode='prepend' "
                             f"(got {lm.config.condition_mode!r})")
        if lm.config.melody_mode == "add" and (melody_conditioner is None
                                               or melody_conditioner.length != lm.config.melody_rows):
            raise ValueError(f"a frame-aligned melody LM (melody_mode='add') reads {lm.config.melody_rows} chroma rows: "
                             "it needs a melody_conditioner of that length, got "
                             f"{None if melody_conditioner is None else melody_conditioner.length}")
        self.melody_conditioner = melody_conditioner
        if lm.config.num_codebooks != codec.num_codebooks or lm.config.bins != codec.cardinality:
            raise ValueError(f"LM ({lm.config.num_codebooks} x {lm.config.bins}) does not match the codec "
                             f"({codec.num_codebooks} x {codec.cardinality})")
        if not 0 < extend_stride < max_duration:
            raise ValueError(f"extend_stride must be in (0, max_duration={max_duration}), got {extend_stride}")
        self.codec, self.lm, self.conditioner = codec, lm, conditioner
        self.pattern = get_pattern(pattern, lm.config.num_codebooks) if isinstance(pattern, str) else pattern
        self.max_duration, self.extend_stride = max_duration, extend_stride
        if not cfg_coef >= 1.0:
            raise ValueError(f"cfg_coef must be >= 1 (1 = no guidance), got {cfg_coef}")
        # the guidance this model was measured with: what generate() uses when not told (as
        # transformers keeps guidance_scale in a model's generation config); saved with the model
        self.cfg_coef = float(cfg_coef)
        # an LM with a beat clock: the bpm of a caption that states none (a TempoPredictor; saved with the model)
        self.tempo = tempo
        # the mode of a caption that states none, for a key condition or key guidance (a ModePredictor; saved)
        self.mode_predictor = mode_predictor
        if key_guide is not None and key_guide.bins != lm.config.bins:
            raise ValueError(f"key_guide knows {key_guide.bins} tokens, the LM's codebooks have {lm.config.bins}")
        self.key_guide = key_guide  # steers codebook 0 toward each row's mode (a KeyGuide; saved with the model)
        if lm.config.beat_clock and self.pattern.name not in CLOCK_PATTERNS:
            raise ValueError(f"a beat-clock LM counts one step per frame: pattern {' or '.join(CLOCK_PATTERNS)}, "
                             f"got {self.pattern.name!r}")

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @classmethod
    def load(cls, path_or_name=None, device: str | torch.device = "cpu") -> "MusicGen":
        """A model by folder or name.

        - None: the shipped default (``data/checkpoints/musicgen_lite``);
        - a folder written by :meth:`save` (``config.json`` of format ``musicgen-lite/musicgen``):
          :func:`musicgen_lite.hub.load_musicgen`;
        - a transformers folder (``save_pretrained``) or a hub name such as
          ``"facebook/musicgen-small"``: :meth:`from_pretrained` (ported and parity-checked).
        """
        import json
        from pathlib import Path

        from .hub import MUSICGEN_FORMAT, from_pretrained, load_musicgen

        if path_or_name is None:
            return load_musicgen(None, device)
        folder = Path(str(path_or_name)).expanduser()
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("config", {}).get("format") == MUSICGEN_FORMAT:
            return load_musicgen(folder, device)
        if folder.is_dir() or (not folder.exists() and "/" in str(path_or_name) and not str(path_or_name).startswith((".", "/"))):
            return from_pretrained(str(path_or_name), device)
        return load_musicgen(folder, device)  # a clear error naming the path

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu", **kw) -> "MusicGen":
        """Meta's released weights (``facebook/musicgen-small`` ...) ported into our modules and
        checked for parity, see :func:`musicgen_lite.hub.from_pretrained`."""
        from .hub import from_pretrained

        return from_pretrained(name_or_path, device, **kw)

    def save(self, path, conditioner: dict | None = None, extra: dict | None = None, dtype=None,
             codec_path: str | None = None):
        """Write this model to a folder, see :func:`musicgen_lite.hub.save_musicgen`."""
        from .hub import save_musicgen

        return save_musicgen(self, path, conditioner, extra, dtype, codec_path)

    # ----------------------------------------------------------------------- conditions
    def condition(self, descriptions, melody=None, melody_sample_rate: int | None = None,
                  melody_offset: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``descriptions`` (list of str / None) -> ``(cond[B, L, D], mask[B, L])``, or (None, None).

        A melody model puts its chroma prefix first: ``cond = [chroma (Lm rows) | text]``.
        ``melody``: what :meth:`MelodyConditioner.prepare` takes (one per description, None
        rows: the null melody; None: no melody at all), at ``melody_sample_rate`` Hz;
        ``melody_offset``: seconds into the (looping) melody where this window starts.
        """
        descriptions = list(descriptions)
        if self.conditioner is None:
            if any(d for d in descriptions):
                raise ValueError("this MusicGen has no text conditioner; pass descriptions=None")
            text = (None, None)
        else:
            text = self.conditioner(descriptions)
        mc = self.melody_conditioner
        if mc is None:
            if melody is not None:
                raise ValueError("this MusicGen has no melody conditioner (a MusicGen-melody model takes "
                                 "melodies); pass melody=None")
            return text
        wavs = [None] * len(descriptions) if melody is None else mc.prepare(melody, melody_sample_rate)
        if len(wavs) != len(descriptions):
            raise ValueError(f"{len(wavs)} melodies for {len(descriptions)} descriptions")
        chroma_emb, chroma_mask = mc.project(mc.chromagram(wavs, offset=melody_offset))  # (B, Lm, D)
        if text[0] is None:
            return chroma_emb, chroma_mask
        return (torch.cat([chroma_emb, text[0].to(chroma_emb.dtype)], dim=1),
                torch.cat([chroma_mask, text[1].to(chroma_mask.dtype)], dim=1))

    def null_condition(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The null condition of classifier-free guidance, shaped like ``cond``: zero text states
        (mask 0) and, for a melody model, the null melody (the chroma of silence) in front."""
        null, null_mask = torch.zeros_like(cond), torch.zeros_like(cond_mask)
        mc = self.melody_conditioner
        if mc is not None:
            emb, mask = mc.project(mc.null_chroma(cond.shape[0], mc.length))
            null[:, :mc.length], null_mask[:, :mc.length] = emb.to(null.dtype), mask.to(null_mask.dtype)
        return null, null_mask

    def clock_bpms(self, descriptions, bpm=None) -> list[float | None] | None:
        """The tempo each row's beat clock keeps (an LM with ``beat_clock``; None otherwise).

        ``bpm``: a number for every row, or one per row (None entries fall back to the
        caption); not given: the bpm the caption states, else the :attr:`tempo` predictor's
        guess from its words, else none (an empty description: no clock, as the null condition).
        """
        descriptions = [d or "" for d in descriptions]
        if not self.lm.config.beat_clock:
            if bpm is not None:
                raise ValueError("bpm: this model has no beat clock (its LM was trained without one)")
            return None
        given = [bpm] * len(descriptions) if bpm is None or isinstance(bpm, (int, float, str)) else list(bpm)
        if len(given) != len(descriptions):
            raise ValueError(f"bpm: {len(given)} tempos for {len(descriptions)} descriptions")
        for b in given:
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)
                                  or not 20 <= b <= 400):
                raise ValueError(f"bpm must be a tempo between 20 and 400 beats per minute, got {b!r}")
        if self.tempo is not None:
            fallback = self.tempo.bpm_for(descriptions)
        else:
            from .conditioning import caption_facts

            fallback = [caption_facts(d)["bpm"] if d.strip() else None for d in descriptions]
        return [float(b) if b is not None else f for b, f in zip(given, fallback)]

    def clock_keys(self, descriptions, key=None) -> list[tuple[int | None, str | None]] | None:
        """The ``(tonic, mode)`` each row's key condition holds (an LM with ``key_condition``; None
        otherwise): :meth:`keys_for`."""
        if not self.lm.config.key_condition:
            if key is not None and self.key_guide is None:
                raise ValueError("key: this model has no key condition (its LM was trained without one) "
                                 "and no key guide")
            return None
        return self.keys_for(descriptions, key)

    def keys_for(self, descriptions, key=None) -> list[tuple[int | None, str | None]]:
        """The ``(tonic, mode)`` of each row, for a key condition or key guidance.

        ``key``: for every row, or a list of one per row (None entries fall back to the caption): a name
        such as ``"A minor"`` or ``"minor"``, or a ``(tonic 0-11 | None, mode)`` pair; not given:
        the key or mode the caption states, else the :attr:`mode_predictor`'s guess of the mode
        from its words (no tonic), else none (an empty description: no key, as the null condition).
        """
        from .conditioning import caption_facts

        descriptions = [d or "" for d in descriptions]
        given = list(key) if isinstance(key, list) else [key] * len(descriptions)
        if len(given) != len(descriptions):
            raise ValueError(f"key: {len(given)} keys for {len(descriptions)} descriptions")
        if self.mode_predictor is not None:
            fallback = self.mode_predictor.key_for(descriptions)
        else:
            fallback = [(f["tonic"], f["mode"]) for f in map(caption_facts, descriptions)]
            fallback = [k if d.strip() else (None, None) for k, d in zip(fallback, descriptions)]
        from .lm import key_features

        out = []
        for k, f in zip(given, fallback):
            if isinstance(k, str):
                facts = caption_facts(k)
                if facts["mode"] is None:
                    raise ValueError(f"key must name a mode, as 'A minor' or 'minor', got {k!r}")
                k = (facts["tonic"], facts["mode"])
            if k is not None:
                try:
                    key_features([k])  # a (tonic 0-11 | None, mode) pair, checked where it is read
                except (TypeError, ValueError) as e:
                    raise ValueError(f"key must be a name or a (tonic 0-11 | None, 'major' | 'minor') pair, "
                                     f"got {k!r}") from e
            out.append(f if k is None else k)
        return out

    def _key_guidance(self, strength) -> float:
        """The key guide's strength for a generation: ``strength`` (checked), or the guide's own; 0 without a guide."""
        if strength is None:
            return self.key_guide.strength if self.key_guide is not None else 0.0
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or strength < 0:
            raise ValueError(f"key_guidance must be a number >= 0 (0: off), got {strength!r}")
        if strength and self.key_guide is None:
            raise ValueError("key_guidance: this model has no key guide (musicgen_lite.key_guidance.KeyGuide)")
        return float(strength)

    def _key_candidates(self, n) -> int:
        """Candidates per row for a generation: ``n`` (checked), or the key guide's own; 1 without a guide."""
        from .key_guidance import check_candidates

        if n is None:
            return self.key_guide.candidates if self.key_guide is not None else 1
        n = check_candidates(n)
        if n > 1 and self.key_guide is None:
            raise ValueError("key_candidates: this model has no key guide to choose among candidates with "
                             "(musicgen_lite.key_guidance.KeyGuide)")
        return n

    def _best_of_candidates(self, n: int, descriptions, duration, prompt_codes=None, melody=None, bpm=None,
                            key=None, **kw) -> torch.Tensor:
        """:meth:`generate_codes` with ``n`` candidates of each row that has a mode, in one batch;
        each row keeps the candidate whose generated tokens fit its key best."""
        if melody is not None:
            raise ValueError("key_candidates > 1 with a melody is not supported: pass key_candidates=1")
        keys = self.keys_for(descriptions, key)
        if all(mode is None for _, mode in keys):  # nothing to choose by: one sample per row
            return self.generate_codes(descriptions, duration, prompt_codes=prompt_codes, bpm=bpm, key=key,
                                       key_candidates=1, **kw)
        B = len(descriptions)
        reps = [n if mode is not None else 1 for _, mode in keys]
        index = torch.repeat_interleave(torch.arange(B), torch.tensor(reps))  # candidate row -> its row

        def spread(x, per_row: bool):  # one entry per row -> one per candidate row; one value for all: as it is
            return [x[int(b)] for b in index] if per_row and len(x) == B else x

        codes = self.generate_codes(
            spread(list(descriptions), True), duration,
            prompt_codes=prompt_codes[index.to(prompt_codes.device)] if prompt_codes is not None else None,
            bpm=spread(bpm, bpm is not None and not isinstance(bpm, (int, float, str))),
            key=spread(key, isinstance(key, list)), key_candidates=1, **kw)
        start = prompt_codes.shape[-1] if prompt_codes is not None else 0
        fit = self.key_guide.key_fit(codes[..., start:], [keys[int(b)] for b in index]).cpu()
        keep, first = [], 0
        for b in range(B):
            keep.append(first + int(fit[first:first + reps[b]].argmax()))  # ties: the first candidate
            first += reps[b]
        return codes[torch.tensor(keep, device=codes.device)]

    def _start_guide(self, guide, B: int, prompt: torch.Tensor | None):
        """A window's key-guidance state (None without guidance), having seen the prompt's frames."""
        if guide is None:
            return None
        keys, strength = guide
        state = self.key_guide.start(keys, strength, self.device)
        if prompt is not None:
            state.observe(prompt[:, 0].to(self.device))
        return state

    def _clock(self, bpms, start: int, guided: bool, keys=None):
        """The beat clock of a window whose first step predicts frame ``start``: ``[B, 2]``, or
        ``[2B, 2]`` with guidance (the null rows get none: the clock is dropped with the other
        conditions); a key-conditioned LM's carries each row's ``keys`` after the beat's columns."""
        if bpms is None:
            return None
        from .lm import beat_clock, key_features

        clock = beat_clock(bpms, self.frame_rate, start)
        if self.lm.config.key_condition:
            clock = torch.cat([clock, key_features(keys if keys is not None else [(None, None)] * len(bpms))], dim=1)
        return torch.cat([clock, torch.zeros_like(clock)]) if guided else clock

    def _frames(self, duration, what: str = "duration") -> int:
        if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"{what} must be a positive number of seconds, got {duration!r}")
        T = int(round(duration * self.frame_rate))
        if T < 1:
            raise ValueError(f"{what}={duration} s is shorter than one frame at {self.frame_rate} Hz")
        return T

    def plan_windows(self, T: int, Tp: int = 0) -> list[tuple[int, int]]:
        """Windows for ``T`` frames after a ``Tp``-frame prompt: ``[(context, new), ...]`` in frames.

        Each window re-reads up to ``max_duration - extend_stride`` seconds of the latest
        frames as its prompt (``context``) and adds ``new`` frames, never more than
        ``max_duration`` in all; the first one fills the context from scratch.
        """
        max_frames = self._frames(self.max_duration, "max_duration")
        max_context = max_frames - max(1, int(round(self.extend_stride * self.frame_rate)))
        plan, have = [], Tp
        while have < T:
            keep = min(have, max_context)
            new = min(T - have, max_frames - keep)
            plan.append((keep, new))
            have += new
        return plan

    # ------------------------------------------------------------------------ the loop
    def _start_window(self, T: int, prompt: torch.Tensor | None, B: int):
        """``(seq[B, K, S + 1], todo[K, S + 1], first, S)`` for a window of ``T`` frames: the
        special token everywhere but the prompt's tokens, which positions to sample (real
        tokens not given by the prompt), and the first step to sample (``S + 1``: none)."""
        pattern, K, special, device = self.pattern, self.lm.config.num_codebooks, self.lm.config.special, self.device
        S = pattern.num_steps(T)
        real = pattern.mask(T, device)  # (K, S + 1): True where a token sits
        seq = torch.full((B, K, S + 1), special, dtype=torch.long, device=device)
        todo = real.clone()  # positions to sample
        if prompt is not None:
            Tp = prompt.shape[-1]
            idx = pattern.steps(T, device)[:, :Tp]  # (K, Tp) step of each prompt token
            seq.scatter_(2, idx.expand(B, K, Tp), prompt.to(device))
            todo.scatter_(1, idx, False)
        first = int(todo.any(dim=0).nonzero()[0]) if todo.any() else S + 1  # first step to sample
        return seq, todo, first, S

    @torch.no_grad()
    def _sample_window(self, cond, cond_mask, T: int, prompt: torch.Tensor | None, B: int, cfg_coef: float,
                       top_k: int, top_p: float, temperature: float, generator, two_pass_cfg: bool,
                       bar=None, null_cond=None, fast: bool = False, cuda_graph: bool | None = None,
                       bpms=None, start: int = 0, keys=None, guide=None, compile_step: bool = False) -> torch.Tensor:
        """``T`` frames of codes ``[B, K, T]`` in one window; ``prompt[B, K, Tp]`` codes are kept.
        ``bpms`` (a beat-clock LM, :meth:`clock_bpms`): each row's tempo, the window's first
        step predicting frame ``start`` of the piece; ``keys`` (a key-conditioned LM,
        :meth:`clock_keys`): each row's ``(tonic, mode)``; ``guide``: ``(keys, strength)`` of key
        guidance (:attr:`key_guide`), or None."""
        if fast:
            return self._sample_window_static(cond, cond_mask, T, prompt, B, cfg_coef, top_k, top_p, temperature,
                                              generator, bar, null_cond, cuda_graph, bpms, start, keys, guide,
                                              compile_step)
        lm, pattern = self.lm, self.pattern
        seq, todo, first, S = self._start_window(T, prompt, B)
        key_state = self._start_guide(guide, B, prompt)

        guided = cond is not None and cfg_coef != 1.0
        if guided:
            null, null_mask = null_cond if null_cond is not None else self.null_condition(cond, cond_mask)
        if guided and not two_pass_cfg:
            cond, cond_mask = torch.cat([cond, null]), torch.cat([cond_mask, null_mask])
        rows = 2 * B if guided and not two_pass_cfg else B
        P = lm.prefix_length(cond)
        caches = [lm.new_cache(rows, P + S)] + ([lm.new_cache(B, P + S)] if guided and two_pass_cfg else [])
        clock = self._clock(bpms, start, guided and not two_pass_cfg, keys)  # two passes: the null pass has none

        def step(x: torch.Tensor) -> torch.Tensor:  # x: (B, K, s) new positions -> (B, K, bins) guided logits
            c, m, k = (cond, cond_mask, clock) if caches[0].pos == 0 else (None, None, None)
            if not guided:
                return lm(x, c, m, cache=caches[0], last_only=True, clock=k)[:, :, -1]
            if two_pass_cfg:
                n, nm = (null, null_mask) if caches[1].pos == 0 else (None, None)
                return sampling.cfg(lm(x, c, m, cache=caches[0], last_only=True, clock=k)[:, :, -1],
                                    lm(x, n, nm, cache=caches[1], last_only=True)[:, :, -1], cfg_coef)
            logits = lm(torch.cat([x, x]), c, m, cache=caches[0], last_only=True, clock=k)[:, :, -1]
            return sampling.cfg_from_batch(logits, cfg_coef)

        if bar is not None:
            bar.update(first - 1)  # steps given by the prompt (read in one prefill)
        for s in range(first, S + 1):
            # read every position not yet read (the prefill: 0..first-1 at once), predict step s
            logits = step(seq[..., caches[0].tokens:s])  # (B, K, bins)
            if key_state is not None:  # key guidance: codebook 0 leans toward each row's key
                logits[:, 0] += key_state.bias().to(logits.dtype)  # logits: a fresh tensor of this step
            tokens = sampling.sample_next(logits, temperature, top_k, top_p, generator)  # (B, K)
            if key_state is not None:
                key_state.observe(tokens[:, 0], todo[0, s])
            seq[:, :, s] = torch.where(todo[:, s], tokens, seq[:, :, s])
            if bar is not None:
                bar.update(1)
        return pattern.revert(seq, T)  # (B, K, T)

    @torch.no_grad()
    def _sample_window_static(self, cond, cond_mask, T: int, prompt: torch.Tensor | None, B: int, cfg_coef: float,
                              top_k: int, top_p: float, temperature: float, generator, bar=None, null_cond=None,
                              cuda_graph: bool | None = None, bpms=None, start: int = 0, keys=None,
                              guide=None, compile_step: bool = False) -> torch.Tensor:
        """:meth:`_sample_window` with a static-shape step: no host sync inside the loop, and on
        CUDA one captured graph replayed per step (``cuda_graph=None``: when on CUDA); on a CPU
        with ``compile_step``, the LM's step compiled (:meth:`MusicLM.compiled_decode_step`).

        State on the device: ``seq[B, K, S + 1]`` (written in place), ``todo[K, S + 1]`` (where
        to sample), ``step`` ``(1,)`` (the step being predicted; the step's input is
        ``seq[..., step - 1]`` at cache position ``P + step - 1``, ``P`` the condition prefix),
        the KV cache and the sampler's noise. One call of ``decode()`` reads them, writes the
        sampled tokens and adds one to ``step``: replaying it ``S - first`` times is the loop.
        """
        lm, K, device = self.lm, self.lm.config.num_codebooks, self.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        lm_step = lm.compiled_decode_step() if compile_step else lm.decode_step
        seq, todo, first, S = self._start_window(T, prompt, B)
        if first > S:  # the prompt fills the window
            return self.pattern.revert(seq, T)
        guided = cond is not None and cfg_coef != 1.0
        if guided:  # one batch: conditions, then null conditions
            null, null_mask = null_cond if null_cond is not None else self.null_condition(cond, cond_mask)
            cond, cond_mask = torch.cat([cond, null]), torch.cat([cond_mask, null_mask])
        rows = 2 * B if guided else B
        P = lm.prefix_length(cond)
        cache = lm.new_cache(rows, -(-(P + S) // 8) * 8)  # a multiple of 8: aligned rows for fused attention
        lm.positions(cache.max_len, device)  # the position table, before any capture
        sampler = sampling.NoiseSampler((B, K), lm.config.bins, temperature, top_k, top_p, generator, device)
        step = torch.tensor([first], device=device)  # (1,) the step being predicted
        key_state = self._start_guide(guide, B, prompt)

        def commit(logits: torch.Tensor) -> None:  # (rows, K, bins) -> tokens of `step` in seq; step += 1
            logits = logits.float()
            if guided:
                logits = sampling.cfg_from_batch(logits, cfg_coef)  # (B, K, bins)
            if key_state is not None:  # key guidance, on the device like the rest
                logits[:, 0] += key_state.bias()
            tokens = sampler(logits)  # (B, K)
            keep = todo.index_select(1, step).view(1, K)  # sample here, or keep the prompt / special token
            if key_state is not None:
                key_state.observe(tokens[:, 0], keep[:, 0])
            old = seq.index_select(2, step).view(B, K)
            seq.index_copy_(2, step, torch.where(keep, tokens, old).unsqueeze(-1))
            step.add_(1)

        def decode() -> None:  # one step, static shapes: what the CUDA graph captures
            x = seq.index_select(2, step - 1)  # (B, K, 1) the previous step's tokens
            commit(lm_step(torch.cat([x, x]) if guided else x, step + (P - 1), cache))

        # prefill: the condition and every step before `first` (start token, prompt) in one forward
        x = seq[..., :first]
        sampler.refill()
        clock = self._clock(bpms, start, guided, keys)  # kept in the cache: decode_step reads it from there
        commit(lm(torch.cat([x, x]) if guided else x, cond, cond_mask, cache=cache, last_only=True,
                  clock=clock)[:, :, -1])
        if bar is not None:
            bar.update(first)
        n = S - first  # steps left
        run = _capture(decode, step, warmup=min(2, n)) if cuda_graph and n > 0 else decode
        for _ in range(n):
            sampler.refill()  # outside the graph: the generator advances in eager mode
            run()
            if bar is not None:
                bar.update(1)
        return self.pattern.revert(seq, T)  # (B, K, T)

    @torch.no_grad()
    def generate_codes(self, descriptions=None, duration: float = 10.0, prompt_codes: torch.Tensor | None = None,
                       cfg_coef: float | None = None, top_k: int = 250, top_p: float = 0.0, temperature: float = 1.0,
                       seed: int | None = None, num_samples: int | None = None, two_pass_cfg: bool = False,
                       progress: bool = True, melody=None, melody_sample_rate: int | None = None,
                       fast: bool = False, cuda_graph: bool | None = None, bpm=None, key=None,
                       key_guidance: float | None = None, key_candidates: int | None = None,
                       compile_step: bool = False) -> torch.Tensor:
        """Tokens for ``duration`` seconds: ``codes[B, K, T]`` (the prompt included when given).

        ``descriptions``: list of texts (``""`` / None: unconditional rows); None with
        ``num_samples``: unconditional. ``prompt_codes[B, K, Tp]``: a beginning to continue.
        ``melody`` (melody models): tensors as :meth:`MelodyConditioner.prepare` takes them, at
        ``melody_sample_rate`` Hz, one per row or one for all rows; each window beyond the first
        reads the (looping) melody from the time it starts. See :meth:`generate_with_chroma`.
        ``fast``: the static-shape loop (one CFG batch, sampling on the device, a CUDA graph on
        a GPU: ``cuda_graph=None`` decides by the device); greedy gives the same tokens as the
        plain loop, sampling other draws from the same distribution. ``compile_step`` (with
        ``fast``, on a CPU): the LM's step compiled by ``torch.compile``
        (:meth:`MusicLM.compiled_decode_step`): the first call for a shape (rows, window length)
        compiles for about 20 s (the lite LM, 2 cores), every later step runs faster. ``cfg_coef`` None: the
        model's own (:attr:`cfg_coef`, 3 unless its folder says otherwise). ``bpm`` (a model whose
        LM has a beat clock): the tempo to keep, a number or one per row; None: the caption's
        stated bpm, else the model's guess from its words (:meth:`clock_bpms`). The clock starts
        on a beat at the first frame (a prompt's first frame, when given). ``key`` (a model whose
        LM has a key condition): "A minor", "minor" or ``(tonic, mode)``, or one per row; None: the
        caption's stated key or mode, else the model's guess of the mode from its words
        (:meth:`keys_for`); a model with a :attr:`key_guide` steers toward it too. ``key_guidance``
        (a model with a key guide): the guide's strength, 0 = off; None: the strength it was saved with.
        ``key_candidates`` (a model with a key guide): sample this many candidates of each row that
        has a mode (one batch) and keep the one whose tokens fit its key best
        (:meth:`KeyGuide.key_fit`, the guide's token table: no audio is decoded); 1 = one sample;
        None: the number the guide was saved with. Rows without a mode are generated once.
        """
        if cfg_coef is None:
            cfg_coef = self.cfg_coef
        if fast and two_pass_cfg:
            raise ValueError("fast=True runs guidance as one batch of 2B rows; pass two_pass_cfg=False")
        if compile_step and not fast:
            raise ValueError("compile_step=True compiles the static-shape step of fast=True: pass fast=True too")
        if descriptions is None:
            descriptions = [None] * (num_samples or (prompt_codes.shape[0] if prompt_codes is not None else 1))
        if isinstance(descriptions, str):
            descriptions = [descriptions]
        if len(descriptions) == 0:
            raise ValueError("descriptions is empty: give one text per sample (or None for unconditional)")
        n_cand = self._key_candidates(key_candidates)
        if n_cand > 1:
            return self._best_of_candidates(
                n_cand, descriptions, duration, prompt_codes=prompt_codes, cfg_coef=cfg_coef, top_k=top_k,
                top_p=top_p, temperature=temperature, seed=seed, two_pass_cfg=two_pass_cfg, progress=progress,
                melody=melody, melody_sample_rate=melody_sample_rate, fast=fast, cuda_graph=cuda_graph, bpm=bpm,
                key=key, key_guidance=key_guidance, compile_step=compile_step)
        B, T = len(descriptions), self._frames(duration)
        Tp = 0
        if prompt_codes is not None:
            K = self.lm.config.num_codebooks
            if prompt_codes.dim() != 3 or prompt_codes.shape[:2] != (B, K):
                raise ValueError(f"prompt codes must be [B={B}, K={K}, Tp], got {list(prompt_codes.shape)}")
            Tp = prompt_codes.shape[-1]
            if Tp == 0:
                raise ValueError("the prompt is empty (0 frames); pass prompt_codes=None to start from scratch")
            if Tp >= T:
                raise ValueError(f"the prompt ({Tp / self.frame_rate:.2f} s) is not shorter than the requested "
                                 f"duration ({duration} s): nothing would be generated")
        if melody is not None:
            if self.melody_conditioner is None:
                raise ValueError("this MusicGen has no melody conditioner (a MusicGen-melody model takes "
                                 "melodies); pass melody=None")
            melody = self.melody_conditioner.prepare(melody, melody_sample_rate)  # once: checked, resampled
            if len(melody) == 1 and B > 1:
                melody = melody * B  # one melody for every description
            if len(melody) != B:
                raise ValueError(f"{len(melody)} melodies for {B} descriptions")
        cond, cond_mask = self.condition(descriptions, melody)
        bpms, keys = self.clock_bpms(descriptions, bpm), self.clock_keys(descriptions, key)
        strength = self._key_guidance(key_guidance)
        if key is not None and not keys and not strength:
            raise ValueError("key: key guidance is off (key_guidance=0) and the LM has no key condition: "
                             "nothing would read it")
        guide_keys = (keys or self.keys_for(descriptions, key)) if strength else None
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        opts = dict(B=B, cfg_coef=cfg_coef, top_k=top_k, top_p=top_p, temperature=temperature,
                    generator=generator, two_pass_cfg=two_pass_cfg, fast=fast, cuda_graph=cuda_graph,
                    compile_step=compile_step,
                    guide=(guide_keys, strength) if strength else None, null_cond=self.null_condition(cond, cond_mask) if cond is not None else None)

        plan = self.plan_windows(T, Tp)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(self.pattern.num_steps(keep + new) for keep, new in plan), desc="generating",
                       unit="step", leave=False)
        codes = prompt_codes
        try:
            for keep, new in plan:
                context = codes[..., codes.shape[-1] - keep:] if keep else None
                start = 0 if codes is None else codes.shape[-1] - keep  # first frame of this window
                if melody is not None and start > 0:  # the melody as it sounds from this window on
                    cond, cond_mask = self.condition(descriptions, melody, melody_offset=start / self.frame_rate)
                window = self._sample_window(cond, cond_mask, keep + new, context, bar=bar, bpms=bpms, start=start, keys=keys,
                                             **opts)
                codes = window if codes is None else torch.cat([codes, window[..., keep:]], dim=-1)
        finally:
            if bar is not None:
                bar.close()
        return codes

    @torch.no_grad()
    def generate(self, descriptions=None, duration: float = 10.0, cfg_coef: float | None = None, top_k: int = 250,
                 top_p: float = 0.0, temperature: float = 1.0, seed: int | None = None, **kw) -> torch.Tensor:
        """``descriptions`` -> ``wav[B, 1, N]`` of ``duration`` seconds at :attr:`sample_rate`.

        ``cfg_coef``: classifier-free guidance (1 = none; None: the model's own :attr:`cfg_coef`); ``top_k`` / ``top_p`` /
        ``temperature``: sampling (``top_k=1`` or ``temperature=0``: greedy); ``seed``: the
        same seed gives the same audio. More options: :meth:`generate_codes`.
        """
        codes = self.generate_codes(descriptions, duration, cfg_coef=cfg_coef, top_k=top_k, top_p=top_p,
                                    temperature=temperature, seed=seed, **kw)
        return self.codec.decode(codes)

    @torch.no_grad()
    def generate_continuation(self, prompt_wav: torch.Tensor, prompt_sample_rate: int | None = None,
                              descriptions=None, duration: float = 10.0, **kw) -> torch.Tensor:
        """Continue ``prompt_wav[B, 1, N]`` (or ``[1, N]``) to ``duration`` seconds in total.

        The prompt is resampled to the codec's rate when ``prompt_sample_rate`` differs,
        encoded, and its tokens are kept as the beginning; returns ``wav[B, 1, ~duration s]``
        (prompt re-decoded, then the continuation).
        """
        if not torch.is_tensor(prompt_wav) or prompt_wav.dim() not in (2, 3):
            raise ValueError("prompt_wav must be a tensor [B, 1, N] or [1, N]")
        wav = prompt_wav if prompt_wav.dim() == 3 else prompt_wav.unsqueeze(0)
        if wav.shape[1] != 1:
            raise ValueError(f"prompt_wav must be mono ([B, 1, N]), got {wav.shape[1]} channels")
        if wav.shape[-1] == 0:
            raise ValueError("prompt_wav is empty (0 samples)")
        if prompt_sample_rate is not None and prompt_sample_rate != self.sample_rate:
            from .audio import resample

            wav = resample(wav, prompt_sample_rate, self.sample_rate)
        prompt_codes = self.codec.encode(wav.to(self.device))
        if prompt_codes.shape[-1] == 0:
            raise ValueError(f"prompt_wav is shorter than one codec frame ({1 / self.frame_rate:.3f} s)")
        if descriptions is None:
            descriptions = [None] * wav.shape[0]
        elif len(descriptions) != wav.shape[0]:
            raise ValueError(f"{len(descriptions)} descriptions for {wav.shape[0]} prompts")
        codes = self.generate_codes(descriptions, duration, prompt_codes=prompt_codes, **kw)
        return self.codec.decode(codes)

    @torch.no_grad()
    def generate_with_chroma(self, descriptions, melody_wavs, melody_sample_rate: int | None = None,
                             duration: float = 10.0, cfg_coef: float | None = None, top_k: int = 250, top_p: float = 0.0,
                             temperature: float = 1.0, seed: int | None = None, **kw) -> torch.Tensor:
        """Text + melody -> ``wav[B, 1, N]``: music that follows ``melody_wavs``' chromagram.

        ``melody_wavs``: a tensor ``[B, 1, N]`` or ``[B, N]`` (B mono melodies; ``[B, C, N]``:
        channels averaged), a list of tensors ``[N]`` / ``[C, N]`` (None: no melody for that
        row), or a path (str / Path) to
        an audio file (wav, flac, mp3, ...; read by :func:`musicgen_lite.audio.load_audio`), or
        a list of paths. ``melody_sample_rate``: the tensors' rate in Hz (files carry their
        own). One melody with several descriptions serves them all; ``descriptions=None``:
        melody only. With guidance the null rows drop both the text and the melody. The other
        arguments are those of :meth:`generate`.
        """
        from pathlib import Path

        from .audio import load_audio

        mc = self.melody_conditioner
        if mc is None:
            raise ValueError("generate_with_chroma needs a melody model (this MusicGen has no melody_conditioner)")
        if melody_wavs is None:
            raise ValueError("melody_wavs is None: give a tensor, a list of tensors or an audio file path")
        paths = isinstance(melody_wavs, (str, Path)) or (
            isinstance(melody_wavs, (list, tuple)) and any(isinstance(m, (str, Path)) for m in melody_wavs))
        if paths:
            items = [melody_wavs] if isinstance(melody_wavs, (str, Path)) else list(melody_wavs)
            rate = mc.sample_rate if melody_sample_rate is None else melody_sample_rate
            if melody_sample_rate is None and any(torch.is_tensor(m) for m in items):
                raise ValueError("melody_sample_rate is needed for the tensors among melody_wavs")
            melody_wavs = [load_audio(m, sample_rate=rate)[0] if isinstance(m, (str, Path)) else m for m in items]
            melody_sample_rate = rate
        elif melody_sample_rate is None:
            raise ValueError("melody_sample_rate is needed: the sample rate (Hz) of melody_wavs")
        if descriptions is None:  # melody only: one row per melody
            one = torch.is_tensor(melody_wavs) and melody_wavs.dim() == 1
            descriptions = [None] * (1 if one else len(melody_wavs))
        elif isinstance(descriptions, str):
            descriptions = [descriptions]
        return self.generate(descriptions, duration, cfg_coef=cfg_coef, top_k=top_k, top_p=top_p,
                             temperature=temperature, seed=seed, melody=melody_wavs,
                             melody_sample_rate=melody_sample_rate, **kw)


def _capture(fn, step: torch.Tensor, warmup: int = 2):
    """Capture ``fn()`` (one decoding step) in a CUDA graph; returns its ``replay``.

    ``fn`` runs ``warmup`` times first on a side stream (lazy initialisation, kernel choice,
    as PyTorch asks), which advances ``step`` and writes the next positions of the cache and
    the sequence; ``step`` is put back afterwards, and the replays overwrite those positions
    before anything reads them (a step writes its cache row before attending to it, and its
    tokens before the next step reads them).
    """
    saved = step.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    step.copy_(saved)
    return graph.replay


# ----------------------------------------------------------------------- transformers port

class TransformersCodec(nn.Module):
    """transformers' ``EncodecModel`` behind the codec interface (``encode`` / ``decode`` of codes).

    A small adapter for parity and for the real MusicGen weights; uses the model's first
    target bandwidth (MusicGen's 32 kHz EnCodec: 2.2 kbps = 4 codebooks) and no chunking.
    """

    def __init__(self, encodec, bandwidth: float | None = None):
        super().__init__()
        self.model = encodec.eval()
        c = encodec.config
        self.bandwidth = bandwidth if bandwidth is not None else c.target_bandwidths[0]
        self.sample_rate = c.sampling_rate
        self.frame_rate = c.frame_rate
        self.cardinality = c.codebook_size
        self.num_codebooks = int(round(1000 * self.bandwidth / (c.frame_rate * math.log2(c.codebook_size))))

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav[B, 1, N]`` -> ``codes[B, K, T]``."""
        return self.model.encode(wav, bandwidth=self.bandwidth).audio_codes[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes[B, K, T]`` -> ``wav[B, 1, N]``."""
        return self.model.decode(codes.unsqueeze(0), [None] * codes.shape[0]).audio_values


def _guidance_scale(hf) -> float:
    """The guidance a transformers MusicGen's generation config asks for (3 for Meta's), else 3."""
    scale = getattr(getattr(hf, "generation_config", None), "guidance_scale", None)
    return float(scale) if scale is not None and scale >= 1 else DEFAULT_CFG


def from_transformers_musicgen(hf, tokenizer=None, max_duration: float = 30.0,
                               extend_stride: float = 18.0) -> MusicGen:
    """A :class:`MusicGen` from transformers' ``MusicgenForConditionalGeneration``.

    The decoder becomes a :class:`MusicLM` (:func:`~musicgen_lite.lm.from_transformers_decoder`),
    T5 + tokenizer + ``enc_to_dec_proj`` a :class:`~musicgen_lite.conditioning.T5Conditioner`,
    EnCodec a :class:`TransformersCodec` (copies: the transformers model stays untouched).
    Greedy decoding then gives transformers' tokens. The tokenizer is not part of the
    transformers model: pass it (``AutoTokenizer.from_pretrained("t5-base")`` for the
    released checkpoints).
    """
    import copy

    from .conditioning import T5Conditioner
    from .lm import from_transformers_decoder

    if type(hf).__name__ == "MusicgenMelodyForConditionalGeneration":
        return from_transformers_musicgen_melody(hf, tokenizer, max_duration=max_duration,
                                                 extend_stride=extend_stride)
    if getattr(hf.config.decoder, "audio_channels", 1) != 1:
        raise ValueError("only mono MusicGen is supported")
    lm = from_transformers_decoder(hf.decoder)
    t5_dim, dim = hf.text_encoder.config.d_model, lm.config.dim
    project = t5_dim != dim and hf.decoder.config.cross_attention_hidden_size is None
    conditioner = T5Conditioner(copy.deepcopy(hf.text_encoder), output_dim=dim,
                                tokenizer=tokenizer or _MissingTokenizer(), project=project)
    if project:
        with torch.no_grad():
            conditioner.proj.weight.copy_(hf.enc_to_dec_proj.weight)
            conditioner.proj.bias.copy_(hf.enc_to_dec_proj.bias)
    codec = TransformersCodec(copy.deepcopy(hf.audio_encoder))
    model = MusicGen(codec, lm, conditioner, "delay", max_duration, extend_stride, cfg_coef=_guidance_scale(hf))
    return model.to(next(hf.parameters()).device).eval()  # where the transformers model is (a GPU run found parts left on the CPU)


def from_transformers_musicgen_melody(hf, tokenizer=None, radix2_exp: int = 14, max_duration: float = 30.0,
                                      extend_stride: float = 18.0) -> MusicGen:
    """A melody :class:`MusicGen` from transformers' ``MusicgenMelodyForConditionalGeneration``.

    - decoder -> a ``condition_mode="prepend"`` :class:`MusicLM` (no cross-attention);
    - T5 + ``enc_to_dec_proj`` -> a :class:`~musicgen_lite.conditioning.T5Conditioner`;
    - ``audio_enc_to_dec_proj`` -> the projection of a
      :class:`~musicgen_lite.conditioning.MelodyConditioner` at the codec's sample rate, with
      ``length = config.chroma_length`` prefix frames; ``radix2_exp`` sets its STFT
      (``n_fft = 2 ** radix2_exp``, hop a quarter of it: 14 is transformers' feature extractor
      for the 32 kHz model, 16384 / 4096);
    - EnCodec -> a :class:`TransformersCodec`.

    Same logits for the same text, chroma and tokens; greedy decoding gives transformers'
    tokens. The transformers model stays untouched (copies).
    """
    import copy

    from .conditioning import MelodyConditioner, T5Conditioner
    from .lm import from_transformers_decoder

    if getattr(hf.config.decoder, "audio_channels", 1) != 1:
        raise ValueError("only mono MusicGen-melody is supported")
    lm = from_transformers_decoder(hf.decoder)
    dim = lm.config.dim
    project = hf.text_encoder.config.hidden_size != dim  # transformers' own condition for enc_to_dec_proj
    conditioner = T5Conditioner(copy.deepcopy(hf.text_encoder), output_dim=dim,
                                tokenizer=tokenizer or _MissingTokenizer(), project=project)
    codec = TransformersCodec(copy.deepcopy(hf.audio_encoder))
    melody = MelodyConditioner(codec.sample_rate, dim, length=hf.config.chroma_length, n_chroma=hf.config.num_chroma,
                               radix2_exp=radix2_exp).to(next(hf.parameters()).device)
    with torch.no_grad():
        if project:
            conditioner.proj.weight.copy_(hf.enc_to_dec_proj.weight)
            conditioner.proj.bias.copy_(hf.enc_to_dec_proj.bias)
        if hf.config.num_chroma != dim:
            melody.proj.weight.copy_(hf.audio_enc_to_dec_proj.weight)
            melody.proj.bias.copy_(hf.audio_enc_to_dec_proj.bias)
        else:  # transformers feeds the chroma as it is
            melody.proj.weight.copy_(torch.eye(dim))
            melody.proj.bias.zero_()
    model = MusicGen(codec, lm, conditioner, "delay", max_duration, extend_stride,
                     melody_conditioner=melody, cfg_coef=_guidance_scale(hf))
    return model.to(next(hf.parameters()).device).eval()


class _MissingTokenizer:
    def __call__(self, *a, **kw):
        raise RuntimeError("no tokenizer: pass tokenizer= to from_transformers_musicgen "
                           "(or set musicgen.conditioner.tokenizer), e.g. AutoTokenizer for 't5-base'")
