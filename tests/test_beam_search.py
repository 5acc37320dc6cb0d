"""Beam search: exhaustive beams find the best continuation found by enumerating them all.

With K beams at least the number of continuations alive at every step, beam search drops
none, so it must return the continuation that enumeration scores best. That checks the
scoring, the freezing of finished beams and the cache reordering (a wrong row's cache gives
wrong logits) at once; K = 1 must be greedy decoding.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from attnkit import masks, score_mods
from attnkit.nn import (
    CausalLM,
    KVCache,
    MultiHeadAttention,
    RotaryEmbedding,
    Transformer,
    beam_kv_cache,
)
from attnkit.nn.beam_kv_cache import BeamKVCache
from attnkit.nn.beam_search import Decoding, beam_search

BOS, EOS = 1, 2


def continuations(vocab, steps, end_id):
    """Every continuation of up to ``steps`` tokens: ended by end_id, or cut at ``steps``."""
    for n in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if end_id not in seq[:-1] and (n == steps or seq[-1] == end_id):
                yield seq


def enumerated(log_probs, vocab, steps, end_id, length_penalty):
    """{continuation: log-probability / length ** length_penalty} of every continuation;
    ``log_probs(seq)`` gives the (len(seq), V) float64 log-probabilities it is made from."""
    found = {}
    for seq in continuations(vocab, steps, end_id):
        lp = log_probs(seq)
        total = sum(float(lp[i, token]) for i, token in enumerate(seq))
        found[seq] = total / len(seq) ** length_penalty
    return found


def assert_beams_are(tokens, scores, expected, fill_id):
    """The beams (K, T) hold every expected continuation once, best first, filled after its
    end; beams beyond them score -inf."""
    got = {}
    for row, score in zip(tokens.tolist(), scores.tolist(), strict=True):
        if score == float("-inf"):
            continue
        seq = min((s for s in expected if row == filled(s, len(row), fill_id)), key=len)
        assert seq not in got, f"{seq} twice"
        got[seq] = score
    assert got.keys() == expected.keys()
    for seq, score in got.items():
        assert score == pytest.approx(expected[seq], abs=1e-4), seq
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    assert scores[len(expected) :].eq(float("-inf")).all()


def filled(seq, steps, fill_id):
    return list(seq) + [fill_id] * (steps - len(seq))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_search_over_a_history_dependent_model_equals_enumeration(length_penalty):
    """A model whose logits hash the whole history (which reorder must copy between rows)."""
    V, steps, K = 3, 4, 3**4
    table = torch.randn(V**steps * 2, V, generator=torch.Generator().manual_seed(0)) * 3

    def logits_after(histories):  # (N, t) -> (N, V): a row of the table per history
        code = torch.zeros(histories.shape[0], dtype=torch.long)
        for t in range(histories.shape[1]):
            code = code * V + histories[:, t] + 1
        return table[code % table.shape[0]]

    history = torch.empty(K, 0, dtype=torch.long)

    def step(tokens, t):
        nonlocal history
        assert history.shape[1] == t
        history = torch.cat([history, tokens[:, None]], 1)
        return logits_after(history)

    def reorder(index):
        nonlocal history
        history = history[index]

    found = beam_search(
        Decoding(logits_after(history), step, reorder),
        num_beams=K,
        max_new_tokens=steps,
        end_id=0,
        fill_id=0,
        length_penalty=length_penalty,
    )

    def log_probs(seq):
        prefixes = [torch.tensor([seq[:i]], dtype=torch.long) for i in range(len(seq))]
        return torch.log_softmax(torch.cat([logits_after(p) for p in prefixes]).double(), -1)

    expected = enumerated(log_probs, V, steps, 0, length_penalty)
    assert_beams_are(found.tokens[0], found.scores[0], expected, fill_id=0)


def sharp(model, scale=4.0):
    """Scale the output head so the next-token distributions differ clearly between prefixes."""
    with torch.no_grad():
        model.head.weight.mul_(scale)
    return model


def with_random_sinks(model):
    """Sinks that differ from head to head (they start equal), so a head that reads another
    head's sink shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MultiHeadAttention) and module.sinks is not None:
                module.sinks.normal_()
    return model


