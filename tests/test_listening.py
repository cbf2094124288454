"""The listening test: shuffled anonymous trials, the widget panel headless, CSV rows, t-intervals, the anchor."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from musicgen_lite.listening import ListeningTest, degraded_anchor, format_summary, summarize

SR = 8000


def _systems(n=4):
    t = torch.arange(SR // 2) / SR
    tone = lambda f: 0.3 * torch.sin(2 * math.pi * f * t)[None]  # noqa: E731  (1, N)
    return {"ours": [(tone(220 * (i + 1)), SR, f"caption {i}") for i in range(n)],
            "baseline": [(tone(330 * (i + 1)), SR, f"caption {i}") for i in range(n)],
            "real": [(tone(440 * (i + 1)), SR, f"caption {i}") for i in range(n)]}


def test_trials_are_shuffled_anonymised_and_fixed_by_seed(tmp_path):
    a = ListeningTest(_systems(), tmp_path / "r.csv", seed=3)
    b = ListeningTest(_systems(), tmp_path / "r.csv", seed=3)
    c = ListeningTest(_systems(), tmp_path / "r.csv", seed=4)
    order = lambda lt: [(t.system, t.item) for t in lt.trials]  # noqa: E731
    assert order(a) == order(b) and [t.clip_id for t in a.trials] == [t.clip_id for t in b.trials]
    assert order(a) != order(c)
    # every clip once, and not grouped by system (the order as given would be ours x4, baseline x4, real x4)
    assert sorted(order(a)) == sorted((s, i) for s in ("ours", "baseline", "real") for i in range(4))
    assert order(a) != [(s, i) for s in ("ours", "baseline", "real") for i in range(4)]
    assert len({t.clip_id for t in a.trials}) == len(a)
    # what a rater sees names no system
    text = a.describe()
    assert all(s not in text for s in ("ours", "baseline", "real"))
    assert all(t.clip_id in text for t in a.trials)
    assert all(s not in t.clip_id for t in a.trials for s in ("ours", "baseline", "real"))


def test_panel_builds_headless_and_save_appends_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSICGEN_LITE_NO_WIDGETS", "1")
    out = tmp_path / "sub" / "ratings.csv"
    lt = ListeningTest(_systems(2), out, seed=0, rater="ann")
    assert lt.show() is None  # no frontend: a text description instead
    assert "6 clips from 3 systems" in capsys.readouterr().out

    panel = lt.build_panel()  # the widgets themselves build without a frontend
    w = lt.widgets
    assert panel.children and "Clip 1 of 6" in w["header"].value
    assert all(s not in w["header"].value for s in ("ours", "baseline", "real"))
    w["quality"].value, w["relevance"].value = 80, 30
    w["save"].click()
    w["quality"].value, w["relevance"].value = 10, 95
    w["save"].click()
    assert "Clip 3 of 6" in w["header"].value and lt.position == 2
    rows = list(csv.DictReader(open(out)))
    assert [(r["system"], int(r["item"])) for r in rows] == [(t.system, t.item) for t in lt.trials[:2]]
    assert [(r["quality"], r["relevance"], r["rater"]) for r in rows] == [("80", "30", "ann"), ("10", "95", "ann")]
    with pytest.raises(ValueError, match="quality"):
        lt.record(0, 0, 50)
    with pytest.raises(ValueError, match="trial"):
        lt.record(99, 50, 50)


def test_summary_matches_the_t_interval(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(0)
    scores = {"ours": (rng.integers(40, 90, 7), rng.integers(30, 80, 7)),
              "anchor": (rng.integers(1, 30, 5), rng.integers(1, 50, 5))}
    lt = ListeningTest({"ours": [(torch.zeros(1, 100), SR, "x")], "anchor": [(torch.zeros(1, 100), SR, "x")]},
                       tmp_path / "r.csv", seed=0)
    trial_of = {t.system: t.index for t in lt.trials}
    rows = []
    for system, (q, r) in scores.items():
        for qi, ri in zip(q, r):
            rows.append(lt.record(trial_of[system], int(qi), int(ri), rater=f"r{len(rows)}"))
    from_csv, from_rows = summarize(tmp_path / "r.csv"), summarize(rows)
    assert from_csv == from_rows
    for system, (q, r) in scores.items():
        for scale, x in (("quality", q), ("relevance", r)):
            s = from_csv[system][scale]
            low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
            assert s["n"] == len(x)
            assert s["mean"] == pytest.approx(x.mean())
            assert (s["low"], s["high"]) == pytest.approx((low, high))
    # a lone rating has no interval
    lone = summarize([{"system": "a", "quality": 50, "relevance": 60}])["a"]["quality"]
    assert lone["mean"] == 50 and lone["ci95"] is None
    assert "anchor" in format_summary(from_csv)
    with pytest.raises(ValueError, match="relevance"):
        summarize([{"system": "a", "quality": 50}])


def test_summary_of_a_pandas_dataframe():
    pd = pytest.importorskip("pandas")
    rows = [{"system": s, "quality": q, "relevance": r} for s, q, r in
            [("a", 50, 60), ("a", 70, 40), ("b", 20, 30), ("b", 25, 35), ("b", 30, 20)]]
    assert summarize(pd.DataFrame(rows)) == summarize(rows)


def test_anchor_is_a_3_5_khz_lowpass_plus_noise():
    sr = 16_000
    t = torch.arange(sr, dtype=torch.float64) / sr  # float64: float32 sin of ~4e4 rad is off by 1e-3
    low, high = torch.sin(2 * math.pi * 1000 * t).float(), 0.5 * torch.sin(2 * math.pi * 6000 * t).float()
    # without noise: exactly the part below the cutoff (both tones fall on exact FFT bins)
    torch.testing.assert_close(degraded_anchor((low + high)[None], sr, snr_db=math.inf), low[None], atol=1e-4, rtol=0)
    anchor = degraded_anchor((low + high)[None], sr, snr_db=20.0, seed=1)
    noise = anchor - low[None]
    snr = 10 * math.log10(low.pow(2).mean() / noise.pow(2).mean())
    assert snr == pytest.approx(20.0, abs=0.01)
    assert torch.equal(anchor, degraded_anchor((low + high)[None], sr, snr_db=20.0, seed=1))
    with pytest.raises(ValueError, match="cutoff_hz"):
        degraded_anchor(low, 6000)
