"""The ``musicgen-lite`` command. ``musicgen-lite --help`` lists the subcommands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench

    torch.set_num_threads(args.threads)
    names = sorted(bench.BENCHES) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in bench.BENCHES]
    if unknown:
        print(f"error: unknown benchmark {unknown[0]!r}; choose from: all, {', '.join(sorted(bench.BENCHES))}",
              file=sys.stderr)
        return 2
    rows = [r for n in names for r in bench.BENCHES[n](args)]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"machine: {bench.machine()}")
        print(f"{'bench':<10} {'config':<40} {'ours':>12} {'peer':>12} {'unit':<10} {'ratio':>6}  peer")
        for r in rows:
            peer = "-" if r["peer"] is None else f"{r['peer']:.3f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            print(f"{r['bench']:<10} {r['config']:<40} {r['ours']:>12.3f} {peer:>12} {r['unit']:<10} {ratio:>6}  {r['peer_name']}")
    return 0


def _cmd_data_make(args: argparse.Namespace) -> int:
    import time

    from .data.dataset import make_dataset

    t0 = time.time()
    out = make_dataset(args.out, n=args.n, seconds=args.seconds, seed=args.seed, source=args.source,
                       sample_rate=args.sample_rate, workers=args.workers, melody_stems=not args.no_stems,
                       renderer=args.renderer, exclude_tunes_of=args.exclude_tunes_of)
    dt = time.time() - t0
    print(f"{args.n} {args.source} clips of {args.seconds:g} s in {out} ({dt:.1f} s, {args.n / dt:.2f} clips/s)")
    return 0


def _cmd_data_manifest(args: argparse.Namespace) -> int:
    from .data.dataset import read_manifest, write_manifest

    out = write_manifest(args.folder, skip_bad=args.skip_bad)
    metas = read_manifest(out)
    print(f"{out}: {len(metas)} files, {sum(m.duration for m in metas) / 60:.1f} min of audio")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    demo(args.out, n=args.n, seconds=args.seconds, seed=args.seed)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .audio import load_audio, save_audio
    from .hub import load_musicgen

    torch.set_num_threads(args.threads)
    if not args.caption.strip() and args.melody is None:
        raise ValueError("caption is empty: describe the music (e.g. \"a calm piano piece at 70 bpm\")")
    out = Path(args.output)
    if out.suffix.lower() not in (".wav", ".flac"):
        raise ValueError(f"-o {out}: write a .wav or .flac file")
    model = load_musicgen(args.model)
    t0 = time.perf_counter()
    sampling = dict(duration=args.duration, cfg_coef=args.cfg, top_k=args.top_k, top_p=args.top_p,
                    temperature=args.temperature, seed=args.seed, progress=not args.quiet)
    if args.bpm is not None:  # a beat-clock model only (checked, with a clear error, by the model)
        sampling["bpm"] = args.bpm
    if args.key is not None:  # a key-conditioned or key-guided model only (checked by the model)
        sampling["key"] = args.key
    if args.key_guidance is not None:  # a model with a key guide only (checked by the model)
        sampling["key_guidance"] = args.key_guidance
    if args.key_candidates is not None:  # likewise
        sampling["key_candidates"] = args.key_candidates
    if args.melody is not None:
        if not hasattr(model, "generate_with_chroma"):
            raise ValueError("this model has no melody conditioning")
        melody, sr = load_audio(args.melody)
        wav = model.generate_with_chroma([args.caption], melody[None], sr, **sampling)
    else:
        wav = model.generate([args.caption], **sampling)
    seconds = time.perf_counter() - t0
    save_audio(out, wav[0], model.sample_rate)
    png = out.with_suffix(".png")
    _spectrogram_png(wav[0], model.sample_rate, png, args.caption)
    print(f"{out} ({args.duration:g} s of audio in {seconds:.1f} s) and {png}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .evaluation import evaluate, format_table, portable_path
    from .generation import MusicGen

    torch.set_num_threads(args.threads)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder")
    if args.melodies is not None and not Path(args.melodies).is_dir():
        raise FileNotFoundError(f"--melodies {args.melodies}: no such folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = MusicGen.load(args.model, device=device)
    if args.int8:
        from .int8 import int8_report

        result = int8_report(model, captions=args.captions, n=args.n, duration=args.duration, seed=args.seed,
                             batch_size=args.batch_size, progress=not args.quiet, cfg_coef=args.cfg, top_k=args.top_k)
        result["setup"]["model"] = portable_path(args.model)
        for name in ("fp32", "int8"):
            r = result[name]
            print(f"{name}: FAD {r['fad']:.3f}  KL {r['kl']:.3f}  CLAP {r['clap']:.3f}  attribute accuracy "
                  f"{r['attribute_accuracy']}  {r['seconds']:.1f} s  LM weights {r['weight_bytes'] / 1e6:.1f} MB")
        print(f"greedy token agreement {result['token_agreement']:.3f}; int8 speed-up {result['speedup']:.2f}x")
    else:
        result = evaluate(model, captions=args.captions, n=args.n, duration=args.duration, seed=args.seed,
                          melodies=args.melodies, batch_size=args.batch_size, progress=not args.quiet,
                          text_only=not args.no_text_only, caption_metadata=args.caption_metadata,
                          cfg_coef=args.cfg, top_k=args.top_k)
        result["setup"]["model"] = portable_path(args.model)
        print(format_table(result))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def _spectrogram_png(wav, sample_rate: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import nb

    fig, ax = plt.subplots(figsize=(8, 3))
    nb.plot_mel(wav, sample_rate, ax=ax, title=title[:80])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_export_lm(args: argparse.Namespace) -> int:
    from .training import export_musicgen

    from .lm_card import write_lm_card

    if args.eval_json is not None and not Path(args.eval_json).is_file():
        raise SystemExit(f"--eval-json: no such file: {args.eval_json}")
    cfg = args.cfg
    if args.eval_json is not None:  # the model generates by default with the guidance it was measured with
        import json

        measured = ((json.loads(Path(args.eval_json).read_text()).get("setup") or {}).get("generate") or {}).get("cfg_coef")
        if cfg is not None and measured is not None and float(measured) != cfg:
            raise SystemExit(f"--cfg {cfg} but {args.eval_json} was measured with cfg_coef {measured}")
        cfg = measured if cfg is None else cfg
    out = export_musicgen(args.run, args.codec, args.out, use_ema=not args.no_ema,
                          cfg_coef=None if cfg is None else float(cfg))
    card = write_lm_card(out, args.run, args.eval_json, command=args.command or "")
    print(f"wrote {out} (model card: {card})")
    return 0


def _cmd_train_reference(args: argparse.Namespace) -> int:
    import torch

    from . import metrics

    torch.set_num_threads(args.threads)
    train, heldout = metrics.reference_datasets(workers=args.workers)
    out = args.out or str(metrics.CHECKPOINTS / args.what)
    if args.what == "tagger":
        card = metrics.train_tagger(train, heldout, out=out, epochs=args.epochs or 12, seed=args.seed)
        title = "Attribute tagger (FAD embedding, KL label distributions)"
    else:
        card = metrics.train_clap(train, heldout, out=out, epochs=args.epochs or 15, seed=args.seed)
        title = "CLAP-style text-audio model (CLAP score)"
    command = f"musicgen-lite train {args.what} --seed {args.seed}" + (f" --epochs {args.epochs}" if args.epochs else "")
    metrics.write_model_card(card, Path(out), title, command)
    print(json.dumps({k: v for k, v in card.items() if k not in ("frontend", "heads")}, indent=1))
    return 0


def _cmd_train_codec(args: argparse.Namespace) -> int:
    import torch

    from .training import train_codec

    torch.set_num_threads(args.threads)
    extra = {"freeze_encoder": True} if args.freeze_encoder else {}
    if args.decoder_n_q is not None:
        extra["decoder_n_q"] = args.decoder_n_q
    if args.chroma_weight:
        extra["chroma_weight"] = args.chroma_weight
    result = train_codec(args.out, scale=args.scale, steps=args.steps, data=args.data, resume=not args.fresh,
                         seed=args.seed, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                         init_from=args.init_from, **extra)
    last = result["log"][-1] if result["log"] else {}
    print(json.dumps({"step": result["step"], "checkpoint": str(result["checkpoint"]),
                      "wall_seconds": round(result["wall_seconds"], 1), "last_log": last}, indent=1))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    import torch

    from .data.dataset import TokenDataset, build_token_cache
    from .hub import load_codec

    torch.set_num_threads(args.threads)
    codec = load_codec(args.codec)
    out = build_token_cache(args.data, codec, out=args.out, chroma=True if args.chroma else None)
    ds = TokenDataset(out)
    frames = sum(c["frames"] for c in ds.clips)
    chroma = ds.chroma_settings
    melody = (f"; melody chroma from {chroma['from_stem']} stems and {chroma['from_mix']} mixes" if chroma
              else "; no melody chroma (no stems; --chroma takes it from the mix)")
    print(f"{out}: {len(ds.clips)} clips, {frames} frames x {codec.num_codebooks} codebooks "
          f"({frames / codec.frame_rate / 60:.1f} min of audio){melody}")
    return 0


def _cmd_train_lm(args: argparse.Namespace) -> int:
    import torch

    from .training import train_lm

    torch.set_num_threads(args.threads)
    extra = {"batch_size": args.batch_size} if args.batch_size else {}
    extra.update({k: v for k, v in (("eval_every", args.eval_every), ("sample_every", args.sample_every)) if v})
    extra.update({k: v for k, v in (("lr", args.lr), ("warmup", args.warmup),
                                    ("caption_metadata_p", args.caption_metadata_p),
                                    ("melody_mode", args.melody_mode)) if v is not None})
    if args.caption_facts:
        if args.conditioner == "none":
            raise SystemExit("--caption-facts adds rows to the text condition: choose a --conditioner")
        extra["caption_facts"] = True
    if args.beat_clock:
        extra["beat_clock"] = True
    if args.key_condition:
        if not args.beat_clock:
            raise SystemExit("--key-condition rides on the beat clock's input: add --beat-clock")
        extra["key_condition"] = True
    if args.key_lr_scale is not None:
        if not args.key_condition:
            raise SystemExit("--key-lr-scale sets the key condition's learning rate: add --key-condition")
        if not args.key_lr_scale > 0:
            raise SystemExit(f"--key-lr-scale must be > 0, got {args.key_lr_scale}")
        extra["key_lr_scale"] = args.key_lr_scale
    if args.caption_metadata_p is not None and not 0 <= args.caption_metadata_p <= 1:
        raise SystemExit(f"--caption-metadata-p must be in [0, 1], got {args.caption_metadata_p}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        raise SystemExit(f"--stop-after must be between 1 and --steps ({args.steps}), got {args.stop_after}")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")
    if args.warmup is not None and args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("eval_tokens", "sample_codec", "init_from"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_dir():
            raise SystemExit(f"--{name.replace('_', '-')}: no such folder: {path}")
    result = train_lm(args.out, args.tokens, scale=args.scale, lm=args.lm or args.scale if args.scale != "full" else "small",
                      conditioner=None if args.conditioner == "none" else args.conditioner, steps=args.steps,
                      resume=not args.fresh, seed=args.seed, melody=args.melody, eval_tokens=args.eval_tokens,
                      sample_codec=args.sample_codec, init_from=args.init_from,
                      max_seconds=args.max_minutes * 60 if args.max_minutes else None, stop_after=args.stop_after,
                      **extra)
    print(json.dumps({k: v for k, v in result.items() if k not in ("model", "ema", "losses")}, indent=1, default=str))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    import shlex
    import sys

    import torch

    from .studies import format_study, run_study

    torch.set_num_threads(args.threads)
    extra = {k: v for k, v in (("batch_size", args.batch_size), ("segment_seconds", args.segment_seconds)) if v}
    table = run_study(args.study, args.tokens, args.heldout, args.codec, args.out, args.runs, steps=args.steps,
                      scale=args.scale, n_eval=args.n_eval, eval_duration=args.duration,
                      max_minutes=args.max_minutes, seed=args.seed, variants=args.variants,
                      progress=not args.quiet, command="musicgen-lite " + shlex.join(sys.argv[1:]), lm=args.lm,
                      **extra)
    print(format_study(table))
    if args.ship:
        if table.get("pending"):
            print(f"not shipped: {', '.join(table['pending'])} not finished yet", file=sys.stderr)
            return 1
        from .studies import ship_study

        try:
            report = ship_study(args.out, args.runs, args.ship, args.codec, args.heldout, progress=not args.quiet,
                                max_seconds=args.max_minutes * 60 if args.max_minutes else None)
        except TimeoutError as exc:
            print(f"not shipped yet: {exc}", file=sys.stderr)
            return 1
        for r in report["rows"]:
            print(f"{r['name']:14s} {r['bytes'] / 1e6:5.1f} MB (fp32 {r['fp32_bytes'] / 1e6:5.1f}): validation loss "
                  f"{r['val_loss_fp32']:.4f} -> {r['val_loss_stored']:.4f}, greedy tokens agree {r['token_agreement']:.0%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musicgen-lite", description="Rebuild MusicGen step by step: data, models, benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="make datasets of captioned music, or index your own")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dm = dsub.add_parser("make", help="render captioned clips + metadata + data.jsonl (deterministic by seed)")
    dm.add_argument("out", help="output folder")
    dm.add_argument("--n", type=int, default=100, help="number of clips (default 100)")
    dm.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds (default 10)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--source", choices=["synth", "corpus", "mix"], default="synth",
                    help="synth: random compositions; corpus: music21 folk tunes and Bach chorales; "
                         "mix: synthetic with every 4th clip a corpus tune")
    dm.add_argument("--sample-rate", type=int, default=32_000, help="Hz (default 32000)")
    dm.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    dm.add_argument("--renderer", choices=["auto", "fluidsynth", "builtin"], default="auto")
    dm.add_argument("--no-stems", action="store_true", help="do not render the melody line alone")
    dm.add_argument("--exclude-tunes-of", default=None, metavar="FOLDER",
                    help="a dataset folder whose corpus tunes to leave out (held-out melodies never trained on)")
    dm.set_defaults(func=_cmd_data_make)
    dman = dsub.add_parser("manifest", help="index a folder of your own audio into data.jsonl")
    dman.add_argument("folder")
    dman.add_argument("--skip-bad", action="store_true", help="skip unreadable files instead of failing")
    dman.set_defaults(func=_cmd_data_manifest)

    demo = sub.add_parser("demo", help="headless tour: generated music (shipped model) and captioned clips, "
                                         "with spectrograms, written to files")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--n", type=int, default=6, help="clips (default 6)")
    demo.add_argument("--seconds", type=float, default=8.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train models")
    tsub = t.add_subparsers(dest="train_command", required=True)
    tc = tsub.add_parser("codec", help="train an EnCodec-style codec (resumes from OUT/checkpoint)")
    tc.add_argument("out", help="run folder: checkpoint/, log.jsonl, samples/")
    tc.add_argument("--scale", choices=["tiny", "lite", "full"], default="lite")
    tc.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run continues to this)")
    tc.add_argument("--data", nargs="+", default=None,
                    help="dataset folders with data.jsonl (default: synthetic clips and corpus tunes, cached)")
    tc.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this much time")
    tc.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    tc.add_argument("--init-from", default=None,
                    help="start a new run from this codec checkpoint folder (e.g. data/checkpoints/codec_lite)")
    tc.add_argument("--freeze-encoder", action="store_true",
                    help="train the decoder only: the codes (and token caches, LMs made from them) stay valid")
    tc.add_argument("--decoder-n-q", type=int, default=None,
                    help="with --freeze-encoder: decode from this many codebooks only (an LM uses all of them)")
    tc.add_argument("--chroma-weight", type=float, default=0.0,
                    help="weight of a chroma (pitch-class) loss beside the spectral ones (default 0: none)")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--threads", type=int, default=2)
    tc.set_defaults(func=_cmd_train_codec)
    tl = tsub.add_parser("lm", help="train the language model on a token cache (DDP under torchrun)")
    tl.add_argument("tokens", help="token cache folder (musicgen-lite tokenize)")
    tl.add_argument("out", help="run folder: checkpoint/, log.jsonl")
    tl.add_argument("--scale", choices=["tiny", "lite", "full"], default="lite", help="recipe preset")
    tl.add_argument("--lm", default=None, help="LM preset: tiny | lite | small | medium | large (default: the scale)")
    tl.add_argument("--conditioner", choices=["learned", "minilm", "t5", "none"], default="learned")
    tl.add_argument("--melody", action="store_true",
                    help="train MusicGen-melody: chroma prefix from the token cache (tokenize a dataset with stems)")
    tl.add_argument("--steps", type=int, default=1000)
    tl.add_argument("--batch-size", type=int, default=None, help="global batch (split over torchrun processes)")
    tl.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default: the scale's; lower it to fine-tune an --init-from model)")
    tl.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: the scale's)")
    tl.add_argument("--melody-mode", choices=("prefix", "add"), default=None,
                    help="with --melody: the chroma rows as a prefix (MusicGen-melody's layout, the default) or "
                         "added to the token frames they describe (frame-aligned: learns to read the melody "
                         "far sooner on a small budget; not portable to transformers)")
    tl.add_argument("--caption-metadata-p", type=float, default=None,
                    help="add the clip's key and bpm to a caption that does not say them, each with this "
                         "probability (default 0: the captions as written)")
    tl.add_argument("--caption-facts", action="store_true",
                    help="give the key and bpm a caption states to the LM as condition rows of their own "
                         "(learned rows per tonic and mode, and for the bpm), beside the text encoder's states")
    tl.add_argument("--beat-clock", action="store_true",
                    help="give the LM each clip's beat phase (from its bpm) at every step, and fit a tempo "
                         "predictor for captions without a bpm (generate keeps the stated or predicted tempo)")
    tl.add_argument("--key-condition", action="store_true",
                    help="with --beat-clock: give the LM each clip's key (mode and tonic) at every step, and fit "
                         "a mode predictor for captions without one (generate keeps the stated or predicted key)")
    tl.add_argument("--key-lr-scale", type=float, default=None,
                    help="with --key-condition: the key's map learns at this multiple of the learning rate (default 1)")
    tl.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this much time")
    tl.add_argument("--stop-after", type=int, default=None,
                    help="checkpoint and stop once this step is done, the schedule still planned for --steps "
                         "(run again with a larger value, or without, to go on)")
    tl.add_argument("--init-from", default=None,
                    help="start a new run from the weights of an LM run folder or a model folder (fresh schedule)")
    tl.add_argument("--eval-tokens", default=None,
                    help="held-out token cache: validation loss in log.jsonl every --eval-every steps")
    tl.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: each checkpoint)")
    tl.add_argument("--sample-codec", default=None,
                    help="codec folder that made the tokens: audio samples in OUT/samples every --sample-every steps")
    tl.add_argument("--sample-every", type=int, default=None,
                    help="steps between audio samples (default: every 4th checkpoint)")
    tl.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    tl.add_argument("--seed", type=int, default=0)
    tl.add_argument("--threads", type=int, default=2)
    tl.set_defaults(func=_cmd_train_lm)
    for what, text in (("tagger", "the attribute tagger behind FAD and KL"), ("clap", "the CLAP-style text-audio model")):
        tr = tsub.add_parser(what, help=f"train {text} on our data (renders it first, cached)")
        tr.add_argument("--out", default=None, help="checkpoint path without suffix (default data/checkpoints/NAME)")
        tr.add_argument("--epochs", type=int, default=None)
        tr.add_argument("--seed", type=int, default=0)
        tr.add_argument("--workers", type=int, default=None, help="processes rendering the data")
        tr.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        tr.set_defaults(func=_cmd_train_reference, what=what)

    tok = sub.add_parser("tokenize", help="encode a dataset once with a codec into a memory-mapped token cache")
    tok.add_argument("data", help="dataset folder with data.jsonl")
    tok.add_argument("--codec", required=True, help="codec checkpoint folder (model.safetensors + config.json)")
    tok.add_argument("--out", default=None, help="cache folder (default DATA/tokens)")
    tok.add_argument("--chroma", action="store_true",
                     help="store melody chroma even without stems (from the mix; default: only when stems exist)")
    tok.add_argument("--threads", type=int, default=2)
    tok.set_defaults(func=_cmd_tokenize)

    g = sub.add_parser("generate", help="text (and melody) to music with a trained model: a wav and a spectrogram PNG")
    g.add_argument("caption", help='what to play, e.g. "a sad piano piece at 70 bpm"')
    g.add_argument("-o", "--output", default="out/generated.wav", help="wav/flac path (a .png is written beside it)")
    g.add_argument("--model", default=None, help="model folder (default: the shipped data/checkpoints/musicgen_lite)")
    g.add_argument("--melody", default=None, help="an audio file (wav/flac/mp3) whose melody to follow")
    g.add_argument("--duration", type=float, default=8.0, help="seconds of audio (default 8)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance coefficient (default: the model's own, 3 unless its card says)")
    g.add_argument("--bpm", type=float, default=None,
                   help="the tempo to keep (a model with a beat clock; default: the caption's bpm, else the "
                        "model's guess from its words)")
    g.add_argument("--key", default=None,
                   help='the key or mode to keep, e.g. "A minor" or "minor" (a model with a key condition or a '
                        "key guide; default: the caption's key or mode, else the model's guess of the mode from "
                        "its words)")
    g.add_argument("--key-guidance", type=float, default=None,
                   help="how hard to steer the first codebook's tokens toward the key (a model with a key guide; "
                        "0: off; default: the model's own, see its card)")
    g.add_argument("--key-candidates", type=int, default=None,
                   help="sample this many candidates and keep the one whose tokens fit the key best (a model "
                        "with a key guide; 1: one sample; default: the model's own, see its card)")
    g.add_argument("--top-k", type=int, default=250)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, default=2)
    g.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("evaluate", help="FAD, KL, CLAP score, attribute accuracy (and chroma cosine) on held-out "
                                         "captions, with real/shuffled/noise references")
    ev.add_argument("--model", required=True, help="model folder (as `generate --model`)")
    ev.add_argument("--json", required=True, help="where to write the results (JSON)")
    ev.add_argument("--n", type=int, default=100, help="held-out captions, one clip each (default 100)")
    ev.add_argument("--duration", type=float, default=6.0, help="seconds per clip (default 6)")
    ev.add_argument("--seed", type=int, default=0, help="generation seed (batch b uses seed + b)")
    ev.add_argument("--melodies", default=None, help="folder of melody audio: adds chroma cosine (melody models)")
    ev.add_argument("--no-text-only", action="store_true",
                    help="with --melodies: skip the text-only reference (the same captions without the melody)")
    ev.add_argument("--captions", default=None,
                    help="dataset folder with captions + attributes (default: the synthetic held-out set, seed 999001)")
    ev.add_argument("--caption-metadata", action="store_true",
                    help="state every clip's key and bpm in its caption (where it does not already): does the "
                         "model follow them?")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--cfg", type=float, default=None,
                    help="classifier-free guidance coefficient (default: the model's own, 3 unless its card says)")
    ev.add_argument("--top-k", type=int, default=250)
    ev.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--int8", action="store_true",
                    help="evaluate the model and its int8 copy side by side (+ token agreement, speed-up); CPU")
    ev.add_argument("--threads", type=int, default=2)
    ev.set_defaults(func=_cmd_evaluate)

    ex = sub.add_parser("export", help="package a trained LM run with its codec as a model folder")
    exsub = ex.add_subparsers(dest="export_command", required=True)
    el = exsub.add_parser("lm", help="LM run + codec -> a model folder that `generate` loads")
    el.add_argument("run", help="LM run folder (with checkpoint/)")
    el.add_argument("--codec", required=True, help="codec checkpoint folder the tokens came from")
    el.add_argument("--out", required=True, help="model folder to write")
    el.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    el.add_argument("--eval-json", default=None,
                    help="a `musicgen-lite evaluate --json` result to put in the model card (metrics and targets)")
    el.add_argument("--command", default=None, help="the training command, quoted in the model card")
    el.add_argument("--cfg", type=float, default=None,
                    help="the guidance the model generates with by default (default: the one --eval-json used, else 3)")
    el.set_defaults(func=_cmd_export_lm)

    st = sub.add_parser("study", help="train and measure LM variants on the same tokens and budget: "
                                      "patterns | scaling | text_encoders (resumable)")
    st.add_argument("study", choices=["patterns", "scaling", "text_encoders"])
    st.add_argument("--tokens", required=True, help="training token cache (from `tokenize`)")
    st.add_argument("--heldout", required=True, help="held-out token cache (validation loss)")
    st.add_argument("--codec", required=True, help="codec checkpoint folder the tokens came from")
    st.add_argument("--out", required=True, help="the results table (JSON); finished rows are kept")
    st.add_argument("--runs", default="runs/studies", help="where the variants train (default runs/studies)")
    st.add_argument("--steps", type=int, required=True, help="training steps of every variant (the budget)")
    st.add_argument("--scale", default="lite", choices=["tiny", "lite", "full"])
    st.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    st.add_argument("--n-eval", type=int, default=100, help="held-out captions to evaluate (default 100)")
    st.add_argument("--duration", type=float, default=6.0, help="seconds per evaluated clip (default 6)")
    st.add_argument("--batch-size", type=int, default=None)
    st.add_argument("--segment-seconds", type=float, default=None)
    st.add_argument("--lm", default=None, help="the LM where the study does not vary it: a preset (tiny, lite, "
                                               "small...) or a scaling size S | M | L (default: the scale's preset)")
    st.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this much time")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--threads", type=int, default=2)
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    st.add_argument("--ship", default=None, metavar="DIR",
                    help="when every variant is done, store each model in DIR/NAME with int8 weights and the "
                         "codec referenced, and measure what that costs (DIR/packing.json, DIR/README.md); "
                         "a model no longer in --runs is trained again with the table's recipe and checked to "
                         "be the one the table scored")
    st.set_defaults(func=_cmd_study)

    b = sub.add_parser("bench", help="side-by-side benchmarks against peers")
    b.add_argument("name", help="benchmark name, or 'all'")
    b.add_argument("--json", action="store_true", help="one JSON object per row")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from .audio import AudioError
    from .data.render import RenderError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AudioError, RenderError, ValueError, FileNotFoundError) as e:
        print(f"musicgen-lite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
