"""How well a caption's words give its tempo: the beat clock's fallback for captions without a bpm.

Fits :class:`musicgen_lite.conditioning.TempoPredictor` on the training token cache's captions
(as ``train lm --beat-clock`` does) and scores it on the 100 held-out captions of ``evaluate``:
the share within 10% of the clip's bpm, or at half or double it (the tempo target's rule),
on the captions that state no bpm, against two baselines: the training captions' median tempo
for every caption, and the same ridge on mean-pooled all-MiniLM-L6-v2 sentence states.

    python scripts/tempo_predictor_check.py data/cache/lm_mix/tokens --out data/results/tempo_predictor.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from musicgen_lite.conditioning import SentenceConditioner, TempoPredictor, caption_facts
from musicgen_lite.data.dataset import TokenDataset
from musicgen_lite.evaluation import heldout_set, portable_path


def within(pred: float, true: float) -> bool:
    """The tempo target's rule: within 10%, or at half or double."""
    return any(abs(pred * m / true - 1) <= 0.1 for m in (1.0, 2.0, 0.5))


def captions_of(folder: Path) -> list[tuple[str, float]]:
    return [(d["description"], float(d["bpm"])) for d in
            (json.loads(p.read_text()) for p in sorted((folder / "audio").glob("*.json")))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokens", help="the training token cache (its clips' captions and bpms)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ridge", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = TokenDataset(args.tokens)
    train = []
    for clip in data.clips:
        info = json.loads((data.root / clip["info"]).read_text())
        train.append((info.get("description", ""), info.get("bpm")))
    held = captions_of(heldout_set(100, 6.0, progress=False))
    unstated = [(t, b) for t, b in held if caption_facts(t)["bpm"] is None]
    tempo = TempoPredictor.fit([t for t, _ in train], [b for _, b in train], ridge=args.ridge)
    words = [within(p, b) for p, (_, b) in zip(tempo.predict([t for t, _ in unstated]), unstated)]
    median = sorted(b for _, b in train if b)[len(train) // 2]
    const = [within(median, b) for _, b in unstated]
    # the same ridge on sentence embeddings (mean of MiniLM's token states)
    enc = SentenceConditioner(output_dim=8)

    def pooled(texts):
        out = []
        for i in range(0, len(texts), 64):
            states, mask = enc.encode(texts[i:i + 64])
            m = mask.unsqueeze(-1).double()
            out.append((states.double() * m).sum(1) / m.sum(1))
        x = torch.cat(out)
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)

    x = pooled([t for t, _ in train])
    y = torch.tensor([math.log2(b) for _, b in train], dtype=torch.float64)
    scores = {}
    for lam in (0.1, 1.0):
        w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
        pred = (2 ** (pooled([t for t, _ in unstated]) @ w)).tolist()
        scores[lam] = sum(within(p, b) for p, (_, b) in zip(pred, unstated)) / len(unstated)
    errors = sorted(abs(p / b - 1) for p, (_, b) in zip(tempo.predict([t for t, _ in unstated]), unstated))
    result = {
        "train": portable_path(args.tokens), "train_captions": tempo.fitted_on, "words": len(tempo.vocab),
        "heldout": "synthetic held-out set, 100 captions (evaluate's default), seed 999001",
        "unstated_captions": len(unstated),
        "within_10pct_or_half_double": {"words_ridge": round(sum(words) / len(words), 3),
                                        "training_median": round(sum(const) / len(const), 3),
                                        "minilm_pooled_ridge_0.1": round(scores[0.1], 3),
                                        "minilm_pooled_ridge_1": round(scores[1.0], 3)},
        "median_relative_error_words": round(errors[len(errors) // 2], 3),
        "ridge": args.ridge,
        "strongest_words": {"slower": [w for _, w in sorted(zip(tempo.weights, tempo.vocab))[:8]],
                            "faster": [w for _, w in sorted(zip(tempo.weights, tempo.vocab))[-8:][::-1]]},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
