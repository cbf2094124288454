"""The codec trainer: losses fall, checkpoints are atomic and complete, and resume is exact."""
from __future__ import annotations

import json
import math

import pytest
import torch

from musicgen_lite.hub import load_checkpoint, load_codec
from musicgen_lite.training import (ClipBank, export_codec, load_training_state, lr_at, save_training_state,
                                    train_codec)


def test_lr_schedule():
    assert lr_at(0, 1.0, warmup=4) == 0.25 and lr_at(3, 1.0, warmup=4) == 1.0 and lr_at(100, 1.0, 4) == 1.0
    assert lr_at(4, 1.0, 4, total=14, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(14, 1.0, 4, total=14, schedule="cosine") == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_at(10, 1.0, schedule="bogus")


def test_batches_depend_on_step_only(synth_dataset):
    bank = ClipBank(synth_dataset, 16_000, seed=1)
    a, b = bank.batch(5, 3, 4000), bank.batch(6, 3, 4000)
    assert a.shape == (3, 1, 4000) and not torch.equal(a, b)
    assert torch.equal(ClipBank(synth_dataset, 16_000, seed=1).batch(5, 3, 4000), a)


def test_training_state_roundtrip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_training_state(tmp_path / "s", model, opt, 7, {"a": 1}, {"note": "x"})
    expected_rng = torch.get_rng_state()
    torch.randn(10)  # move the generator on; loading must bring it back
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    extra = load_training_state(path, model2, opt2)
    assert extra["step"] == 7 and extra["note"] == "x"
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))
    assert not list(path.glob("*.tmp"))


def test_resume_is_exact_and_loss_falls(tmp_path, synth_dataset):
    kw = dict(scale="tiny", data=synth_dataset, progress=False, log_every=2, checkpoint_every=100, seed=3,
              batch_size=2, segment_seconds=0.4)
    whole = train_codec(tmp_path / "whole", steps=8, **kw)
    first = train_codec(tmp_path / "split", steps=3, **kw)
    second = train_codec(tmp_path / "split", steps=8, **kw)  # a new process would do the same
    assert first["step"] == 3 and second["step"] == 8
    assert first["losses"] + second["losses"] == whole["losses"]  # bit-for-bit the same run
    for p, q in zip(whole["model"].state_dict().values(), second["model"].state_dict().values()):
        assert torch.equal(p, q)
    losses = whole["losses"]
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns
    rows = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and len(rows[-1]["entries_used"]) == rows[-1]["n_q"]
    saved = json.loads((tmp_path / "whole" / "checkpoint" / "config.json").read_text())
    assert saved["extra"]["step"] == 8 and len(saved["extra"]["losses"]) == 8
    # the shippable export: weights only, loads as a codec (fp32 exactly; fp16 smaller)
    exact = load_codec(export_codec(tmp_path / "whole", tmp_path / "ship32", dtype=None, extra={"data": "synth"}))
    wav = torch.randn(1, 1, 3200)
    assert torch.equal(exact.encode(wav), whole["model"].encode(wav))
    half = export_codec(tmp_path / "whole", tmp_path / "ship16")
    assert (half / "model.safetensors").stat().st_size < (tmp_path / "ship32" / "model.safetensors").stat().st_size
    assert load_codec(half).decode(exact.encode(wav)).shape == (1, 1, 3200)
    # inference-only: no EMA sums stored; loading rebuilds them as embed x smoothed count, so an
    # EMA update that saw no frames would leave every entry where it is
    lean = export_codec(tmp_path / "whole", tmp_path / "lean32", dtype=None, inference_only=True)
    assert not any(k.endswith("embed_avg") for k in load_checkpoint(lean)[0])
    rebuilt = load_codec(lean)
    assert torch.equal(rebuilt.encode(wav), exact.encode(wav))
    for (name, a), b in zip(exact.state_dict().items(), rebuilt.state_dict().values()):
        if not name.endswith("embed_avg"):
            assert torch.equal(a, b), name
    for layer in rebuilt.quantizer.layers:
        cb = layer.codebook
        total = cb.cluster_size.sum()
        smoothed = (cb.cluster_size + cb.epsilon) / (total + cb.bins * cb.epsilon) * total
        torch.testing.assert_close(cb.embed_avg / smoothed.unsqueeze(1), cb.embed)


def test_unknown_option_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="unknown options"):
        train_codec(tmp_path, scale="tiny", steps=1, bogus=1)


