"""Training: the codec trainer, schedules, and checkpoints that resume exactly.

A training state is a folder written atomically (see :mod:`musicgen_lite.hub`):

- ``model.safetensors``: ``model.*`` weights and buffers, ``optim.{i}.{name}`` optimizer
  tensors, ``rng.torch`` (and ``rng.cuda``) generator states;
- ``config.json``: the model config, plus ``extra`` = step, optimizer hyper-parameters,
  loss history and the options of the run.

Resume loads all of it, so an interrupted run continues with the same batches, the same
random draws (quantizer dropout, dead codes) and the same losses as one that never stopped:
batches are drawn from a generator seeded by ``(seed, step)``, never from hidden state.

:func:`train_codec` is the entry point that ``musicgen-lite train codec`` calls, :func:`train_lm`
the one for the language model (on a token cache; DDP under ``torchrun``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .hub import load_checkpoint, musicgen_codec_dir, save_checkpoint


# --------------------------------------------------------------------------- schedules

def lr_at(step: int, base_lr: float, warmup: int = 0, total: int | None = None, schedule: str = "constant",
          min_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warmup over ``warmup`` steps, then constant or cosine."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine" and total:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    return base_lr


# --------------------------------------------------------------------------- training state

def save_training_state(path, model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | dict | None, step: int,
                        config: dict, extra: dict | None = None) -> Path:
    """Model + optimizer + step + RNG state in one atomic checkpoint folder (see module doc).

    ``model`` / ``optimizer`` may also be their state dicts (FSDP gathers full ones first).
    """
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {f"model.{k}": v for k, v in state.items()}
    meta = dict(extra or {}, step=int(step))
    if optimizer is not None:
        opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        scalars = {}
        for idx, state in opt["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{name}"] = value
                else:
                    scalars[f"{idx}.{name}"] = value
        meta["optimizer"] = {"param_groups": opt["param_groups"], "scalars": scalars}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return save_checkpoint(path, tensors, config, meta)


def load_training_state(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        restore_rng: bool = True, device: str | torch.device = "cpu") -> dict:
    """Load what :func:`save_training_state` wrote into ``model`` (and ``optimizer``); returns ``extra``."""
    tensors, _, extra = load_checkpoint(path, device)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None and "optimizer" in extra:
        optimizer.load_state_dict(_optimizer_state(tensors, extra))
    if restore_rng:
        _restore_rng(tensors)
    return extra


def _optimizer_state(tensors: dict, extra: dict) -> dict:
    """The optimizer state dict (``{"state": {index: ...}, "param_groups"}``) stored in a checkpoint."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in extra["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for s in state.values():  # Adam keeps `step` on the CPU
        if "step" in s and torch.is_tensor(s["step"]):
            s["step"] = s["step"].cpu()
    return {"state": state, "param_groups": extra["optimizer"]["param_groups"]}


def _restore_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu())


def _param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters as module names, in its own (index) order."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _fsdp_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts of an FSDP2 model, in the plain format
    (optimizer state keyed by index), so a checkpoint does not depend on the number of processes.
    A collective: every rank must call it; rank 0 gets the tensors (on the CPU)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(module, options=opts)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=opts)
    index = {name: i for i, name in enumerate(_param_names(module, optimizer))}
    state = {index[name]: value for name, value in optim_sd.get("state", {}).items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in optim_sd.get("param_groups", [])]
    return model_sd, {"state": state, "param_groups": groups}


