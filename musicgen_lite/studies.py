"""Ahead-of-time LM studies: one thing changed at a time, the same data and token budget.

Three studies, each a list of variants trained by :func:`~musicgen_lite.training.train_lm` on
the same token cache with the same recipe, steps, batch and segment (so every variant sees the
same tokens), then measured the same way:

- ``patterns``: the codebook interleaving (``flatten``, ``delay``, ``parallel``,
  ``coarse_first``, ``partial_delay``), as the paper's Table 3 (notebook 08);
- ``scaling``: three LM sizes around the lite preset (notebook 07);
- ``text_encoders``: the learned encoder, all-MiniLM-L6-v2 and T5 (T5 only where the model hub
  can be reached; offline it is recorded as skipped) (notebook 05).

Each finished variant adds one row to a JSON table (written atomically after every row):
validation loss on a held-out token cache (per codebook too), then the model exported with
its codec and scored by :func:`musicgen_lite.evaluation.evaluate` on held-out captions (FAD,
KL, CLAP, attribute accuracy), plus the wall time to generate 10 s and, for patterns, the
decoding steps for 10 s and 30 s. Runs are resumable: a call trains until its time budget,
checkpoints, and the next call continues; finished rows are never recomputed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

STUDIES = ("patterns", "scaling", "text_encoders")
PATTERN_STUDY = ("flatten", "delay", "parallel", "coarse_first", "partial_delay")
# around the lite preset (256 x 6 layers): half and 1.5x the width, fewer and more layers
SCALING_SIZES = {
    "lite": {"S": dict(dim=128, num_layers=4, num_heads=4, ffn_dim=512),
             "M": dict(dim=256, num_layers=6, num_heads=8, ffn_dim=1024),
             "L": dict(dim=384, num_layers=8, num_heads=8, ffn_dim=1536)},
    "tiny": {"S": dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32),
             "M": dict(dim=32, num_layers=2, num_heads=4, ffn_dim=64),
             "L": dict(dim=48, num_layers=3, num_heads=4, ffn_dim=96)},
}


def study_variants(study: str, scale: str = "lite") -> list[dict]:
    """The variants of ``study``: dicts with ``name`` and the :func:`train_lm` arguments they set."""
    if study == "patterns":
        return [{"name": p, "pattern": p} for p in PATTERN_STUDY]
    if study == "scaling":
        return [{"name": name, "lm": study_lm(name, scale)} for name in SCALING_SIZES["tiny" if scale == "tiny" else "lite"]]
    if study == "text_encoders":
        return [{"name": "learned", "conditioner": "learned"}, {"name": "minilm", "conditioner": "minilm"},
                {"name": "t5", "conditioner": "t5"}]
    raise ValueError(f"unknown study {study!r}: choose one of {', '.join(STUDIES)}")


def study_lm(lm, scale: str = "lite"):
    """The LM for a study's variants: None (the scale's preset), a preset name, ``"S"`` | ``"M"`` | ``"L"``
    (the scaling study's sizes at this scale) or an ``LMConfig`` (returned as is)."""
    from .lm import LM_PRESETS, lm_config

    base = "tiny" if scale == "tiny" else "lite"
    if lm is None:
        return base
    if not isinstance(lm, str):
        return lm
    sizes = SCALING_SIZES[base]
    if lm in sizes:
        return lm_config(base, **sizes[lm])
    if lm in LM_PRESETS:
        return lm
    raise ValueError(f"lm={lm!r}: choose a preset ({', '.join(LM_PRESETS)}) or a size ({', '.join(sizes)})")


def _write_atomic(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)


def _frame_rate(tokens) -> float:
    from .data.dataset import TokenDataset

    return float(TokenDataset(tokens).fingerprint["frame_rate"])


def run_study(study: str, tokens, heldout_tokens, codec, out_json, runs_dir, steps: int, scale: str = "lite",
              n_eval: int = 100, eval_duration: float = 6.0, max_minutes: float | None = None, seed: int = 0,
              variants: list[str] | None = None, eval_captions=None, eval_kw: dict | None = None,
              progress: bool = True, command: str = "", lm=None, **train_options) -> dict:
    """Train and measure every variant of ``study`` that ``out_json`` does not hold yet.

    Args:
        tokens / heldout_tokens: token caches (training / validation) made by the same ``codec``.
        codec: the codec checkpoint folder the tokens came from (for export and listening).
        out_json: the table; rows already there are kept and skipped.
        runs_dir: where each variant trains (``runs_dir/study/name``), resumable.
        steps: the budget of every variant (with the recipe's batch and segment: equal tokens).
        max_minutes: stop (checkpointed) once this much time has passed; call again to go on.
        variants: only these names (default: all of the study).
        eval_captions: a caption folder for :func:`~musicgen_lite.evaluation.evaluate` (default:
            its synthetic held-out set). ``eval_kw``: more :func:`evaluate` arguments (``tagger``,
            ``clap``, ``batch_size``, sampling options).
        lm: the LM of every variant where the study does not set it (patterns, text_encoders):
            a preset name, a size of the scaling study (``"S"`` | ``"M"`` | ``"L"``) or an
            ``LMConfig``; default the scale's preset. A smaller LM makes a study affordable on a CPU.
        **train_options: recipe overrides for every variant (``batch_size``, ``segment_seconds`` ...).

    Returns the table: ``study``, ``setup``, ``rows`` (one per finished variant), ``skipped``,
    ``pending`` (names not finished when time ran out).
    """
    from .evaluation import evaluate
    from .generation import MusicGen
    from .training import export_musicgen, lm_train_options, log_wall_seconds, validation_loss

    out_json, runs_dir = Path(out_json), Path(runs_dir)
    study_lm(lm, scale)  # an unknown name fails before anything trains
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    all_variants = study_variants(study, scale)
    if variants is not None:
        unknown = set(variants) - {v["name"] for v in all_variants}
        if unknown:
            raise ValueError(f"unknown {study} variants {sorted(unknown)}: choose from "
                             f"{[v['name'] for v in all_variants]}")
        all_variants = [v for v in all_variants if v["name"] in variants]
    recipe = {**lm_train_options(scale), **train_options}
    table = json.loads(out_json.read_text()) if out_json.is_file() else {}
    table.update({"study": study, "setup": {
        "scale": scale, "steps": steps, "batch_size": recipe["batch_size"], "segment_seconds": recipe["segment_seconds"],
        "tokens_seen": steps * recipe["batch_size"] * round(recipe["segment_seconds"] * _frame_rate(tokens)),
        "tokens": str(tokens), "heldout_tokens": str(heldout_tokens), "codec": str(codec), "seed": seed,
        "eval": {"n": n_eval, "duration": eval_duration}, "command": table.get("setup", {}).get("command") or command,  # the call that made the rows
        "lm": lm if lm is None or isinstance(lm, str) else lm.to_dict(),
    }})
    table.setdefault("rows", [])
    table.setdefault("skipped", {})
    done = {r["name"] for r in table["rows"]}
    t0 = time.perf_counter()
    pending = []
    for variant in all_variants:
        name = variant["name"]
        if name in done or name in table["skipped"]:
            continue
        left = None if max_minutes is None else max_minutes * 60 - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            pending.append(name)
            continue
        run_dir = runs_dir / study / name
        try:
            run = _train_variant(variant, run_dir, tokens, scale, steps, seed, lm, left, progress, train_options)
        except Exception as exc:  # T5 offline: record and go on with the others
            from .hub import HubUnreachableError

            if isinstance(exc, (HubUnreachableError, OSError)) and variant.get("conditioner") == "t5":
                table["skipped"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                _write_atomic(out_json, table)
                continue
            raise
        if run["step"] < steps:
            pending.append(name)
            break
        task = run["model"]
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        val = validation_loss(task, heldout_tokens, recipe["segment_seconds"])
        model_dir = export_musicgen(run_dir, codec, run_dir / "model", dtype=None)
        model = MusicGen.load(model_dir)
        t1 = time.perf_counter()
        model.generate(["a calm piano piece"], duration=10.0, seed=seed, progress=False)
        gen_seconds = time.perf_counter() - t1
        ev = evaluate(model, captions=eval_captions, n=n_eval, duration=eval_duration, seed=seed, progress=progress,
                      **(eval_kw or {}))
        frames_10, frames_30 = round(10 * model.frame_rate), round(30 * model.frame_rate)
        pattern = model.pattern
        row = {
            "name": name, "params_m": sum(p.numel() for p in task.parameters() if p.requires_grad) / 1e6,
            "lm_params_m": sum(p.numel() for p in task.lm.parameters()) / 1e6,
            "val_loss": val["loss"], "val_per_codebook": val["per_codebook"],
            "train_loss_last": sum(r["loss"] for r in log[-4:]) / max(1, len(log[-4:])),
            "train_seconds": log_wall_seconds(log),
            "steps_10s": pattern.num_steps(frames_10), "steps_30s": pattern.num_steps(frames_30),
            "gen_seconds_10s": gen_seconds,
            "fad": ev["fad"]["value"], "kl": ev["kl"]["kl_ref_gen"], "kl_gen_ref": ev["kl"]["kl_gen_ref"],
            "clap": ev["clap"]["value"],
            "attribute_accuracy": (ev["attribute_accuracy"] or {}).get("mean"),
            "attribute_per": (ev["attribute_accuracy"] or {}).get("per_attribute"),
            "caption_gain": (ev.get("caption_gain") or {}).get("gain_null"),  # nats per clip the caption saves
        }
        row[{"patterns": "pattern", "scaling": "size", "text_encoders": "encoder"}[study]] = name
        table["rows"].append(row)
        table["reference"] = ev["reference"]
        _write_atomic(out_json, table)
    table["pending"] = pending
    _write_atomic(out_json, table)
    return table


def _train_variant(variant: dict, run_dir: Path, tokens, scale: str, steps: int, seed: int, lm, max_seconds,
                   progress: bool, train_options: dict) -> dict:
    """Train one variant as every study does (resumes ``run_dir``): :func:`train_lm`'s result."""
    from .lm import LMConfig
    from .training import train_lm

    kwargs = {k: v for k, v in variant.items() if k != "name"}
    kwargs.setdefault("lm", study_lm(LMConfig(**lm) if isinstance(lm, dict) else lm, scale))
    return train_lm(run_dir, tokens, scale=scale, steps=steps, seed=seed, progress=progress,
                    max_seconds=max_seconds, **kwargs, **train_options)


def format_study(table: dict) -> str:
    """The table as aligned text, one row per variant."""
    cols = ["params_m", "val_loss", "fad", "kl", "clap", "attribute_accuracy", "caption_gain", "steps_10s",
            "gen_seconds_10s"]
    lines = [f"{table.get('study', '')}: {table.get('setup', {}).get('steps')} steps each",
             f"{'variant':14s} " + " ".join(f"{c:>12s}" for c in cols)]
    for r in table.get("rows", []):
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:12.3f}" if isinstance(v, float) else f"{str(v):>12s}")
        lines.append(f"{r['name']:14s} " + " ".join(cells))
    for name, why in table.get("skipped", {}).items():
        lines.append(f"{name:14s} skipped: {why[:80]}")
    if table.get("pending"):
        lines.append(f"not finished yet: {', '.join(table['pending'])} (run again to continue)")
    return "\n".join(lines)


def ship_study(table_json, runs_dir, out_dir, codec, heldout_tokens, agreement_captions: int = 4,
               agreement_seconds: float = 4.0, max_seconds: float | None = None, progress: bool = True) -> dict:
    """Pack every finished variant of a study for shipping, and measure what packing costs.

    Each row's trained model (``runs_dir/study/name/model``, written by :func:`run_study`) is
    checked to be the model the table scored (its validation loss recomputed, within 1e-3 nats)
    and saved to ``out_dir/name`` with its large matrices in int8 and one scale per row
    (:func:`musicgen_lite.hub.pack_int8`: a quarter of the fp32 bytes) and its codec referenced
    (``codec``, a folder holding the same weights) rather than copied; it loads with
    :meth:`MusicGen.load` like any other. A model no longer in ``runs_dir`` is trained again with
    the table's recipe and seed (resumable; ``max_seconds`` bounds that training).

    What packing costs is measured on each model, not assumed: the validation loss on
    ``heldout_tokens`` (the study's windows) of the trained fp32 model and of the stored one, and
    the share of greedy tokens on which they agree (:func:`musicgen_lite.int8.token_agreement` on
    the first ``agreement_captions`` captions of ``heldout_tokens``, ``agreement_seconds`` each).
    Writes ``out_dir/packing.json`` (returned: ``{"study", "setup", "codec", "agreement", "rows":
    [{"name", "val_loss_fp32", "val_loss_stored", "token_agreement", "bytes", "fp32_bytes"}]}``)
    and the card ``out_dir/README.md`` (:func:`study_models_card`).
    """
    import os

    from .data.dataset import TokenDataset
    from .generation import MusicGen
    from .hub import CONFIG_NAME, WEIGHTS_NAME, _atomic_write, save_musicgen
    from .int8 import token_agreement
    from .training import LMTask, export_musicgen, validation_loss

    table = json.loads(Path(table_json).read_text())
    study, segment = table["study"], table["setup"]["segment_seconds"]
    runs_dir, out_dir, codec = Path(runs_dir), Path(out_dir), Path(codec)
    held = TokenDataset(heldout_tokens)
    captions = [held[i][1].get("description", "") for i in range(min(agreement_captions, len(held)))]
    rows, t0 = [], time.perf_counter()
    for row in table["rows"]:
        name = row["name"]
        source = runs_dir / study / name / "model"
        if not (source / CONFIG_NAME).is_file():  # trained again, exactly as the study did (resumable)
            setup = table["setup"]
            variant = next(v for v in study_variants(study, setup["scale"]) if v["name"] == name)
            options = {"batch_size": setup["batch_size"], "segment_seconds": setup["segment_seconds"]}
            left = None if max_seconds is None else max_seconds - (time.perf_counter() - t0)
            run = _train_variant(variant, runs_dir / study / name, Path(setup["tokens"]), setup["scale"],
                                 setup["steps"], setup["seed"], setup.get("lm"), left, progress, options)
            if run["step"] < setup["steps"]:
                raise TimeoutError(f"{name}: trained to step {run['step']} of {setup['steps']} in the time given; "
                                   "call again to go on")
            export_musicgen(runs_dir / study / name, codec, source, dtype=None)
        spec = json.loads((source / CONFIG_NAME).read_text())
        model = MusicGen.load(source)
        target = out_dir / name
        extra = {"study": study, "variant": name, "setup": table["setup"], "metrics": row,
                 "weights": "int8 per row (pack_int8), fp16 vectors; computed in fp32",
                 "trained": spec.get("extra", {})}
        save_musicgen(model, target, spec["config"]["conditioner"], extra, dtype="int8",
                      codec_path=os.path.relpath(codec, target))
        stored = MusicGen.load(target)
        losses = [validation_loss(LMTask(m.lm, m.conditioner, m.pattern), heldout_tokens, segment)["loss"]
                  for m in (model, stored)]
        if abs(losses[0] - row["val_loss"]) > 1e-3:
            raise ValueError(f"{source}: validation loss {losses[0]:.4f}, the table measured {row['val_loss']:.4f}: "
                             "not the model the table scored (other tokens, code or machine?)")
        agree = token_agreement(model, stored, captions, agreement_seconds)
        rows.append({"name": name, "val_loss_fp32": losses[0], "val_loss_stored": losses[1],
                     "token_agreement": agree, "bytes": (target / WEIGHTS_NAME).stat().st_size,
                     "fp32_bytes": sum(p.numel() * 4 for p in model.lm.parameters())
                     + sum(p.numel() * 4 for n, p in model.conditioner.named_parameters() if p.requires_grad)})
    report = {"study": study, "setup": table["setup"], "codec": str(codec),
              "agreement": {"captions": agreement_captions, "seconds": agreement_seconds}, "rows": rows}
    _write_atomic(out_dir / "packing.json", report)
    card = study_models_card(report, table)
    _atomic_write(out_dir / "README.md", lambda tmp: Path(tmp).write_text(card))
    return report


def study_models_card(report: dict, table: dict) -> str:
    """The model card of a study's shipped models (``README.md`` beside them): how they were
    trained, what they scored (the study's table) and what storing them cost (``report``)."""
    setup, study = table["setup"], table["study"]
    rows = {r["name"]: r for r in table["rows"]}
    lm = setup.get("lm")
    lm_text = lm if isinstance(lm, str) else f"{lm.get('dim')} x {lm.get('num_layers')} layers" if lm else "preset"
    lines = [
        f"# The {study} study's models (notebook 08)" if study == "patterns" else f"# The {study} study's models",
        "",
        f"One LM per variant of the {study} study (`data/results/{study}.json`), shipped so that the study's",
        "numbers can be heard and measured again. Load one like any model:",
        f"`MusicGen.load('data/checkpoints/{study}/{report['rows'][0]['name']}')`.",
        "",
        "## Training",
        "",
        f"- LM: `{lm_text}` (`--lm {lm}`), the same for every variant; only the {study[:-1] if study.endswith('s') else study} changes.",
        f"- Data: the token cache `{setup['tokens']}` (made by `{setup['codec']}`; see",
        "  `scripts/train_lite_models.sh`, steps 2-3, for how it is built), deterministic by seed.",
        f"- Budget: {setup['steps']:,} steps of {setup['batch_size']} x {setup['segment_seconds']:g} s, "
        f"{setup['tokens_seen']:,} tokens seen by each variant, seed {setup['seed']}.",
        f"- Command: `{setup['command']} --ship data/checkpoints/{study}`",
        "",
        f"## What they scored ({setup['eval']['n']} held-out captions, {setup['eval']['duration']:g} s each)",
        "",
        "| variant | validation loss | FAD | KL | CLAP | attribute accuracy | training s | generation s / 10 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        m = rows[r["name"]]
        lines.append(f"| {r['name']} | {m['val_loss']:.3f} | {m['fad']:.1f} | {m['kl']:.2f} | {m['clap']:.3f} | "
                     f"{m['attribute_accuracy']:.3f} | {m['train_seconds']:.0f} | {m['gen_seconds_10s']:.2f} |")
    agree = report["agreement"]
    lines += [
        "",
        "## Storage: int8 rows, the codec shared",
        "",
        "Every matrix of at least 4,096 weights (embeddings, projections, heads) is stored in int8",
        "with one fp32 scale per row (`musicgen_lite.hub.pack_int8`: each weight within half a step",
        "of its value), the rest in fp16; loading gives fp32 back and the model computes in fp32.",
        f"The codec is not copied: each `config.json` names `{setup['codec']}` (`codec_path`).",
        "What storing cost, measured on each model: the validation loss of the trained fp32 model",
        "and of the stored one (the study's held-out windows), and the share of greedy tokens on",
        f"which the two agree ({agree['captions']} held-out captions, {agree['seconds']:g} s each; one",
        "changed token changes the rest of an autoregressive sequence, so this is strict).",
        "",
        "| variant | validation loss, trained | stored | greedy tokens agree | MB stored | MB in fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['val_loss_fp32']:.3f} | {r['val_loss_stored']:.3f} | "
                     f"{r['token_agreement']:.0%} | {r['bytes'] / 1e6:.1f} | {r['fp32_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"
