"""DecodingStep and TranslationStep on random models: texts fed in random chunks.

Each example draws a model (positions, grouped heads, a window, latent or differential
attention, sinks, QK-norm, an output gate), a batch of left-padded texts and a split of the
text into chunks (a prompt, then steps of one or more tokens). Feeding the chunks through
``DecodingStep``, the caches handed from call to call, must give the full pass's logits at
every position of every row; through ``TranslationStep``, a random Transformer's targets
over padded sources give its teacher-forced logits (the exports are tested in
test_export.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks
from attnkit.nn import CausalLM, DecodingStep, KVCache, Transformer, TranslationStep


@st.composite
def models_and_texts(draw):
    """A CausalLM, ids (B, L), each row's count of left pads, and the chunks' lengths."""
    kind = draw(st.sampled_from(["plain", "latent", "differential"]))
    options: dict[str, object] = {
        "positions": draw(st.sampled_from(["learned", "rope", "alibi"])),
        "sinks": draw(st.booleans()),
        "qk_norm": draw(st.booleans()),
        "output_gate": draw(st.booleans()),
    }
    if kind == "latent":
        options = {
            "positions": "rope",
            "latent": {"kv_rank": 8, "nope_dim": 4, "rope_dim": 4, "v_dim": 4},
        }
    elif kind == "differential":
        options = {"positions": draw(st.sampled_from(["learned", "rope"])), "differential": True}
    else:
        options["num_kv_heads"] = draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):
        options["mask"] = masks.sliding_window(draw(st.integers(1, 6)))
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    pads = [draw(st.integers(0, L - 1)) for _ in range(B)]
    chunks, left = [], L
    while left:
        chunks.append(draw(st.integers(1, left)))
        left -= chunks[-1]
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    lm = CausalLM(40, d_model=16, nhead=4, num_layers=2, max_len=32, **options).eval()
    return lm, torch.randint(0, 40, (B, L)), torch.tensor(pads), chunks


@settings(max_examples=40)
@given(case=models_and_texts())
def test_chunks_through_a_decoding_step_give_the_full_pass(case):
    lm, ids, pads, chunks = case
    padding = torch.arange(ids.shape[1])[None, :] < pads[:, None]
    step = DecodingStep(lm)
    keys, values = step.empty_caches(ids.shape[0])
    got, at = [], 0
    with torch.no_grad():
        full, _ = lm(ids, padding=padding)
        for n in chunks:
            logits, keys, values = step(ids[:, at : at + n], keys, values, pads)
            got.append(logits)
            at += n
    assert keys.shape[3] == values.shape[3] == ids.shape[1]
    kept = ~padding  # a pad's own logits are not the model's business
    torch.testing.assert_close(torch.cat(got, 1)[kept], full[kept], rtol=1e-4, atol=1e-5)


@st.composite
def translators_and_pairs(draw):
    """A Transformer, padded sources (B, S), targets (B, T) and the targets' chunk lengths."""
    options = {
        "positions": draw(st.sampled_from(["learned", "rope", "alibi"])),
        "num_kv_heads": draw(st.sampled_from([1, 2, 4])),
        "sinks": draw(st.booleans()),
        "qk_norm": draw(st.booleans()),
        "output_gate": draw(st.booleans()),
    }
    B, S, T = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lengths = [draw(st.integers(1, S)) for _ in range(B)]
    chunks, left = [], T
    while left:
        chunks.append(draw(st.integers(1, left)))
        left -= chunks[-1]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Transformer(30, 30, d_model=16, nhead=4, max_len=32, **options).eval()
    src = torch.randint(1, 30, (B, S))
    src[torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]] = model.pad_id
    return model, src, torch.randint(1, 30, (B, T)), chunks


@settings(max_examples=30)
@given(case=translators_and_pairs())
def test_targets_in_chunks_through_a_translation_step_give_teacher_forcing(case):
    model, src, tgt, chunks = case
    step = TranslationStep(model)
    keys, values = step.empty_caches(src.shape[0])
    got, at = [], 0
    with torch.no_grad():
        full = model(src, tgt)
        source = step.encode(src)
        for n in chunks:
            logits, keys, values = step(tgt[:, at : at + n], keys, values, *source)
            got.append(logits)
            at += n
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-5)


def test_a_decoding_step_recording_gradients_hands_back_what_it_does_without():
    """With autograd recording, the caches write into copies (``KVCache.append``): the step
    hands back those, the same keys and values as without, and gradients reach the weights."""
    torch.manual_seed(0)
    lm = CausalLM(16, d_model=16, nhead=2, num_kv_heads=1, num_layers=2, max_len=32).double()
    step = DecodingStep(lm)
    ids, more = torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 2))
    with torch.no_grad():
        _, keys, values = step(ids, *step.empty_caches(2))
        want = step(more, keys, values)
    got = step(more, keys, values)
    for name, a, b in zip(("logits", "keys", "values"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    got[1].sum().backward()
    assert lm.layers[1].self_attn.k_proj.weight.grad is not None


def test_kv_cache_holding_part_of_its_buffers_appends_after_them():
    keys, values = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 3)
    cache = KVCache.holding(keys, values, length=2)
    assert (cache.length, cache.position, cache.max_len) == (2, 2, 6)
    cache.append(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 3))
    assert keys[:, :, 2:5].eq(1).all()  # written in place
    assert keys[:, :, 5].eq(0).all()
    with pytest.raises(ValueError, match=r"length must lie in 0 \.\. 6"):
        KVCache.holding(keys, values, length=7)
