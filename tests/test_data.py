"""The data: labels true to the audio, captions true to the labels, determinism, manifests."""
from __future__ import annotations

import importlib
import json
import re
import warnings

import numpy as np
import pytest
import torch

from musicgen_lite.audio import AudioError, load_audio, save_audio
from musicgen_lite.data import (AudioDataset, RenderError, compose, compose_corpus, make_dataset, read_info,
                                read_manifest, render, write_manifest)
from musicgen_lite.data.analysis import estimate_key, estimate_tempo, key_label, tempo_agrees
from musicgen_lite.data.dataset import clip_seed, corpus_titles
from musicgen_lite.data.music import INSTRUMENTS, MOOD_WORDS, STYLES

SR = 32_000
# the module (the package exports its `render` function under the same name)
render_mod = importlib.import_module("musicgen_lite.data.render")


# ------------------------------------------------------------------ labels true to the audio

@pytest.fixture(scope="module")
def rendered_clips():
    """30 synthetic clips of 8 s at 32 kHz, as the data is made (about 10 s to render)."""
    clips = []
    for i in range(30):
        comp = compose(clip_seed(2024, i), 8.0)
        clips.append((comp.meta, render(comp, SR)))
    return clips


def test_beat_tracker_agrees_with_bpm_label(rendered_clips):
    with_drums = [(m, w) for m, w in rendered_clips if m["drums"]]
    assert len(with_drums) >= 12
    hits = [tempo_agrees(estimate_tempo(w, SR), m["bpm"]) for m, w in with_drums]
    # measured: 53/53 synthetic and 20/20 corpus clips with drums agree within 8%
    assert np.mean(hits) >= 0.85, f"{sum(hits)}/{len(hits)} clips agree"


def test_key_from_chroma_agrees_with_key_label(rendered_clips):
    hits = [key_label(*estimate_key(w, SR)) == m["key"] for m, w in rendered_clips]
    # measured: 75% of 60 synthetic and 83% of 30 corpus clips (exact tonic and mode)
    assert np.mean(hits) >= 0.6, f"{sum(hits)}/{len(hits)} keys agree"


def test_tempo_agreement_rule():
    assert tempo_agrees(121.0, 120) and tempo_agrees(60.5, 120) and tempo_agrees(236.0, 120)
    assert not tempo_agrees(135.0, 120) and not tempo_agrees(90.0, 120)


def test_key_estimator_on_a_known_scale():
    """A plain C-major and A-minor cadence, rendered, are found in their keys."""
    from musicgen_lite.data.music import Composition, Note, Track

    def cadence(chords):
        notes = [Note(i * 0.5, i * 0.5 + 0.48, p, 90) for i, ch in enumerate(chords) for p in ch]
        return Composition([Track("piano", 0, "harmony", notes)], 0.5 * len(chords) + 0.5)

    c_major = cadence([[48, 64, 67, 72], [53, 65, 69, 72], [55, 62, 67, 71], [48, 64, 67, 72]] * 2)
    a_minor = cadence([[45, 64, 69, 72], [50, 65, 69, 74], [52, 64, 68, 71], [45, 64, 69, 72]] * 2)
    assert key_label(*estimate_key(render(c_major, SR), SR)) == "C major"
    assert key_label(*estimate_key(render(a_minor, SR), SR)) == "A minor"


# --------------------------------------------------------------------- captions and attributes

def test_captions_name_the_attributes():
    for seed in range(60):
        m = compose(seed, 4.0).meta
        text = m["description"].lower()
        assert all(i in text for i in m["instruments"]), text
        style_words = {m["style"], *STYLES[m["style"]].noun}
        assert any(w in text for w in style_words), text
        assert any(w in text for w in m["moods"]), text
        assert m["mood"] == MOOD_WORDS[(m["mode"], m["tempo_bucket"])][0]
        drums_said = bool(re.search(r"\bdrums?\b(?!less)|drum kit|drum beat|drum groove", text)) and not re.search(
            r"no drums|without drums|no percussion|without percussion|drumless", text)
        assert drums_said == m["drums"], text
        tempo_said = str(m["bpm"]) in text or any(w in text for w in (
            "slow", "unhurried", "gentle-paced", "laid-back", "mid-tempo", "moderate", "steady", "medium-tempo",
            "fast", "quick", "lively", "uptempo"))
        assert tempo_said, text


