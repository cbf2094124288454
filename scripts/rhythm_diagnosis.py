"""Why a text-to-music model misses the caption's bpm: does it make a steady beat at all?

Writes ``data/results/rhythm_diagnosis.json`` (or ``--out``) with, for each audio set, the mean
:func:`musicgen_lite.metrics.pulse_clarity`, the rank correlation of librosa's tempo with the
captions' bpm, and the bpm accuracy (within 10%, or half / double):

1. the 100 held-out captions (seed 999001, 6 s): the real clips, their reconstructions by the
   codec (4 codebooks), and each ``--model`` (default: the shipped default);
2. sampling settings, on other captions (seed 999002, so that no choice is made on the test set):
   top-k 250 (MusicGen's), top-k 50, temperature 0.8, guidance 5;
3. a beat to hold: the first 2 s of 40 real clips continued to 6 s (``generate_continuation``),
   against the same captions from text alone; the pulse of the last 4 s.

About 15 minutes on 2 CPU cores. ``python scripts/rhythm_diagnosis.py [--model NAME=FOLDER ...]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rhythm(wavs, infos) -> dict:
    from musicgen_lite.evaluation import _bpm_ok, _bpms, _rhythm_of

    est = _bpms(wavs)  # evaluate()'s own measures, per set
    row = {k: None if v is None else round(v, 4) for k, v in _rhythm_of(wavs, est, infos).items()}
    return {**row, "bpm_accuracy": round(sum(_bpm_ok(e, i["bpm"]) for e, i in zip(est, infos)) / len(infos), 4),
            "clips": len(infos)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=FOLDER (default: default=the shipped one)")
    ap.add_argument("--out", default=str(REPO / "data" / "results" / "rhythm_diagnosis.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from musicgen_lite.evaluation import EVAL_RATE, generate_all, heldout_set, load_clips
    from musicgen_lite.hub import default_model_path, load_codec, load_musicgen

    models = dict(m.split("=", 1) for m in args.model) or {"default": str(default_model_path())}
    out = {"what": __doc__.split("\n")[0], "command": "python scripts/rhythm_diagnosis.py "
           + " ".join(f"--model {m}" for m in args.model), "heldout": {}, "sampling": {}, "continuation": {}}

    def show(section, name, row):
        out[section][name] = row
        print(section, name, json.dumps(row), flush=True)

    real, infos = load_clips(heldout_set(100, 6.0, progress=False), 100, 6.0)
    captions = [i["description"] for i in infos]
    show("heldout", "real", rhythm(real, infos))
    codec = load_codec(REPO / "data" / "checkpoints" / "codec_lite")
    with torch.no_grad():
        rebuilt = torch.cat([codec.decode(codec.encode(real[i:i + 10]))[..., :real.shape[-1]].clamp(-1, 1)
                             for i in range(0, len(real), 10)])
    show("heldout", "codec", rhythm(rebuilt, infos))
    loaded = {name: load_musicgen(path) for name, path in models.items()}
    for name, model in loaded.items():
        show("heldout", name, rhythm(generate_all(model, captions, 6.0, seed=0, progress=False), infos))

    first = next(iter(loaded))
    model = loaded[first]
    val_real, val_infos = load_clips(heldout_set(100, 6.0, seed=999_002, progress=False), 100, 6.0)
    val_caps = [i["description"] for i in val_infos]
    show("sampling", "real", rhythm(val_real, val_infos))
    for name, kw in (("top_k 250", dict(top_k=250)), ("top_k 50", dict(top_k=50)),
                     ("temperature 0.8", dict(top_k=250, temperature=0.8)), ("guidance 5", dict(top_k=250, cfg_coef=5.0))):
        show("sampling", f"{first}, {name}", rhythm(generate_all(model, val_caps, 6.0, seed=0, progress=False, **kw),
                                                    val_infos))

    n, prompt = 40, 2 * EVAL_RATE
    assert model.sample_rate == EVAL_RATE
    cont, text = [], []
    for i in range(0, n, 8):
        with torch.no_grad():
            cont.append(model.generate_continuation(real[i:i + 8, :, :prompt], EVAL_RATE, descriptions=captions[i:i + 8],
                                                    duration=6.0, seed=i, progress=False)[..., :real.shape[-1]])
            text.append(model.generate(captions[i:i + 8], duration=6.0, seed=i, progress=False)[..., :real.shape[-1]])
    tail = lambda x: x[..., prompt:]  # noqa: E731
    show("continuation", "real, last 4 s", rhythm(tail(real[:n]), infos[:n]))
    show("continuation", f"{first}, continuing 2 s of the real clip, last 4 s", rhythm(tail(torch.cat(cont)), infos[:n]))
    show("continuation", f"{first}, from the caption alone, last 4 s", rhythm(tail(torch.cat(text)), infos[:n]))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