def _load_fsdp_state(path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device) -> dict:
    """Load a checkpoint (written by any number of processes) into an FSDP2-sharded model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    tensors, _, extra = load_checkpoint(path, "cpu")
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                         options=opts)
    if "optimizer" in extra:
        plain = _optimizer_state(tensors, extra)
        names = _param_names(module, optimizer)
        set_optimizer_state_dict(module, optimizer, options=opts, optim_state_dict={
            "state": {names[i]: v for i, v in plain["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in plain["param_groups"]]})
    _restore_rng(tensors)
    return extra



# --------------------------------------------------------------------------- data

class ClipBank:
    """Every clip of a dataset folder held in memory at one sample rate; seeded random crops.

    ``batch(step, size, samples)`` draws clips and offsets from a generator seeded by
    ``(seed, step)``, so step ``s`` always gets the same batch, whatever happened before.
    """

    def __init__(self, root, sample_rate: int, seed: int = 0):
        from .data import AudioDataset

        roots = [root] if isinstance(root, (str, Path)) else list(root)
        self.wavs = []
        for folder in roots:
            dataset = AudioDataset(folder, segment_seconds=None, sample_rate=sample_rate)
            self.wavs += [dataset[i][0].mean(0, keepdim=True) for i in range(len(dataset))]  # [(1, N)]
        if not self.wavs:
            raise ValueError(f"{', '.join(map(str, roots))}: no clips")
        self.sample_rate, self.seed = sample_rate, seed

    def __len__(self) -> int:
        return len(self.wavs)

    def batch(self, step: int, size: int, samples: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = torch.zeros(size, 1, samples)
        picks = torch.randint(len(self.wavs), (size,), generator=g)
        for b, i in enumerate(picks.tolist()):
            wav = self.wavs[i]
            room = wav.shape[-1] - samples
            start = int(torch.randint(room + 1, (1,), generator=g)) if room > 0 else 0
            piece = wav[:, start:start + samples]
            out[b, :, : piece.shape[-1]] = piece
        return out  # (B, 1, N)


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_codec(model, wavs: torch.Tensor, n_qs=None, mel_loss=None) -> list[dict]:
    """Quality of ``model`` on ``wavs`` ``[B, 1, N]`` per number of codebooks.

    Returns one dict per ``n_q``: ``si_snr`` (dB, mean over items), ``mel`` (multi-scale mel
    distance, lower is better) and ``kbps``.
    """
    from .codec import MultiScaleMelLoss, si_snr

    mel_loss = mel_loss or MultiScaleMelLoss(model.sample_rate).to(wavs.device)
    rows = []
    for n_q in n_qs or range(1, model.num_codebooks + 1):
        rec = model.reconstruct(wavs, n_q=n_q)
        rows.append({"n_q": n_q, "kbps": model.bits_per_second(n_q) / 1000,
                     "si_snr": float(si_snr(rec, wavs).mean()), "mel": float(mel_loss(rec, wavs))})
    return rows


# --------------------------------------------------------------------------- codec trainer

def codec_train_options(scale: str) -> dict:
    """The recipe per scale: batch, segment, learning rate, losses (lite: checked in short runs only)."""
    base = dict(batch_size=8, segment_seconds=1.0, lr=3e-4, betas=(0.5, 0.9), warmup=50, grad_clip=1.0,
                l1_weight=0.1, mel_weight=1.0, adversarial=False, n_clips=64, clip_seconds=4.0, log_every=25,
                sample_every=500, checkpoint_every=250,
                mel_windows=(64, 128, 256, 512, 1024, 2048), mel_n_mels=64, stft_weight=0.0,
                stft_windows=(512, 1024, 2048), zero_bias=True, corpus_clips=0, amp="auto", freeze_encoder=False,
                decoder_n_q=None, chroma_weight=0.0)
    if scale == "tiny":
        base.update(batch_size=4, segment_seconds=0.5, lr=1e-3, betas=(0.9, 0.999), warmup=5, n_clips=8,
                    clip_seconds=2.0, log_every=5, sample_every=0, checkpoint_every=50,
                    mel_windows=(64, 128, 256, 512))
    elif scale == "lite":
        # checked in short runs: EnCodec's betas (0.5, 0.9) and lr 1e-3 collapsed level 1 to a few entries
        # from step 4131 on: w // 8 mel filters per window and a linear STFT loss. In a 400-step A/B
        # from the same checkpoint, chroma agreement on 16 held-out clips rose to 0.587 (from 0.523)
        # against 0.561 without them, at 1.0 s a step instead of 0.78 (2 threads).
        # From step 4531 on: bf16 autocast on the CPU. In a 300-step A/B, chroma 0.591 vs 0.575 (fp32),
        # mel 0.719 vs 0.717, training loss 2.543 vs 2.531, at 0.67 s a step instead of 0.91.
        base.update(batch_size=16, segment_seconds=1.0, lr=3e-4, betas=(0.9, 0.999), warmup=100, n_clips=400,
                    corpus_clips=200, clip_seconds=8.0, mel_n_mels=None, stft_weight=1.0, amp="bf16")
    elif scale == "full":
        base.update(batch_size=32, segment_seconds=1.0, lr=3e-4, warmup=1000, adversarial=True, n_clips=20_000,
                    clip_seconds=10.0, checkpoint_every=2000, sample_every=5000)
    return base


def train_codec(out_dir, scale: str = "lite", steps: int = 1000, data=None, resume: bool = True, seed: int = 0,
                device: str | None = None, progress: bool = True, max_seconds: float | None = None,
                config_overrides: dict | None = None, init_from=None, **options) -> dict:
    """Train a :class:`~musicgen_lite.codec.CompressionModel` into ``out_dir``; resumable.

    Args:
        out_dir: folder for ``checkpoint/`` (latest state), ``log.jsonl`` and ``samples/``.
        scale: codec and recipe preset (``tiny`` | ``lite`` | ``full``).
        steps: total optimizer steps (a resumed run continues up to this number).
        data: a dataset folder (``data.jsonl`` manifest) or a list of them; default: synthetic
            clips (``n_clips``) and corpus tunes (``corpus_clips``) made and cached by
            :func:`musicgen_lite.data.make_dataset` at the codec's sample rate.
        resume: continue from ``out_dir/checkpoint`` when it exists.
        max_seconds: stop (after checkpointing) when this much wall time has passed, so long
            runs can be split across sessions.
        config_overrides: fields of :class:`~musicgen_lite.codec.CodecConfig` to change.
        init_from: a codec checkpoint folder (e.g. a shipped one) whose weights and config start
            a *new* run (ignored when ``out_dir`` already holds a checkpoint). With
            ``freeze_encoder=True`` this fine-tunes the decoder of the very codec a token cache
            was made with, so the cache and its LMs stay valid.
        **options: override :func:`codec_train_options` (``batch_size``, ``segment_seconds``,
            ``lr``, ``warmup``, ``grad_clip``, ``l1_weight``, ``mel_weight``, ``adversarial``,
            ``log_every``, ``sample_every``, ``checkpoint_every``, ``n_clips``, ``clip_seconds``,
            ``mel_windows``, ``schedule``, ``zero_bias``, ``corpus_clips``, ``mel_n_mels``,
            ``stft_weight``, ``stft_windows``, ``amp``, ``freeze_encoder``, ``decoder_n_q``,
            ``chroma_weight``). ``freeze_encoder``
            trains the decoder alone: the encoder and codebooks stay fixed, so the codes, and any
            token cache or LM made from them, stay valid (a run switching to it from joint
            training keeps the weights and starts a fresh optimizer for the decoder).
            ``decoder_n_q`` (with ``freeze_encoder``): the decoder learns from this many levels
            only, instead of every count that quantizer dropout draws (an LM always decodes
            through all of its codebooks). ``chroma_weight``: adds
            :class:`~musicgen_lite.codec.ChromaLoss` (the pitch classes) to the losses.

    Returns a summary dict: ``step``, ``losses`` (one per step of this call), ``log`` (the
    logged rows, with per-level codebook usage), ``checkpoint`` path, ``wall_seconds``.
    """
    from tqdm.auto import tqdm

    from .codec import (Balancer, ChromaLoss, CodecConfig, CompressionModel, MultiResolutionSTFTLoss,
                        MultiScaleMelLoss, MultiScaleSTFTDiscriminator,
                        adversarial_losses, codec_config, discriminator_loss)

    opts = codec_train_options(scale)
    unknown = set(options) - set(opts) - {"schedule"}
    if unknown:
        raise TypeError(f"train_codec: unknown options {sorted(unknown)}")
    opts.update(options)
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    cfg = codec_config(scale, **(config_overrides or {}))
    start_step, history = 0, []
    resuming = resume and (ckpt / "config.json").is_file()
    initial = None
    if resuming:
        cfg = CodecConfig.from_dict(json.loads((ckpt / "config.json").read_text())["config"])
    elif init_from is not None:
        from .hub import load_codec

        initial = load_codec(init_from)
        cfg = initial.config
    torch.manual_seed(seed)
    model = CompressionModel(cfg).to(device).train()
    if initial is not None:
        model.load_state_dict(initial.state_dict())
    elif opts["zero_bias"] and not resuming:
        _zero_conv_biases(model)
    disc = MultiScaleSTFTDiscriminator().to(device) if opts["adversarial"] else None
    frozen = bool(opts["freeze_encoder"])
    if opts["decoder_n_q"] is not None and not (frozen and 1 <= int(opts["decoder_n_q"]) <= cfg.n_q):
        raise ValueError(f"decoder_n_q must be 1..{cfg.n_q} and goes with freeze_encoder=True, "
                         f"got {opts['decoder_n_q']!r} (freeze_encoder={frozen})")
    if frozen:  # decoder-only: the codes (what an LM was trained on) stay exactly as they are
        for module in (model.encoder, model.quantizer):
            for p in module.parameters():
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts["lr"], betas=tuple(opts["betas"]))
    disc_opt = torch.optim.Adam(disc.parameters(), lr=opts["lr"], betas=(0.5, 0.9)) if disc else None
    balancer = Balancer({"l1": opts["l1_weight"], "mel": opts["mel_weight"], "adv": 3.0, "fm": 3.0}) if disc else None
    if resume and (ckpt / "config.json").is_file():
        saved = json.loads((ckpt / "config.json").read_text())["extra"].get("options", {})
        switching = frozen and not saved.get("freeze_encoder", False)  # joint -> decoder-only: a fresh optimizer
        extra = load_training_state(ckpt, model, None if switching else optimizer, device=device)
        start_step, history = int(extra["step"]), list(extra.get("losses", []))
        if disc is not None and (ckpt / "disc").is_dir():
            load_training_state(ckpt / "disc", disc, disc_opt, restore_rng=False, device=device)
            balancer.load_state_dict(extra.get("balancer", {}))

    if data is None:
        from .data import make_dataset

        data = [make_dataset(None, n=opts["n_clips"], seconds=opts["clip_seconds"], seed=seed,
                             sample_rate=cfg.sample_rate, progress=progress)]
        if opts["corpus_clips"]:
            data.append(make_dataset(None, n=opts["corpus_clips"], seconds=opts["clip_seconds"], seed=seed,
                                     source="corpus", sample_rate=cfg.sample_rate, progress=progress))
    bank = ClipBank(data, cfg.sample_rate, seed=seed)
    samples = int(round(opts["segment_seconds"] * cfg.sample_rate))
    mel = MultiScaleMelLoss(cfg.sample_rate, windows=tuple(opts["mel_windows"]), n_mels=opts["mel_n_mels"]).to(device)
    stft = MultiResolutionSTFTLoss(opts["stft_windows"]).to(device) if opts["stft_weight"] else None
    chroma = ChromaLoss(cfg.sample_rate).to(device) if opts["chroma_weight"] else None
    probe = bank.batch(10**9, 1, min(samples * 4, max(w.shape[-1] for w in bank.wavs))).to(device)
    log_path = out_dir / "log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    trim_log(log_path, start_step)
    if opts["amp"] not in ("auto", "bf16", "off"):
        raise ValueError(f"train_codec: amp must be 'auto' (bf16 on CUDA only), 'bf16' or 'off', not {opts['amp']!r}")
    # the codec in bf16 autocast (its losses and the quantizer's distances stay fp32); on a CPU
    # with AVX512-BF16 this about halves the step time (1.49 s vs 3.09 s per lite step, 1 thread)
    use_bf16 = opts["amp"] == "bf16" or (opts["amp"] == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cpu" and not _cpu_has_native_bf16():
        warnings.warn("train_codec: this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32", stacklevel=2)
        use_bf16 = False
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    losses, log_rows = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not progress, desc="codec")
    step = start_step
    usage_acc = torch.zeros(cfg.n_q)
    for step in bar:
        lr = lr_at(step, opts["lr"], opts["warmup"], steps, opts.get("schedule", "constant"))
        for group in optimizer.param_groups:
            group["lr"] = lr
        wav = bank.batch(step, opts["batch_size"], samples).to(device)  # (B, 1, N)
        n_q = None
        if frozen:  # no codebook updates; the decoder learns every level count (quantizer dropout), or one
            model.encoder.eval(), model.quantizer.eval()
            n_q = int(opts["decoder_n_q"]) if opts["decoder_n_q"] is not None else \
                model.quantizer._draw_n_q(wav.shape[0], device)
        with torch.autocast(**autocast):
            out = model(wav, n_q=n_q)
        rec = out.wav.float()
        l1 = F.l1_loss(rec, wav)
        mel_l = mel(rec, wav)
        stft_l = stft(rec, wav) if stft is not None else None
        chroma_l = chroma(rec, wav) if chroma is not None else None
        optimizer.zero_grad(set_to_none=True)
        if disc is None:
            loss = opts["l1_weight"] * l1 + opts["mel_weight"] * mel_l + out.vq_loss
            if stft_l is not None:
                loss = loss + opts["stft_weight"] * stft_l
            if chroma_l is not None:
                loss = loss + opts["chroma_weight"] * chroma_l
            loss.backward()
            loss = loss - out.vq_loss
            values = {"l1": float(l1.detach()), "mel": float(mel_l.detach())}
            if stft_l is not None:
                values["stft"] = float(stft_l.detach())
            if chroma_l is not None:
                values["chroma"] = float(chroma_l.detach())
        else:
            adv, fm = adversarial_losses(disc, wav, rec)
            values = balancer.backward({"l1": l1, "mel": mel_l, "adv": adv, "fm": fm}, rec, out.vq_loss)
            loss = opts["l1_weight"] * l1 + opts["mel_weight"] * mel_l
        if opts["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, opts["grad_clip"])
        optimizer.step()
        if disc is not None:
            disc_opt.zero_grad(set_to_none=True)
            d_loss = discriminator_loss(disc, wav, rec)
            d_loss.backward()
            disc_opt.step()
            values["disc"] = float(d_loss.detach())
        total = float(loss.detach()) + float(out.vq_loss.detach())
        losses.append(total)
        history.append(round(total, 6))
        n_levels = out.codes.shape[1]
        usage_acc[:n_levels] = torch.maximum(usage_acc[:n_levels], out.metrics["usage"].cpu())
        done = step + 1
        if done % opts["log_every"] == 0 or done == steps:
            row = {"step": done, "lr": lr, "loss": total, "vq": float(out.vq_loss.detach()), **values,
                   "n_q": int(n_levels), "usage": [round(float(u), 4) for u in out.metrics["usage"]],
                   "entries_used": [int(round(float(u) * cfg.bins)) for u in out.metrics["usage"]],
                   "replaced": [int(r) for r in out.metrics["replaced"]],
                   "seconds": round(time.perf_counter() - t0, 1)}
            log_rows.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{total:.3f}", mel=f"{values['mel']:.3f}")
        out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if done % opts["checkpoint_every"] == 0 or done == steps or out_of_time:
            _save(ckpt, model, optimizer, done, cfg, history, opts, disc, disc_opt, balancer)
        if opts["sample_every"] and done % opts["sample_every"] == 0:
            write_samples(out_dir / "samples", model, probe, done)
        if out_of_time:
            break
    bar.close()
    if not losses and not (ckpt / "config.json").is_file():
        _save(ckpt, model, optimizer, step, cfg, history, opts, disc, disc_opt, balancer)
    return {"step": step + 1 if losses else start_step, "losses": losses, "log": log_rows, "checkpoint": ckpt,
            "wall_seconds": time.perf_counter() - t0, "model": model.eval()}


def trim_log(log_path, step: int) -> int:
    """Drop the rows of ``log.jsonl`` after ``step``, the step a run resumes from: a run stopped
    between a log row and its next checkpoint logged steps that it will train (and log) again.
    Rewritten atomically; returns how many rows were dropped (0: the file is left as it was)."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return 0
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log_path)
    return len(lines) - len(keep)