def test_captions_vary():
    captions = [compose(seed, 4.0).meta["description"] for seed in range(100)]
    assert len(set(captions)) == 100
    openings = {" ".join(c.lower().split()[:2]) for c in captions}
    assert len(openings) >= 25  # many phrasings, not one template with slots


def test_attributes_cover_the_space():
    metas = [compose(seed, 2.0).meta for seed in range(300)]
    assert {m["style"] for m in metas} == set(STYLES)
    assert {m["mode"] for m in metas} == {"major", "minor"}
    assert {m["drums"] for m in metas} == {True, False}
    assert len({m["tonic"] for m in metas}) == 12
    used = {i for m in metas for i in m["instruments"]}
    assert used == set(INSTRUMENTS)
    assert {len(m["instruments"]) for m in metas} == {1, 2, 3}
    assert all(60 <= m["bpm"] <= 180 for m in metas)
    for m in metas:  # audiocraft's metadata fields are all there
        for k in ("description", "title", "artist", "key", "bpm", "genre", "moods", "keywords", "instrument"):
            assert k in m


def test_melody_metadata_matches_the_notes():
    comp = compose(5, 6.0)
    mel = comp.only("melody")
    assert len(mel.tracks) == 1 and comp.meta["melody"] == comp.melody_notes()
    assert all(0 <= s < e <= 6.0 for s, e, _ in comp.meta["melody"])


# ------------------------------------------------------------------------------- corpus

def test_corpus_clip_carries_the_real_melody():
    from music21 import corpus

    comp = compose_corpus(seed=11, seconds=6.0, collection="folk")
    meta = comp.meta
    assert meta["source"] == "corpus" and meta["corpus_path"].startswith("ryansMammoth/")
    score = corpus.parse(meta["corpus_path"])
    ref = [n for n in score.parts[0].flatten().notes if n.duration.quarterLength > 0]
    ref_pitches = [max(p.midi for p in n.pitches) for n in ref]
    ours = [p for _, _, p in meta["melody"]]
    shift = ours[0] - ref_pitches[0]
    assert shift % 12 == 0  # only moved by octaves into the instrument's range
    n = min(len(ours), len(ref_pitches))
    assert n >= 8 and [p - shift for p in ours[:n]] == ref_pitches[:n]
    beat = 60.0 / meta["bpm"]
    onsets = [float(x.offset) - float(ref[0].offset) for x in ref[:n]]
    assert np.allclose([s for s, _, _ in meta["melody"][:n]], np.array(onsets) * beat, atol=1e-3)


def test_chorale_clip_uses_its_four_voices():
    comp = compose_corpus(seed=3, seconds=6.0, collection="chorale")
    assert comp.meta["collection"] == "chorale" and comp.meta["title"].startswith("Chorale BWV")
    assert comp.meta["artist"] == "J. S. Bach"
    harmony = [t for t in comp.tracks if t.role in ("harmony", "bass")]
    assert harmony and all(t.notes for t in harmony)


# ------------------------------------------------------------------------- rendering

def test_render_length_is_exact_and_bounded():
    for seed, seconds in [(1, 1.0), (2, 2.37), (3, 5.0)]:
        comp = compose(seed, seconds)
        for renderer in ("fluidsynth", "builtin") if render_mod.fluidsynth_available() else ("builtin",):
            wav = render(comp, 16_000, renderer=renderer)
            assert wav.shape == (round(seconds * 16_000),) and wav.dtype == np.float32
            assert np.isfinite(wav).all() and 0.5 < np.abs(wav).max() <= 0.9 + 1e-6


@pytest.mark.skipif(not render_mod.fluidsynth_available(), reason="FluidSynth not installed")
def test_fluidsynth_is_deterministic_whatever_came_before():
    a = render(compose(1, 3.0), SR)
    render(compose(2, 2.1), SR)  # something else in between
    assert np.array_equal(a, render(compose(1, 3.0), SR))