@pytest.mark.parametrize(
    ("length_penalty", "options"),
    [
        (0.0, {}),
        (1.0, {}),
        (2.0, {}),
        (1.0, {"num_kv_heads": 1, "sinks": True, "output_gate": True}),
    ],
)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "copied"])
def test_translation_beams_equal_enumeration(length_penalty, options, shared, monkeypatch):
    """Transformer.beam_search with 4³ beams over a 4-token target vocabulary, batch of 2,
    the beams reading their source's cross-attention keys and values (or copies of them)."""
    monkeypatch.setattr(beam_kv_cache, "SHARE_PROMPTS", shared)
    torch.manual_seed(0)
    V, steps = 4, 3
    model = Transformer(12, V, d_model=16, nhead=2, max_len=8, pad_id=0, **options)
    model = sharp(with_random_sinks(model)).eval()
    src = torch.randint(3, 12, (2, 5))
    src[1, 3:] = 0  # a padded source
    kwargs = {"bos_id": BOS, "eos_id": EOS, "max_len": steps, "length_penalty": length_penalty}
    found = model.beam_search(src, num_beams=V**steps, **kwargs)
    memory, padding = model.encode(src)
    for b in range(2):

        def log_probs(seq, b=b):
            tgt = torch.tensor([[BOS, *seq[:-1]]])
            logits, _ = model.decode(tgt, memory[b : b + 1], padding[b : b + 1])
            return torch.log_softmax(logits[0].double(), -1)

        with torch.no_grad():
            expected = enumerated(log_probs, V, steps, EOS, length_penalty)
        assert_beams_are(found.tokens[b], found.scores[b], expected, model.pad_id)
    best = model.generate(src, num_beams=V**steps, **kwargs)
    assert torch.equal(best, found.tokens[:, 0])


@pytest.mark.parametrize("variant", ["rope", "alibi_gqa_sinks", "latent", "window"])
def test_language_model_beams_equal_enumeration(variant):
    """CausalLM.beam_search with 4³ beams, ragged left-padded prompts: the beams sharing the
    prompt's caches (RoPE; ALiBi with grouped heads, sinks and gates); copying them (a
    window, over windowed caches and a chunked prompt; multi-head latent attention's latent
    caches)."""
    torch.manual_seed(1)
    V, steps = 4, 3
    kwargs = {
        "rope": {"positions": "rope"},
        "alibi_gqa_sinks": {
            "positions": "alibi",
            "num_kv_heads": 2,
            "sinks": True,
            "output_gate": True,
        },
        "latent": {
            "positions": "rope",
            "latent": {"kv_rank": 12, "nope_dim": 4, "rope_dim": 4, "v_dim": 6},
        },
        "window": {"positions": "alibi", "mask": masks.sliding_window(2)},
    }[variant]
    lm = CausalLM(V, d_model=32, nhead=4, num_layers=2, max_len=32, **kwargs)
    lm = sharp(with_random_sinks(lm)).eval()
    shared = lm._beams_share_prompts(windowed=False)
    assert shared == (variant in ("rope", "alibi_gqa_sinks")), variant
    prompt = torch.randint(0, V, (2, 6))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, :2] = True
    found = lm.beam_search(
        prompt, num_beams=V**steps, max_new_tokens=steps, eos_id=EOS, prompt_padding=padding
    )
    for b in range(2):
        alone = prompt[b, padding[b].sum() :]

        def log_probs(seq, alone=alone):
            with torch.no_grad():
                logits, _ = lm(torch.cat([alone, torch.tensor(seq[:-1], dtype=torch.long)])[None])
            return torch.log_softmax(logits[0, len(alone) - 1 :].double(), -1)

        expected = enumerated(log_probs, V, steps, EOS, 1.0)
        assert_beams_are(found.tokens[b], found.scores[b], expected, EOS)
    best = lm.generate(
        prompt, max_new_tokens=steps, temperature=0, eos_id=EOS, prompt_padding=padding,
        num_beams=V**steps,
    )  # fmt: skip
    assert torch.equal(best, torch.cat([prompt, found.tokens[:, 0]], 1))


