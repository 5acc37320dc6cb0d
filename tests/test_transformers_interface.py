"""attnkit.integrations.transformers: transformers models run with attn_implementation="attnkit".

Whole tiny models (random weights, float64) against transformers' own SDPA path, which is exact
in float64, on a left-padded batch and an unpadded one: logits, every parameter's gradient and
greedy decoding with transformers' cache. Softcap (Gemma 2) and sinks (gpt-oss) have no SDPA
path; there the reference is transformers' eager path, whose softmax runs in float32, so the
tolerance is its own float32 error (DESIGN §7).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnkit.integrations.transformers as bridge
from conftest import assert_close_scaled

transformers = pytest.importorskip("transformers")
TILED = bridge.register("attnkit_tiled", backend="tiled")
L = 70  # two 64-key tiles, so the tiled backend's online softmax runs across tiles

SMALL = {
    "vocab_size": 40,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}
MODELS = {  # model_type -> config beyond SMALL; the comment says what it exercises
    "llama": {},  # grouped kv heads, causal
    "qwen3": {},  # q/k norms
    "mistral": {"sliding_window": 9},  # a window on every layer: the bool masks SDPA gets
}
EAGER_ONLY = {  # features SDPA lacks, checked against the eager path
    "gemma2": {  # logit softcapping, a sliding layer and a global one
        "attn_logit_softcapping": 5.0,
        "sliding_window": 9,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gpt_oss": {  # attention sinks, a sliding layer
        "sliding_window": 9,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
    },
}


def tiny_model(model_type, **config):
    """A float64 causal LM with random weights (biases, norms and sinks included)."""
    cfg = transformers.AutoConfig.for_model(model_type, **SMALL, **config)
    cfg._experts_implementation = "eager"  # gpt-oss: grouped_mm has no float64
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    return model


def batch():
    """Token ids (2, L) and a padding mask: row 0 left-padded by 5."""
    ids = torch.randint(0, SMALL["vocab_size"], (2, L), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, L, dtype=torch.long)
    attention_mask[0, :5] = 0
    return ids, attention_mask


def run(model, implementation, ids, attention_mask=None):
    """Logits (B, L, V) and every parameter's gradient of the mean logit over real tokens."""
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(ids, attention_mask=attention_mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask > 0
    logits[real].mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[real], grads


@pytest.mark.parametrize("model_type", list(MODELS))
@pytest.mark.parametrize("padded", [False, True])
def test_models_match_transformers_sdpa(model_type, padded):
    model = tiny_model(model_type, **MODELS[model_type])
    ids, attention_mask = batch()
    mask = attention_mask if padded else None
    expected, expected_grads = run(model, "sdpa", ids, mask)
    got, grads = run(model, TILED, ids, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("model_type", list(MODELS))
def test_greedy_decoding_with_transformers_cache_is_the_same(model_type):
    model = tiny_model(model_type, **MODELS[model_type])
    ids, attention_mask = batch()
    outputs = {}
    for implementation in ("sdpa", TILED):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model.generate(
            ids[:, :20], attention_mask=attention_mask[:, :20], max_new_tokens=6, do_sample=False
        )
    assert torch.equal(outputs[TILED], outputs["sdpa"])


@pytest.mark.parametrize("model_type", list(EAGER_ONLY))
def test_softcap_and_sinks_match_transformers_eager(model_type):
    model = tiny_model(model_type, **EAGER_ONLY[model_type])
    ids, attention_mask = batch()
    # padded on the right: eager in float64 turns a fully masked row into NaN (its float32
    # softmax sees -inf everywhere), which then spreads to every later layer
    attention_mask = attention_mask.flip(-1)
    expected64, grads64 = run(model, "eager", ids, attention_mask)
    expected32, grads32 = run(copy.deepcopy(model).float(), "eager", ids, attention_mask)
    got, grads = run(model, TILED, ids, attention_mask)
    assert_close_scaled(got, expected64, expected32, floor=1e-9, what="logits")
    for name, grad in grads.items():
        assert_close_scaled(grad, grads64[name], grads32[name], floor=1e-9, what=name)


@pytest.mark.parametrize("model_type", ["llama", *EAGER_ONLY])
def test_output_attentions_are_the_eager_paths_weights(model_type):
    """``output_attentions=True`` gives every layer's (B, Hq, L, L) weights, as eager does."""
    model = tiny_model(model_type, **(MODELS | EAGER_ONLY)[model_type])
    ids, attention_mask = batch()
    attention_mask = attention_mask.flip(-1)  # right-padded, as in the eager test above

    def weights(model, implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out = model(ids, attention_mask=attention_mask, output_attentions=True)
        return out.attentions

    expected64 = weights(model, "eager")
    expected32 = weights(copy.deepcopy(model).float(), "eager")
    got = weights(model, TILED)
    assert len(got) == len(expected64) == SMALL["num_hidden_layers"]
    for layer, w in enumerate(got):
        assert w.shape == (2, SMALL["num_attention_heads"], L, L)
        assert_close_scaled(w, expected64[layer], expected32[layer], floor=1e-9, what=f"{layer}")


class Layer(torch.nn.Module):
    """What the attention function reads off its calling layer."""

    def __init__(self, is_causal=True):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, 2


def qkv(Lq, Lk):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, Lq, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, Lk, 8, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k, v


CALLS = {  # name -> (Lq, Lk, is_causal, attention_mask builder, position_bias builder)
    "causal prefill": (13, 13, True, None, None),
    "decoding step": (1, 13, True, None, None),
    "prefill into a static cache": (5, 13, True, None, None),  # top-left: later slots unseen
    "bidirectional": (13, 13, False, None, None),
    "bool mask": (13, 17, True, lambda: torch.rand(2, 1, 13, 17) < 0.7, None),
    "additive mask with a bias": (
        13,
        17,
        True,
        lambda: torch.randn(2, 1, 13, 17, dtype=torch.float64).masked_fill(
            torch.rand(2, 1, 13, 17) < 0.3, torch.finfo(torch.float64).min
        ),
        None,
    ),
    "position bias": (13, 13, True, None, lambda: torch.randn(1, 4, 13, 13, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", list(CALLS))
@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_attention_function_matches_transformers_sdpa_function(case, backend):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    Lq, Lk, causal, make_mask, make_bias = CALLS[case]
    q, k, v = qkv(Lq, Lk)
    torch.manual_seed(3)
    mask = make_mask() if make_mask else None
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # no fully masked row: SDPA gives NaN there, attnkit zeros
    bias = make_bias() if make_bias else None
    layer = Layer(causal)
    expected, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.3, position_bias=bias)
    got, weights = bridge.attention_forward(
        layer, q, k, v, mask, scaling=0.3, position_bias=bias, backend=backend
    )
    assert weights is None
    assert got.shape == expected.shape == (2, Lq, 4, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_an_unpadded_prompt_runs_the_tile_skipping_causal_mask(monkeypatch):
    """No padding: the model passes no mask and attnkit runs masks.causal, not a bool tensor;
    decoding steps (one query) run with no mask; a padded batch brings a bool tensor."""
    seen = []
    attention = bridge.attention

    def spy(*args, **kwargs):
        seen.append(repr(kwargs["mask"]) if not torch.is_tensor(kwargs["mask"]) else "tensor")
        return attention(*args, **kwargs)

    monkeypatch.setattr(bridge, "attention", spy)
    model = tiny_model("llama")
    model.set_attn_implementation(TILED)
    ids, attention_mask = batch()
    prompt = ids[:, :10]
    model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False
    )
    assert seen == ["causal(align='top_left')"] * 2 + ["None"] * 2  # prefill, then one step
    seen.clear()
    model(ids, attention_mask=attention_mask)
    assert seen == ["tensor"] * 2


@pytest.mark.parametrize("name", ["attnkit", TILED])
def test_a_models_mask_tensor_is_classified_once_per_forward(monkeypatch, name):
    """Mistral passes one sliding-window bool tensor to every layer: its tile map is built
    once (dispatch, tile sizing and the kernel of both layers reuse it), and again for the
    next forward's new tensor."""
    from attnkit.backends import tensor_masks

    built = []
    build = tensor_masks._build
    monkeypatch.setattr(tensor_masks, "_build", lambda *a: built.append(a[1:]) or build(*a))
    bridge.register("attnkit")
    model = tiny_model("mistral", **MODELS["mistral"])
    model.set_attn_implementation(name)
    ids, attention_mask = batch()
    for _ in range(2):
        model(ids, attention_mask=attention_mask).logits.sum().backward()
    assert built == [(L, L, 64, 64, 2, 4)] * 2


SEQ2SEQ = {  # model_type -> (config, the implementation compared with): encoder and decoder
    "bart": (  # padded encoder, causal decoder, cross-attention (Lq != Lk)
        {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 48,
         "decoder_ffn_dim": 48, "encoder_attention_heads": 4, "decoder_attention_heads": 4},
        "sdpa",
    ),
    "t5": (  # T5's relative position bias reaches the function as position_bias
        {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 1, "num_heads": 4},
        "eager",
    ),
}  # fmt: skip


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("model_type", list(SEQ2SEQ))
def test_encoder_decoder_models_match_transformers(model_type, padded):
    """An encoder (bidirectional: with no padding it passes no mask at all), a causal decoder
    and its cross-attention over the encoder's keys: logits and every gradient as
    transformers' own attention gives them."""
    config, reference = SEQ2SEQ[model_type]
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=40, pad_token_id=0, decoder_start_token_id=1, **config
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg).double().eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    ids, attention_mask = batch()
    # right-padded: no query row is fully masked
    attention_mask = attention_mask.flip(-1) if padded else torch.ones_like(attention_mask)
    decoder_ids = ids[:, :11]

    def run(implementation):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        logits = model(ids, attention_mask=attention_mask, decoder_input_ids=decoder_ids).logits
        logits.mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, expected_grads = run(reference)
    got, grads = run(TILED)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-10, msg=name)
