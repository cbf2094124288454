"""Training MusicGen-melody: chroma in the token cache, aligned segments, the melody LM trainer, model folders."""
from __future__ import annotations

import json
import math

import pytest
import torch

from musicgen_lite.audio import load_audio, save_audio
from musicgen_lite.conditioning import ChromaExtractor
from musicgen_lite.data import make_dataset, read_manifest, write_manifest
from musicgen_lite.data.dataset import SILENT, TokenDataset, _window_peaks, build_token_cache, chroma_radix2_exp

SR = 16_000  # the tiny codec's rate: chroma n_fft 2 ** 13, hop 2048 = 0.128 s, 7.8125 chroma frames/s


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, whatever an earlier test's CLI call (``--threads 2``) left behind: training on an
    oversubscribed pool ran 5x slower next to the background jobs of a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tones(midis, seconds: float) -> torch.Tensor:
    """A melody ``[N]`` at 16 kHz: one sine per midi note, ``seconds`` each."""
    t = torch.arange(int(seconds * SR)) / SR
    return torch.cat([0.3 * torch.sin(2 * math.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midis])


def write_tunes(root, n: int, seed: int = 0, stems: bool = True):
    """``n`` one-second clips in the dataset format: mix = 4 random notes + a low drone, the notes alone
    in ``stems/`` (named by the sidecar's ``melody_path``, as ``make_dataset`` does)."""
    g = torch.Generator().manual_seed(seed)
    drone = 0.1 * torch.sin(2 * math.pi * 110 * torch.arange(SR) / SR)
    for i in range(n):
        melody = tones((60 + torch.randint(0, 12, (4,), generator=g)).tolist(), 0.25)
        save_audio(root / "audio" / f"tune{i}.wav", (melody + drone)[None], SR)
        info = {"description": "a tune on a drone"}
        if stems:
            save_audio(root / "stems" / f"tune{i}.melody.wav", melody[None], SR)
            info["melody_path"] = f"../stems/tune{i}.melody.wav"
        (root / "audio" / f"tune{i}.json").write_text(json.dumps(info))
    write_manifest(root)
    return root


def fitted_codec(root):
    """The tiny codec with its codebooks k-means-initialised on the clips (a fresh one gives all-zero codes)."""
    from musicgen_lite.codec import CompressionModel, codec_config

    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny"))
    wavs = torch.stack([load_audio(m.path, SR)[0] for m in read_manifest(root)])  # (B, 1, N)
    with torch.no_grad():
        codec.train()(wavs)
    return codec.eval()


@pytest.fixture(scope="module")
def tunes(tmp_path_factory):
    """4 one-second tunes with stems, a fitted tiny codec saved as a folder, and the token cache."""
    from musicgen_lite.hub import load_codec, save_checkpoint

    tmp = tmp_path_factory.mktemp("tunes")
    root = write_tunes(tmp / "data", 4)
    codec = fitted_codec(root)
    save_checkpoint(tmp / "codec", codec, codec.config.to_dict())
    cache = build_token_cache(root, load_codec(tmp / "codec"), progress=False)
    return tmp, root, cache


# ------------------------------------------------------------------------------ the cache

def test_chroma_window_is_musicgens_in_seconds():
    """MusicGen: n_fft 2 ** 14 at 32 kHz (0.512 s), hop a quarter. At 16 kHz 2 ** 13 is the same time."""
    assert chroma_radix2_exp(32_000) == 14 and chroma_radix2_exp(16_000) == 13
    ref, ours = ChromaExtractor(32_000, radix2_exp=14), ChromaExtractor(16_000, radix2_exp=chroma_radix2_exp(16_000))
    assert ref.n_fft / 32_000 == ours.n_fft / 16_000 == 0.512
    assert ref.hop_length / 32_000 == ours.hop_length / 16_000 == 0.128


def test_cached_chroma_is_the_extractors_on_the_stem(tmp_path):
    """Rendered clips (make_dataset with stems): the cache holds ChromaExtractor's argmax of each stem,
    rests aside; a cache without stems (or asked without chroma) has none, and settings are fingerprinted."""
    from musicgen_lite.codec import CompressionModel, codec_config

    root = make_dataset(tmp_path / "d", n=2, seconds=2.0, seed=5, sample_rate=SR, workers=1, progress=False)
    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()
    cache = build_token_cache(root, codec, progress=False)  # stems exist: chroma by default
    ds = TokenDataset(cache)
    chroma_fp = ds.fingerprint["chroma"]
    assert chroma_fp["radix2_exp"] == 13 and chroma_fp["from_stem"] == 2 and chroma_fp["from_mix"] == 0
    extractor = ChromaExtractor(SR, radix2_exp=13)
    stems_differ = False
    for i, meta in enumerate(read_manifest(root)):
        _, info = ds[i]
        assert info["chroma_source"] == "stem"
        stem, _ = load_audio(root / "stems" / f"{meta.path.stem}.melody.wav", SR)
        expected = extractor(stem[None])[0]  # (T, 12) one-hot
        got = info["chroma"]
        assert got.shape == expected.shape and torch.equal(got.sum(-1), torch.ones(len(got)))
        rests = _window_peaks(stem[0], extractor.n_fft, extractor.hop_length) < 1e-5
        assert torch.equal(got[~rests], expected[~rests])
        assert (got[rests].argmax(-1) == 0).all()  # a rest reads as the null melody (the chroma of silence)
        mix, _ = load_audio(meta.path, SR)
        stems_differ |= not torch.equal(extractor(mix[None])[0], expected)
    assert stems_differ  # so the check above really tells the stem from the mix

    # another chroma window: fingerprint differs, cache rebuilt; chroma=False: a cache without it
    build_token_cache(root, codec, progress=False, radix2_exp=12)
    assert TokenDataset(cache).fingerprint["chroma"]["radix2_exp"] == 12
    assert TokenDataset(cache)[0][1]["chroma"].shape[0] == 2 * SR // 1024 + 1
    build_token_cache(root, codec, progress=False, chroma=False)
    assert "chroma" not in TokenDataset(cache).fingerprint and "chroma" not in TokenDataset(cache)[0][1]
    assert not list(cache.glob("chroma_*.npy"))
    with pytest.raises(ValueError, match="no melody chroma"):
        TokenDataset(cache, chroma=True)


def test_rests_are_stored_as_the_null_melody():
    """A melody with a rest: frames whose whole window is silent are SILENT in the cache, and read back
    as MelodyConditioner's null melody; every other frame is the extractor's pitch class."""
    from musicgen_lite.conditioning import MelodyConditioner
    from musicgen_lite.data.dataset import chroma_classes, chroma_one_hot

    wav = torch.cat([tones([64], 1.0), torch.zeros(2 * SR), tones([67], 1.0)])  # E, 2 s rest, G
    extractor = ChromaExtractor(SR, radix2_exp=13)
    classes = torch.from_numpy(chroma_classes(wav, extractor)).long()
    expected = extractor(wav.view(1, 1, -1))[0].argmax(-1)
    rest = classes == SILENT
    assert rest.sum() >= 4 and torch.equal(classes[~rest], expected[~rest])
    assert classes[0] == 4 and classes[-1] == 7  # E, G
    null = MelodyConditioner(SR, 8, radix2_exp=13).null_chroma(1, int(rest.sum()))[0]
    assert torch.equal(chroma_one_hot(classes)[rest], null)


def test_chroma_from_the_mix_without_stems(tmp_path):
    from musicgen_lite.codec import CompressionModel, codec_config

    root = write_tunes(tmp_path / "d", 2, stems=False)
    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()
    default = TokenDataset(build_token_cache(root, codec, progress=False))
    assert "chroma" not in default.fingerprint  # by default only where stems exist
    cache = build_token_cache(root, codec, progress=False, chroma=True)
    ds = TokenDataset(cache)
    assert ds.fingerprint["chroma"]["from_mix"] == 2 and ds.clips[0]["chroma_source"] == "mix"
    mix, _ = load_audio(read_manifest(root)[0].path, SR)
    assert torch.equal(ds[0][1]["chroma"], ChromaExtractor(SR, radix2_exp=13)(mix[None])[0])


def test_segments_carry_the_chroma_of_their_time(tunes):
    """Consecutive segments of 32 codec frames (0.64 s = 5 chroma hops, where the two grids meet): each
    segment's chroma is the extractor's chroma of the stem from the segment's start on (exactly, past
    the first two frames, whose windows reach before the start); random segments take the chroma frame
    nearest their start."""
    _, root, cache = tunes
    extractor = ChromaExtractor(SR, radix2_exp=13)
    seg = TokenDataset(cache, segment_frames=32)
    whole = TokenDataset(cache)
    assert seg.chroma_frames(32) == 5 and seg.chroma_frames(50) == 8  # ceil(frames / 50 * 7.8125)
    for i in range(len(seg)):
        codes, info = seg[i]
        clip = seg.items[i][0]
        stem, _ = load_audio(root / "stems" / f"tune{clip}.melody.wav", SR)
        start = info["start_frame"] * 320  # samples: the codec's hop
        assert info["chroma_start"] * 2048 == start
        later = extractor(stem[None, :, start:])[0]  # (T', 12), frame 0 at the segment's start
        n = min(5, seg.clips[clip]["chroma_frames"] - info["chroma_start"])  # frames the clip has
        assert torch.equal(info["chroma"][2:n], later[2:n])
        assert torch.equal(codes[:, :info["n_frames"]], whole[clip][0][:, info["start_frame"]:][:, :info["n_frames"]])
        assert (info["chroma"][n:].argmax(-1) == 0).all()  # past the clip's end: the null melody
    rand = TokenDataset(cache, segment_frames=20, random_segments=True, seed=3)
    starts = set()
    for epoch in range(4):
        rand.set_epoch(epoch)
        for i in range(len(rand)):
            _, info = rand[i]
            starts.add(info["start_frame"])
            c0 = info["chroma_start"]
            assert abs(c0 / 7.8125 - info["start_frame"] / 50) <= 0.5 / 7.8125 + 1e-9  # within half a hop
            full = whole[i][1]["chroma"]
            assert info["chroma"].shape == (4, 12) and torch.equal(info["chroma"], full[c0:c0 + 4])
    assert len(starts) > 3


# --------------------------------------------------------------------------- the trainer

def test_melody_lm_resumes_exactly(tmp_path, tunes):
    from musicgen_lite.training import train_lm

    _, _, cache = tunes
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", melody=True, progress=False, log_every=1)
    whole = train_lm(tmp_path / "a", cache, steps=6, **kw)
    train_lm(tmp_path / "b", cache, steps=3, **kw)
    rest = train_lm(tmp_path / "b", cache, steps=6, **kw)
    assert rest["losses"] == whole["losses"][3:]
    for (name, p), q in zip(whole["model"].state_dict().items(), rest["model"].state_dict().values()):
        assert torch.equal(p, q), name
    task = whole["model"]
    assert task.lm.config.condition_mode == "prepend" and not hasattr(task.lm.blocks[0], "cross")
    assert task.melody.length == 8  # 1 s segments: 50 codec frames -> 8 chroma frames
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {"melody_dropped", "cond_dropped"} <= set(rows[0])
    saved = json.loads((tmp_path / "a" / "checkpoint" / "config.json").read_text())
    assert saved["extra"]["melody"]["length"] == 8 and saved["extra"]["options"]["melody_dropout"] == 0.5
    assert saved["extra"]["options"]["cond_dropout"] == 0.2  # MusicGen-melody's recipe


def test_melody_lm_starts_from_a_text_lm(tmp_path, tunes):
    """``init_from`` a text run (cross-attention): the melody LM (prefix) takes every shared weight, drops
    the cross-attention, and its first loss is far below a fresh melody LM's."""
    from musicgen_lite.training import train_lm

    _, _, cache = tunes
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, checkpoint_every=10_000)
    text = train_lm(tmp_path / "text", cache, steps=40, **kw)["model"]
    fresh = train_lm(tmp_path / "fresh", cache, steps=1, melody=True, **kw)
    init = train_lm(tmp_path / "init", cache, steps=1, melody=True, init_from=tmp_path / "text", lr=0.0, **kw)
    lm, src = init["model"].lm.state_dict(), text.lm.state_dict()
    assert set(lm) < set(src) and all(".cross." in k or ".norm_cross." in k for k in set(src) - set(lm))
    assert all(torch.equal(lm[k], src[k]) for k in lm)  # lr 0: still exactly the text LM's weights
    cond, src_cond = init["model"].conditioner.state_dict(), text.conditioner.state_dict()
    assert all(torch.equal(cond[k], src_cond[k]) for k in cond)
    assert init["losses"][0] < fresh["losses"][0] - 0.5