def test_pitch_losses_and_cpu_bf16_train(tmp_path, synth_dataset):
    """The lite recipe's extras at toy size: proportional mel filters, the linear STFT loss
    (logged), and bf16 autocast on the CPU; a bad ``amp`` value is an error naming it."""
    kw = dict(scale="tiny", data=synth_dataset, progress=False, batch_size=2, log_every=1, segment_seconds=0.25,
              mel_n_mels=None, stft_weight=1.0, stft_windows=(256, 512))
    plain = train_codec(tmp_path / "fp32", steps=2, amp="off", **kw)
    bf16 = train_codec(tmp_path / "bf16", steps=2, amp="bf16", **kw)
    assert "stft" in plain["log"][-1] and plain["log"][-1]["stft"] > 0
    assert all(torch.isfinite(torch.tensor(bf16["losses"])))
    assert bf16["losses"][0] == pytest.approx(plain["losses"][0], rel=0.05)  # same batch, same weights at step 1
    from musicgen_lite.training import _cpu_has_native_bf16

    if _cpu_has_native_bf16():
        assert bf16["losses"][0] != plain["losses"][0]  # bf16 arithmetic did run
    else:
        assert bf16["losses"] == plain["losses"]  # no native bf16: the documented fp32 fallback
    with pytest.raises(ValueError, match="amp"):
        train_codec(tmp_path / "bad", steps=1, amp="fp8", **kw)


def test_decoder_only_training_keeps_the_codes(tmp_path, synth_dataset):
    """``freeze_encoder``: after joint training, the decoder goes on alone; the codes and the
    token fingerprint stay the same, the decoder changes, and the run resumes exactly."""
    from musicgen_lite.data.dataset import codec_fingerprint

    kw = dict(scale="tiny", data=synth_dataset, progress=False, batch_size=2, log_every=1, segment_seconds=0.25)
    joint = train_codec(tmp_path / "run", steps=3, **kw)["model"]
    wav = ClipBank(synth_dataset, 16_000).wavs[0][None, :, :16_000]
    codes, fp = joint.encode(wav), codec_fingerprint(joint)
    decoder = {k: v.clone() for k, v in joint.decoder.state_dict().items()}
    tuned = train_codec(tmp_path / "run", steps=6, freeze_encoder=True, **kw)  # switches: fresh optimizer
    model = tuned["model"]
    assert torch.equal(model.encode(wav), codes) and codec_fingerprint(model) == fp
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder.items())
    assert all(math.isfinite(x) for x in tuned["losses"]) and len(tuned["losses"]) == 3
    # a decoder-only run resumes exactly: 3 -> 6 -> 8 gives the losses of 3 -> 8 in one go
    rest = train_codec(tmp_path / "run", steps=8, freeze_encoder=True, **kw)
    train_codec(tmp_path / "straight", steps=3, **kw)
    straight = train_codec(tmp_path / "straight", steps=8, freeze_encoder=True, **kw)
    assert tuned["losses"] + rest["losses"] == straight["losses"]
    # from a shipped (fp16) export: a new run starts from its weights; the tokens' fingerprint holds
    shipped = load_codec(export_codec(tmp_path / "run", tmp_path / "ship", inference_only=True))
    fine = train_codec(tmp_path / "decoder", steps=2, init_from=tmp_path / "ship", freeze_encoder=True, **kw)
    assert codec_fingerprint(fine["model"]) == codec_fingerprint(shipped) != codec_fingerprint(model)
    assert torch.equal(fine["model"].encode(wav), shipped.encode(wav))


