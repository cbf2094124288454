"""Does a model play the mode it is told? Each model generates the 100 held-out captions of
``evaluate`` (seed 999001, 6 s) twice, with the same seeds: every caption stating its clip's
key ("..., in A minor"), and the same caption with major and minor swapped. A model that
follows the mode plays minor when told minor whatever else the caption says.

Scored by the evaluation tagger's mode head and by the key-finder of
:mod:`musicgen_lite.data.analysis` (librosa chroma against Temperley's key profiles, an
outside reference): the share of clips in the mode they were told, for each telling, and
the share whose mode moves when the telling does. A model that ignores the mode scores about
0.5 on the told and the swapped captions together.

``--continuation``: can the model hold a mode it hears? Each model continues the first 2 s of
each real clip to 6 s (its caption as written) and the last 4 s are scored against the clip's
mode, beside the real clip's own last 4 s. A model that cannot hold a mode from its context
cannot be expected to start one from a condition.

    python scripts/key_following_check.py data/checkpoints/musicgen_lite runs/other_model --out data/results/key_following.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from musicgen_lite.data.analysis import estimate_key
from musicgen_lite.data.dataset import caption_for_training
from musicgen_lite.evaluation import EVAL_RATE, generate_all, heldout_set, load_clips, mode_swapped, portable_path
from musicgen_lite.generation import MusicGen
from musicgen_lite.metrics import load_tagger

OTHER = {"major": "minor", "minor": "major"}


def heard_modes(wav: torch.Tensor, tagger) -> dict:
    """``wav[n, 1, N]`` at 16 kHz -> the mode each clip is heard in, by the tagger and by the key-finder."""
    probs = torch.cat([tagger.predict(w, EVAL_RATE)["mode"] for w in wav.split(16)])  # (n, 2): major, minor
    return {"tagger": ["major" if p[0] >= p[1] else "minor" for p in probs],
            "key_finder": [estimate_key(w[0].numpy(), EVAL_RATE)[1] for w in wav]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model folders")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--continuation", action="store_true", help="also: continue 2 s of each real clip to 6 s")
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder = heldout_set(args.n, 6.0, progress=False)
    real, infos = load_clips(folder, args.n, 6.0)
    told = [caption_for_training(info, 1.0, None) for info in infos]  # every caption states its key and bpm
    swapped = [mode_swapped(c) for c in told]
    modes = {"told": [i["mode"] for i in infos], "swapped": [OTHER[i["mode"]] for i in infos]}
    tagger = load_tagger()
    result = {"what": __doc__.strip().splitlines()[0], "clips": portable_path(folder), "n": len(infos),
              "seed": args.seed, "example": [told[0], swapped[0]], "models": {}}
    tail = int(2.0 * EVAL_RATE)  # the continuation: the last 4 s of 6
    if args.continuation:
        heard = heard_modes(real[..., tail:], tagger)
        result["real_last_4s"] = {j: sum(h == i["mode"] for h, i in zip(heard[j], infos)) / len(infos) for j in heard}
    for path in args.models:
        model = MusicGen.load(path)
        t0 = time.time()
        heard = {name: heard_modes(generate_all(model, captions, 6.0, seed=args.seed, progress=False), tagger)
                 for name, captions in (("told", told), ("swapped", swapped))}
        entry = {}
        for judge in ("tagger", "key_finder"):
            hits = {name: [h == m for h, m in zip(heard[name][judge], modes[name])] for name in heard}
            moved = [a != b for a, b in zip(heard["told"][judge], heard["swapped"][judge])]
            entry[judge] = {"told": sum(hits["told"]) / len(infos), "swapped": sum(hits["swapped"]) / len(infos),
                            "both": (sum(hits["told"]) + sum(hits["swapped"])) / (2 * len(infos)),
                            "moved": sum(moved) / len(infos)}
        if args.continuation:
            captions = [i["description"] for i in infos]
            with torch.inference_mode():
                cont = torch.cat([model.generate_continuation(real[i:i + 8, :, :tail], EVAL_RATE, captions[i:i + 8],
                                                              duration=6.0, seed=args.seed + b, progress=False)
                                  [..., :real.shape[-1]].float().cpu() for b, i in enumerate(range(0, len(infos), 8))])
            heard = heard_modes(cont[..., tail:], tagger)
            entry["continued"] = {j: sum(h == i["mode"] for h, i in zip(heard[j], infos)) / len(infos) for j in heard}
        entry["seconds"] = round(time.time() - t0, 1)
        result["models"][portable_path(path)] = entry
        print(path, json.dumps(entry))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
