"""`attnkit explain` with each option, its pictures, its HTML in a real browser, bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from collections import Counter

import pytest
import torch

from attnkit.cli import main
from attnkit.explain import DEFAULT_TEXT, parse_mask
from attnkit.viz.head_view import head_view_html, quantize


def png_size(path):
    with open(path, "rb") as f:
        data = f.read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_explain_default_text_top_words(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "9:a" in out  # the last word, highlighted
    assert "what 'a' (token 9) attends to, per head" in out
    assert out.count("│     5 │") == 12  # one row per head of the last layer


def test_explain_all_layers_and_word(capsys):
    assert main(["explain", DEFAULT_TEXT, "--word", "surgeon", "--layer", "all", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "what 'surgeon' (token 3)" in out
    assert len(re.findall(r"│\s+\d+ │\s+\d+ │", out)) == 6 * 12


@pytest.mark.parametrize("layer", ["2", "-4"])  # negative: from the end of 6
def test_explain_steps_match_the_model(layer, capsys):
    assert main(["explain", "--steps", "--layer", layer, "--head", "7"]) == 0
    out = capsys.readouterr().out
    assert "Layer 2, head 7" in out
    assert "These weights match the model's own attention" in out
    assert "÷√d" in out


def test_explain_sparse(capsys):
    assert main(["explain", "--sparse", "sliding_window:2,2+global:0"]) == 0
    out = capsys.readouterr().out
    assert "may look at: [CLS] patient with a [SEP]" in out
    assert "cosine similarity to full attention, per layer" in out


def test_explain_png_and_html(tmp_path, capsys):
    png, page = tmp_path / "heads.png", tmp_path / "heads.html"
    assert main(["explain", "--png", str(png), "--html", str(page)]) == 0
    width, height = png_size(png)
    assert width > 600
    assert height > 400
    assert os.path.getsize(png) > 20_000
    text = page.read_text()
    assert "<script" in text
    assert "DATA" in text
    # self-contained: nothing is loaded from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text
    assert "url(http" not in text


def test_explain_sparse_pictures_show_both_runs(tmp_path, capsys):
    """With --sparse, the PNG of the full run gets a .sparse.png beside it, and the page holds
    both runs (the selector is browser-tested below)."""
    png, page = tmp_path / "heads.png", tmp_path / "heads.html"
    argv = ["explain", "--sparse", "sliding_window:2,2", "--png", str(png), "--html", str(page)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'heads.sparse.png'} (under sliding_window(left=2, right=2))" in out
    assert png_size(tmp_path / "heads.sparse.png")[0] > 600
    data = json.loads(re.search(r"const DATA = (.*);", page.read_text()).group(1))
    assert data["runs"] == ["full attention", "under sliding_window(left=2, right=2)"]
    weights = torch.frombuffer(bytearray(base64.b64decode(data["weights"])), dtype=torch.uint8)
    L = len(data["tokens"])
    sparse = weights.view(2, data["layers"], data["heads"], L, L)[1]
    far = (torch.arange(L).view(-1, 1) - torch.arange(L).view(1, -1)).abs() > 2
    assert not sparse[..., far].any()  # the sparse run is the sparse model's own weights
    # and each run's rollout, a column of the model view
    rolled = torch.frombuffer(bytearray(base64.b64decode(data["rollout"])), dtype=torch.uint8)
    rolled = rolled.view(2, data["layers"], L, L)
    from attnkit import explain
    from attnkit.models import load_pretrained

    model = load_pretrained()
    runs = [
        explain.run(model, DEFAULT_TEXT),
        explain.run(model, DEFAULT_TEXT, mask=parse_mask("sliding_window:2,2")),
    ]
    for got, r in zip(rolled, runs, strict=True):
        assert torch.equal(got, quantize(list(explain.rollout(r).float())))
    # and what each head does, per run
    assert data["roles"] == [explain.role_words(r) for r in runs]
    assert data["roles"][0][0][2] == "previous token 1.00"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", ""], "text is empty"),
        (["explain", "word " * 600], "reads at most 512"),
        (["explain", "--layer", "6"], "layer 6 is out of range"),
        (["explain", "--layer", "-7"], "layer -7 is out of range: the model has layers 0..5 (-6"),
        (["explain", "--steps", "--head", "12"], "head 12 is out of range"),
        (["explain", "--model", "bert-huge"], "unknown model 'bert-huge'"),
        (["explain", "--word", "scalpel"], "word 'scalpel' is not a token"),
        (["explain", "--sparse", "zigzag:3"], "unknown pattern 'zigzag'"),
        (["explain", "--sparse", "sliding_window:-5"], "bad arguments"),
        (["explain", "--top", "0"], "must be >= 1"),
        (["explain", "--top", "two"], "must be an int >= 1, got 'two'"),
        (["explain", "--layer", "last"], "must be an int or 'all', got 'last'"),
    ],
)
def test_explain_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert message in err
    assert out == ""  # refused before any table: --sparse is read before the model runs


def test_explain_truncates_long_text_with_warning(capsys):
    assert main(["explain", "word " * 600, "--truncate", "--top", "1"]) == 0
    assert "warning: text cut to 512 tokens" in capsys.readouterr().out


@pytest.fixture
def char_lm(tmp_path):
    """A small character-level CausalLM with a sliding window, saved as a checkpoint."""
    from attnkit import masks
    from attnkit.nn import CausalLM, save_checkpoint

    torch.manual_seed(0)
    vocab = sorted(set(DEFAULT_TEXT))
    model = CausalLM(len(vocab), d_model=32, nhead=2, num_layers=2, mask=masks.sliding_window(4))
    return save_checkpoint(tmp_path / "lm.pt", model, vocab=vocab), model, vocab


def test_explain_checkpoint_heads_pictures_and_guesses(char_lm, tmp_path, capsys):
    from attnkit.explain import run_checkpoint
    from attnkit.nn import load_checkpoint

    path, model, vocab = char_lm
    png, page = tmp_path / "heads.png", tmp_path / "heads.html"
    argv = ["explain", "--checkpoint", str(path), "--word", "surgeon", "--layer", "all"]
    assert main([*argv, "--png", str(png), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    i = DEFAULT_TEXT.index("surgeon") + len("surgeon") - 1  # a word is its last character
    assert f"what 'n' (token {i}) attends to, per head" in out
    assert len(re.findall(r"│\s+\d+ │\s+\d+ │", out)) == 2 * 2  # layers x heads
    assert "next-token guesses after the text" in out
    assert png_size(png)[0] > 300
    assert "DATA" in page.read_text()
    # the weights shown are the model's own, inside its sliding window (4 back, causal)
    r = run_checkpoint(load_checkpoint(path), DEFAULT_TEXT)
    ids = torch.tensor([[vocab.index(c) for c in DEFAULT_TEXT]])
    logits, weights = model.eval()(ids, need_weights=True)
    for got, want in zip(r.output.attentions, weights, strict=True):
        torch.testing.assert_close(got, want)
    L = ids.shape[1]
    allowed = torch.ones(L, L).tril().triu(-4).bool()
    assert (r.attention(1)[:, ~allowed] == 0).all()
    torch.testing.assert_close(r.attention(1).sum(-1), torch.ones(2, L))  # rows sum to 1
    top = logits[0, -1].softmax(-1).argmax()
    assert r.next_tokens[0][0] == {" ": "␣"}.get(vocab[top], vocab[top])


def translator(tmp_path, vocab, **options):
    """A small random character-level Transformer (GQA) saved with its vocabulary. Its
    <pad> and <bos> embeddings (tied to its output) are zero, so it never writes them: with
    this seed it writes 'a', seven '1's and <eos> for "ab 12"."""
    from attnkit.nn import Transformer, save_checkpoint

    torch.manual_seed(20)
    model = Transformer(
        len(vocab), len(vocab), d_model=32, nhead=4, num_kv_heads=2, max_len=12, **options
    ).eval()
    with torch.no_grad():
        model.tgt_embed.tokens.weight[:2] = 0
    return save_checkpoint(tmp_path / "tr.pt", model, vocab=vocab), model


def test_explain_a_translation_shows_its_cross_attention(tmp_path, capsys):
    """A Transformer checkpoint: the decoder's cross-attention over the source while it writes
    its greedy translation, in the table, the PNG and the HTML page (whose neuron view's
    vectors give the weights)."""
    from attnkit.explain import run_checkpoint
    from attnkit.nn import load_checkpoint

    vocab = ["<pad>", "<bos>", "<eos>", *"abc 123"]
    path, model = translator(tmp_path, vocab)
    png, page = tmp_path / "cross.png", tmp_path / "cross.html"
    argv = ["explain", "--checkpoint", str(path), "ab 12", "--layer", "all"]
    assert main([*argv, "--png", str(png), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    src = torch.tensor([[vocab.index(c) for c in "ab 12"]])
    written = model.generate(src, bos_id=1, eos_id=2, max_len=12)[0].tolist()
    if 2 in written:
        written = written[: written.index(2) + 1]
    shown = [{" ": "␣"}.get(vocab[t], vocab[t]) for t in written]
    assert f"the translation, token by token: {' '.join(shown)}" in out
    assert shown[0] == "a"  # what the test needs from this model
    assert shown[-1] == "<eos>"
    assert len(shown) > 2
    last = len(shown) - 2  # the last token before <eos>, by default
    title = " ".join(out.split())  # (rich wraps the table's title)
    assert f"what {shown[last]!r} (output token {last}) attends to in the source" in title
    assert len(re.findall(r"│\s+\d+ │\s+\d+ │", out)) == 2 * 4  # layers x heads
    assert png_size(png)[0] > 300
    data = page_data(page.read_text())
    assert data["tokens"] == ["a", "b", "␣", "1", "2"]
    assert data["query_tokens"] == shown
    assert data["rollout"] is None  # (cross-attention has none)
    assert data["roles"] is None
    # the weights are the decoder's own cross-attention, step by step
    r = run_checkpoint(load_checkpoint(path), "ab 12")
    with torch.no_grad():
        memory, padding = model.encode(src)
        _, weights = model.decode(
            torch.tensor([[1, *written[:-1]]]), memory, padding, need_weights=True
        )
    for got, want in zip(r.output.attentions, weights, strict=True):
        torch.testing.assert_close(got, want)
    # and the neuron view's queries and keys (kv heads repeated) give them
    q, k = r.vectors["q"], r.vectors["k"]
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    torch.testing.assert_close(scores, torch.cat(weights), rtol=0, atol=1e-5)
    assert main([*argv, "--word", "a"]) == 0
    assert "what 'a' (output token 0) attends to in the source" in " ".join(
        capsys.readouterr().out.split()
    )


def test_a_translations_end_token_is_found_by_its_id_not_its_spelling(tmp_path, capsys):
    """An end token spelled "</s>" (named by meta's eos_id): the default output token is
    still the last before it."""
    from attnkit.nn import save_checkpoint

    vocab = ["<pad>", "<s>", "</s>", *"abc 123"]
    _, model = translator(tmp_path, vocab)
    path = save_checkpoint(
        tmp_path / "named.pt", model, vocab=vocab, meta={"bos_id": 1, "eos_id": 2}
    )
    assert main(["explain", "--checkpoint", str(path), "ab 12"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    written = out.split("the translation, token by token: ")[1].split()
    assert written[-1] == "</s>"
    last = len(written) - 2
    assert f"what {written[last]!r} (output token {last}) attends to in the source" in out


def test_explain_a_translation_with_sinks_shows_their_share(tmp_path, capsys):
    """Sinks in every attention: rows of cross-attention sum to 1 minus the sink's share, shown
    in a sink column; the page has no neuron view (softmax(q·kᵀ/√d) is not the layer's)."""
    vocab = ["<pad>", "<bos>", "<eos>", *"abc 123"]
    path, _ = translator(tmp_path, vocab, sinks=True)
    page = tmp_path / "sinks.html"
    assert main(["explain", "--checkpoint", str(path), "ab 12", "--html", str(page)]) == 0
    assert "sink" in capsys.readouterr().out
    data = page_data(page.read_text())
    assert data["sink"]  # each row's share, drawn as a "(sink)" key
    assert data["vectors"] == [None]  # (the one run has none)
    with pytest.raises(SystemExit) as exc:  # nor a walk through softmax(q·kᵀ/√d)·v
        main(["explain", "--checkpoint", str(path), "ab 12", "--steps"])
    assert exc.value.code == 2
    assert "--steps walks softmax(q·kᵀ/√d)·v" in capsys.readouterr().err


def test_explain_steps_of_checkpoints_match_their_models(char_lm, tmp_path, capsys):
    """--steps on a checkpoint walks one head from the run's own queries, keys and values:
    a translation's cross-attention (the decoder's query over the source), and a causal LM's
    self-attention under its sliding window (the keys it hides get -inf); both give the
    model's own weights."""
    path, _ = translator(tmp_path, ["<pad>", "<bos>", "<eos>", *"abc 123"])
    assert main(["explain", "--checkpoint", str(path), "ab 12", "--steps", "--head", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Layer 1, head 3: how 1 decides where to look" in out  # the last token before <eos>
    assert "(the query from the decoder, keys and values from the encoder)" in out
    assert "These weights match the model's own attention" in out
    assert "The 4 heads' outputs" in out
    argv = ["explain", "--checkpoint", str(char_lm[0]), "--steps", "--layer", "0", "--head", "1"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(keys the mask hides: -∞)" in out
    assert "These weights match the model's own attention" in out
    assert "The 2 heads' outputs" in out


def test_explain_a_translation_refuses_what_it_cannot_run(tmp_path, capsys):
    path, _ = translator(tmp_path, ["<pad>", "<bos>", "a", "b"])  # no <eos>
    for argv, message in (([str(path), "ab"], "vocabulary must hold '<eos>'"),):
        with pytest.raises(SystemExit) as exc:
            main(["explain", "--checkpoint", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    path, _ = translator(tmp_path, ["<pad>", "<bos>", "<eos>", "a", "b"])
    for argv, message in (
        ([str(path), "abz"], "not in the checkpoint's vocabulary: 'z'"),
        ([str(path), "ab", "--word", "q"], "'q' is not a token of the translation"),
        ([str(path), "ab", "--sparse", "causal"], "--sparse explains the pretrained encoder"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["explain", "--checkpoint", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_explain_checkpoint_shows_the_sinks_share(tmp_path, capsys):
    """With attention sinks, each head's row sums to 1 minus its sink column."""
    from attnkit.explain import run_checkpoint
    from attnkit.nn import CausalLM, load_checkpoint, save_checkpoint

    vocab = sorted(set(DEFAULT_TEXT))
    model = CausalLM(len(vocab), d_model=32, nhead=2, num_layers=1, sinks=True)
    with torch.no_grad():
        model.layers[0].self_attn.sinks.copy_(torch.tensor([2.0, 5.0]))
    path = save_checkpoint(tmp_path / "sinks.pt", model, vocab=vocab)
    page = tmp_path / "sinks.html"
    assert main(["explain", "--checkpoint", str(path), "--top", "1", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    r = run_checkpoint(load_checkpoint(path), DEFAULT_TEXT)
    data = page_data(page.read_text())  # the page carries each row's sink share
    embedded = torch.frombuffer(bytearray(base64.b64decode(data["sink"])), dtype=torch.uint8)
    expected = ((1 - r.attention(0).sum(-1)) * 255).round().to(torch.uint8)
    assert torch.equal(embedded.view(1, 1, *expected.shape)[0, 0], expected)
    i = len(DEFAULT_TEXT) - 1
    shares = 1 - r.attention(0)[:, i].sum(-1)
    assert float(shares.min()) > 0.05
    assert float(shares.max()) < 0.95
    assert re.search(r"┃ #1\s+┃ sink", out)
    for h, share in enumerate(shares.tolist()):
        assert re.search(rf"│\s+0 │\s+{h} │ .* │ {share:.2f}\s+│", out)


def test_explain_checkpoint_of_a_differential_model(tmp_path, capsys):
    """Differential weights: the table says so, and its 1 − λ column is each row's sum."""
    from attnkit import explain
    from attnkit.nn import CausalLM, load_checkpoint, save_checkpoint

    vocab = sorted(set(DEFAULT_TEXT))
    model = CausalLM(len(vocab), d_model=32, nhead=4, num_layers=2, differential=True)
    path = save_checkpoint(tmp_path / "diff.pt", model, vocab=vocab)
    assert main(["explain", "--checkpoint", str(path), "--layer", "all", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "differential maps A1 − λ·A2" in out
    for depth, layer in enumerate(model.layers):
        one_minus = 1 - layer.self_attn.lambda_().item()
        for h in range(2):
            assert re.search(rf"│\s+{depth} │\s+{h} │ .* │ {one_minus:.2f}\s+│", out), out
    # the pictures take its signed maps (weights below 0), which plain maps may not have
    png, page = tmp_path / "diff.png", tmp_path / "diff.html"
    assert main(["explain", "--checkpoint", str(path), "--png", str(png), "--html", str(page)]) == 0
    r = explain.run_checkpoint(load_checkpoint(path), DEFAULT_TEXT)
    assert float(r.attention(1).min()) < 0
    assert png.stat().st_size > 0
    assert page_data(page.read_text())["vectors"] == [None]  # no neuron view of A1 − λ·A2
    with pytest.raises(ValueError, match=r"not weights in \[0, 1\]"):
        head_view_html(r.tokens, [r.attention(n) for n in range(2)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparse", "causal"], "--sparse explains the pretrained encoder"),
        (["The surgeon's scalpel!"], "not in the checkpoint's vocabulary"),
        (["--word", "scalpel"], "word 'scalpel' is not in the text"),
        (["--layer", "2"], "layer 2 is out of range"),
    ],
)
def test_explain_checkpoint_usage_errors(char_lm, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--checkpoint", str(char_lm[0]), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_explain_checkpoint_refuses_other_files(tmp_path, capsys):
    from attnkit.nn import Transformer, save_checkpoint

    no_vocab = save_checkpoint(tmp_path / "t.pt", Transformer(9, 9, d_model=16, nhead=2))
    torch.save([1, 2], tmp_path / "junk.pt")
    for path, message in (
        (no_vocab, "takes a checkpoint saved with its vocabulary"),
        (tmp_path / "junk.pt", "not an attnkit checkpoint"),
    ):
        with pytest.raises(SystemExit):
            main(["explain", "--checkpoint", str(path)])
        assert message in capsys.readouterr().err


def test_parse_mask_union():
    m = parse_mask("sliding_window:1,1+global:0")
    assert m.dense(4, 4)[0, 0].int().tolist() == [
        [1, 1, 1, 1],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 0, 1, 1],
    ]


_FIRST = r"attentions\[0\]"  # the name the head view's errors give its first map
_HLL = r"\(H, Lq, Lk\)"


@pytest.mark.parametrize(
    ("maps", "where", "what"),
    [
        ([], "attentions", " has no layers"),
        ([torch.rand(3, 3)], _FIRST, f" must be {_HLL} attention weights, got \\(3, 3\\)"),
        ([torch.rand(2, 3, 4)], _FIRST, f" is {_HLL} = \\(2, 3, 4\\) but there are 3 tokens"),
        ([torch.rand(2, 4, 4)], _FIRST, f" is {_HLL} = \\(2, 4, 4\\) but there are 3 tokens"),
        ([torch.rand(2, 3, 3), torch.rand(1, 3, 3)], "attentions", f"'s layers differ in {_HLL}"),
        (
            {"full": [torch.full((1, 3, 3), float("nan"))]},
            r"attentions\['full'\]\[0\]",
            " holds NaN",
        ),
        ([torch.randn(2, 3, 3) * 4], _FIRST, r" .* not weights in \[0, 1\]: draw probabilities"),
    ],
)
def test_pictures_refuse_maps_that_are_not_weights(maps, where, what, tmp_path):
    """Both pictures say what is wrong with their maps (they drew scores or NaN as weights,
    or failed inside torch.stack / matplotlib)."""
    from attnkit.viz import save_head_grid

    tokens = ["a", "b", "c"]
    with pytest.raises(ValueError, match=where + what):
        head_view_html(tokens, maps)
    layers = maps if isinstance(maps, list) else maps["full"]
    if len(layers) == 1:  # the heatmap grid draws one layer's map
        with pytest.raises(ValueError, match="attention" + what):
            save_head_grid(layers[0], tokens, tmp_path / "grid.png")


def test_html_escapes_script_closing_tokens():
    page = head_view_html(["a", "</script><b>"], [torch.full((1, 2, 2), 0.5)])
    assert "</script><b>" not in page


# ---- the head view in a real browser --------------------------------------------------------


@pytest.mark.slow
def test_head_view_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from attnkit import explain
    from attnkit.models import load_pretrained

    model = load_pretrained()
    r = explain.run(model, DEFAULT_TEXT)
    attentions = [r.attention(n) for n in range(6)]
    page = tmp_path / "view.html"
    page.write_text(head_view_html(r.tokens, attentions))
    browser.get(page.as_uri())

    # the page draws the last layer: one line per (head, i, j) above the 0.02 threshold
    weights = quantize(attentions)[5].float() / 255
    drawn = (weights > 0.02).sum(dim=(1, 2))  # per head
    lines = browser.find_elements(By.CSS_SELECTOR, "line.attn-line")
    assert len(lines) == int(drawn.sum()) > 0

    browser.find_element(By.CSS_SELECTOR, "input.head-toggle[data-head='3']").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "line.attn-line")) == int(
        drawn.sum() - drawn[3]
    )
    assert not browser.find_elements(By.CSS_SELECTOR, "line.attn-line[data-head='3']")

    # hovering the query token 'surgeon' (index 3) leaves only its lines visible
    token = browser.find_element(By.CSS_SELECTOR, "text.tok[data-side='i'][data-index='3']")
    ActionChains(browser).move_to_element(token).perform()
    visible = browser.find_elements(By.CSS_SELECTOR, "line.attn-line:not(.hidden)")
    assert visible
    assert {ln.get_attribute("data-i") for ln in visible} == {"3"}

    # one run: no run selector
    assert not browser.find_element(By.ID, "run-box").is_displayed()

    shot = tmp_path / "view.png"
    assert browser.save_screenshot(str(shot))
    viewport = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert list(png_size(shot)) == viewport
    assert os.path.getsize(shot) > 20_000  # lines and labels, not a blank page


def page_data(page):
    """The DATA object a head-view page embeds."""
    return json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0])  # JSON reads <\/


@pytest.mark.slow
def test_head_view_draws_the_sink_in_chromium(browser, tmp_path):
    """A sinks model's page has one more key, "(sink)": one line per (head, query) whose
    share passes the threshold, the only lines left when it is hovered."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from attnkit.explain import run_checkpoint
    from attnkit.nn import CausalLM, load_checkpoint, save_checkpoint

    vocab = sorted(set(DEFAULT_TEXT))
    model = CausalLM(len(vocab), d_model=32, nhead=2, num_layers=1, sinks=True)
    with torch.no_grad():
        model.layers[0].self_attn.sinks.copy_(torch.tensor([-4.0, 3.0]))  # small, large
    r = run_checkpoint(load_checkpoint(save_checkpoint(tmp_path / "s.pt", model, vocab=vocab)),
                       DEFAULT_TEXT)  # fmt: skip
    attentions = [r.attention(0)]
    page = tmp_path / "sinks.html"
    page.write_text(head_view_html(r.tokens, attentions, sinks=True))
    browser.get(page.as_uri())
    shares = ((1 - attentions[0].sum(-1)) * 255).round() / 255  # (H, L) as embedded
    sink_lines = browser.find_elements(By.CSS_SELECTOR, "line.sink-line")
    assert len(sink_lines) == int((shares > 0.02).sum()) > 0
    per_head = Counter(ln.get_attribute("data-head") for ln in sink_lines)
    expected = {str(h): int(n) for h, n in enumerate((shares > 0.02).sum(-1)) if n}
    assert per_head == expected
    assert per_head["1"] > per_head.get("0", 0)  # the larger sink takes more rows' weight
    assert browser.find_element(By.ID, "sink-note").is_displayed()
    sink = browser.find_element(By.CSS_SELECTOR, "text.tok[data-side='j'][data-index='sink']")
    assert sink.text == "(sink)"
    ActionChains(browser).move_to_element(sink).perform()
    visible = browser.find_elements(By.CSS_SELECTOR, "line.attn-line:not(.hidden)")
    assert visible
    assert {ln.get_attribute("data-j") for ln in visible} == {"sink"}
    page.write_text(head_view_html(r.tokens, attentions))  # the same maps, no sinks asked
    browser.get(page.as_uri())
    assert not browser.find_elements(By.CSS_SELECTOR, "line.sink-line")
    assert not browser.find_element(By.ID, "sink-note").is_displayed()


@pytest.mark.slow
def test_head_view_switches_between_runs_in_chromium(browser, tmp_path):
    """Full attention and a sliding window on one page: the selector redraws the same layer
    and heads from the other run's weights."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from attnkit import explain, masks
    from attnkit.models import load_pretrained

    model = load_pretrained()
    runs = {
        "full": explain.run(model, DEFAULT_TEXT),
        "window": explain.run(model, DEFAULT_TEXT, mask=masks.sliding_window(2, 2)),
    }
    maps = {name: [r.attention(n) for n in range(6)] for name, r in runs.items()}
    page = tmp_path / "runs.html"
    page.write_text(head_view_html(runs["full"].tokens, maps))
    browser.get(page.as_uri())

    def drawn(name):  # lines the page should draw at the last layer, all heads on
        return int((quantize(maps[name])[5].float() / 255 > 0.02).sum())

    assert browser.find_element(By.ID, "run-box").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "line.attn-line")) == drawn("full")
    Select(browser.find_element(By.ID, "run")).select_by_visible_text("window")
    lines = browser.find_elements(By.CSS_SELECTOR, "line.attn-line")
    assert len(lines) == drawn("window") < drawn("full")
    spans = {abs(int(ln.get_attribute("data-i")) - int(ln.get_attribute("data-j"))) for ln in lines}
    assert max(spans) == 2


@pytest.mark.slow
def test_model_view_in_chromium(browser, tmp_path):
    """The model view: a cell per (layer, head) whose pixels carry the embedded weights of the
    selected run, the cells the head view draws outlined, and a click that shows its cell."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    layers, H, L = 2, 3, 5
    g = torch.Generator().manual_seed(0)
    maps = {
        name: [torch.randn(H, L, L, generator=g).mul(2).softmax(-1) for _ in range(layers)]
        for name in ("first", "second")
    }
    page = tmp_path / "model.html"
    page.write_text(head_view_html(list("abcde"), maps))
    browser.get(page.as_uri())

    cells = browser.find_elements(By.CSS_SELECTOR, "canvas.thumb")
    assert len(cells) == layers * H
    assert {(c.get_attribute("width"), c.get_attribute("height")) for c in cells} == {("5", "5")}

    def alpha(layer, head):  # the cell's alpha channel, row by row
        return browser.execute_script(
            "const c = document.querySelector(`canvas.thumb[data-layer='${arguments[0]}']"
            "[data-head='${arguments[1]}']`);"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
            ".filter((_, i) => i % 4 === 3);",
            layer,
            head,
        )

    def shown():
        return {
            (c.get_attribute("data-layer"), c.get_attribute("data-head"))
            for c in browser.find_elements(By.CSS_SELECTOR, "canvas.thumb.shown")
        }

    for layer in range(layers):
        for head in range(H):
            assert alpha(layer, head) == quantize(maps["first"])[layer, head].flatten().tolist()
    assert shown() == {("1", str(h)) for h in range(H)}  # the last layer, every head

    browser.find_element(By.CSS_SELECTOR, "canvas.thumb[data-layer='0'][data-head='1']").click()
    assert Select(browser.find_element(By.ID, "layer")).first_selected_option.text == "0"
    checked = [
        cb.get_attribute("data-head")
        for cb in browser.find_elements(By.CSS_SELECTOR, "input.head-toggle")
        if cb.is_selected()
    ]
    assert checked == ["1"]
    lines = browser.find_elements(By.CSS_SELECTOR, "line.attn-line")
    assert {ln.get_attribute("data-head") for ln in lines} == {"1"}
    assert len(lines) == int((quantize(maps["first"])[0, 1].float() / 255 > 0.02).sum())
    assert shown() == {("0", "1")}

    Select(browser.find_element(By.ID, "run")).select_by_visible_text("second")
    assert alpha(1, 2) == quantize(maps["second"])[1, 2].flatten().tolist()
    assert alpha(1, 2) != quantize(maps["first"])[1, 2].flatten().tolist()
    assert not browser.find_elements(By.CSS_SELECTOR, "canvas.rollout")  # none given


@pytest.mark.slow
def test_model_views_rollout_column_in_chromium(browser, tmp_path):
    """Given each run's rollout, the model view has one more column whose cells carry the
    selected run's rollout after each layer; its cells are no head's (never outlined)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from attnkit.explain import rollout

    layers, H, L = 3, 2, 4
    g = torch.Generator().manual_seed(1)
    maps = {
        name: [torch.randn(H, L, L, generator=g).mul(2).softmax(-1) for _ in range(layers)]
        for name in ("first", "second")
    }
    rolled = {name: rollout(_run_of(run, "abcd")).float() for name, run in maps.items()}
    page = tmp_path / "rollout.html"
    page.write_text(head_view_html(list("abcd"), maps, rollout=rolled))
    browser.get(page.as_uri())
    assert len(browser.find_elements(By.CSS_SELECTOR, "canvas.thumb")) == layers * (H + 1)
    headers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#model-view .axis")]
    assert headers[: H + 2] == ["", "head 0", "head 1", "rollout"]

    def alpha(layer):
        return browser.execute_script(
            "const c = document.querySelector(`canvas.rollout[data-layer='${arguments[0]}']`);"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
            ".filter((_, i) => i % 4 === 3);",
            layer,
        )

    for layer in range(layers):
        assert alpha(layer) == quantize(list(rolled["first"]))[layer].flatten().tolist()
    Select(browser.find_element(By.ID, "run")).select_by_visible_text("second")
    assert alpha(2) == quantize(list(rolled["second"]))[2].flatten().tolist()
    assert alpha(2) != quantize(list(rolled["first"]))[2].flatten().tolist()
    assert not browser.find_elements(By.CSS_SELECTOR, "canvas.rollout.shown")


@pytest.mark.slow
def test_heads_roles_show_on_their_cells_and_toggles_in_chromium(browser, tmp_path):
    """Given each run's roles, a model-view cell's title and a head toggle's (at the layer
    shown) name what that head does in the selected run."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    maps = {name: [torch.eye(3)[None].expand(2, 3, 3)] * 2 for name in ("first", "second")}
    roles = {
        name: [[f"{name} {layer}.{h}" for h in range(2)] for layer in range(2)] for name in maps
    }
    page = tmp_path / "roles.html"
    page.write_text(head_view_html(list("abc"), maps, roles=roles))
    browser.get(page.as_uri())

    def titles(selector):
        return [e.get_attribute("title") for e in browser.find_elements(By.CSS_SELECTOR, selector)]

    assert titles("canvas.thumb") == [
        f"layer {layer}, head {h}: first {layer}.{h}" for layer in range(2) for h in range(2)
    ]
    assert titles("label.head-toggle-label") == [
        "layer 1, head 0: first 1.0",
        "layer 1, head 1: first 1.1",
    ]
    Select(browser.find_element(By.ID, "run")).select_by_visible_text("second")
    Select(browser.find_element(By.ID, "layer")).select_by_visible_text("0")
    assert titles("label.head-toggle-label") == [
        "layer 0, head 0: second 0.0",
        "layer 0, head 1: second 0.1",
    ]
    assert titles("canvas.thumb")[3] == "layer 1, head 1: second 1.1"


def test_head_view_refuses_a_rollout_or_roles_that_do_not_fit():
    maps = {"a": [torch.eye(3)[None]] * 2, "b": [torch.eye(3)[None]] * 2}
    good = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match=r"rollout must be given for every run, \['a', 'b'\]"):
        head_view_html(list("xyz"), maps, rollout=good)
    with pytest.raises(ValueError, match=r"rollout\['b'\] must be \(layers, L, L\) = \(2, 3, 3\)"):
        head_view_html(list("xyz"), maps, rollout={"a": good, "b": good[:1]})
    with pytest.raises(ValueError, match="weights ≥ 0 whose rows sum to 1"):
        head_view_html(list("xyz"), maps, rollout={"a": good, "b": good * 0.5})
    words = [["x"], ["y"]]
    with pytest.raises(ValueError, match=r"roles must be given for every run, \['a', 'b'\]"):
        head_view_html(list("xyz"), maps, roles=words)
    with pytest.raises(
        ValueError,
        match=r"roles\['b'\] must hold \(layers, heads\) = \(2, 1\) strings, got \(2, 2\)",
    ):
        head_view_html(list("xyz"), maps, roles={"a": words, "b": [["x", "y"], ["z", "w"]]})


@pytest.mark.slow
def test_neuron_view_in_chromium(browser, tmp_path):
    """The neuron view scores every key from the embedded q, k, v as the model does: its
    q·k and output are `head_steps`', its weights the model's; the head, the query (picked
    by clicking a token) and the layer can change; other runs have no vectors."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from attnkit import explain, masks
    from attnkit.models import load_pretrained

    model = load_pretrained()
    r = explain.run(model, DEFAULT_TEXT)
    window = explain.run(model, DEFAULT_TEXT, mask=masks.sliding_window(2, 2))
    maps = {
        name: [run.attention(n) for n in range(6)]
        for name, run in (("full", r), ("window", window))
    }
    vectors = explain.head_vectors(model, r)
    page = tmp_path / "neuron.html"
    page.write_text(head_view_html(r.tokens, maps, vectors=vectors, query=3, head=7, layer=2))
    browser.get(page.as_uri())

    def shown():
        rows = browser.find_elements(By.CSS_SELECTOR, "#neuron tr.key")
        dots = torch.tensor([float(row.get_attribute("data-dot")) for row in rows]).double()
        weights = torch.tensor([float(row.get_attribute("data-weight")) for row in rows]).double()
        out = json.loads(
            browser.find_element(By.CSS_SELECTOR, "#neuron tr.summary").get_attribute("data-out")
        )
        return dots, weights, torch.tensor(out, dtype=torch.float64)

    def check(layer, head, query):
        steps = explain.head_steps(model, r, query, layer, head)
        dots, weights, out = shown()
        torch.testing.assert_close(dots, steps["dots"].double(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            weights, r.attention(layer)[head, query].double(), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(out, steps["out"].double(), rtol=0, atol=1e-4)

    assert Select(browser.find_element(By.ID, "layer")).first_selected_option.text == "2"
    assert Select(browser.find_element(By.ID, "nq")).first_selected_option.text == "3: surgeon"
    check(2, 7, 3)
    Select(browser.find_element(By.ID, "nh")).select_by_value("0")
    check(2, 0, 3)
    browser.find_element(By.CSS_SELECTOR, "text.tok[data-side='i'][data-index='7']").click()
    assert Select(browser.find_element(By.ID, "nq")).first_selected_option.text == "7: patient"
    check(2, 0, 7)
    Select(browser.find_element(By.ID, "layer")).select_by_value("4")
    check(4, 0, 7)

    Select(browser.find_element(By.ID, "run")).select_by_visible_text("window")
    assert not browser.find_element(By.ID, "neuron-box").is_displayed()
    assert browser.find_element(By.ID, "neuron-missing").is_displayed()
    # both runs' vectors, the window's with its mask: each run scored by its own
    L = len(r.tokens)
    windowed = explain.head_vectors(model, window) | {
        "mask": masks.sliding_window(2, 2).dense(L, L)[0, 0]
    }
    both = {"full": vectors, "window": windowed}
    page.write_text(head_view_html(r.tokens, maps, vectors=both, query=7, layer=4))
    browser.get(page.as_uri())
    Select(browser.find_element(By.ID, "run")).select_by_visible_text("window")
    rows = browser.find_elements(By.CSS_SELECTOR, "#neuron tr.key")
    weights = torch.tensor([float(row.get_attribute("data-weight")) for row in rows])
    torch.testing.assert_close(weights, window.attention(4)[0, 7], rtol=0, atol=1e-5)
    assert [j for j, row in enumerate(rows) if "masked" in row.text] == [0, 1, 2, 3, 4, 10]
    with pytest.raises(
        ValueError, match="differs from the weights of run 'window'"
    ):  # its mask left out
        head_view_html(r.tokens, maps, vectors={"window": explain.head_vectors(model, window)})
    page.write_text(head_view_html(r.tokens, maps))  # no vectors: no neuron view at all
    browser.get(page.as_uri())
    assert not browser.find_element(By.ID, "neuron-box").is_displayed()
    assert not browser.find_element(By.ID, "neuron-missing").is_displayed()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "v"}, "vectors must hold 'q', 'k', 'v' \\(and a 'mask'\\)"),
        ({"mask": torch.ones(3, 4, dtype=torch.bool)}, r"mask must be bool \(Lq, Lk\) = \(3, 3\)"),
        ({"mask": torch.eye(3, dtype=torch.bool)}, "differs from the weights of run 'attention'"),
        ({"q": torch.zeros(2, 2, 4, 4)}, r"vectors must be q \(layers, H, Lq, d\)"),
        ({"v": torch.zeros(2, 2, 4, 5)}, r"vectors must be q \(layers, H, Lq, d\)"),
        ({"k": torch.full((2, 2, 3, 4), float("nan"))}, "vectors hold NaN"),
        ({"query": 3}, "query 3 and head 0 must index the 3 queries, 2 heads"),
        (
            {
                "q": torch.ones(2, 2, 3, 4),
                "k": torch.arange(24.0).view(2, 2, 3, 2).repeat(1, 1, 1, 2),
            },
            r"softmax\(q·kᵀ/√d\) over the vectors differs from the weights of run 'attention'",
        ),
        ({"layer": 2}, r"layer 2 is out of range: the maps have layers 0..1"),
    ],
)
def test_neuron_view_refuses_vectors_that_do_not_fit(change, message):
    maps = [torch.full((2, 3, 3), 1 / 3)] * 2
    vectors = {
        "q": torch.zeros(2, 2, 3, 4),
        "k": torch.zeros(2, 2, 3, 4),
        "v": torch.zeros(2, 2, 3, 5),
    }
    vectors.pop(change.pop("drop", None), None)
    kwargs = {name: change.pop(name) for name in ("query", "layer") if name in change}
    with pytest.raises(ValueError, match=message):
        head_view_html(list("abc"), maps, vectors=vectors | change, **kwargs)


@pytest.mark.slow
def test_cross_attention_page_in_chromium(browser, tmp_path):
    """A decoder's 4 queries over an encoder's 6 keys: query tokens on the left, key tokens
    on the right, 4 × 6 model-view cells, and a neuron view scoring the 6 keys."""
    from selenium.webdriver.common.by import By

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, d, generator=g) for n, d in ((4, 8), (6, 8), (6, 5)))
    maps = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)  # (layers, H, 4, 6)
    page = tmp_path / "cross.html"
    page.write_text(
        head_view_html(
            list("uvwxyz"), list(maps), query_tokens=list("ABCD"), vectors={"q": q, "k": k, "v": v}
        )
    )
    browser.get(page.as_uri())

    def side(s):
        return [
            t.text for t in browser.find_elements(By.CSS_SELECTOR, f"text.tok[data-side='{s}']")
        ]

    assert side("i") == list("ABCD")
    assert side("j") == list("uvwxyz")
    drawn = int((quantize(list(maps))[1].float() / 255 > 0.02).sum())
    assert len(browser.find_elements(By.CSS_SELECTOR, "line.attn-line")) == drawn
    cells = browser.find_elements(By.CSS_SELECTOR, "canvas.thumb")
    assert {(c.get_attribute("width"), c.get_attribute("height")) for c in cells} == {("6", "4")}
    rows = browser.find_elements(By.CSS_SELECTOR, "#neuron tr.key")
    weights = torch.tensor([float(r.get_attribute("data-weight")) for r in rows]).double()
    torch.testing.assert_close(weights, maps[1, 0, 3].double(), rtol=0, atol=1e-6)  # last query

    with pytest.raises(ValueError, match="but there are 3 query and 6 key tokens"):
        head_view_html(list("uvwxyz"), list(maps), query_tokens=list("ABC"))


@pytest.mark.slow
def test_neuron_view_of_a_causal_lm_checkpoint_in_chromium(browser, tmp_path):
    """A CausalLM (RoPE, grouped kv heads, a sliding window): the page's neuron view scores
    each key with the model's own rotated vectors, gives the keys its mask hides no weight
    (shown as masked), and matches the model's weights."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from attnkit import explain, masks
    from attnkit.nn import CausalLM, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    vocab = sorted(set(DEFAULT_TEXT))
    model = CausalLM(
        len(vocab), d_model=32, nhead=4, num_kv_heads=2, num_layers=2,
        positions="rope", mask=masks.sliding_window(4),
    )  # fmt: skip
    path = save_checkpoint(tmp_path / "lm.pt", model, vocab=vocab)
    page = tmp_path / "lm.html"
    assert main(["explain", DEFAULT_TEXT, "--checkpoint", str(path), "--html", str(page),
                 "--layer", "1", "--head", "3"]) == 0  # fmt: skip
    r = explain.run_checkpoint(load_checkpoint(path), DEFAULT_TEXT)
    browser.get(page.as_uri())
    for query in (len(DEFAULT_TEXT) - 1, 2):
        Select(browser.find_element(By.ID, "nq")).select_by_value(str(query))
        rows = browser.find_elements(By.CSS_SELECTOR, "#neuron tr.key")
        weights = torch.tensor([float(row.get_attribute("data-weight")) for row in rows])
        torch.testing.assert_close(weights, r.attention(1)[3, query], rtol=0, atol=1e-5)
        hidden = [j for j, row in enumerate(rows) if "masked" in row.text]
        assert hidden == [j for j in range(len(rows)) if not query - 4 <= j <= query]


def _run_of(maps, tokens):
    """A Run over ``tokens`` whose layers' (H, L, L) attention maps are ``maps``."""
    from attnkit.explain import Run
    from attnkit.models.bert import EncoderOutput
    from attnkit.models.pretrained import Encoding

    ids = torch.arange(len(tokens))[None]
    encoding = Encoding(ids, list(tokens), list(range(len(tokens))), False)
    return Run(
        encoding, EncoderOutput(torch.zeros(1, len(tokens), 4), attentions=[m[None] for m in maps])
    )


def test_rollout_by_hand():
    """Two tokens, two layers in which both heads send every token to token 0: Â = ½·I + ½·A
    = [[1, 0], [½, ½]], and after two layers token 1 is ¾ token 0."""
    from attnkit.explain import rollout

    to_first = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 2, 2)
    rolled = rollout(_run_of([to_first, to_first], "ab"))
    expected = torch.tensor([[[1, 0], [0.5, 0.5]], [[1, 0], [0.75, 0.25]]], dtype=torch.float64)
    torch.testing.assert_close(rolled, expected)
    # heads are averaged: one head to token 0, one to itself, is Â = [[1, 0], [¼, ¾]]
    mixed = torch.stack([to_first[0], torch.eye(2)])
    torch.testing.assert_close(
        rollout(_run_of([mixed], "ab"))[0, 1], torch.tensor([0.25, 0.75], dtype=torch.float64)
    )
    # a row whose weight went to a sink (sums to ½) is renormalised: [[¾, 0], [¼, ½]] / rows
    half = to_first * 0.5
    torch.testing.assert_close(
        rollout(_run_of([half], "ab"))[0],
        torch.tensor([[1, 0], [1 / 3, 2 / 3]], dtype=torch.float64),
    )


def test_rollout_of_the_model_multiplies_its_layers_maps(tmp_path, capsys):
    """all-MiniLM-L6-v2 on the default text: the rollout is the product of its layers'
    head-averaged maps with the residual, computed here row by row in plain Python; --rollout
    prints its top tokens after each layer, and draws every layer's with --png."""
    from attnkit import explain
    from attnkit.models import load_pretrained

    r = explain.run(load_pretrained(), DEFAULT_TEXT)
    L = len(r.tokens)
    rolled = [[float(i == j) for j in range(L)] for i in range(L)]
    for layer in range(len(r.output.attentions)):
        mean = r.attention(layer).double().mean(0).tolist()
        mixed = [[0.5 * (i == j) + 0.5 * mean[i][j] for j in range(L)] for i in range(L)]
        mixed = [[x / sum(row) for x in row] for row in mixed]
        rolled = [
            [sum(mixed[i][m] * rolled[m][j] for m in range(L)) for j in range(L)] for i in range(L)
        ]
    got = explain.rollout(r)
    torch.testing.assert_close(got[-1], torch.tensor(rolled, dtype=torch.float64))
    torch.testing.assert_close(got.sum(-1), torch.ones(6, L, dtype=torch.float64))
    assert main(["explain", "--rollout", "--top", "2", "--png", str(tmp_path / "h.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert png_size(tmp_path / "h.rollout.png")[0] > 300
    assert "what 'a' (token 9) is made of after each layer: attention rollout" in out
    for n in range(6):
        (w1, w2), (j1, j2) = got[n, 9].topk(2)
        row = f"│ {n} │ {r.tokens[j1]} {w1:.2f} │ {r.tokens[j2]} {w2:.2f} │ {got[n, 9, 9]:.2f} │"
        assert row in out


def test_rollout_under_a_window_reaches_one_window_further_each_layer(capsys):
    """Under sliding_window(1, 1) a token is made of its neighbours after layer 0, and of
    tokens up to n + 1 away after layer n, never further; --rollout --sparse prints it."""
    from attnkit import explain
    from attnkit.models import load_pretrained

    r = explain.run(load_pretrained(), DEFAULT_TEXT, mask=parse_mask("sliding_window:1,1"))
    rolled = explain.rollout(r)
    L = len(r.tokens)
    distance = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs()
    for n in range(6):
        assert (rolled[n][distance > n + 1] == 0).all()
        assert (rolled[n][distance == min(n + 1, L - 1)] > 0).any()
    argv = ["explain", "--rollout", "--sparse", "sliding_window:1,1", "--word", "surgeon"]
    assert main([*argv, "--top", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "made of after each layer under sliding_window(left=1, right=1)" in out
    i = r.tokens.index("surgeon")
    weights, at = rolled[0, i].topk(4)
    shown = [f"{r.tokens[j]} {w:.2f}" if w > 0 else "·" for w, j in zip(weights, at, strict=True)]
    assert f"│ 0 │ {' │ '.join(shown)} │ {rolled[0, i, i]:.2f} │" in out
    assert shown[-1] == "·"  # three tokens within reach after one layer


def test_head_roles_by_hand():
    """Four heads over five tokens: to the previous token (the first query to itself), to
    the next, to the first token, and uniform; their roles, shares, entropies, distances."""
    import math

    from attnkit.explain import head_roles

    L = 5
    previous = torch.eye(L).roll(-1, 1).tril()
    previous[0, 0] = 1
    following = torch.eye(L).roll(1, 1).triu()
    following[-1, -1] = 1
    maps = torch.stack([previous, following, torch.eye(L)[[0] * L], torch.full((L, L), 1 / L)])
    found = head_roles(_run_of([maps], "abcde"))
    assert [(f.role, round(f.share, 6)) for f in found] == [
        ("previous token", 1.0),
        ("next token", 1.0),
        ("first token 'a'", 1.0),
        ("mixed", 0.2),
    ]
    assert [round(f.entropy, 6) for f in found] == [0, 0, 0, round(math.log2(L), 6)]
    assert [round(f.distance, 6) for f in found] == [0.8, 0.8, 2.0, 1.6]  # (|i-j| over 25: 40/25)
    assert found[3].pattern in {"previous token", "next token", "itself", "first token 'a'",
                                "last token 'e'"}  # fmt: skip
    assert head_roles(_run_of([maps], "abcde"), threshold=0.2)[3].role != "mixed"


def test_head_roles_of_the_model_name_its_positional_heads(capsys):
    """all-MiniLM-L6-v2 on the default text: layer 0 head 2 looks at the previous token,
    layer 1 head 8 at the next (as the README's model view shows); --roles prints them."""
    from attnkit import explain
    from attnkit.models import load_pretrained

    r = explain.run(load_pretrained(), DEFAULT_TEXT)
    roles = {(f.layer, f.head): f for f in explain.head_roles(r)}
    assert len(roles) == 6 * 12
    assert roles[0, 2].role == "previous token"
    assert roles[0, 2].share > 0.9
    assert roles[1, 8].role == "next token"
    assert sum(f.role == "first token '[CLS]'" for f in roles.values()) > 20
    assert main(["explain", "--roles"]) == 0
    out = capsys.readouterr().out
    for f in (roles[0, 2], roles[1, 8]):
        assert re.search(rf"│\s+{f.layer} │\s+{f.head} │ {f.role}\s+│\s+{f.share:.2f} │", out)
    # under a sparse pattern, its run's roles too: the previous-token head stays one
    assert main(["explain", "--roles", "--sparse", "sliding_window:1,1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "what each head does under sliding_window(left=1, right=1), over the 11 tokens" in out
    sparse = explain.run(load_pretrained(), DEFAULT_TEXT, mask=parse_mask("sliding_window:1,1"))
    assert explain.head_roles(sparse)[2].role == "previous token"


def test_rollout_of_a_causal_lm_never_reaches_ahead(char_lm):
    """A CausalLM's rollout stays causal: no token is made of later ones."""
    from attnkit import explain
    from attnkit.nn import load_checkpoint

    rolled = explain.rollout(explain.run_checkpoint(load_checkpoint(char_lm[0]), DEFAULT_TEXT))
    assert rolled.shape[0] == 2
    assert (rolled.triu(1) == 0).all()
    assert (rolled.tril() > 0).any()


def test_rollout_and_roles_refuse_translations_and_differential_maps(tmp_path, capsys):
    from attnkit.explain import rollout
    from attnkit.nn import CausalLM, save_checkpoint

    path, _ = translator(tmp_path, ["<pad>", "<bos>", "<eos>", *"abc 123"])
    vocab = sorted(set(DEFAULT_TEXT))
    model = CausalLM(len(vocab), d_model=32, nhead=4, num_layers=2, differential=True)
    diff = save_checkpoint(tmp_path / "diff.pt", model, vocab=vocab)
    for argv, why in [
        ([str(path), "ab 12", "--rollout"], "a translation's cross-attention mixes"),
        ([str(diff), "--rollout"], "differential maps A1 − λ·A2 are not"),
        ([str(path), "ab 12", "--roles"], "has its queries in another sequence"),
        ([str(diff), "--roles"], "differential maps are not"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["explain", "--checkpoint", *argv])
        assert exc.value.code == 2
        assert why in " ".join(capsys.readouterr().err.split())
    from attnkit.viz import save_head_grid

    with pytest.raises(ValueError, match="panel_titles has 1 titles for 2 maps"):
        save_head_grid(torch.eye(2).expand(2, 2, 2), "ab", tmp_path / "x.png", panel_titles=["a"])
    with pytest.raises(ValueError, match=r"residual share must be in \[0, 1\], got 1.5"):
        rollout(_run_of([torch.eye(2)[None]], "ab"), residual=1.5)