def test_decoder_at_one_level_count_with_a_chroma_loss(tmp_path, synth_dataset):
    """``decoder_n_q`` (decoder-only): every step decodes from that many levels, not the
    quantizer dropout's draw; ``chroma_weight`` adds the chroma loss, logged as ``chroma``; the
    codes stay those of the codec it started from. Bad combinations are clear errors."""
    kw = dict(scale="tiny", data=synth_dataset, progress=False, batch_size=2, log_every=1, segment_seconds=0.25)
    base = train_codec(tmp_path / "base", steps=2, **kw)["model"]
    export_codec(tmp_path / "base", tmp_path / "ship")
    wav = ClipBank(synth_dataset, 16_000).wavs[0][None, :, :16_000]
    run = train_codec(tmp_path / "dec", steps=6, init_from=tmp_path / "ship", freeze_encoder=True,
                      decoder_n_q=base.config.n_q, chroma_weight=0.5, **kw)
    assert [row["n_q"] for row in run["log"]] == [base.config.n_q] * 6
    assert all(0 <= row["chroma"] <= 2 for row in run["log"])
    assert torch.equal(run["model"].encode(wav), load_codec(tmp_path / "ship").encode(wav))
    # without it the decoder-only run draws level counts (quantizer dropout 1.0 in the tiny preset)
    drawn = train_codec(tmp_path / "drawn", steps=6, init_from=tmp_path / "ship", freeze_encoder=True, **kw)
    assert len({row["n_q"] for row in drawn["log"]}) > 1 and "chroma" not in drawn["log"][0]
    with pytest.raises(ValueError, match="decoder_n_q"):
        train_codec(tmp_path / "bad", steps=1, decoder_n_q=2, **kw)  # needs freeze_encoder
    with pytest.raises(ValueError, match="decoder_n_q"):
        train_codec(tmp_path / "bad2", steps=1, init_from=tmp_path / "ship", freeze_encoder=True,
                    decoder_n_q=base.config.n_q + 1, **kw)


def test_adversarial_training_runs_and_resumes(tmp_path, synth_dataset):
    """The full-scale extras (MS-STFT discriminator, feature matching, balancer) at toy size."""
    kw = dict(scale="tiny", data=synth_dataset, progress=False, adversarial=True, batch_size=1, log_every=1,
              segment_seconds=0.25)
    first = train_codec(tmp_path / "adv", steps=1, **kw)
    assert (tmp_path / "adv" / "checkpoint" / "disc" / "model.safetensors").is_file()
    second = train_codec(tmp_path / "adv", steps=2, **kw)
    assert len(first["losses"]) == 1 and len(second["losses"]) == 1
    assert all(torch.isfinite(torch.tensor(first["losses"] + second["losses"])))
    assert "disc" in second["log"][-1] and "fm" in second["log"][-1]


# ---------------------------------------------------------------------------------- the LM

@pytest.fixture(scope="module")
def codec_and_tokens(tmp_path_factory):
    """A tiny codec and its tokens for 6 synthetic clips of 2 s."""
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.data import make_dataset
    from musicgen_lite.data.dataset import build_token_cache

    from musicgen_lite.training import ClipBank

    root = make_dataset(tmp_path_factory.mktemp("lmdata"), n=6, seconds=2.0, seed=11, sample_rate=16_000,
                        workers=1, melody_stems=False, progress=False)
    torch.manual_seed(0)
    codec = CompressionModel(codec_config("tiny")).eval()
    codec.init_codebooks(torch.stack(ClipBank(root, 16_000).wavs))  # a fresh codec maps everything to code 0
    cache = build_token_cache(root, codec, progress=False)
    from musicgen_lite.data.dataset import TokenDataset

    codes = torch.stack([c for c, _ in TokenDataset(cache)])
    assert all(codes[:, k].unique().numel() > 20 for k in range(4))  # the LM tests learn real token streams
    return codec, cache


@pytest.fixture(scope="module")
def token_cache(codec_and_tokens):
    return codec_and_tokens[1]


