"""The paper's listening test, in a notebook: rate clips for quality and for relevance to text.

MusicGen's human study asks raters two questions about each clip, each on a 1-100 scale:
**overall quality** (OVL: how good does it sound?) and **relevance to the text** (REL: how
well does it match the caption?). Systems are hidden: the clips of all systems are shuffled
together and each is shown only with an anonymous id and its caption.

- :class:`ListeningTest` builds the trials (shuffled, anonymised, with a fixed seed) and an
  ipywidgets panel (a player, two sliders, a save button that appends one CSV row per
  rating). Without a widget frontend (CI, a plain terminal) it prints a text description
  and the trial list is still there to script against (:meth:`ListeningTest.record`).
- :func:`summarize` turns the CSV into a mean and a 95% confidence interval per system and
  scale (t-distribution: with a handful of raters a normal interval is too narrow).
- :func:`degraded_anchor` makes the low anchor a listening test needs: a version of a
  reference clip that every rater should score low (MUSHRA's 3.5 kHz low-pass, plus noise).
  A rater who scores the anchor high is not listening; drop their ratings.

Example::

    systems = {"real": [(wav, sr, caption), ...], "ours": [...],
               "anchor": [(degraded_anchor(w, sr), sr, c) for w, sr, c in real_items]}
    test = ListeningTest(systems, "ratings.csv", seed=0)
    test.show()                       # the panel (or a text description, headless)
    summarize("ratings.csv")          # {"ours": {"quality": {"mean": .., "ci95": ..}, ...}, ...}
"""
from __future__ import annotations

import csv
import io
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SCALES = ("quality", "relevance")  # the paper's OVL and REL, each 1..100
COLUMNS = ("rater", "trial", "clip_id", "system", "item", "caption", "quality", "relevance", "time")


@dataclass
class Trial:
    """One clip to rate. ``system`` and ``item`` go to the CSV, never on screen."""

    index: int  # position in the presentation order
    clip_id: str  # anonymous id shown to the rater (random, says nothing about the system)
    system: str
    item: int  # index in the system's list
    caption: str
    wav: torch.Tensor  # (C, N) or (N,)
    sample_rate: int


