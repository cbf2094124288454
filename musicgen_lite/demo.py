"""``make demo``: a headless tour of the project, written to files.

For now it is the data tour: captioned clips (synthetic and corpus melodies), each as a wav,
a spectrogram PNG and its metadata, with an ``index.md`` that lists them. Later stages add
generated music to the same folder.
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