def test_lm_training_resumes_exactly(tmp_path, token_cache):
    from musicgen_lite.training import train_lm

    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, cond_dropout=0.5, log_every=1)
    whole = train_lm(tmp_path / "a", token_cache, steps=6, **kw)
    train_lm(tmp_path / "b", token_cache, steps=3, **kw)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a run killed after logging steps 4-5, before their checkpoint
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n" + json.dumps({"step": 5, "loss": 99.0}) + "\n")
    rest = train_lm(tmp_path / "b", token_cache, steps=6, **kw)  # picks up at step 3
    assert len(rest["losses"]) == 3
    assert rest["losses"] == whole["losses"][3:]
    # the log holds each step once, as the uninterrupted run's (the killed run's rows after step 3 dropped)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("a", "b")}
    assert [r["step"] for r in rows["b"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows["b"]] == [r["loss"] for r in rows["a"]]
    for (n, p), q in zip(whole["model"].state_dict().items(), rest["model"].state_dict().values()):
        assert torch.equal(p, q), n


def test_caption_metadata_reaches_the_text_conditioner_and_resumes_exactly(tmp_path, token_cache, monkeypatch):
    """``caption_metadata_p``: the key and bpm each added to a caption that lacks them, from a
    stream seeded per (seed, step, item), so a resumed run sees the same captions; p = 0 is the
    captions as written."""
    from musicgen_lite.conditioning import LearnedTextConditioner
    from musicgen_lite.evaluation import caption_states
    from musicgen_lite.training import train_lm

    seen = []
    forward = LearnedTextConditioner.forward

    def spy(self, texts, *a, **k):
        seen.append(list(texts))
        return forward(self, texts, *a, **k)

    monkeypatch.setattr(LearnedTextConditioner, "forward", spy)
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, cond_dropout=0.0)
    plain = train_lm(tmp_path / "plain", token_cache, steps=3, **kw)
    plain_texts, seen[:] = [t for b in seen for t in b], []
    whole = train_lm(tmp_path / "a", token_cache, steps=6, caption_metadata_p=1.0, **kw)
    texts = [t for b in seen for t in b]
    assert all(caption_states(t) == {"mode": True, "bpm": True} for t in texts)  # p = 1: every caption says both
    assert sum(caption_states(t)["mode"] for t in plain_texts) < len(plain_texts)  # the written ones do not
    assert whole["losses"][:3] != plain["losses"]
    seen[:] = []
    train_lm(tmp_path / "b", token_cache, steps=3, caption_metadata_p=1.0, **kw)
    rest = train_lm(tmp_path / "b", token_cache, steps=6, caption_metadata_p=1.0, **kw)
    assert [t for b in seen for t in b] == texts and rest["losses"] == whole["losses"][3:]


def test_lm_cpu_bf16_option(tmp_path, token_cache):
    """``cpu_amp``: bf16 autocast on a CPU with native bf16 (else fp32, as without the option)."""
    from musicgen_lite.training import _cpu_has_native_bf16, train_lm

    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, steps=2, seed=1)
    plain = train_lm(tmp_path / "fp32", token_cache, **kw)["losses"]
    mixed = train_lm(tmp_path / "bf16", token_cache, cpu_amp=True, **kw)["losses"]
    assert all(math.isfinite(x) for x in mixed)
    assert mixed[0] == pytest.approx(plain[0], rel=0.02)
    if _cpu_has_native_bf16():
        assert mixed[0] != plain[0]
    else:
        assert mixed == plain


def test_lm_training_learns_and_logs(tmp_path, token_cache):
    import json

    from musicgen_lite.training import train_lm

    out = train_lm(tmp_path / "run", token_cache, scale="tiny", lm="tiny", conditioner=None, steps=40,
                   progress=False, batch_size=6, grad_accum=2, ema_decay=0.9)
    first, last = sum(out["losses"][:5]) / 5, sum(out["losses"][-5:]) / 5
    assert last < first - 0.3  # cross-entropy falls on a small set it can memorise
    assert first == pytest.approx(math.log(256), abs=0.6)  # starts near uniform over the tiny codec's 256 bins
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and len(rows[-1]["per_codebook"]) == 4
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(rows[-1])
    assert out["ema"] is not None


def _ddp_worker(rank, world, port, cache, out, queue, **kw):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from musicgen_lite.training import train_lm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = train_lm(out, cache, scale="tiny", lm="tiny", conditioner="learned", steps=4, progress=False,
                     batch_size=4, cond_dropout=0.0, **kw)
        if rank == 0:
            queue.put(r["losses"])
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path, token_cache):
    """torchrun-style DDP on CPU (gloo): 2 processes x 2 samples follow 1 process x 4 samples."""
    import socket

    import torch.multiprocessing as mp

    from musicgen_lite.training import train_lm

    torch.set_num_threads(1)
    single = train_lm(tmp_path / "one", token_cache, scale="tiny", lm="tiny", conditioner="learned", steps=4,
                      progress=False, batch_size=4, cond_dropout=0.0)["losses"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, str(token_cache), str(tmp_path / "two"), queue), nprocs=2,
                       start_method="spawn")
    double = queue.get()
    assert len(double) == 4
    assert double == pytest.approx(single, rel=1e-4, abs=1e-5)


def _fsdp_worker(rank, world, port, cache, out, queue):
    _ddp_worker(rank, world, port, cache, out, queue, fsdp=True, schedule="constant", grad_accum=2)


