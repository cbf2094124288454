"""Key guidance for the shipped default: why (a probe), building it, and what it does (evaluation).

Three subcommands:

``probe``: do the codec's tokens carry the key, and do the LM's? A small MLP learns to read
librosa's CENS chroma from the codec's quantized latents (codebooks 1, 2 or 4; 9 frames of
context) on the 400 clips the codec was trained on; the key-finder's profiles then name the
key of each clip's mean predicted chroma. Scored on the real held-out clips' tokens and on the
tokens the model generates for the same captions (stated keys added, seed 0), without its key guide
and, when it has one, with it.

``build``: attach a :class:`~musicgen_lite.key_guidance.KeyGuide` learned from the LM's training
audio (``--data``, the token cache's clips) and a mode predictor fitted on its captions to a
model folder, written to ``--out`` (the same LM weights, dtype and codec reference).

``eval``: ``musicgen-lite evaluate``'s numbers at several strengths, held-out sets and seeds:
one JSON line per run, collected into ``--json``.

    python scripts/key_guidance_check.py probe --json data/results/key_guidance_probe.json
    python scripts/key_guidance_check.py build --model data/checkpoints/musicgen_lite --data data/cache/lm_mix --out M
    python scripts/key_guidance_check.py eval --model M --strengths 0 2 3 4 --heldout 999003 --json J
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _keys_of(chroma: torch.Tensor) -> list[tuple[int, str]]:
    """``chroma[B, T, 12]`` -> each row's key by the key-finder's rule on its mean chroma."""
    from musicgen_lite.key_guidance import key_profiles
    from musicgen_lite.data.music import MODES

    mean = chroma.mean(1)
    fit = torch.einsum("mtj,bj->bmt", key_profiles(), mean - mean.mean(1, keepdim=True))  # (B, 2, 12)
    best = fit.flatten(1).argmax(1)
    return [(int(b) % 12, MODES[int(b) // 12]) for b in best]


def probe(args) -> dict:
    from musicgen_lite.data.dataset import caption_for_training
    from musicgen_lite.data.music import PITCH_CLASSES
    from musicgen_lite.evaluation import heldout_set, load_clips, portable_path
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.key_guidance import frame_chroma

    torch.manual_seed(0)
    model = MusicGen.load(args.model)
    codec, C = model.codec, 4
    hop = int(round(codec.sample_rate / codec.frame_rate))

    def context(codes, levels):  # (B, K, T) -> (B, T, D * (2C + 1)): each frame with 4 neighbours a side
        with torch.inference_mode():
            lat = codec.quantizer.decode(codes[:, :levels])
        pad = torch.nn.functional.pad(lat, (C, C), mode="replicate")
        return torch.cat([pad[..., i:i + lat.shape[-1]] for i in range(2 * C + 1)], 1).transpose(1, 2)

    def encode(wavs):
        with torch.inference_mode():
            return torch.cat([codec.encode(w) for w in wavs.split(10)])

    train, _ = load_clips(args.train, 400, 8.0)
    target = torch.stack([torch.from_numpy(frame_chroma(w.numpy(), codec.sample_rate, hop)).float() for w in train])
    train_codes = encode(train)
    folder = heldout_set(100, 6.0, progress=False)
    real, infos = load_clips(folder, 100, 6.0)
    real_codes = encode(real)
    captions = [caption_for_training(i, 1.0, None) for i in infos]  # every caption states its key
    def generated(strength):
        return torch.cat([model.generate_codes(captions[b:b + 10], duration=6.0, seed=b // 10, progress=False,
                                               key_guidance=strength) for b in range(0, len(captions), 10)])

    gen_codes = generated(0)
    guided_codes = generated(None) if getattr(model, "key_guide", None) is not None else None  # its own strength

    def accuracy(keys):
        hits = np.array([(t == PITCH_CLASSES.index(i["tonic"]), m == i["mode"]) for (t, m), i in zip(keys, infos)])
        return {"tonic": float(hits[:, 0].mean()), "mode": float(hits[:, 1].mean())}

    out = {"what": "Do the codec's tokens carry the key, and do the LM's? An MLP reads CENS chroma from the "
                   "quantized latents; the key-finder's profiles name the key of the mean predicted chroma.",
           "train_clips": portable_path(args.train), "heldout": portable_path(folder), "model": portable_path(args.model),
           "real_audio_key_finder_cens_per_frame": accuracy(_keys_of(torch.stack([
               torch.from_numpy(frame_chroma(w.numpy(), codec.sample_rate, hop)).float() for w in real]))),
           "levels": {}}
    for levels in (1, 2, 4):
        X = context(train_codes, levels)
        T = min(X.shape[1], target.shape[1])
        X, Y = X[:, :T].reshape(-1, X.shape[-1]), target[:, :T].reshape(-1, 12)
        mu, sd = X.mean(0), X.std(0) + 1e-5
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                  torch.nn.GELU(), torch.nn.Linear(512, 12))
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.01)
        for _ in range(3000):
            idx = torch.randint(0, len(X), (512,))
            loss = torch.nn.functional.mse_loss(net((X[idx] - mu) / sd), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            read = lambda codes: _keys_of(net((context(codes, levels) - mu) / sd))  # noqa: E731
            out["levels"][str(levels)] = {"real_tokens": accuracy(read(real_codes)),
                                          "generated_tokens_told_their_key": accuracy(read(gen_codes)),
                                          "train_mse": float(loss)}
            if guided_codes is not None:
                out["levels"][str(levels)]["the_same_with_key_guidance"] = accuracy(read(guided_codes))
        print(levels, json.dumps(out["levels"][str(levels)]), flush=True)
    return out


def build(args) -> None:
    from musicgen_lite.evaluation import load_clips
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.hub import load_checkpoint
    from musicgen_lite.key_guidance import KeyGuide
    from musicgen_lite.training import fit_mode_predictor

    t0 = time.time()
    model = MusicGen.load(args.model)
    state, config, extra = load_checkpoint(args.model)
    meta = json.loads((Path(args.data) / "dataset.json").read_text())
    wavs, _ = load_clips(args.data, meta["n"], meta["seconds"])
    model.key_guide = KeyGuide.from_audio(model.codec, wavs, batch_size=16, strength=args.strength, cap=args.cap,
                                          progress=True)
    model.mode_predictor = fit_mode_predictor(Path(args.data) / "tokens")
    dtype = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}.get(state["lm.out_norm.weight"].dtype)
    out = Path(args.out)
    codec_path = config.get("codec_path")
    if codec_path is not None:  # the same codec folder, seen from the new place
        codec_path = os.path.relpath(os.path.normpath(Path(args.model) / codec_path), out)
    extra = {**(extra or {}), "key_guide": {"data": str(args.data), "clips": meta["n"], "seconds": meta["seconds"],
                                            "tokens_seen": int((model.key_guide.counts > 0).sum()),
                                            "strength": args.strength, "cap": args.cap,
                                            "built_in_s": round(time.time() - t0, 1)}}
    model.save(out, config["conditioner"], extra, dtype=dtype, codec_path=codec_path)
    again = MusicGen.load(out)
    for k, v in model.lm.state_dict().items():  # the LM is untouched
        assert torch.equal(again.lm.state_dict()[k], v), k
    print(f"{out}: guide from {meta['n']} clips, {extra['key_guide']['tokens_seen']} tokens seen, "
          f"{time.time() - t0:.0f} s")


def evaluate_runs(args) -> None:
    from musicgen_lite.evaluation import evaluate
    from musicgen_lite.generation import MusicGen

    model = MusicGen.load(args.model)
    rows = json.loads(Path(args.json).read_text())["runs"] if Path(args.json).is_file() else []
    for heldout in args.heldout:
        for seed in args.seeds:
            for strength, candidates in [(s, c) for s in args.strengths for c in args.candidates]:
                t0 = time.time()
                r = evaluate(model, n=100, duration=6.0, seed=seed, progress=False, heldout_seed=heldout,
                             key_guidance=strength, key_candidates=candidates)
                pa = r["attribute_accuracy"]["per_attribute"]
                row = {"heldout_seed": heldout, "seed": seed, "strength": strength, "candidates": candidates,
                       "fad": r["fad"]["value"],
                       "clap": r["clap"]["value"], "kl": r["kl"]["kl_ref_gen"], **pa,
                       "mean": r["attribute_accuracy"]["mean"],
                       "real_mode": r["reference"]["real"]["attribute_accuracy"]["per_attribute"]["mode"],
                       "seconds": round(time.time() - t0, 1)}
                rows = [x for x in rows if (x["heldout_seed"], x["seed"], x["strength"], x.get("candidates", 1))
                        != (heldout, seed, strength, candidates)]
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                Path(args.json).write_text(json.dumps({"model": str(args.model), "runs": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--model", default="data/checkpoints/musicgen_lite")
    p.add_argument("--train", default="data/cache/synth-n400-8s-seed0-16k-fluidsynth")
    p.add_argument("--json", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", required=True)
    b.add_argument("--data", required=True, help="the LM's training data folder (audio/ + tokens/)")
    b.add_argument("--out", required=True)
    b.add_argument("--strength", type=float, default=4.0)
    b.add_argument("--cap", type=float, default=1.5)
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--strengths", type=float, nargs="+", required=True)
    e.add_argument("--candidates", type=int, nargs="+", default=[1],
                   help="key_candidates: samples per caption, the best fit to its key kept (1: one sample)")
    e.add_argument("--heldout", type=int, nargs="+", default=[999001])
    e.add_argument("--seeds", type=int, nargs="+", default=[0])
    e.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    if args.cmd == "probe":
        Path(args.json).write_text(json.dumps(probe(args), indent=1) + "\n")
    elif args.cmd == "build":
        build(args)
    else:
        evaluate_runs(args)


if __name__ == "__main__":
    main()
