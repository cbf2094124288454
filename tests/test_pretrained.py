"""MusicGen.from_pretrained: a transformers folder (save_pretrained) -> our modules, parity checked; offline errors."""
from __future__ import annotations

import pytest
import torch

from musicgen_lite.generation import MusicGen
from musicgen_lite.hub import HubUnreachableError, from_pretrained, parity_check

V, K = 32, 4
CAPTIONS = ["80s pop track with bassy drums and synth", "a sad piano piece at 70 bpm"] * 30


@pytest.fixture(scope="module")
def saved_musicgen(tmp_path_factory):
    """A tiny random MusicgenForConditionalGeneration + tokenizer, saved as transformers saves the real ones."""
    from conftest import make_tiny_hf_musicgen

    hf, tok = make_tiny_hf_musicgen(CAPTIONS, V, K)
    hf.generation_config.guidance_scale = 3.0  # as the released checkpoints: the parity check must not use it
    hf.generation_config.do_sample = True
    out = tmp_path_factory.mktemp("hf") / "musicgen-tiny"
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    return out, hf, tok


def test_from_pretrained_local_folder_ports_and_checks_parity(saved_musicgen):
    path, hf, tok = saved_musicgen
    model = MusicGen.from_pretrained(path)
    assert model.parity["greedy_equal"] and model.parity["max_logit_diff"] < 1e-4
    assert model.codec.num_codebooks == K and model.lm.config.bins == V
    # the port holds the same weights as the saved transformers model
    torch.testing.assert_close(model.lm.emb[0].weight, hf.decoder.model.decoder.embed_tokens[0].weight)
    # and generates with the saved tokenizer
    wav = model.generate(["a sad piano piece at 70 bpm"], duration=0.02, top_k=1, progress=False)
    assert wav.shape[:2] == (1, 1) and torch.isfinite(wav).all()


def test_parity_check_catches_a_wrong_weight(saved_musicgen):
    path, hf, tok = saved_musicgen
    model = from_pretrained(path, check=False)
    assert model.parity is None
    with torch.no_grad():
        model.lm.heads[0].weight.add_(0.5 * torch.randn_like(model.lm.heads[0].weight))
    with pytest.raises(RuntimeError, match="does not match"):
        parity_check(hf, model, tok)
    result = parity_check(hf, model, tok, raise_on_mismatch=False)
    assert result["max_logit_diff"] > 1e-2


def test_offline_hub_name_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time: patch the constant as well
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="save_pretrained"):
        from_pretrained("facebook/musicgen-small")


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        from_pretrained(tmp_path)


def test_load_dispatches_on_what_the_folder_holds(saved_musicgen, tmp_path):
    path, hf, tok = saved_musicgen
    model = MusicGen.load(path)  # a transformers folder -> ported and checked
    assert model.parity["greedy_equal"]
    with pytest.raises(FileNotFoundError, match="nope"):
        MusicGen.load(tmp_path / "nope")