def test_fsdp_two_processes_match_one_and_resume_anywhere(tmp_path, token_cache):
    """FSDP2 on CPU (gloo): 2 sharded processes follow 1 process; the checkpoint holds full tensors,
    so one process resumes it and continues as an uninterrupted single run."""
    import socket

    import torch.multiprocessing as mp

    from musicgen_lite.training import train_lm

    torch.set_num_threads(1)
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, batch_size=4, cond_dropout=0.0,
              schedule="constant", grad_accum=2)
    single = train_lm(tmp_path / "one", token_cache, steps=6, **kw)["losses"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_fsdp_worker, args=(2, port, str(token_cache), str(tmp_path / "two"), queue), nprocs=2,
                       start_method="spawn")
    sharded = queue.get()
    assert sharded == pytest.approx(single[:4], rel=1e-4, abs=1e-5)
    rest = train_lm(tmp_path / "two", token_cache, steps=6, **kw)["losses"]  # 1 process picks up at step 4
    assert rest == pytest.approx(single[4:], rel=1e-4, abs=1e-5)


def test_stop_after_then_resume_equals_one_run_under_the_cosine_schedule(tmp_path, token_cache):
    """An interrupted run (stop_after) keeps the planned schedule: resuming it repeats the uninterrupted
    losses even where the cosine decay depends on the total number of steps."""
    from musicgen_lite.training import train_lm

    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, warmup=2, schedule="cosine")
    whole = train_lm(tmp_path / "a", token_cache, steps=8, **kw)
    first = train_lm(tmp_path / "b", token_cache, steps=8, stop_after=4, **kw)
    assert len(first["losses"]) == 4 and first["step"] == 4
    rest = train_lm(tmp_path / "b", token_cache, steps=8, **kw)
    assert first["losses"] + rest["losses"] == whole["losses"]


def test_validation_loss_is_the_mean_over_fixed_windows(tmp_path, token_cache):
    from musicgen_lite.data.dataset import TokenDataset
    from musicgen_lite.training import train_lm, validation_loss

    run = train_lm(tmp_path / "run", token_cache, scale="tiny", lm="tiny", conditioner="learned", steps=3,
                   progress=False)
    task = run["model"]
    a = validation_loss(task, token_cache, segment_seconds=1.0, batch_size=2)
    b = validation_loss(task, token_cache, segment_seconds=1.0, batch_size=5)
    assert a["windows"] == b["windows"] > 0 and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    data = TokenDataset(token_cache, segment_frames=50)
    items = [data[i] for i in range(len(data))][: a["windows"]]
    with torch.no_grad():
        ref, _ = task(torch.stack([c for c, _ in items]), [i["description"] for _, i in items])
    assert a["loss"] == pytest.approx(float(ref), rel=1e-5)
    # the text's share: null drops the condition, shuffled rotates the captions by one window
    with torch.no_grad():
        ref_null, _ = task(torch.stack([c for c, _ in items]), [i["description"] for _, i in items], drop=True)
    assert validation_loss(task, token_cache, 1.0, captions="null")["loss"] == pytest.approx(float(ref_null), rel=1e-5)
    shuffled = validation_loss(task, token_cache, 1.0, captions="shuffled")["loss"]
    with torch.no_grad():  # a conditioner whose output is zero: every caption is the null condition
        task.conditioner.proj.weight.zero_()
        task.conditioner.proj.bias.zero_()
    flat = [validation_loss(task, token_cache, 1.0, captions=c)["loss"] for c in ("true", "shuffled", "null")]
    assert flat[0] == flat[1] == flat[2] and shuffled != flat[1]
    with pytest.raises(ValueError, match="captions must be"):
        validation_loss(task, token_cache, 1.0, captions="random")


