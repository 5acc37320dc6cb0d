"""attnkit's BERT with the real all-MiniLM-L6-v2 weights against transformers' BertModel."""

from __future__ import annotations

import pytest
import torch

from attnkit.models import load_pretrained
from attnkit.models.pretrained import model_dir

TEXTS = ["The skilled surgeon operated on the patient with a", "Attention is all you need."]


@pytest.fixture(scope="module")
def model():
    return load_pretrained("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    return transformers.BertModel.from_pretrained(
        str(model_dir("all-MiniLM-L6-v2")), attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("backend", ["auto", "reference", "tiled", "sdpa"])
def test_matches_transformers_bertmodel(model, hf_model, backend):
    model.encoder.set_backend(backend)
    try:
        for text in TEXTS:
            enc = model.tokenize(text)
            with torch.no_grad():
                ours = model(enc.ids, output_attentions=True)
                theirs = hf_model(enc.ids, output_hidden_states=True, output_attentions=True)
            assert len(ours.hidden_states) == len(theirs.hidden_states) == 7
            assert len(ours.attentions) == len(theirs.attentions) == 6
            for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            for a, b in zip(ours.attentions, theirs.attentions, strict=True):
                assert a.shape == (1, 12, enc.ids.shape[1], enc.ids.shape[1])
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            torch.testing.assert_close(
                ours.last_hidden_state, theirs.last_hidden_state, atol=1e-4, rtol=0
            )
    finally:
        model.encoder.set_backend("auto")


def test_padded_batch_matches_transformers(model, hf_model):
    encs = [model.tokenize(t) for t in TEXTS]
    L = max(e.ids.shape[1] for e in encs)
    ids = torch.zeros(2, L, dtype=torch.long)
    attn = torch.zeros(2, L, dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : e.ids.shape[1]] = e.ids[0]
        attn[b, : e.ids.shape[1]] = 1
    with torch.no_grad():
        ours = model(ids, attn).last_hidden_state
        theirs = hf_model(ids, attention_mask=attn).last_hidden_state
    real = attn.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_tokenize(model):
    enc = model.tokenize("The skilled surgeon")
    assert enc.tokens == ["[CLS]", "the", "skilled", "surgeon", "[SEP]"]
    assert enc.words == [None, 0, 1, 2, None]
    assert enc.ids.shape == (1, 5)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="empty"):
        model.tokenize("   ")
    long_text = "word " * 600
    with pytest.raises(ValueError, match="at most 512"):
        model.tokenize(long_text)
    cut = model.tokenize(long_text, truncate=True)
    assert cut.truncated
    assert cut.ids.shape == (1, 512)
    assert cut.tokens[-1] == "[SEP]"
    with pytest.raises(ValueError, match="unknown model 'bert-huge'"):
        load_pretrained("bert-huge")
