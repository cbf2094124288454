"""``make demo``: a headless tour of the project, written to files.

Two parts, both in one folder with an ``index.md`` that lists them:

- :func:`generated_music`: the shipped text-to-music model (``data/checkpoints/musicgen_lite``)
  playing a few captions, each as a wav and a spectrogram PNG, with the seconds it took;
  skipped with a note while no model is shipped;
- :func:`data_tour`: captioned clips of our data (synthetic and corpus melodies), each as a
  wav, a spectrogram PNG and its metadata.
"""
from __future__ import annotations

import json
from pathlib import Path


def data_tour(out, n: int = 6, seconds: float = 8.0, seed: int = 0, sample_rate: int = 32_000) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import nb
    from .audio import save_audio
    from .data.corpus import compose_corpus
    from .data.dataset import clip_seed
    from .data.render import render, which_renderer
    from .data.synth import compose

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# musicgen-lite data tour\n\nRenderer: {which_renderer()}; {sample_rate} Hz mono; {seconds:g} s per clip.\n",
             "| clip | caption | key | bpm | drums |", "|---|---|---|---|---|"]
    for i in range(n):
        source = "corpus" if i % 3 == 2 else "synth"
        cs = clip_seed(seed, i)
        comp = compose(cs, seconds) if source == "synth" else compose_corpus(cs, seconds)
        wav = render(comp, sample_rate)
        name = f"{i:02d}_{source}"
        save_audio(out / f"{name}.wav", wav[None], sample_rate)
        (out / f"{name}.json").write_text(json.dumps(comp.meta, indent=1))
        fig, ax = plt.subplots(figsize=(8, 2.5))
        nb.plot_mel(wav, sample_rate, ax=ax, title=comp.meta["description"][:90])
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=80)
        plt.close(fig)
        m = comp.meta
        lines.append(f"| [{name}.wav]({name}.wav) ([spectrogram]({name}.png)) | {m['description']} | {m['key']} | "
                     f"{m['bpm']} | {'yes' if m['drums'] else 'no'} |")
        print(f"{name}.wav  {m['description']}")
    (out / "index.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {n} clips with spectrograms and metadata to {out}/ (see index.md)")
    return out


DEMO_CAPTIONS = ("a sad piano piece at 70 bpm", "an energetic rock song with drums and electric guitar at 150 bpm",
                 "a calm ambient pad in d minor at 80 bpm", "a cheerful folk tune with flute and acoustic guitar at 110 bpm")


def generated_music(out, captions=DEMO_CAPTIONS, duration: float = 6.0, seed: int = 0, model_path=None) -> list[str]:
    """Generate one clip per caption with the shipped model into ``out``; lines for ``index.md``.

    Without a shipped model (or with an explicit ``model_path`` that does not exist) it returns
    a note instead, so ``make demo`` still runs in a fresh checkout.
    """
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import nb
    from .audio import save_audio
    from .hub import default_model_path, load_musicgen

    path = Path(model_path) if model_path else default_model_path()
    if not (path / "config.json").is_file():
        note = (f"No text-to-music model at {path.name}/ yet (see the README's Training section): "
                "skipping generated music.")
        print(note)
        return [f"## Generated music\n\n{note}\n"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_musicgen(path)
    lines = ["## Generated music\n", f"Model: `{path.name}`; {duration:g} s each, seed {seed}, CFG 3, top-k 250.\n",
             "| clip | caption | seconds to generate |", "|---|---|---|"]
    for i, caption in enumerate(captions):
        t0 = time.perf_counter()
        wav = model.generate([caption], duration=duration, seed=seed + i, progress=False)[0]
        took = time.perf_counter() - t0
        name = f"gen_{i:02d}"
        save_audio(out / f"{name}.wav", wav, model.sample_rate)
        fig, ax = plt.subplots(figsize=(8, 2.5))
        nb.plot_mel(wav, model.sample_rate, ax=ax, title=caption[:90])
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=80)
        plt.close(fig)
        lines.append(f"| [{name}.wav]({name}.wav) ([spectrogram]({name}.png)) | {caption} | {took:.1f} |")
        print(f"{name}.wav  {caption}  ({took:.1f} s)")
    return lines


def demo(out, n: int = 6, seconds: float = 8.0, seed: int = 0) -> Path:
    """The whole headless tour: generated music (when a model is shipped), then the data."""
    out = Path(out)
    gen = generated_music(out, seed=seed)
    data_tour(out, n=n, seconds=seconds, seed=seed)
    index = out / "index.md"
    index.write_text("\n".join(gen) + "\n\n" + index.read_text())
    return out
