"""How much of the music's key a codec keeps: the ceiling on the mode target of any LM decoding through it.

Each codec encodes and decodes the 100 held-out clips of ``evaluate`` (seed 999001, 6 s, 16 kHz)
at all of its codebooks, and the reconstructions are scored two ways:

- by an outside reference, the key-finder of :mod:`musicgen_lite.data.analysis` (librosa's CENS
  chroma against Temperley's key profiles): the share of clips whose tonic, and whose mode,
  it hears as the clip's label says; and the mean :class:`~musicgen_lite.codec.ChromaLoss`
  against the real clip;
- by the evaluation models (:func:`musicgen_lite.codec_card.roundtrip_evaluation`): the
  tagger's attribute accuracies, CLAP and FAD, as if an LM had generated the clips.

The real clips get the same key-finder scores, for the top of the scale.

    python scripts/codec_tonal_check.py data/checkpoints/codec_lite runs/other_codec --out data/results/codec_tonal.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from musicgen_lite.codec import ChromaLoss
from musicgen_lite.codec_card import roundtrip_evaluation
from musicgen_lite.data.analysis import estimate_key
from musicgen_lite.data.music import PITCH_CLASSES
from musicgen_lite.evaluation import EVAL_RATE, heldout_set, load_clips, portable_path
from musicgen_lite.hub import load_codec


def key_scores(wavs: torch.Tensor, infos: list[dict]) -> dict:
    hits = np.array([(t == PITCH_CLASSES.index(info["tonic"]), m == info["mode"])
                     for w, info in zip(wavs, infos) for t, m in [estimate_key(w[0].numpy(), EVAL_RATE)]])
    return {"tonic": float(hits[:, 0].mean()), "mode": float(hits[:, 1].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codecs", nargs="+", help="codec checkpoint folders")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--no-models", action="store_true", help="the key-finder only (no tagger, CLAP, FAD)")
    args = ap.parse_args()
    folder = heldout_set(args.n, 6.0, progress=False)
    wavs, infos = load_clips(folder, args.n, 6.0)
    result = {"what": __doc__.strip().splitlines()[0], "clips": portable_path(folder), "n": len(infos),
              "real": {"key_finder": key_scores(wavs, infos)}, "codecs": {}}
    chroma = ChromaLoss(EVAL_RATE)
    for path in args.codecs:
        codec = load_codec(path)
        if codec.sample_rate != EVAL_RATE:
            raise ValueError(f"{path}: this check runs at {EVAL_RATE} Hz, the codec at {codec.sample_rate}")
        with torch.inference_mode():
            rec = torch.cat([codec.decode(codec.encode(w))[..., :w.shape[-1]].float() for w in wavs.split(10)])
        entry = {"key_finder": key_scores(rec, infos), "chroma_loss": float(chroma(rec, wavs))}
        if not args.no_models:
            rt = roundtrip_evaluation(codec, n=args.n, captions=folder)
            entry["evaluation_models"] = {"attribute_accuracy": rt["attribute_accuracy"]["per_attribute"],
                                          "clap": rt["clap"], "fad": rt["fad"]}
            result["real"]["evaluation_models"] = {"attribute_accuracy":
                                                   rt["real"]["attribute_accuracy"]["per_attribute"],
                                                   "clap": rt["real"]["clap"]}
        result["codecs"][portable_path(path)] = entry
        print(path, json.dumps(entry))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
