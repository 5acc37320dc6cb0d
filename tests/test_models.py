"""attnkit's BERT with the real all-MiniLM-L6-v2 weights, and BERT folders saved by transformers,
against transformers' BertModel."""

from __future__ import annotations

import shutil

import pytest
import torch

from attnkit.cli import main
from attnkit.models import BertConfig, load_pretrained
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


def save_bert(folder, head, **config):
    """A small random BERT (``head``: transformers' class name) saved as a model folder,
    with MiniLM's tokenizer."""
    transformers = pytest.importorskip("transformers")
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = transformers.BertConfig(
        intermediate_size=64, attn_implementation="eager", **(sizes | config)
    )
    torch.manual_seed(0)
    hf = getattr(transformers, head)(cfg).eval()
    hf.save_pretrained(folder)
    shutil.copy(model_dir("all-MiniLM-L6-v2") / "tokenizer.json", folder)
    return hf if head == "BertModel" else hf.bert


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
def test_a_bert_model_folder_matches_transformers(head, tmp_path, capsys):
    """A folder transformers saved (any BERT with heads: its encoder) loads, runs as
    transformers runs it, and `attnkit explain --model FOLDER` explains it."""
    hf = save_bert(tmp_path, head)
    model = load_pretrained(tmp_path)
    assert model.name == tmp_path.name
    enc = model.tokenize(TEXTS[0])
    with torch.no_grad():
        ours = model(enc.ids, output_attentions=True)
        theirs = hf(enc.ids, output_hidden_states=True, output_attentions=True)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert a.shape == (1, 4, 11, 11)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert main(["explain", "--model", str(tmp_path), "--steps", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "what 'a' (token 9) attends to, per head" in out
    assert "These weights match the model's own attention" in out


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='absolute'"),
        ({"hidden_act": "relu"}, "hidden_act='gelu' are supported, got 'relu'"),
    ],
)
def test_a_bert_folder_that_would_compute_something_else_is_refused(config, message, tmp_path):
    save_bert(tmp_path, "BertModel", **config)
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)
    roberta = BertConfig.from_dict
    with pytest.raises(ValueError, match="model_type='bert' are supported, got 'roberta'"):
        roberta({"model_type": "roberta", "hidden_size": 32})


def test_a_folder_without_the_model_files_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors or tokenizer\.json"):
        load_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", str(tmp_path / "none")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "or a folder with config.json, model.safetensors, tokenizer.json" in err