def test_a_language_model_feeds_its_prompt_once_for_every_beam():
    """The beams of a prompt start from copies of its caches: the prompt goes through the
    model with its own B rows, only the new tokens with B·K."""
    torch.manual_seed(3)
    lm = CausalLM(8, d_model=16, nhead=2, num_layers=1, max_len=32).eval()
    fed = []
    lm.embed.register_forward_hook(lambda module, args, out: fed.append(tuple(args[0].shape)))
    lm.beam_search(torch.randint(0, 8, (2, 7)), num_beams=3, max_new_tokens=4)
    assert fed == [(2, 7)] + [(6, 1)] * 3


def test_a_translation_projects_its_source_once_for_every_beam():
    """The beams of a source start from copies of its cross-attention caches: the memory's
    keys and values are projected for its own B rows, not B·K."""
    torch.manual_seed(3)
    model = Transformer(12, 12, d_model=16, nhead=2, max_len=16).eval()
    projected = []
    for layer in model.decoder:
        layer.cross_attn.k_proj.register_forward_hook(
            lambda module, args, out: projected.append(args[0].shape[0])
        )
    read = []  # the memory's rows at every cross-attention: the sources', never the beams'
    model.decoder[0].cross_attn.register_forward_pre_hook(
        lambda module, args: read.append(args[1].shape[0])
    )
    model.beam_search(torch.randint(1, 12, (2, 5)), num_beams=3, bos_id=1, eos_id=2, max_len=4)
    assert projected == [2] * len(model.decoder)
    assert len(read) >= 2  # bos, then the beams' steps
    assert set(read) == {2}


def test_one_beam_is_greedy_decoding():
    torch.manual_seed(2)
    model = Transformer(12, 12, d_model=16, nhead=2, max_len=16).eval()
    src = torch.randint(3, 12, (3, 5))
    greedy = model.generate(src, bos_id=BOS, eos_id=EOS, max_len=10)
    found = model.beam_search(src, bos_id=BOS, eos_id=EOS, max_len=10, num_beams=1)
    assert torch.equal(found.tokens[:, 0], greedy)
    lm = CausalLM(30, d_model=16, nhead=2, num_layers=2, max_len=32).eval()
    prompt = torch.randint(0, 30, (2, 4))
    greedy = lm.generate(prompt, max_new_tokens=8, temperature=0, eos_id=EOS)
    found = lm.beam_search(prompt, max_new_tokens=8, eos_id=EOS, num_beams=1)
    assert torch.equal(found.tokens[:, 0], greedy[:, 4:])


def test_more_beams_than_continuations_and_no_end_token():
    """32 beams over the 9 two-token continuations of a 3-token vocabulary: 23 score -inf."""
    torch.manual_seed(3)
    lm = sharp(CausalLM(3, d_model=16, nhead=2, num_layers=1, max_len=16)).eval()
    prompt = torch.randint(0, 3, (1, 3))
    found = lm.beam_search(prompt, max_new_tokens=2, num_beams=32, length_penalty=0.0)

    def log_probs(seq):
        with torch.no_grad():
            logits, _ = lm(torch.cat([prompt[0], torch.tensor(seq[:-1], dtype=torch.long)])[None])
        return torch.log_softmax(logits[0, 2:].double(), -1)

    expected = enumerated(log_probs, 3, 2, None, 0.0)
    assert len(expected) == 9
    assert_beams_are(found.tokens[0], found.scores[0], expected, fill_id=0)