class ListeningTest:
    """Shuffled, anonymised clips from several systems; ratings appended to ``out_csv``.

    ``systems``: ``{name: [(wav, sample_rate, caption), ...]}``. ``seed`` fixes the order and
    the ids, so every rater who uses the same seed hears the same sequence (give each rater
    their own seed to spread order effects).
    """

    def __init__(self, systems: dict, out_csv, seed: int = 0, rater: str = ""):
        if not isinstance(systems, dict) or not systems:
            raise ValueError("systems must be a non-empty dict {name: [(wav, sample_rate, caption), ...]}")
        self.out_csv, self.seed, self.rater = Path(out_csv), seed, rater
        rng = random.Random(seed)
        trials = []
        for name, items in systems.items():
            if not items:
                raise ValueError(f"systems[{name!r}] has no clips")
            for i, item in enumerate(items):
                if not (isinstance(item, (tuple, list)) and len(item) == 3):
                    raise ValueError(f"systems[{name!r}][{i}] must be (wav, sample_rate, caption)")
                wav, sr, caption = item
                if not isinstance(sr, int) or sr <= 0:
                    raise ValueError(f"systems[{name!r}][{i}]: sample_rate must be a positive int, got {sr!r}")
                trials.append((str(name), i, str(caption), torch.as_tensor(wav).detach().float().cpu(), sr))
        rng.shuffle(trials)
        ids = rng.sample(range(16 ** 4), len(trials))  # distinct 4-hex-digit ids
        self.trials = [Trial(k, f"{ids[k]:04x}", s, i, c, w, sr) for k, (s, i, c, w, sr) in enumerate(trials)]
        self.position = 0  # the next trial the panel shows
        self.widgets: dict = {}

    def __len__(self) -> int:
        return len(self.trials)

    # ------------------------------------------------------------------------ ratings
    def record(self, trial: int, quality: int, relevance: int, rater: str | None = None) -> dict:
        """Append one rating (``quality``, ``relevance`` in 1..100) of trial ``trial`` to the CSV."""
        if not 0 <= trial < len(self.trials):
            raise ValueError(f"trial must be in 0..{len(self.trials) - 1}, got {trial}")
        for name, v in (("quality", quality), ("relevance", relevance)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 100:
                raise ValueError(f"{name} must be a number in 1..100, got {v!r}")
        t = self.trials[trial]
        row = {"rater": self.rater if rater is None else rater, "trial": t.index, "clip_id": t.clip_id,
               "system": t.system, "item": t.item, "caption": t.caption, "quality": quality,
               "relevance": relevance, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _append_row_atomic(self.out_csv, row)
        return row

    # ------------------------------------------------------------------------- display
    def describe(self) -> str:
        """A text description of the test, with the trial list (ids and captions only)."""
        n_sys = len({t.system for t in self.trials})
        lines = [f"Listening test: {len(self)} clips from {n_sys} systems, shuffled (seed {self.seed}); "
                 "system names are hidden.",
                 "Rate each clip 1-100 for overall quality and for relevance to its caption; "
                 f"ratings are appended to {self.out_csv}."]
        lines += [f"  {t.index + 1:>3}. clip {t.clip_id}: {t.caption}" for t in self.trials]
        return "\n".join(lines)

    def build_panel(self):
        """The ipywidgets panel: caption, player, two 1-100 sliders, rater name, save button."""
        import ipywidgets as w

        from .nb import audio_html

        header = w.HTML()
        player = w.HTML()
        quality = w.IntSlider(value=50, min=1, max=100, description="quality", continuous_update=False)
        relevance = w.IntSlider(value=50, min=1, max=100, description="relevance", continuous_update=False)
        rater = w.Text(value=self.rater, description="rater", placeholder="your name or id")
        save = w.Button(description="save and next", button_style="primary")
        status = w.HTML()

        def show_current():
            if self.position >= len(self.trials):
                header.value = f"<b>Done: {len(self.trials)} clips rated. Thank you!</b>"
                player.value, save.disabled = "", True
                return
            t = self.trials[self.position]
            header.value = (f"<b>Clip {self.position + 1} of {len(self.trials)}</b> (id {t.clip_id})<br>"
                            f"Caption: <i>{_escape(t.caption)}</i>")
            player.value = audio_html(t.wav, t.sample_rate)
            quality.value = relevance.value = 50

        def on_save(_):
            if self.position >= len(self.trials):
                return
            self.record(self.position, quality.value, relevance.value, rater=rater.value)
            status.value = f"saved clip {self.trials[self.position].clip_id} to {_escape(str(self.out_csv))}"
            self.position += 1
            show_current()

        save.on_click(on_save)
        show_current()
        intro = w.HTML("Rate <b>overall quality</b> (how good does it sound?) and <b>relevance</b> "
                       "(how well does it match the caption?), 1 = bad, 100 = excellent.")
        self.widgets = {"quality": quality, "relevance": relevance, "rater": rater, "save": save,
                        "header": header, "status": status}  # handles for scripting and tests
        return w.VBox([intro, header, player, quality, relevance, rater, save, status])

    def show(self):
        """Display the panel in a live notebook; print :meth:`describe` where widgets cannot render."""
        from .nb import has_widget_frontend

        if not has_widget_frontend():
            print(self.describe())
            return None
        from IPython.display import display

        panel = self.build_panel()
        display(panel)
        return panel


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _append_row_atomic(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV (header first when new), rewriting the file via temp + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerow(row)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(old + buf.getvalue())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ summary

def _rows(ratings) -> list[dict]:
    if isinstance(ratings, (str, Path)):
        path = Path(ratings)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ratings CSV not found")
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if hasattr(ratings, "to_dict"):  # a pandas DataFrame
        return ratings.to_dict("records")
    return list(ratings)


def summarize(ratings, confidence: float = 0.95) -> dict:
    """Per-system mean and confidence interval of each scale.

    ``ratings``: a CSV path (as :class:`ListeningTest` writes), a pandas DataFrame, or a list
    of dicts with ``system``, ``quality``, ``relevance``. The interval is ``mean +- t *
    s / sqrt(n)`` with ``s`` the sample standard deviation and ``t`` the two-sided quantile
    of Student's t with ``n - 1`` degrees of freedom (``ci95`` is that half-width; None when
    ``n < 2``). Returns ``{system: {scale: {"mean", "ci95", "low", "high", "std", "n"}}}``.
    """
    from scipy import stats

    rows = _rows(ratings)
    if not rows:
        raise ValueError("no ratings to summarize")
    by_system: dict[str, dict[str, list[float]]] = {}
    for i, r in enumerate(rows):
        if "system" not in r:
            raise ValueError(f"rating {i} has no 'system'")
        for s in SCALES:
            try:
                v = float(r[s])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"rating {i}: {s!r} must be a number, got {r.get(s)!r}") from None
            by_system.setdefault(str(r["system"]), {k: [] for k in SCALES})[s].append(v)
    out = {}
    for system, scales in sorted(by_system.items()):
        out[system] = {}
        for s, xs in scales.items():
            n = len(xs)
            mean = sum(xs) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n) if n > 1 else None
            out[system][s] = {"mean": mean, "ci95": half, "low": None if half is None else mean - half,
                              "high": None if half is None else mean + half, "std": std, "n": n}
    return out


def format_summary(summary: dict) -> str:
    """The summary as a table: one line per system, ``mean +- ci`` per scale."""
    lines = [f"{'system':<16}" + "".join(f"{s:>20}" for s in SCALES)]
    for system, scales in summary.items():
        cells = []
        for s in SCALES:
            d = scales[s]
            ci = "" if d["ci95"] is None else f" +- {d['ci95']:.1f}"
            cells.append(f"{d['mean']:.1f}{ci} (n={d['n']})")
        lines.append(f"{system:<16}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- anchor

def degraded_anchor(wav, sample_rate: int, cutoff_hz: float = 3500.0, snr_db: float = 20.0,
                    seed: int = 0) -> torch.Tensor:
    """The low anchor: ``wav`` low-passed at ``cutoff_hz`` plus white noise at ``snr_db``.

    MUSHRA (ITU-R BS.1534) uses a 3.5 kHz low-pass of the reference as its low anchor; the
    added noise (``snr_db`` below the low-passed signal's power; ``math.inf``: none) makes
    it bad on a second axis too. The low-pass is ideal: the spectrum's bins above the cutoff
    are zeroed (``rfft`` -> mask -> ``irfft``). ``wav`` is ``[..., N]``; returns the same shape.
    """
    x = torch.as_tensor(wav).float()
    if x.shape[-1] == 0:
        raise ValueError("degraded_anchor: empty audio")
    if not 0 < cutoff_hz < sample_rate / 2:
        raise ValueError(f"cutoff_hz must be in (0, {sample_rate / 2:g}) for {sample_rate} Hz, got {cutoff_hz}")
    N = x.shape[-1]
    spec = torch.fft.rfft(x, dim=-1)  # (..., N // 2 + 1)
    freqs = torch.fft.rfftfreq(N, 1 / sample_rate)
    low = torch.fft.irfft(spec * (freqs <= cutoff_hz), n=N, dim=-1)
    if math.isinf(snr_db):
        return low
    power = low.pow(2).mean().clamp_min(1e-12)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise * torch.sqrt(power / 10 ** (snr_db / 10) / noise.pow(2).mean())
    return low + noise