def test_melody_needs_a_chroma_cache(tmp_path):
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.training import train_lm

    root = write_tunes(tmp_path / "d", 1, stems=False)
    cache = build_token_cache(root, CompressionModel(codec_config("tiny")).eval(), progress=False)
    with pytest.raises(ValueError, match="chroma=True"):
        train_lm(tmp_path / "run", cache, scale="tiny", lm="tiny", melody=True, steps=1, progress=False)


def test_the_lm_learns_to_read_the_melody(tmp_path, tunes):
    """Memorise 4 tunes (melody only, no dropout): the loss with each clip's own chroma ends far below
    the loss with the chroma of another clip, and below the null melody's."""
    from musicgen_lite.training import train_lm

    _, _, cache = tunes
    out = train_lm(tmp_path / "run", cache, scale="tiny", lm="tiny", conditioner=None, melody=True, steps=200,
                   progress=False, batch_size=4, cond_dropout=0.0, melody_dropout=0.0, warmup=5,
                   checkpoint_every=10_000, log_every=10_000, eval_tokens=cache)
    task = out["model"]
    ds = TokenDataset(cache, segment_frames=50)
    codes = torch.stack([ds[i][0] for i in range(4)])  # (4, K, 50)
    chroma = torch.stack([ds[i][1]["chroma"] for i in range(4)])  # (4, 8, 12)
    assert len({tuple(c.argmax(-1).tolist()) for c in chroma}) == 4  # four different melodies
    with torch.no_grad():
        own = float(task(codes, None, False, chroma)[0])
        other = float(task(codes, None, False, chroma.roll(1, dims=0))[0])
        null = float(task(codes, None, False, chroma, True)[0])
    assert own < 0.5 * other and own < null, (own, other, null)
    # validation_loss reads the melody the same three ways, and the run logs what the melody is worth
    from musicgen_lite.training import validation_loss

    val = {m: validation_loss(task, cache, 1.0, melody=m)["loss"] for m in ("true", "shuffled", "null")}
    assert val["true"] == pytest.approx(own, rel=1e-5) and val["null"] == pytest.approx(null, rel=1e-5)
    assert val["shuffled"] > 2 * val["true"]
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 200 and last["val_melody_gain"] == pytest.approx(val["null"] - val["true"], abs=1e-4)
    with pytest.raises(ValueError, match="melody must be"):
        validation_loss(task, cache, 1.0, melody="none")