def log_wall_seconds(log) -> float:
    """Training wall time from a run's ``log.jsonl`` (a path, or its rows as dicts): each session's
    ``seconds`` restarts at 0, so this sums the last value of every session."""
    if isinstance(log, (str, Path)):
        log = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    total, last = 0.0, 0.0
    for row in log:
        s = row.get("seconds", 0.0)
        if s < last:
            total += last
        last = s
    return total + last


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _zero_conv_biases(model: nn.Module) -> None:
    """Start every conv bias at 0: with PyTorch's default (uniform +-1/sqrt(fan_in)) the biases,
    summed through the stack, swamped the quiet input and the lite encoder's latents barely moved
    in time (temporal std 2% of their std after 100 steps; about 30% with zero biases)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and module.bias is not None:
            nn.init.zeros_(module.bias)


def _save(ckpt, model, optimizer, step, cfg, history, opts, disc, disc_opt, balancer) -> None:
    extra = {"losses": history, "options": opts}
    if balancer is not None:
        extra["balancer"] = balancer.state_dict()
        save_training_state(ckpt / "disc", disc, disc_opt, step, {})
    save_training_state(ckpt, model, optimizer, step, cfg.to_dict(), extra)


def write_samples(folder, model, wav: torch.Tensor, step: int) -> list[Path]:
    """Reconstructions of ``wav`` ``[1, 1, N]`` at 1..K codebooks (wav files) and one mel figure."""
    from .audio import save_audio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    recs = [model.reconstruct(wav, n_q=k)[0].cpu() for k in range(1, model.num_codebooks + 1)]
    for k, rec in enumerate(recs, 1):
        paths.append(save_audio(folder / f"step{step:07d}_q{k}.wav", rec, model.sample_rate))
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from . import nb

        fig, axes = plt.subplots(1, len(recs) + 1, figsize=(3 * (len(recs) + 1), 2.5))
        nb.plot_mel(wav[0].cpu(), model.sample_rate, ax=axes[0], title="original")
        for k, rec in enumerate(recs, 1):
            nb.plot_mel(rec, model.sample_rate, ax=axes[k], title=f"{k} codebook{'s' * (k > 1)}")
        fig.tight_layout()
        fig.savefig(folder / f"step{step:07d}_mel.png", dpi=80)
        plt.close(fig)
    except Exception:  # figures are a convenience; never stop training for them
        pass
    model.train()
    return paths


def export_codec(run_dir, out_dir, dtype: torch.dtype | None = torch.float16, extra: dict | None = None,
                 inference_only: bool = False) -> Path:
    """A training run's latest codec weights (no optimizer) as a shippable checkpoint folder.

    Stores floating tensors as ``dtype`` (fp16 halves the size; :func:`musicgen_lite.hub.load_codec`
    reads them back as fp32). ``extra`` (data, steps, wall time, command, metrics) goes into
    ``config.json`` for the model card. ``inference_only`` leaves out the codebooks' EMA sums
    (``embed_avg``, only k-means updates read them: 1 MB of the lite codec's 7.4);
    :func:`~musicgen_lite.hub.load_codec` rebuilds them from ``embed`` and ``cluster_size``.
    """
    tensors, config, meta = load_checkpoint(Path(run_dir) / "checkpoint")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if inference_only:
        state = {k: v for k, v in state.items() if not k.endswith("codebook.embed_avg")}
    info = {"step": meta.get("step"), "options": meta.get("options"), **(extra or {})}
    return save_checkpoint(out_dir, state, config, info, dtype=dtype)


def export_musicgen(run_dir, codec_path, out_dir, use_ema: bool = True, dtype: torch.dtype | None = torch.float16,
                    extra: dict | None = None, cfg_coef: float | None = None) -> Path:
    """An LM run (:func:`train_lm`) and the codec its tokens came from -> a model folder.

    The folder is what :func:`musicgen_lite.hub.load_musicgen` and ``musicgen-lite generate``
    read. EMA weights are used when the run kept them (``use_ema``). Checks that the run's
    token cache was made by this codec (the fingerprint stored at training time).

    A melody run (``train_lm(..., melody=True)``) exports its
    :class:`~musicgen_lite.conditioning.MelodyConditioner` too, and the model's context
    (``max_duration``) is the training segment (``extend_stride`` 60% of it, MusicGen's 18 s of
    30 s), so that every generated window is as long as the chroma prefix the model learned.
    ``cfg_coef``: the guidance the model generates with when not told otherwise (stored in
    its config; the one its evaluation used; None: MusicGen's 3).
    """
    from .conditioning import MelodyConditioner, ModePredictor, TempoPredictor, get_conditioner
    from .data.dataset import codec_fingerprint
    from .generation import DEFAULT_CFG, MusicGen
    from .hub import load_codec, save_musicgen
    from .lm import LMConfig, MusicLM

    tensors, config, meta = load_checkpoint(Path(run_dir) / "checkpoint")
    codec = load_codec(codec_path)
    expected = (meta.get("token_fingerprint") or {}).get("codec")
    if expected is not None and expected != codec_fingerprint(codec):
        raise ValueError(f"{codec_path}: not the codec that made {run_dir}'s tokens")
    lm = MusicLM(LMConfig(**config))
    name, cond_kwargs = meta.get("conditioner"), meta.get("conditioner_kwargs") or {}
    conditioner = get_conditioner(name, lm.config.dim, **cond_kwargs) if name else None
    prefix = "model.ema." if use_ema and any(k.startswith("model.ema.") for k in tensors) else "model.task."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    lm.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("lm.")})
    if conditioner is not None:
        conditioner.load_state_dict({k[len("conditioner."):]: v for k, v in state.items()
                                     if k.startswith("conditioner.")})
    melody, window = None, {}
    if meta.get("melody"):
        melody = MelodyConditioner(output_dim=lm.config.dim, **meta["melody"])
        melody.load_state_dict({k[len("melody."):]: v for k, v in state.items() if k.startswith("melody.")})
        seconds = float(meta["options"]["segment_seconds"])
        window = {"max_duration": seconds, "extend_stride": 0.6 * seconds}
    model = MusicGen(codec, lm, conditioner, meta.get("pattern", "delay"), melody_conditioner=melody,
                     cfg_coef=DEFAULT_CFG if cfg_coef is None else cfg_coef, **window,
                     tempo=TempoPredictor.from_dict(meta["tempo"]) if meta.get("tempo") else None,
                     mode_predictor=ModePredictor.from_dict(meta["mode_predictor"]) if meta.get("mode_predictor")
                     else None)
    info = {"step": meta.get("step"), "options": meta.get("options"), "tokens": meta.get("tokens"),
            "weights": "ema" if prefix == "model.ema." else "raw", **(extra or {})}
    return save_musicgen(model, out_dir, {"name": name, "kwargs": cond_kwargs} if name else None, info, dtype=dtype)


@torch.no_grad()
def validation_loss(task: "LMTask", tokens, segment_seconds: float, max_items: int = 64, batch_size: int = 16,
                    captions: str = "true", melody: str = "true", clock: bool = True, key: bool = True) -> dict:
    """Mean per-token cross-entropy of ``task`` (an :class:`LMTask`, e.g. ``train_lm(...)["model"]``)
    on a held-out token cache: its first ``max_items`` full windows of ``segment_seconds``, in
    order (the same windows every call), captions (and chroma) as in training, no dropout.
    ``captions``: ``"true"`` (each window's own), ``"shuffled"`` (the next window's, a fixed
    rotation) or ``"null"`` (the null condition of guidance): how much a model reads its text is
    the loss it loses without it. ``melody`` (a melody task): ``"true"`` (each window's own
    chroma), ``"shuffled"`` (the next window's) or ``"null"`` (the null melody alone, the text
    kept): how much the model reads its melody. An LM with a beat clock gets each window's clock
    (:func:`window_clock`) unless ``clock=False``; a key-conditioned one also its clip's key (tonic and
    mode) unless ``key=False`` (the beat kept). Returns ``{"loss", "per_codebook", "windows"}`` (nats)."""
    if captions not in ("true", "shuffled", "null"):
        raise ValueError(f"captions must be 'true', 'shuffled' or 'null', got {captions!r}")
    if melody not in ("true", "shuffled", "null"):
        raise ValueError(f"melody must be 'true', 'shuffled' or 'null', got {melody!r}")
    from .data.dataset import TokenDataset

    probe = TokenDataset(tokens)
    frames = max(1, round(segment_seconds * probe.fingerprint["frame_rate"]))
    data = TokenDataset(tokens, segment_frames=frames, chroma=bool(getattr(task, "melody", None)) or None)
    items = []
    for i in range(len(data)):
        codes, info = data[i]
        if info.get("n_frames", frames) == frames:
            items.append((codes, info))
        if len(items) == max_items:
            break
    if not items:
        raise ValueError(f"{tokens}: no full window of {segment_seconds} s in the token cache")
    was_training = task.training
    task.eval()
    device = next(task.parameters()).device
    all_texts = [i.get("description", "") for _, i in items]
    if captions == "shuffled":
        all_texts = all_texts[1:] + all_texts[:1]
    chromas = [i["chroma"] for _, i in items] if getattr(task, "melody", None) is not None else None
    if chromas is not None and melody == "shuffled":
        chromas = chromas[1:] + chromas[:1]
    total, per_cb, n = 0.0, None, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        codes = torch.stack([c for c, _ in chunk]).to(device)
        texts = all_texts[start:start + batch_size]
        kw = {"drop": True} if captions == "null" else {}
        if chromas is not None:
            kw["chroma"] = torch.stack(chromas[start:start + batch_size]).to(device)
            kw["drop_melody"] = melody == "null"
        if clock and task.lm.config.beat_clock:
            kw["clock"] = window_clock([i for _, i in chunk], data.fingerprint["frame_rate"],
                                       key_columns=task.lm.config.key_condition, with_key=key).to(device)
        loss, per_codebook = task(codes, texts if task.conditioner is not None else None, **kw)
        total += float(loss) * len(chunk)
        per_cb = per_codebook.float().cpu() * len(chunk) + (per_cb if per_cb is not None else 0)
        n += len(chunk)
    task.train(was_training)
    return {"loss": total / n, "per_codebook": [round(float(v), 4) for v in per_cb / n], "windows": n}


# ------------------------------------------------------------------------------ LM trainer

def lm_train_options(scale: str) -> dict:
    """The LM recipe per scale (AdamW 0.9/0.95, weight decay 0.1, warmup + cosine, as MusicGen)."""
    base = dict(batch_size=16, segment_seconds=10.0, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup=200,
                schedule="cosine", grad_clip=1.0, grad_accum=1, ema_decay=None, cond_dropout=0.3, amp="bf16",
                log_every=25, checkpoint_every=250, fsdp=None, melody_dropout=0.0, cpu_amp=False,
                caption_metadata_p=0.0, melody_mode="prefix", caption_facts=False, beat_clock=False,
                key_condition=False, key_tonic_dropout=0.5, key_lr_scale=1.0)
    if scale == "lite":
        # bf16 autocast on CPUs with native bf16 too: a lite step (4 x 10 s, 1 thread) took 1.87 s
        # instead of 2.60 in fp32 on the project's machine
        base.update(cpu_amp=True)
    if scale == "tiny":
        base.update(batch_size=4, segment_seconds=1.0, lr=3e-3, warmup=5, log_every=5, checkpoint_every=50)
    elif scale == "full":  # musicgen-small: global batch 192 x 30 s, lr 1e-4 (run with torchrun on GPUs)
        base.update(batch_size=192, segment_seconds=30.0, lr=1e-4, warmup=4000, checkpoint_every=2000)
    return base


# MusicGen-melody's recipe on top (audiocraft's chroma2music conditioner config): guidance dropout
# of every condition at once 0.2 (text models: 0.3), plus the melody alone dropped on half the
# batches, so the model also learns text-only music and does not lean on the melody for everything.
MELODY_TRAIN_OPTIONS = dict(cond_dropout=0.2, melody_dropout=0.5)


def _shard(task: "LMTask", opts: dict) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block is its own unit
    (its weights gathered just before use, freed after; its cross-attention a unit of its own,
    since the condition's keys/values are computed before the blocks run), then the rest (embeddings, heads,
    conditioner) as the root unit. A frozen pretrained text encoder gets its own unit, so each
    unit's parameters are all trainable or all frozen. Optimizer states are sharded with them:
    what lets the ``full`` presets (up to 3.3 B parameters) train where DDP's full copy per GPU
    would not fit."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if opts["ema_decay"]:
        raise ValueError("ema_decay is not supported with FSDP yet: set ema_decay=None or fsdp=False")
    for block in task.lm.blocks:
        cross = getattr(block, "cross", None)
        if cross is not None:  # its keys/values are computed once per batch, outside the block's forward
            fully_shard(cross)
            register_fsdp_forward_method(cross, "keys_values")
        fully_shard(block)
    if task.conditioner is not None:
        for child in task.conditioner.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                fully_shard(child)
    fully_shard(task)


class LMTask(torch.nn.Module):
    """The LM and its conditioners as one module: ``forward(codes, texts, drop) -> (loss, per_codebook)``.

    One module so that DDP sees every trainable weight in one forward. A dropped condition
    (classifier-free guidance training) keeps the conditioner in the graph with a zero mask,
    so every parameter gets a gradient (zero) on every rank.

    MusicGen-melody (``melody``: a :class:`~musicgen_lite.conditioning.MelodyConditioner`, the
    LM in ``condition_mode="prepend"``): ``forward(codes, texts, drop, chroma, drop_melody)``
    with ``chroma[B, Lc, n_chroma]`` from the token cache; the condition is
    ``[projected chroma | text states]``, as :meth:`~musicgen_lite.generation.MusicGen.condition`
    builds it at generation. ``drop`` (guidance) nulls both, as the null rows at generation do:
    the null melody (the chroma of silence) and zero text states; ``drop_melody`` nulls the
    melody alone. A null melody still goes through the projection, so it too gets a gradient.
    """

    def __init__(self, lm, conditioner=None, pattern="delay", melody=None):
        super().__init__()
        from .patterns import get_pattern

        self.lm, self.conditioner, self.melody = lm, conditioner, melody
        self.pattern = get_pattern(pattern, lm.config.num_codebooks) if isinstance(pattern, str) else pattern

    def forward(self, codes: torch.Tensor, texts=None, drop: bool = False, chroma: torch.Tensor | None = None,
                drop_melody: bool = False, clock: torch.Tensor | None = None):
        cond = mask = None
        if self.conditioner is not None:
            cond, mask = self.conditioner(list(texts))
            if drop:
                cond, mask = cond * 0, torch.zeros_like(mask)
        if self.melody is not None:
            if chroma is None or chroma.dim() != 3 or chroma.shape[0] != codes.shape[0]:
                raise ValueError(f"a melody LMTask needs chroma [B={codes.shape[0]}, Lc, n_chroma], got "
                                 f"{None if chroma is None else list(chroma.shape)}")
            if drop or drop_melody:
                chroma = self.melody.null_chroma(chroma.shape[0], chroma.shape[1]).to(chroma.device)
            emb, emb_mask = self.melody.project(chroma)  # (B, Lc, D), (B, Lc) all ones
            if cond is None:
                cond, mask = emb, emb_mask
            else:
                cond = torch.cat([emb, cond.to(emb.dtype)], dim=1)  # (B, Lc + L, D): [chroma | text]
                mask = torch.cat([emb_mask, mask.to(emb_mask.dtype)], dim=1)
        if clock is not None and drop:  # the beat clock is a condition too: the null rows of guidance lack it
            clock = torch.zeros_like(clock)
        return self.lm.compute_loss(codes, self.pattern, cond, mask, clock=clock)


def window_clock(infos, frame_rate: float, key_columns: bool = False, with_key: bool = True,
                 keep_tonic=None) -> torch.Tensor:
    """The beat clocks (:func:`~musicgen_lite.lm.beat_clock`) of token windows from a
    :class:`~musicgen_lite.data.dataset.TokenDataset`: each clip's ``bpm`` from its caption
    side file, its beats from the clip's time 0 (our renderings start on a beat), the window
    from its ``start_frame``. A clip without a bpm gets no clock.

    ``key_columns`` (a key-conditioned LM): each clip's key after the beat's columns
    (:func:`~musicgen_lite.lm.key_features`, from its ``tonic`` and ``mode``); zeros with
    ``with_key=False``; ``keep_tonic``: one bool per row, False leaves that row's mode alone
    (training drops tonics so that a predicted mode without a tonic is a condition it knows)."""
    from .conditioning import _PITCH_CLASS, MODES
    from .lm import beat_clock, key_features

    clock = beat_clock([info.get("bpm") for info in infos], frame_rate,
                       [int(info.get("start_frame", 0)) for info in infos])
    if not key_columns:
        return clock
    keep = [True] * len(infos) if keep_tonic is None else list(keep_tonic)
    keys = [(_PITCH_CLASS.get(str(info.get("tonic"))) if k else None,
             info.get("mode") if info.get("mode") in MODES else None) for info, k in zip(infos, keep)]
    key = key_features(keys)
    return torch.cat([clock, key if with_key else torch.zeros_like(key)], dim=1)


def _cache_captions(tokens, field: str) -> tuple[list[str], list]:
    """The captions of a token cache's clips and each clip's ``field`` (None where missing), from their side files."""
    from .data.dataset import TokenDataset

    data = TokenDataset(tokens)
    texts, values = [], []
    for clip in data.clips:
        side = data.root / clip["info"] if clip.get("info") else None
        if side is not None and side.exists():
            info = json.loads(side.read_text())
            texts.append(info.get("description", ""))
            values.append(info.get(field))
    return texts, values


def fit_tempo_predictor(tokens):
    """A :class:`~musicgen_lite.conditioning.TempoPredictor` fitted on a token cache's captions and bpms."""
    from .conditioning import TempoPredictor

    return TempoPredictor.fit(*_cache_captions(tokens, "bpm"))


def fit_mode_predictor(tokens):
    """A :class:`~musicgen_lite.conditioning.ModePredictor` fitted on a token cache's captions and modes."""
    from .conditioning import ModePredictor

    return ModePredictor.fit(*_cache_captions(tokens, "mode"))


def _init_lm_from(task: "LMTask", source, cfg, conditioner, fingerprint: dict) -> None:
    """Copy the LM (and text conditioner) weights of a run folder or model folder into ``task``."""
    source = Path(source)
    if (source / "checkpoint" / "config.json").is_file():
        tensors, config, meta = load_checkpoint(source / "checkpoint")
        prefix = "model.task."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        codec_fp, cond_name = (meta.get("token_fingerprint") or {}).get("codec"), meta.get("conditioner")
    elif (source / "config.json").is_file() and (musicgen_codec_dir(source) / "config.json").is_file():
        from .data.dataset import codec_fingerprint
        from .hub import load_codec

        tensors, outer, meta = load_checkpoint(source)
        config, state = outer.get("lm", {}), dict(tensors)
        codec_fp = codec_fingerprint(load_codec(musicgen_codec_dir(source)))
        cond_name = (outer.get("conditioner") or {}).get("name")
    else:
        raise FileNotFoundError(f"init_from={source}: neither an LM run folder (checkpoint/) nor a model folder")
    if codec_fp is not None and codec_fp != fingerprint.get("codec"):
        raise ValueError(f"init_from={source}: trained on another codec's tokens than this run's")
    mismatch = {k: (config.get(k), v) for k, v in cfg.to_dict().items() if k in config and config[k] != v}
    for added in ("beat_clock", "key_condition"):  # a clock or key added by this run: the source's LM carries over
        if getattr(cfg, added) and not config.get(added):
            mismatch.pop(added, None)
    # a melody LM (prepend) from a text LM (cross-attention): everything but the cross-attention carries over
    cross_to_prepend = (cfg.condition_mode == "prepend" and config.get("condition_mode", "cross") == "cross")
    if cross_to_prepend:
        mismatch = {k: v for k, v in mismatch.items()
                    if k not in ("condition_mode", "cross_attention", "melody_mode", "melody_rows", "melody_ratio")}
    if mismatch:
        raise ValueError(f"init_from={source}: the LM differs: {mismatch}")
    same_text = (cond_name or None) == (conditioner or None)
    if not same_text and (cond_name is None or conditioner is None):
        raise ValueError(f"init_from={source}: text conditioner {cond_name!r}, this run {conditioner!r}")
    lm_state = {k[3:]: v.float() for k, v in state.items() if k.startswith("lm.")}
    if cross_to_prepend:
        own = task.lm.state_dict()
        lm_state = {k: v for k, v in lm_state.items() if k in own}  # drops the cross-attention weights
        missing = sorted(set(own) - set(lm_state) - {"beat.weight", "key.weight"})
        if missing:
            raise ValueError(f"init_from={source}: the text LM lacks {missing[:4]}")
    for added in ("beat", "key"):  # a clock or key added by this run starts at zero: the same LM
        if getattr(task.lm, added) is not None and f"{added}.weight" not in lm_state:
            lm_state[f"{added}.weight"] = torch.zeros_like(getattr(task.lm, added).weight)
    task.lm.load_state_dict(lm_state)
    if task.conditioner is not None and same_text:  # another text encoder starts fresh; the LM carries over
        own = task.conditioner.state_dict()
        given = {k[len("conditioner."):]: v.float() for k, v in state.items() if k.startswith("conditioner.")}
        given = {k: v for k, v in given.items() if k in own}  # caption-fact rows this run lacks stay behind
        task.conditioner.load_state_dict({**own, **given})  # a frozen encoder's weights are not in model folders;
        # rows the source lacks (caption facts added by this run) start fresh
    if task.melody is not None:
        given = {k.split(".", 1)[1]: v.float() for k, v in state.items()
                 if k.startswith(("melody.", "melody_conditioner."))}
        if given:
            task.melody.load_state_dict({**task.melody.state_dict(), **given})


class _LMSampler:
    """Audio samples during LM training: the model as it is, decoded by ``codec``, to ``folder``."""

    def __init__(self, task: LMTask, codec, fingerprint: dict, opts: dict, captions_from, folder, seed: int):
        from .data.dataset import TokenDataset, codec_fingerprint
        from .hub import load_codec

        self.codec = load_codec(codec) if isinstance(codec, (str, Path)) else codec
        if codec_fingerprint(self.codec) != fingerprint.get("codec"):
            raise ValueError(f"sample_codec={codec}: not the codec that made the training tokens "
                             "(its fingerprint differs); pass that codec, or a decoder-only fine-tune of it")
        texts = opts.get("sample_texts")
        if texts is None:
            data = TokenDataset(captions_from)
            texts = [data[i][1].get("description", "") for i in range(min(2, len(data)))]
        self.task, self.texts, self.folder, self.seed = task, list(texts), Path(folder), seed
        self.seconds = float(opts.get("sample_seconds", 5.0))

    def __call__(self, step: int) -> list[str]:
        from .audio import save_audio
        from .generation import MusicGen

        device = next(self.task.parameters()).device
        model = MusicGen(self.codec.to(device), self.task.lm, self.task.conditioner, self.task.pattern,
                         melody_conditioner=self.task.melody)
        was_training = self.task.training
        self.task.eval()
        with torch.no_grad():
            wav = model.generate(self.texts, duration=self.seconds, seed=self.seed * 1_000_003 + step,
                                 progress=False).float().cpu()
        self.task.train(was_training)
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, w in enumerate(wav):
            path = self.folder / f"step_{step:06d}_{i}.wav"
            save_audio(path, w, self.codec.sample_rate)
            paths.append(str(path.relative_to(self.folder.parent)))
        (self.folder / "captions.json").write_text(json.dumps(self.texts, indent=1))
        return paths


def _dist() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group when launched by torchrun."""
    import os

    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_lm(out_dir, tokens, scale: str = "lite", lm="lite", conditioner: str | None = "learned", steps: int = 1000,
             resume: bool = True, seed: int = 0, device: str | None = None, progress: bool = True,
             max_seconds: float | None = None, pattern: str = "delay", melody: bool = False,
             stop_after: int | None = None, eval_tokens=None, sample_codec=None, init_from=None,
             **options) -> dict:
    """Train a text-conditioned :class:`~musicgen_lite.lm.MusicLM` on a token cache; resumable.

    Args:
        out_dir: run folder: ``checkpoint/`` (latest state), ``log.jsonl``.
        tokens: a token cache folder (:func:`musicgen_lite.data.dataset.build_token_cache`).
        scale: recipe preset (``tiny`` | ``lite`` | ``full``, see :func:`lm_train_options`).
        lm: an LM preset name (``tiny`` | ``lite`` | ``small`` ...) or an ``LMConfig``; the
            number of codebooks and bins come from the token cache.
        conditioner: ``"learned"`` | ``"minilm"`` | ``"t5"`` | None (unconditional).
        melody: train MusicGen-melody: the LM in ``condition_mode="prepend"`` reads
            ``[chroma | text | tokens]``, the chroma (a
            :class:`~musicgen_lite.conditioning.MelodyConditioner` prefix of ``Lc`` frames, the
            segment's length in chroma frames) from the token cache, which must hold it
            (``build_token_cache(..., chroma=True)``, or a dataset with melody stems). Its recipe
            adds :data:`MELODY_TRAIN_OPTIONS`: ``cond_dropout`` 0.2 (drops text and melody
            together, as the null rows of guidance) and ``melody_dropout`` 0.5 (the null melody
            alone), both drawn per batch from ``(seed, step)``. Option ``melody_mode``:
            ``"prefix"`` (MusicGen-melody's, and transformers': the chroma rows are prefix rows)
            or ``"add"`` (frame-aligned: each token step gets the chroma row of its frame added,
            :func:`~musicgen_lite.lm.melody_index`; learns to read the melody far sooner, not
            portable to transformers).
        stop_after: checkpoint and stop once this step is done, as an interrupted run would,
            while the schedule still plans ``steps`` (a later call resumes to ``steps``).
        init_from: start a new run from trained weights: an LM run folder (its ``checkpoint/``) or
            an exported model folder (:func:`export_musicgen`). The LM and text conditioner weights
            are copied (the LM sizes, conditioner, pattern and codec must match); the optimizer,
            the step and the schedule start afresh. With another text conditioner (``learned`` ->
            ``minilm``) the LM carries over and the new conditioner starts fresh. A melody run may start from a text model:
            all but its cross-attention carries over (the melody LM reads the text as a prefix),
            and the melody projection starts fresh. Ignored when ``out_dir`` already has a
            checkpoint (that run resumes).
        eval_tokens: a held-out token cache: every ``eval_every`` steps (default: each checkpoint)
            the log row also gets ``val_loss`` / ``val_per_codebook`` (:func:`validation_loss` on
            its first ``eval_items`` windows; ``val_loss_ema`` too with EMA weights) and, with a text
            conditioner, ``val_text_gain``: the loss under the null condition minus ``val_loss``,
            nats per token (near 0: the model ignores its caption). A caption holds a few dozen
            nats in all, so as the LM learns to infer it from the music this falls towards
            (caption nats / tokens per window); early in a run that reads its text it is large.
            A melody run also logs ``val_melody_gain``: the loss with the null melody (the text
            kept) minus ``val_loss``, what the melody alone is worth.
        sample_codec: a codec (or its folder) that decodes the run's tokens: every
            ``sample_every`` steps (default: every 4th checkpoint) the model generates
            ``sample_seconds`` of audio for ``sample_texts`` (default: the first two captions of
            the held-out cache, else of the training data), written to
            ``samples/step_NNNNNN_i.wav`` (top-k 250, guidance 3, seeded by the step).
        **options: override the recipe (``batch_size`` is the *global* batch, split over
            processes under torchrun; ``grad_accum`` micro-batches per process and step).

    Under ``torchrun --nproc-per-node N`` the same call trains with DDP, or with FSDP2 (sharded
    weights, gradients and optimizer states) at the ``full`` scale or with ``fsdp=True``;
    checkpoints hold full tensors either way, so a run can resume on another number of
    processes. Every step draws one
    global batch from ``(seed, step)`` and each rank takes its slice, so the trajectory
    matches one process with the same global batch.
    """
    from dataclasses import replace

    from .conditioning import MelodyConditioner, get_conditioner
    from .data.dataset import TokenDataset, caption_for_training
    from .hub import melody_spec
    from .lm import CLOCK_PATTERNS, MusicLM, lm_config

    rank, world = _dist()
    opts = lm_train_options(scale)
    if melody:
        opts.update(MELODY_TRAIN_OPTIONS)
    opts.update(options)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    segment_frames = max(1, round(opts["segment_seconds"] * TokenDataset(tokens).fingerprint["frame_rate"]))
    data = TokenDataset(tokens, random_segments=True, seed=seed, segment_frames=segment_frames, chroma=melody)
    fp = data.fingerprint
    cfg = lm_config(lm) if isinstance(lm, str) else lm
    cfg = replace(cfg, num_codebooks=fp["num_codebooks"], bins=fp["cardinality"],
                  cross_attention=conditioner is not None, **({"condition_mode": "prepend"} if melody else {}))
    if opts["melody_mode"] not in ("prefix", "add"):
        raise ValueError(f"melody_mode must be 'prefix' or 'add', got {opts['melody_mode']!r}")
    if opts["melody_mode"] == "add" and not melody:
        raise ValueError("melody_mode='add' reads a melody: train with melody=True (--melody)")
    if melody and opts["melody_mode"] == "add":  # chroma row i added to the token frames it covers
        cfg = replace(cfg, melody_mode="add", melody_rows=data.chroma_frames(segment_frames),
                      melody_ratio=fp["frame_rate"] / data.chroma_settings["frame_rate"])
    tempo = None
    if opts["beat_clock"]:  # each clip's bpm as a per-step beat clock; captions without one get a predicted bpm
        if getattr(pattern, "name", pattern) not in CLOCK_PATTERNS:
            raise ValueError(f"beat_clock needs a pattern with one step per frame ({', '.join(CLOCK_PATTERNS)}), "
                             f"got {pattern!r}")
        cfg = replace(cfg, beat_clock=True)
        tempo = fit_tempo_predictor(tokens)
    mode_predictor = None
    if opts["key_condition"]:  # each clip's key added to every step (tonic dropped with key_tonic_dropout)
        if not opts["beat_clock"]:
            raise ValueError("key_condition rides on the beat clock: train with beat_clock=True too")
        cfg = replace(cfg, key_condition=True)
        mode_predictor = fit_mode_predictor(tokens)
    torch.manual_seed(seed)
    cond_kwargs = {"caption_facts": True} if opts["caption_facts"] else {}
    if cond_kwargs and not conditioner:
        raise ValueError("caption_facts=True adds rows to a text condition: choose a conditioner")
    lm_module, text = MusicLM(cfg), get_conditioner(conditioner, cfg.dim, **cond_kwargs) if conditioner else None
    melody_cond = None
    if melody:  # the prefix: one row per chroma frame of a training segment, as generation will give it
        settings = data.chroma_settings  # the cache's chroma: generation must compute the same
        melody_cond = MelodyConditioner(fp["sample_rate"], cfg.dim, length=data.chroma_frames(segment_frames),
                                        n_chroma=settings["n_chroma"], radix2_exp=settings["radix2_exp"], argmax=True)
    task = LMTask(lm_module, text, pattern, melody=melody_cond).to(device)
    eval_every = opts.get("eval_every") or opts["checkpoint_every"]
    sample_every = opts.get("sample_every") or 4 * opts["checkpoint_every"]
    if eval_tokens is not None:
        if TokenDataset(eval_tokens).fingerprint.get("codec") != fp.get("codec"):
            raise ValueError(f"eval_tokens={eval_tokens}: made with another codec than the training tokens {tokens}")
    use_fsdp = world > 1 and (opts["fsdp"] if opts["fsdp"] is not None else scale == "full")
    if use_fsdp:
        _shard(task, opts)
    ema = None
    if opts["ema_decay"]:
        import copy

        ema = copy.deepcopy(task).eval().requires_grad_(False)
    holder = torch.nn.ModuleDict({"task": task, **({"ema": ema} if ema is not None else {})})
    params = [p for p in task.parameters() if p.requires_grad]
    # key_lr_scale: the key condition's map learns at its own multiple of the schedule's lr. A new input
    # on a trained LM gets a weak gradient (a window's first frames already tell the rest its key): at
    # the LM's lr it barely grew in session 16's run (norm 0.1). At 10-30x (session 18, on a GPU) it grew
    # to 0.4-1.0, and still the LM did not choose tokens by mode (data/results/gpu_session18.json).
    own = {id(p) for p in task.lm.key.parameters()} if task.lm.key is not None and opts["key_lr_scale"] != 1 else set()
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in own], "weight_decay": opts["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2 and id(p) not in own], "weight_decay": 0.0}]
    if own:
        groups.append({"params": [p for p in params if id(p) in own], "weight_decay": 0.0,
                       "lr_scale": float(opts["key_lr_scale"])})
    optimizer = torch.optim.AdamW(groups, lr=opts["lr"], betas=tuple(opts["betas"]))
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    start, history = 0, []
    if init_from is not None and not (resume and (ckpt / "config.json").is_file()):
        _init_lm_from(task, init_from, cfg, conditioner, fp)
    if resume and (ckpt / "config.json").is_file():
        if use_fsdp:
            extra = _load_fsdp_state(ckpt, holder, optimizer, device)
        else:
            extra = load_training_state(ckpt, holder, optimizer, device=device)
        start, history = int(extra["step"]), list(extra.get("losses", []))
    model = task
    if world > 1 and not use_fsdp:
        model = torch.nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
    global_batch = opts["batch_size"]
    if global_batch % world:
        raise ValueError(f"batch_size={global_batch} must be divisible by the {world} processes")
    local = global_batch // world
    accum = opts["grad_accum"]
    if local % accum:
        raise ValueError(f"the per-process batch {local} must be divisible by grad_accum={accum}")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts["amp"])
    use_amp = amp is not None and (device.type == "cuda" or (device.type == "cpu" and opts["cpu_amp"]
                                                             and amp == torch.bfloat16 and _cpu_has_native_bf16()))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp == torch.float16)
    log_path = out_dir / "log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        trim_log(log_path, start)
    sampler = None
    if sample_codec is not None and rank == 0:
        if use_fsdp:
            warnings.warn("sample_codec is ignored under FSDP (generation needs the whole model on one rank)")
        else:
            sampler = _LMSampler(task, sample_codec, fp, opts, eval_tokens if eval_tokens is not None else tokens,
                                 out_dir / "samples", seed)
    from tqdm.auto import tqdm

    t0, rows, losses = time.perf_counter(), [], []
    end = steps if stop_after is None else min(steps, max(start, stop_after))  # a run already past stop_after: none
    bar = tqdm(range(start, end), initial=start, total=steps, disable=not progress or rank != 0, desc="lm")
    step = start
    for step in bar:
        lr = lr_at(step, opts["lr"], opts["warmup"], steps, opts["schedule"])
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # The whole global batch and the guidance dropout come from (seed, step): resumable, rank-agnostic.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(data), (global_batch,), generator=gen)[rank * local:(rank + 1) * local]
        drop = bool(torch.rand((), generator=gen) < opts["cond_dropout"]) and (conditioner is not None or melody)
        drop_melody = melody and bool(torch.rand((), generator=gen) < opts["melody_dropout"])
        data.set_epoch(step)
        torch.manual_seed(seed + step)  # dropout inside the model, if any
        items = [data[int(i)] for i in idx]
        codes = torch.stack([c for c, _ in items]).to(device)  # (b, K, T)
        # key / bpm added to captions: a stream of its own per item of the global batch (p = 0 draws nothing)
        texts = [caption_for_training(info, opts["caption_metadata_p"], f"captions:{seed}:{step}:{rank * local + j}")
                 for j, (_, info) in enumerate(items)]
        chroma = torch.stack([info["chroma"] for _, info in items]).to(device) if melody else None  # (b, Lc, C)
        keep_tonic = None
        if cfg.key_condition:  # a stream of its own per item of the global batch, as the captions'
            keep_tonic = [random.Random(f"tonic:{seed}:{step}:{rank * local + j}").random() >= opts["key_tonic_dropout"]
                          for j in range(len(items))]
        clock = window_clock([info for _, info in items], fp["frame_rate"], key_columns=cfg.key_condition,
                             keep_tonic=keep_tonic).to(device) if tempo is not None else None
        optimizer.zero_grad(set_to_none=True)
        total, per_cb = 0.0, torch.zeros(cfg.num_codebooks)
        micro = local // accum
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            sync = m == accum - 1 or world == 1
            if use_fsdp:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
                task.set_requires_gradient_sync(sync)
            ctx = model.no_sync() if (world > 1 and not sync and not use_fsdp) else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=use_amp):
                melody_args = (chroma[sl], drop_melody) if melody else ()
                clock_kw = {"clock": clock[sl]} if clock is not None else {}
                loss, per_codebook = model(codes[sl], texts[sl], drop, *melody_args, **clock_kw)
                scaler.scale(loss / accum).backward()
            total += float(loss.detach()) / accum
            per_cb += per_codebook.detach().float().cpu() / accum
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts["grad_clip"] or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), task.parameters()):
                    pe.lerp_(p.detach(), 1 - opts["ema_decay"])
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([total], device=device)
            dist.all_reduce(t)
            total = float(t) / world
        losses.append(total)
        history.append(round(total, 6))
        done = step + 1
        extra_row = {}
        if eval_tokens is not None and (done % eval_every == 0 or done == steps):
            # every rank runs it (FSDP gathers weights collectively); the windows are the same on each
            val = validation_loss(task, eval_tokens, opts["segment_seconds"], max_items=opts.get("eval_items", 64))
            extra_row.update(val_loss=round(val["loss"], 5), val_per_codebook=val["per_codebook"])
            if task.conditioner is not None:  # how much the conditions are read: the loss without, minus with
                # (the null condition drops the text, and in a melody run the melody with it)
                null = validation_loss(task, eval_tokens, opts["segment_seconds"], max_items=opts.get("eval_items", 64),
                                       captions="null")
                extra_row["val_text_gain"] = round(null["loss"] - val["loss"], 5)
            if melody:  # the melody alone: the loss with the null melody (text kept) minus val_loss
                no_melody = validation_loss(task, eval_tokens, opts["segment_seconds"],
                                            max_items=opts.get("eval_items", 64), melody="null")
                extra_row["val_melody_gain"] = round(no_melody["loss"] - val["loss"], 5)
            if tempo is not None:  # the clock alone: the loss without it (the text kept) minus val_loss
                no_clock = validation_loss(task, eval_tokens, opts["segment_seconds"],
                                           max_items=opts.get("eval_items", 64), clock=False)
                extra_row["val_clock_gain"] = round(no_clock["loss"] - val["loss"], 5)
            if cfg.key_condition:  # the key alone: the loss without it (text and beat kept) minus val_loss
                no_key = validation_loss(task, eval_tokens, opts["segment_seconds"],
                                         max_items=opts.get("eval_items", 64), key=False)
                extra_row["val_key_gain"] = round(no_key["loss"] - val["loss"], 5)
            if ema is not None:
                extra_row["val_loss_ema"] = round(validation_loss(ema, eval_tokens, opts["segment_seconds"],
                                                                  max_items=opts.get("eval_items", 64))["loss"], 5)
        if sampler is not None and (done % sample_every == 0 or done == steps):
            extra_row["samples"] = sampler(done)
        if rank == 0 and (done % opts["log_every"] == 0 or done == steps or extra_row):
            elapsed = time.perf_counter() - t0
            row = {"step": done, "lr": lr, "loss": total, "per_codebook": [round(float(v), 4) for v in per_cb],
                   "grad_norm": grad_norm, "cond_dropped": drop, **({"melody_dropped": drop_melody} if melody else {}),
                   "tokens_per_s": round(len(losses) * global_batch * codes.shape[1] * codes.shape[2] / max(elapsed, 1e-9)),
                   "seconds": round(elapsed, 1), **extra_row}
            rows.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{total:.3f}")
        out_of_time = (max_seconds is not None and time.perf_counter() - t0 > max_seconds) or done == stop_after
        if done % opts["checkpoint_every"] == 0 or done == steps or out_of_time:
            state = _fsdp_state(holder, optimizer) if use_fsdp else (holder, optimizer)  # FSDP: every rank gathers
            if rank == 0:
                save_training_state(ckpt, *state, done, cfg.to_dict(),
                                    {"losses": history, "options": opts, "conditioner": conditioner,
                                     "conditioner_kwargs": cond_kwargs, "pattern": pattern,
                                     "tokens": str(tokens), "token_fingerprint": fp,
                                     "melody": melody_spec(melody_cond) if melody_cond is not None else None,
                                     "tempo": tempo.to_dict() if tempo is not None else None,
                                     "mode_predictor": mode_predictor.to_dict() if mode_predictor else None})
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
        if out_of_time:
            break
    bar.close()
    return {"step": step + 1 if losses else start, "losses": losses, "log": rows, "checkpoint": ckpt,
            "model": task.eval(), "ema": ema}