def test_lm_training_validates_and_writes_samples(tmp_path, codec_and_tokens):
    """``eval_tokens``: validation rows in the log, equal to :func:`validation_loss` of the model at
    that step; ``sample_codec``: audio samples on disk; neither changes the training trajectory."""
    import json

    from musicgen_lite.audio import load_audio
    from musicgen_lite.codec import CompressionModel, codec_config
    from musicgen_lite.training import train_lm, validation_loss

    codec, cache = codec_and_tokens
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, steps=4, checkpoint_every=2)
    plain = train_lm(tmp_path / "plain", cache, **kw)
    run = train_lm(tmp_path / "run", cache, eval_tokens=cache, sample_codec=codec, sample_every=4,
                   sample_seconds=0.5, **kw)
    assert run["losses"] == plain["losses"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [2, 4]
    assert val[4] == pytest.approx(validation_loss(run["model"], cache, segment_seconds=1.0)["loss"], abs=1e-5)
    assert len(rows[-1]["val_per_codebook"]) == 4
    gain = validation_loss(run["model"], cache, segment_seconds=1.0, captions="null")["loss"] - val[4]
    assert rows[-1]["val_text_gain"] == pytest.approx(gain, abs=1e-4)  # how much the text is read
    samples = [r["samples"] for r in rows if "samples" in r]
    assert samples == [["samples/step_000004_0.wav", "samples/step_000004_1.wav"]]
    wav, sr = load_audio(tmp_path / "run" / samples[0][0])
    assert sr == codec.sample_rate and wav.shape[-1] == pytest.approx(0.5 * sr, abs=codec.hop_length)
    assert float(wav.abs().max()) > 0
    torch.manual_seed(1)
    other = CompressionModel(codec_config("tiny")).eval()  # not the codec that made the tokens
    with pytest.raises(ValueError, match="sample_codec"):
        train_lm(tmp_path / "bad", cache, sample_codec=other, **kw)


def test_lm_init_from_a_run_or_a_model_folder(tmp_path, codec_and_tokens):
    """``init_from``: a new run starts from trained weights (the step and schedule afresh); from a run
    folder and from its exported model folder alike; another LM size is a clear error."""
    from musicgen_lite.hub import save_checkpoint
    from musicgen_lite.lm import lm_config
    from musicgen_lite.training import export_musicgen, train_lm

    codec, cache = codec_and_tokens
    save_checkpoint(tmp_path / "codec", codec, codec.config.to_dict())
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False)
    first = train_lm(tmp_path / "first", cache, steps=6, **kw)
    model_dir = export_musicgen(tmp_path / "first", tmp_path / "codec", tmp_path / "model", dtype=None)
    fresh = train_lm(tmp_path / "fresh", cache, steps=1, **kw)
    from_run = train_lm(tmp_path / "a", cache, steps=1, init_from=tmp_path / "first", **kw)
    from_model = train_lm(tmp_path / "b", cache, steps=1, init_from=model_dir, **kw)
    assert from_run["step"] == 1 and from_run["losses"] == from_model["losses"]
    assert from_run["losses"][0] < fresh["losses"][0] - 0.2  # it starts where the first run ended
    assert abs(from_run["losses"][0] - first["losses"][-1]) < 0.5
    with pytest.raises(ValueError, match="LM differs"):
        train_lm(tmp_path / "c", cache, steps=1, init_from=tmp_path / "first",
                 **{**kw, "lm": lm_config("tiny", num_layers=3)})
    with pytest.raises(FileNotFoundError, match="init_from"):
        train_lm(tmp_path / "d", cache, steps=1, init_from=tmp_path / "nothing", **kw)
    # another text encoder: the LM carries over (lr 0: exactly), the new encoder's projection starts fresh
    other = train_lm(tmp_path / "e", cache, steps=1, init_from=tmp_path / "first", lr=0.0,
                     **{**kw, "conditioner": "minilm"})["model"]
    src = first["model"].lm.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in other.lm.state_dict().items())
    assert other.conditioner.proj.weight.shape[1] == 384  # MiniLM's width, not the learned encoder's


def test_lm_caption_facts_from_a_model_without_them(tmp_path, codec_and_tokens):
    """``caption_facts=True`` on top of a model without them (``init_from``): the LM and the
    encoder's projection carry over exactly (lr 0), the fact rows start fresh; the export stores
    ``kwargs`` so the loaded model conditions exactly as the trained one."""
    from musicgen_lite.hub import load_musicgen, save_checkpoint
    from musicgen_lite.training import export_musicgen, train_lm

    codec, cache = codec_and_tokens
    save_checkpoint(tmp_path / "codec", codec, codec.config.to_dict())
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False)
    first = train_lm(tmp_path / "first", cache, steps=3, **kw)
    source = export_musicgen(tmp_path / "first", tmp_path / "codec", tmp_path / "model", dtype=None)
    facts = train_lm(tmp_path / "facts", cache, steps=2, init_from=source, caption_facts=True, lr=0.0,
                     **kw)["model"]
    src = first["model"]
    assert all(torch.equal(v, src.lm.state_dict()[k]) for k, v in facts.lm.state_dict().items())
    assert torch.equal(facts.conditioner.proj.weight, src.conditioner.proj.weight)
    assert facts.conditioner.facts is not None and src.conditioner.facts is None
    out = export_musicgen(tmp_path / "facts", tmp_path / "codec", tmp_path / "facts_model", dtype=None)
    loaded = load_musicgen(out)
    assert loaded.conditioner.facts is not None
    texts = ["calm piano in D minor, 70 bpm", "rock"]
    with torch.no_grad():
        a, ma = facts.conditioner.eval()(texts)
        b, mb = loaded.conditioner(texts)
    assert torch.equal(ma, mb) and torch.allclose(a, b)
    with pytest.raises(ValueError, match="conditioner"):
        train_lm(tmp_path / "none", cache, steps=1, caption_facts=True, **{**kw, "conditioner": None})