@pytest.mark.skipif(not render_mod.fluidsynth_available(), reason="FluidSynth not installed")
def test_same_bytes_in_another_process_whatever_seeds_rand():
    """A Jupyter kernel seeds the C library's rand(); FluidSynth's 16-bit dither draws from it."""
    import subprocess
    import sys

    code = ("import ctypes, sys, numpy as np; ctypes.CDLL(None).srand(987654);"
            "from musicgen_lite.data import compose, render;"
            "sys.stdout.buffer.write(render(compose(4, 2.0), 32000).tobytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out == render(compose(4, 2.0), SR).tobytes()


def test_missing_fluidsynth_is_a_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(render_mod, "_fluidsynth_module", lambda: None)
    render_mod._warn_fallback_once.cache_clear()
    comp = compose(1, 1.0)
    with pytest.raises(RenderError, match="FluidSynth rendering is unavailable: missing the FluidSynth library"):
        render(comp, SR, renderer="fluidsynth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wav = render(comp, SR, renderer="auto")
    assert wav.shape == (SR,) and any("built-in synthesizer" in str(w.message) for w in caught)
    assert np.array_equal(wav, render(comp, SR, renderer="builtin"))


def test_bad_soundfont_and_arguments(monkeypatch):
    monkeypatch.setenv("MUSICGEN_LITE_SOUNDFONT", "/nonexistent/GM.sf2")
    with pytest.raises(RenderError, match="MUSICGEN_LITE_SOUNDFONT=/nonexistent/GM.sf2: no such file"):
        render(compose(1, 1.0), SR)
    monkeypatch.delenv("MUSICGEN_LITE_SOUNDFONT")
    with pytest.raises(ValueError, match="sample_rate"):
        render(compose(1, 1.0), 100)
    with pytest.raises(ValueError, match="renderer"):
        render(compose(1, 1.0), SR, renderer="timidity")


# ---------------------------------------------------------------------- datasets on disk

def test_same_seed_same_bytes(tmp_path, synth_dataset):
    again = make_dataset(tmp_path / "again", n=12, seconds=3.0, seed=7, sample_rate=16_000, workers=1,
                         progress=False)
    for a, b in zip(read_manifest(synth_dataset), read_manifest(again)):
        assert a.path.read_bytes() == b.path.read_bytes()
        assert a.path.with_suffix(".json").read_text() == b.path.with_suffix(".json").read_text()
    other = make_dataset(tmp_path / "other", n=2, seconds=3.0, seed=8, sample_rate=16_000, workers=1, progress=False)
    assert read_manifest(other)[0].path.read_bytes() != read_manifest(synth_dataset)[0].path.read_bytes()


def test_dataset_folder_layout(synth_dataset):
    lines = (synth_dataset / "data.jsonl").read_text().splitlines()
    assert len(lines) == 12
    for line in lines:
        row = json.loads(line)
        assert set(row) >= {"path", "duration", "sample_rate"} and row["duration"] == 3.0
    meta = read_manifest(synth_dataset)[0]
    info = read_info(meta)
    assert info["description"] and info["sample_rate"] == 16_000
    stem = (meta.path.parent / info["melody_path"]).resolve()
    wav, sr = load_audio(stem)
    assert sr == 16_000 and wav.shape == (1, 48_000)


def test_cached_dataset_is_reused(synth_dataset):
    before = (synth_dataset / "data.jsonl").stat().st_mtime_ns
    make_dataset(synth_dataset, n=12, seconds=3.0, seed=7, sample_rate=16_000, workers=2, progress=False)
    assert (synth_dataset / "data.jsonl").stat().st_mtime_ns == before


def test_corpus_dataset(tmp_path):
    root = make_dataset(tmp_path / "c", n=2, seconds=2.0, seed=0, source="corpus", sample_rate=16_000, workers=1,
                        progress=False)
    infos = [read_info(m) for m in read_manifest(root)]
    assert all(i["source"] == "corpus" and i["melody"] and i["corpus_path"] for i in infos)
    # a held-out set that leaves out every tune of the first one: same seed, other tunes
    held = make_dataset(tmp_path / "h", n=2, seconds=2.0, seed=0, source="corpus", sample_rate=16_000, workers=1,
                        progress=False, exclude_tunes_of=root)
    used, fresh = set(corpus_titles(root)), set(corpus_titles(held))
    assert len(used) >= 1 and len(fresh) >= 1 and not used & fresh
    assert json.loads((held / "dataset.json").read_text())["exclude_tunes"]["count"] == len(used)
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        corpus_titles(tmp_path)


def test_compose_corpus_skips_excluded_titles():
    first = compose_corpus(seed=11, seconds=2.0, collection="folk").meta["title"]
    other = compose_corpus(seed=11, seconds=2.0, collection="folk", exclude_titles={first}).meta["title"]
    assert other != first
    assert compose_corpus(seed=11, seconds=2.0, collection="folk", exclude_titles={"no such tune"}).meta["title"] == first


def test_manifest_round_trip_on_a_users_folder(tmp_path):
    music = tmp_path / "my music"
    (music / "album").mkdir(parents=True)
    t = torch.linspace(0, 1, 22_050)
    save_audio(music / "a.wav", 0.3 * torch.sin(2 * np.pi * 220 * t), 22_050)
    save_audio(music / "album" / "b.flac", 0.3 * torch.sin(2 * np.pi * 330 * t[:11_025]), 22_050)
    (music / "notes.txt").write_text("not audio")
    out = write_manifest(music)
    metas = read_manifest(music)
    assert out == music / "data.jsonl"
    assert [m.path.name for m in metas] == ["a.wav", "b.flac"]
    assert [m.duration for m in metas] == pytest.approx([22_050 / 22_050, 11_025 / 22_050])
    assert all(m.sample_rate == 22_050 for m in metas)
    ds = AudioDataset(music, segment_seconds=0.4, sample_rate=16_000)
    assert len(ds) == 3 + 1  # 1 s -> 2 full segments + a 0.2 s tail (half a segment: kept); 0.5 s -> 1
    wav, info = ds[0]
    assert wav.shape == (1, 6_400) and info["path"].endswith("a.wav") and info["n_samples"] == 6_400


def test_manifest_errors_name_the_file(tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(AudioError, match=r"broken\.wav"):
        write_manifest(tmp_path)
    (tmp_path / "broken.wav").unlink()
    with pytest.raises(AudioError, match="no audio files found"):
        write_manifest(tmp_path)
    with pytest.raises(AudioError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"path": "x.wav"}\n')
    with pytest.raises(AudioError, match=r"data\.jsonl:1: bad manifest line"):
        read_manifest(tmp_path)


def test_segments_padding_and_collate(synth_dataset):
    ds = AudioDataset(synth_dataset, segment_seconds=2.0, sample_rate=16_000)
    assert len(ds) == 12 * 2  # 3 s -> [0, 2) and [2, 3) padded (1 s >= half a segment)
    wav, info = ds[1]
    assert wav.shape == (1, 32_000) and info["seek_time"] == 2.0 and info["n_samples"] == 16_000
    assert torch.count_nonzero(wav[:, 16_000:]) == 0
    batch, infos = AudioDataset.collate([ds[0], ds[1]])
    assert batch.shape == (2, 1, 32_000) and len(infos) == 2
    whole = AudioDataset(synth_dataset, sample_rate=16_000)
    assert len(whole) == 12 and whole[0][0].shape == (1, 48_000)
    rnd = AudioDataset(synth_dataset, segment_seconds=1.0, sample_rate=16_000, random_segments=True, seed=1)
    a = rnd[3][1]["seek_time"]
    assert rnd[3][1]["seek_time"] == a  # same epoch, same segment
    rnd.set_epoch(1)
    assert 0.0 <= rnd[3][1]["seek_time"] <= 2.0


def test_make_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source"):
        make_dataset(tmp_path, n=1, source="radio")
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(tmp_path, n=0)
    with pytest.raises(ValueError, match="seconds"):
        make_dataset(tmp_path, n=1, seconds=-3)
    with pytest.raises(AudioError, match="impossible sample rate"):
        make_dataset(tmp_path, n=1, sample_rate=5)


# ------------------------------------------------------------------------------ token cache

def test_token_cache_matches_the_codec_and_is_rebuilt_when_it_changes(tmp_path):
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.data.dataset import TokenDataset, build_token_cache

    root = make_dataset(tmp_path / "d", n=3, seconds=1.0, seed=3, sample_rate=16_000, workers=1,
                        melody_stems=False, progress=False)
    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()
    cache = build_token_cache(root, codec, clips_per_shard=2, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "shard_00000.npy", "shard_00001.npy"]
    ds = TokenDataset(cache)
    for i, meta in enumerate(read_manifest(root)):
        wav, _ = load_audio(meta.path, 16_000)
        codes, info = ds[i]
        assert torch.equal(codes, codec.encode(wav[None])[0]) and info["description"]
    # reused while codec and data are the same; rebuilt when either changes
    stamp = (cache / "index.json").stat().st_mtime_ns
    assert build_token_cache(root, codec, progress=False) == cache and (cache / "index.json").stat().st_mtime_ns == stamp
    with torch.no_grad():
        next(codec.parameters()).add_(0.01)
    build_token_cache(root, codec, progress=False)
    assert json.loads((cache / "index.json").read_text())["fingerprint"]["codec"] != ds.fingerprint["codec"]
    # segments: consecutive windows, the last one padded and counted
    segs = TokenDataset(cache, segment_frames=20)
    T = ds[0][0].shape[-1]
    assert len(segs) == 3 * -(-T // 20)
    first, info = segs[0]
    last, info_last = segs[-(-T // 20) - 1]
    assert first.shape == (4, 20) and info["n_frames"] == 20 and info_last["n_frames"] == T - 20 * (T // 20)
    assert (last[:, info_last["n_frames"]:] == 0).all()
    with pytest.raises(FileNotFoundError, match="no token cache"):
        TokenDataset(tmp_path)


def test_tokenize_command(tmp_path):
    from musicgen_lite.cli import main
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.hub import save_checkpoint

    root = make_dataset(tmp_path / "d", n=2, seconds=1.0, seed=4, sample_rate=16_000, workers=1,
                        melody_stems=False, progress=False)
    codec = CompressionModel(codec_config("tiny"))
    save_checkpoint(tmp_path / "codec", codec, codec.config.to_dict())
    assert main(["tokenize", str(root), "--codec", str(tmp_path / "codec")]) == 0
    assert (root / "tokens" / "index.json").exists()
    assert main(["tokenize", str(root), "--codec", str(tmp_path / "missing")]) != 0


def test_mix_source_interleaves_corpus_tunes(tmp_path):
    from musicgen_lite.data.dataset import read_info, read_manifest

    root = make_dataset(tmp_path / "m", n=4, seconds=1.5, seed=3, source="mix", sample_rate=16_000, workers=1,
                        melody_stems=False, progress=False)
    names = [read_info(m)["name"] for m in read_manifest(root)]
    assert names == ["synth_000000", "synth_000001", "synth_000002", "corpus_000003"]
    corpus = make_dataset(tmp_path / "c", n=4, seconds=1.5, seed=3, source="corpus", sample_rate=16_000, workers=1,
                          melody_stems=False, progress=False)
    # the corpus clip of the mix is the corpus source's clip 3 (same seed, same index)
    assert (root / "audio" / "corpus_000003.wav").read_bytes() == (corpus / "audio" / "corpus_000003.wav").read_bytes()


def test_caption_for_training_adds_the_key_and_bpm_a_caption_lacks():
    from musicgen_lite.data.dataset import caption_for_training

    info = {"description": "Calm ambient piece for piano.", "key": "D minor", "bpm": 71}
    assert caption_for_training(info, 0.0, 0) == "Calm ambient piece for piano."
    assert caption_for_training(info, 1.0, 0) == "Calm ambient piece for piano, in D minor, 71 bpm"
    said = {"description": "rock in A major at 120 bpm", "key": "A major", "bpm": 120}
    assert caption_for_training(said, 1.0, 0) == said["description"]  # already says both
    # key from tonic + mode when there is no key field; no bpm field, no bpm
    assert caption_for_training({"description": "folk tune", "tonic": "G", "mode": "major"}, 1.0, 0) == (
        "folk tune, in G major")
    # p = 0.5: about half of each is added, the same draws for the same stream
    outs = [caption_for_training(info, 0.5, f"s:{i}") for i in range(400)]
    assert outs == [caption_for_training(info, 0.5, f"s:{i}") for i in range(400)]
    keys, bpms = sum("D minor" in o for o in outs) / 400, sum("71 bpm" in o for o in outs) / 400
    assert 0.4 < keys < 0.6 and 0.4 < bpms < 0.6