@pytest.mark.parametrize("melody_mode", ["prefix", "add"])
def test_the_lm_learns_to_follow_melodies_it_never_saw(tmp_path, melody_mode):
    """The memorising test above could read a chroma as a clip id. Here the held-out tunes are new:
    a melody-only LM trained on 96 random tunes scores 16 others better with their own melody than
    with another tune's or none, so it follows pitch in time, not identities. Both ways of reading
    the melody: MusicGen-melody's prefix and the frame-aligned sum."""
    from musicgen_lite.training import train_lm, validation_loss

    train, held = write_tunes(tmp_path / "train", 96, seed=0), write_tunes(tmp_path / "held", 16, seed=1)
    codec = fitted_codec(train)
    cache, held_cache = build_token_cache(train, codec, progress=False), build_token_cache(held, codec, progress=False)
    task = train_lm(tmp_path / "run", cache, scale="tiny", lm="tiny", conditioner=None, melody=True, steps=400,
                    progress=False, batch_size=16, cond_dropout=0.0, melody_dropout=0.0,
                    checkpoint_every=10_000, log_every=10_000, melody_mode=melody_mode)["model"]
    assert task.lm.config.melody_mode == melody_mode
    val = {m: validation_loss(task, held_cache, 1.0, melody=m)["loss"] for m in ("true", "shuffled", "null")}
    assert val["true"] < val["shuffled"] - 0.02 and val["true"] < val["null"] - 0.02, val