def _added_on_a_source(tmp_path, codec_and_tokens, name: str, kw: dict, **added):
    """A 2-step source model (``kw``), exported, then a run ``name`` that adds ``added`` to it
    at lr 0 with validation: the source's LM must carry over exactly. Returns (run, cache)."""
    from musicgen_lite.hub import save_checkpoint
    from musicgen_lite.training import export_musicgen, train_lm

    codec, cache = codec_and_tokens
    save_checkpoint(tmp_path / "codec", codec, codec.config.to_dict())
    first = train_lm(tmp_path / "first", cache, steps=2, **kw)
    source = export_musicgen(tmp_path / "first", tmp_path / "codec", tmp_path / "model", dtype=None)
    run = train_lm(tmp_path / name, cache, steps=2, init_from=source, lr=0.0, eval_tokens=cache, eval_every=2,
                   **kw, **added)
    own = run["model"].lm.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in first["model"].lm.state_dict().items())
    return run, cache


def test_lm_beat_clock_from_a_model_without_one(tmp_path, codec_and_tokens):
    """``beat_clock=True`` on top of a model without a clock: the LM carries over exactly (lr 0)
    and its clock map starts at zero (the same LM); each window's clock comes from its clip's
    bpm and start frame; the tempo predictor is fitted on the cache's captions and travels
    with the export, and the loaded model keeps the stated tempo, else the predicted one."""
    from musicgen_lite.data.dataset import TokenDataset
    from musicgen_lite.hub import load_musicgen
    from musicgen_lite.lm import beat_clock
    from musicgen_lite.training import export_musicgen, fit_tempo_predictor, train_lm, window_clock

    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False)
    run, cache = _added_on_a_source(tmp_path, codec_and_tokens, "clock", kw, beat_clock=True)
    clocked = run["model"]
    assert clocked.lm.config.beat_clock and clocked.lm.beat.weight.abs().sum() == 0
    assert run["log"][-1]["val_clock_gain"] == 0.0  # a zero clock map: the clock is worth nothing yet
    # the windows' clocks: the clip's bpm, from the window's first frame
    data = TokenDataset(cache, segment_frames=20, random_segments=True, seed=3)
    infos = [data[i][1] for i in range(4)]
    assert all(i["bpm"] > 0 for i in infos) and any(i["start_frame"] > 0 for i in infos)
    torch.testing.assert_close(window_clock(infos, 50.0),
                               beat_clock([i["bpm"] for i in infos], 50.0, [i["start_frame"] for i in infos]))
    out = export_musicgen(tmp_path / "clock", tmp_path / "codec", tmp_path / "clock_model", dtype=None)
    loaded = load_musicgen(out)
    assert loaded.lm.config.beat_clock and loaded.tempo is not None
    fitted = fit_tempo_predictor(cache)
    assert loaded.tempo.to_dict() == fitted.to_dict() and fitted.fitted_on == 6
    texts = [TokenDataset(cache)[0][1]["description"], "a piece at 97 bpm"]
    assert loaded.clock_bpms(texts)[1] == 97.0
    assert loaded.clock_bpms(texts)[0] == pytest.approx(fitted.bpm_for(texts[:1])[0])
    with pytest.raises(ValueError, match="one step per frame"):
        train_lm(tmp_path / "flat", cache, steps=1, beat_clock=True, pattern="flatten", **kw)