def test_generate_refuses_sampling_with_beams():
    lm = CausalLM(10, d_model=16, nhead=2, num_layers=1, max_len=16).eval()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for kwargs, match in (
        ({}, "temperature=1.0"),  # CausalLM samples by default
        ({"temperature": 0, "top_k": 3}, "top_k=3"),
        ({"temperature": 0, "generator": torch.Generator()}, "generator=set"),
    ):
        with pytest.raises(ValueError, match=f"num_beams=2 .* does not sample.*{match}"):
            lm.generate(prompt, max_new_tokens=2, num_beams=2, **kwargs)
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate(prompt, max_new_tokens=2, temperature=0, num_beams=0)
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(
            ValueError, match=f"length_penalty must be a finite number, got {bad!r}"
        ):
            lm.beam_search(prompt, max_new_tokens=2, num_beams=2, length_penalty=bad)
    with pytest.raises(ValueError, match="end_id 10 is not a token of the 10 logits"):
        lm.beam_search(prompt, max_new_tokens=2, num_beams=2, eos_id=10)
    with pytest.raises(ValueError, match="5 decoding rows are not num_beams=2 per batch row"):
        beam_search(Decoding(torch.zeros(5, 3), None, None), num_beams=2, max_new_tokens=1,
                    end_id=None, fill_id=0)  # fmt: skip