def _fsdp_worker(rank, world, port, cache, out, queue):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from musicgen_lite.training import train_lm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = train_lm(out, cache, **FSDP_KW)
        if rank == 0:
            queue.put(r["losses"])
    finally:
        dist.destroy_process_group()


FSDP_KW = dict(scale="tiny", lm="tiny", conditioner="learned", melody=True, steps=3, progress=False, batch_size=4,
               schedule="constant", fsdp=True, melody_dropout=0.5, cond_dropout=0.3, seed=1)


def test_melody_fsdp_two_processes_match_one(tmp_path, tunes):
    """FSDP2 on CPU (gloo) with the melody conditioner in the root unit: 2 processes follow 1."""
    import socket

    import torch.multiprocessing as mp

    from musicgen_lite.training import train_lm

    _, _, cache = tunes
    single = train_lm(tmp_path / "one", cache, **FSDP_KW)["losses"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_fsdp_worker, args=(2, port, str(cache), str(tmp_path / "two"), queue), nprocs=2,
                       start_method="spawn")
    assert queue.get() == pytest.approx(single, rel=1e-4, abs=1e-5)


# -------------------------------------------------------------------------- model folders

@pytest.mark.parametrize("melody_mode", ["prefix", "add"])
def test_melody_model_round_trips(tmp_path, tunes, melody_mode):
    """export_musicgen and MusicGen.save / load keep the melody conditioner: the same generate_with_chroma
    output for the same seed as the model trained in memory (several windows, the melody followed along)."""
    from musicgen_lite.cli import main
    from musicgen_lite.generation import MusicGen
    from musicgen_lite.hub import load_codec
    from musicgen_lite.training import export_musicgen, train_lm

    tmp, root, cache = tunes
    assert main(["train", "lm", str(cache), str(tmp_path / "run"), "--scale", "tiny", "--lm", "tiny", "--steps", "4",
                 "--melody", "--threads", "1", "--lr", "2e-3", "--warmup", "2", "--melody-mode", melody_mode]) == 0
    run = tmp_path / "run"
    options = json.loads((run / "checkpoint" / "config.json").read_text())["extra"]["options"]
    assert (options["lr"], options["warmup"]) == (2e-3, 2)  # --lr / --warmup reach the recipe
    with pytest.raises(SystemExit, match="--lr must be positive"):
        main(["train", "lm", str(cache), str(tmp_path / "bad"), "--scale", "tiny", "--lr", "0"])
    with pytest.raises(SystemExit, match="--stop-after must be between 1 and --steps"):
        main(["train", "lm", str(cache), str(tmp_path / "bad"), "--scale", "tiny", "--steps", "4", "--stop-after", "5"])
    if melody_mode == "add":  # --stop-after: checkpoint at that step, the 4-step schedule kept
        assert main(["train", "lm", str(cache), str(tmp_path / "part"), "--scale", "tiny", "--lm", "tiny", "--steps", "4",
                     "--stop-after", "2", "--melody", "--threads", "1", "--melody-mode", melody_mode]) == 0
        part = json.loads((tmp_path / "part" / "checkpoint" / "config.json").read_text())["extra"]
        assert part["step"] == 2 and part["options"]["melody_mode"] == "add"
        # asked again to stop at (or before) the step it holds: it trains no further
        assert main(["train", "lm", str(cache), str(tmp_path / "part"), "--scale", "tiny", "--lm", "tiny", "--steps", "4",
                     "--stop-after", "1", "--melody", "--threads", "1", "--melody-mode", melody_mode]) == 0
        assert json.loads((tmp_path / "part" / "checkpoint" / "config.json").read_text())["extra"]["step"] == 2
        with pytest.raises(ValueError, match="melody_mode='add' reads a melody"):
            train_lm(tmp_path / "no_melody", cache, scale="tiny", lm="tiny", steps=1, progress=False, melody_mode="add")
    out = export_musicgen(run, tmp / "codec", tmp_path / "model", dtype=None)
    model = MusicGen.load(out)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["melody"] == {"sample_rate": SR, "n_chroma": 12, "radix2_exp": 13, "argmax": True, "length": 8}
    assert model.max_duration == 1.0 and model.melody_conditioner.length == 8
    lm_cfg = config["lm"]  # add: the 8 chroma rows of a 1 s segment, 6.4 token frames (50 Hz) per row (7.8125 Hz)
    assert (model.lm.config.melody_mode, lm_cfg["melody_mode"]) == (melody_mode, melody_mode)
    if melody_mode == "add":
        assert (model.lm.config.melody_rows, model.lm.config.melody_ratio) == (8, 50 / 7.8125) == (
            lm_cfg["melody_rows"], lm_cfg["melody_ratio"])

    # the run in memory: train_lm on the finished run loads its checkpoint and trains no further
    task = train_lm(run, cache, scale="tiny", lm="tiny", conditioner="learned", melody=True, steps=4,
                    progress=False, melody_mode=melody_mode)["model"]
    for name, value in task.melody.named_parameters():
        assert torch.equal(model.melody_conditioner.state_dict()[name], value), name
    live = MusicGen(load_codec(tmp / "codec"), task.lm, task.conditioner, "delay", max_duration=1.0,
                    extend_stride=0.6, melody_conditioner=task.melody)
    melody, _ = load_audio(root / "stems" / "tune1.melody.wav", SR)
    kw = dict(duration=2.0, seed=3, progress=False)
    a = model.generate_with_chroma(["a tune on a drone"], melody, SR, **kw)
    assert torch.equal(a, live.generate_with_chroma(["a tune on a drone"], melody, SR, **kw))
    model.save(tmp_path / "again", {"name": "learned", "kwargs": {}})
    again = MusicGen.load(tmp_path / "again")
    assert torch.equal(a, again.generate_with_chroma(["a tune on a drone"], melody, SR, **kw))
    other = again.generate_with_chroma(["a tune on a drone"], tones([61, 66, 70, 63], 0.25), SR, **kw)
    assert not torch.equal(a, other)  # the melody reaches the output