def test_lm_key_condition_from_a_clocked_model_without_one(tmp_path, codec_and_tokens):
    """``key_condition=True`` on top of a clocked model without a key: the LM carries over
    exactly (lr 0), its key map starts at zero (``val_key_gain`` 0); each window's clock carries
    its clip's key after the beat's columns (tonics dropped where told); the mode predictor is
    fitted on the cache's captions and travels with the export."""
    from musicgen_lite.conditioning import _PITCH_CLASS
    from musicgen_lite.data.dataset import TokenDataset
    from musicgen_lite.hub import load_musicgen
    from musicgen_lite.lm import beat_clock, key_features
    from musicgen_lite.training import export_musicgen, fit_mode_predictor, train_lm, window_clock

    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, beat_clock=True)
    run, cache = _added_on_a_source(tmp_path, codec_and_tokens, "key", kw, key_condition=True)
    keyed = run["model"]
    assert keyed.lm.config.key_condition and keyed.lm.key.weight.abs().sum() == 0
    assert run["log"][-1]["val_key_gain"] == 0.0
    data = TokenDataset(cache, segment_frames=20, random_segments=True, seed=3)
    infos = [data[i][1] for i in range(4)]
    assert all(i["mode"] in ("major", "minor") and i["tonic"] in _PITCH_CLASS for i in infos)
    beat = beat_clock([i["bpm"] for i in infos], 50.0, [i["start_frame"] for i in infos])
    keys = [(_PITCH_CLASS[i["tonic"]], i["mode"]) for i in infos]
    torch.testing.assert_close(window_clock(infos, 50.0, key_columns=True), torch.cat([beat, key_features(keys)], 1))
    dropped = window_clock(infos, 50.0, key_columns=True, keep_tonic=[False, True, False, True])
    keys = [(t if j % 2 else None, m) for j, (t, m) in enumerate(keys)]
    torch.testing.assert_close(dropped, torch.cat([beat, key_features(keys)], 1))
    assert window_clock(infos, 50.0, key_columns=True, with_key=False)[:, 2:].abs().sum() == 0
    out = export_musicgen(tmp_path / "key", tmp_path / "codec", tmp_path / "key_model", dtype=None)
    loaded = load_musicgen(out)
    assert loaded.lm.config.key_condition and loaded.mode_predictor is not None
    fitted = fit_mode_predictor(cache)
    assert loaded.mode_predictor.to_dict() == fitted.to_dict() and fitted.fitted_on == 6
    texts = [TokenDataset(cache)[0][1]["description"], "a piece in F# minor"]
    assert loaded.clock_keys(texts) == [(None, fitted.predict(texts[:1])[0]), (6, "minor")]
    with pytest.raises(ValueError, match="rides on the beat clock"):
        train_lm(tmp_path / "nobeat", cache, steps=1, key_condition=True, **{**kw, "beat_clock": False})
    from musicgen_lite.cli import main

    with pytest.raises(SystemExit, match="--key-condition rides on the beat clock"):
        main(["train", "lm", str(cache), str(tmp_path / "bad"), "--scale", "tiny", "--key-condition"])


def test_lm_key_lr_scale_moves_the_key_map_faster(tmp_path, codec_and_tokens):
    """``key_lr_scale``: the key map is a param group of its own at that multiple of the lr. One
    AdamW step from zero moves each weight by lr x g / (|g| + eps): the key map's entries by
    ``lr x scale``, every other weight exactly as in a run without the scale."""
    from musicgen_lite.cli import main
    from musicgen_lite.training import train_lm

    _, cache = codec_and_tokens
    kw = dict(scale="tiny", lm="tiny", conditioner="learned", progress=False, beat_clock=True, key_condition=True,
              steps=1, lr=1e-3, warmup=0, schedule="constant")
    runs = {s: train_lm(tmp_path / f"s{s}", cache, key_lr_scale=s, **kw)["model"] for s in (1.0, 10.0)}
    for s, task in runs.items():
        w = task.lm.key.weight.detach()
        moved = w[w != 0].abs()
        assert moved.numel() > 0  # the columns of the keys this batch holds (the rest have no gradient)
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-3 * s), rtol=1e-2, atol=0)
    assert torch.equal(runs[1.0].lm.key.weight != 0, runs[10.0].lm.key.weight != 0)
    plain, scaled = (dict(runs[s].lm.named_parameters()) for s in (1.0, 10.0))
    assert all(torch.equal(v, scaled[k]) for k, v in plain.items() if not k.startswith("key."))
    with pytest.raises(SystemExit, match="--key-lr-scale sets the key condition's learning rate"):
        main(["train", "lm", str(cache), str(tmp_path / "bad"), "--scale", "tiny", "--key-lr-scale", "10"])
    with pytest.raises(SystemExit, match="--key-lr-scale must be > 0"):
        main(["train", "lm", str(cache), str(tmp_path / "bad"), "--scale", "tiny", "--beat-clock", "--key-condition",
              "--key-lr-scale", "0"])