def test_kv_cache_reorder_copies_rows_and_checks_its_index():
    cache = KVCache(3, 2, max_len=6, head_dim=4, window=2)
    k, v = torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4)
    cache.append(k, v)  # window 2: keeps positions 1, 2 once the next append comes
    cache.reorder(torch.tensor([2, 2, 0, 1]))  # the batch may grow (or shrink)
    assert cache.keys.shape == (4, 2, 3, 4)
    assert torch.equal(cache.keys, k[[2, 2, 0, 1]])
    assert torch.equal(cache.values, v[[2, 2, 0, 1]])
    keys, _ = cache.append(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))
    assert torch.equal(keys[:, :, :2], k[[2, 2, 0, 1]][:, :, 1:])
    assert cache.position == 4
    # the same batch size: the held slots are rewritten in place, the buffers kept
    before, held = cache._k.data_ptr(), cache.keys.clone()
    cache.reorder(torch.tensor([3, 0, 0, 1]))
    assert cache._k.data_ptr() == before
    assert torch.equal(cache.keys, held[[3, 0, 0, 1]])
    cache.reorder(torch.arange(4))  # the identity: nothing moves
    assert torch.equal(cache.keys, held[[3, 0, 0, 1]])
    # while autograd records the cache, new buffers (the graph holds the old), gradients flow
    k = torch.randn(2, 1, 2, 4, requires_grad=True)
    recorded = KVCache(2, 1, max_len=4, head_dim=4)
    recorded.append(k, k.detach())
    recorded.reorder(torch.tensor([1, 1]))
    (grad,) = torch.autograd.grad(recorded.keys.sum(), k)
    assert torch.equal(grad, torch.tensor([0.0, 2.0])[:, None, None, None].expand(2, 1, 2, 4))
    for index, error, match in (
        (torch.tensor([0, 4]), ValueError, r"in 0 \.\. 3 .* got 0 \.\. 4"),
        (torch.tensor([-1]), ValueError, r"got -1 \.\. -1"),
        (torch.tensor([0.0]), TypeError, "1-D int64 .* got torch.float32"),
        (torch.tensor([[0]]), TypeError, r"torch.int64 \(1, 1\)"),
        ([0, 1], TypeError, "got list"),
    ):
        with pytest.raises(error, match=match):
            cache.reorder(index)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_attention_over_a_beam_cache_is_attention_over_copies_of_the_prompt(positions, T):
    """MultiHeadAttention over a BeamKVCache (the prompt's keys once, the beams' own after)
    against a KVCache holding a copy of the prompt for every beam, in float64: T new tokens a
    step, a padded prompt, grouped heads, sinks and a gate; reorders among a prompt's beams."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(8) if positions == "rope" else None
    mod = score_mods.alibi(score_mods.alibi_slopes(4)) if positions == "alibi" else None
    attn = MultiHeadAttention(
        32, 4, num_kv_heads=2, mask=masks.causal(), rope=rope, score_mod=mod, sinks=True,
        output_gate=True,
    ).double().eval()  # fmt: skip
    B, K, P, steps = 2, 3, 5, 3
    pads = torch.zeros(B, P + steps * T, dtype=torch.bool)
    pads[1, :2] = True  # the second prompt is left-padded
    rows = torch.arange(B).repeat_interleave(K)
    with torch.no_grad():
        prompt = attn.new_cache(B, P)
        attn(torch.randn(B, P, 32).double(), cache=prompt, key_padding_mask=pads[:, :P])
        copied = attn.new_cache(B, P + steps * T)
        copied.append(prompt.keys, prompt.values)
        copied.reorder(rows)
        beams = BeamKVCache(prompt, K, steps * T)
        for step in range(steps):
            x = torch.randn(B * K, T, 32).double()
            seen = pads[rows, : P + (step + 1) * T]
            want, _ = attn(x, cache=copied, key_padding_mask=seen)
            got, _ = attn(x, cache=beams, key_padding_mask=seen)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            index = torch.tensor([2, 2, 0, 4, 3, 4])  # beams die and split within a prompt
            copied.reorder(index)
            beams.reorder(index)
    assert (beams.position, beams.length, prompt.keys.shape[0]) == (P + steps * T, steps * T, B)


def test_a_beam_cache_refuses_what_it_cannot_serve():
    torch.manual_seed(0)
    prompt = KVCache(2, 1, max_len=4, head_dim=8)
    prompt.append(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    beams = BeamKVCache(prompt, 2, 4)
    assert repr(beams) == "BeamKVCache(beams=2, prefix=3, length=0, position=3)"
    with pytest.raises(ValueError, match=r"among its prompt's 2 beams"):
        beams.reorder(torch.tensor([1, 2, 2, 3]))  # row 1 would take prompt 1's beam
    with pytest.raises(ValueError, match=r"an index of its 4 rows, got \(2,\)"):
        beams.reorder(torch.tensor([0, 1]))
    windowed = KVCache(2, 1, max_len=4, head_dim=8, window=2)
    with pytest.raises(ValueError, match="no windowed cache"):
        BeamKVCache(windowed, 2, 4)
    x = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="every new query sees the whole prompt"):
        MultiHeadAttention(8, 1, mask=masks.sliding_window(2))(x, cache=beams)
    with pytest.raises(ValueError, match="served without need_weights"):
        MultiHeadAttention(8, 1, mask=masks.causal())(x, cache=beams, need_weights=True)
    memory = torch.randn(2, 3, 8)  # cross-attention: the sources' rows
    with pytest.raises(ValueError, match=r"over a BeamKVCache is served without .* got mask"):
        MultiHeadAttention(8, 1)(x, memory, cache=beams, mask=masks.causal())
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(B, S\) = \(2, 3\)"):
        MultiHeadAttention(8, 1)(x, memory, cache=beams, key_padding_mask=torch.ones(4, 3) > 0)
    assert beams.length == 0  # nothing was stored by the refusals
    lm = CausalLM(8, d_model=16, nhead=2, num_layers=1, max_len=16, differential=True)
    with pytest.raises(ValueError, match="BeamKVCache is served by MultiHeadAttention only"):
        lm(torch.randint(0, 8, (4, 1)), start=3, caches=[BeamKVCache(prompt, 2, 4)])


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_beams_copy_the_prompt_where_the_backend_returns_no_lse(backend):
    """The "sdpa" backend returns no log-sum-exp to merge a shared prompt's part with: its
    beams copy the prompt's caches, and find what the tiled backend's sharing beams find."""
    torch.manual_seed(0)
    lm = CausalLM(20, d_model=32, nhead=4, num_layers=1, max_len=32, backend=backend).eval()
    assert lm._beams_share_prompts(windowed=False) == (backend != "sdpa")
    prompt = torch.randint(0, 20, (2, 5))
    found = lm.beam_search(prompt, num_beams=3, max_new_tokens=3)
    lm_tiled = CausalLM(20, d_model=32, nhead=4, num_layers=1, max_len=32, backend="tiled")
    lm_tiled.load_state_dict(lm.state_dict())
    expected = lm_tiled.eval().beam_search(prompt, num_beams=3, max_new_tokens=3)
    assert torch.equal(found.tokens, expected.tokens)
