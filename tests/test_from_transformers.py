"""attnkit.nn.from_transformers against the transformers attention modules it converts.

Each module gets random weights (norm gains and sinks included), and its own rotary
embedding class gives the cos/sin it is called with; the mask follows transformers' own
definition (causal, and q - kv < W on sliding-window layers), written out here.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from attnkit.nn import KVCache, MultiHeadAttention, MultiHeadLatentAttention, from_transformers
from conftest import assert_close_scaled, hf_attention, hf_prefixes

GEMMA4_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1e4,
    },
}


def one_layer(layer_type):
    """The config of a one-layer model whose layer is ``layer_type``, the window 4."""
    return {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 4,
        "num_hidden_layers": 1,
        "layer_types": [layer_type],
    }


FAMILIES = {  # family -> config; the comment says what each one exercises
    "llama": {  # GQA, Llama 3.1 rope scaling, no biases
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "qwen2": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},  # qkv bias
    "qwen3": {  # q/k RMSNorm, head_dim 16 x 4 heads != hidden 48
        "hidden_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "mistral": {  # multi-query, a sliding window on every layer
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "sliding_window": 4,
    },
    "gemma2": {  # logit softcapping, query_pre_attn_scalar, a sliding layer
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 2.0,
        "sliding_window": 4,
        "num_hidden_layers": 1,
        "layer_types": ["sliding_attention"],
    },
    "gpt_oss": {  # sinks, biases, a sliding layer, YaRN by default
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 4,
        "num_hidden_layers": 1,
        "layer_types": ["sliding_attention"],
        "attention_bias": True,
    },
    "qwen3_next": {  # output gate, (1 + w) q/k norms, a quarter of each head rotated
        "hidden_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "gemma3": {  # (1 + w) q/k norms, local and global rope bases, a sliding layer
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "num_hidden_layers": 1,
        "layer_types": ["sliding_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    },
    "gemma4": {  # q/k norms, values RMS-normed without a gain, scale 1, a sliding layer
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 4,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": GEMMA4_ROPE,
    },
    "gemma4 (global, k = v)": {  # its own head_dim and kv heads, proportional rope, v = k_proj
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "num_hidden_layers": 1,
        "layer_types": ["full_attention"],
        "rope_parameters": GEMMA4_ROPE,
    },
    "phi": {  # partial rotary (0.4 of 20), biases, the output named dense
        "hidden_size": 80,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.4},
    },
    "phi3": {  # fused qkv_proj blocks, GQA
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "gpt_neox": {  # fused query_key_value, q/k/v rows per head, partial rotary
        "hidden_size": 64,
        "num_attention_heads": 4,
        "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25},
    },
    "glm": {  # interleaved rotary pairs on half of each head, q/k/v biases
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "attention_bias": True,
    },
    "nemotron": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "persimmon": {  # fused query_key_value, LayerNorm q/k norms, partial rotary, dense output
        "hidden_size": 64,
        "num_attention_heads": 4,
        "qk_layernorm": True,
    },
    "falcon (multi-query)": {  # fused: every query's rows, then one key's and one value's
        "hidden_size": 64,
        "num_attention_heads": 4,
        "multi_query": True,
        "new_decoder_architecture": False,
    },
    "falcon (new architecture)": {  # fused per kv head: its 2 queries, its key, its value
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "new_decoder_architecture": True,
        "bias": True,
    },
    "falcon (a kv head per head)": {  # fused per head: query, key, value (as GPT-NeoX)
        "hidden_size": 64,
        "num_attention_heads": 4,
        "multi_query": False,
        "new_decoder_architecture": False,
        "bias": True,
    },
    "cohere2 (sliding layer)": one_layer("sliding_attention"),  # interleaved rotary pairs
    "cohere2 (global layer)": one_layer("full_attention"),  # no positions (NoPE)
    "jamba": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},  # NoPE
    "smollm3": {  # no positions (NoPE) in the layers no_rope_layers marks 0
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "no_rope_layers": [0],
    },
    # q/k norms; the global layer: NoPE, and no window though the config has one
    "exaone4 (global layer)": one_layer("full_attention"),
    "exaone4 (sliding layer)": one_layer("sliding_attention"),
    "lfm2": {  # RMS q/k norms named q_layernorm / k_layernorm, out_proj
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "phi (qk LayerNorm)": {  # LayerNorm q/k norms over 20 channels, GQA
        "hidden_size": 80,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "qk_layernorm": True,
    },
}


def transformers_reference(family, hf, x):
    """The module's output and weights on x (B, L, E) at positions 0.., as its model runs it."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    B, L, _ = x.shape
    positions = torch.arange(L)[None].expand(B, L)
    rotary = getattr(modeling, f"{hf_prefixes(family)[1]}RotaryEmbedding", None)
    positional = {}  # the model's cos and sin; none where it has no rotary embedding (Jamba)
    if rotary is not None:
        layer_type = getattr(hf, "layer_type", None)
        per_layer_type = layer_type in hf.config.rope_parameters  # Gemma 3: local and global
        args = [layer_type] if per_layer_type else []
        positional["position_embeddings"] = rotary(hf.config)(x, positions, *args)
    q, kv = torch.arange(L)[:, None], torch.arange(L)[None]
    allowed = kv <= q
    window = getattr(hf, "sliding_window", getattr(hf.config, "sliding_window", None))
    layer_types = getattr(hf.config, "layer_types", None)  # where given, the config's word
    if layer_types is not None and layer_types[hf.layer_idx] != "sliding_attention":
        window = None
    if window:
        allowed &= q - kv < window
    additive = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))
    # Gemma 4 passes keys and values between layers that share them; this layer shares none
    shared = {"shared_kv_states": {}} if family == "gemma4" else {}
    out, weights = hf(x, attention_mask=additive.expand(B, 1, L, L), **positional, **shared)[:2]
    return out, weights


@pytest.mark.parametrize("case", list(FAMILIES))
def test_converted_attention_matches_transformers_and_decodes_the_same(case):
    family = case.split(" (")[0]  # "phi (qk LayerNorm)": a second phi configuration
    hf = hf_attention(family, **FAMILIES[case])
    ours = from_transformers(hf)
    assert isinstance(ours, MultiHeadAttention)
    x = torch.randn(
        2, 11, FAMILIES[case]["hidden_size"], generator=torch.Generator().manual_seed(0)
    )
    # float32 against transformers in float64, within twice transformers' own float32 error
    exp_out, exp_w = transformers_reference(family, hf, x)
    true_out, true_w = transformers_reference(family, copy.deepcopy(hf).double(), x.double())
    out, w = ours(x, need_weights=True)
    assert_close_scaled(out, true_out, exp_out, floor=1e-6)
    assert_close_scaled(w, true_w, exp_w, floor=1e-7)
    cache = KVCache(2, ours.num_kv_heads, 11, ours.head_dim)
    with torch.no_grad():
        steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(11)]
    assert_close_scaled(torch.cat(steps, 1), true_out, exp_out, floor=1e-6)


def tiny_config(family, **overrides):
    """A two-layer transformers config of ``family`` at test sizes; ``overrides`` win."""
    transformers = pytest.importorskip("transformers")
    sizes = {
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    return getattr(transformers, f"{hf_prefixes(family)[0]}Config")(**{**sizes, **overrides})


MODEL_MASKS = {  # family (variant) -> config of a two-layer model: a sliding and a full layer
    "gemma3": {},
    "gemma3 (bidirectional)": {"use_bidirectional_attention": True},  # EmbeddingGemma
    "gemma4": {},
    "gemma4 (bidirectional)": {"use_bidirectional_attention": "all"},
    "exaone4": {},  # its global layer keeps the config's sliding_window, unused
    "cohere2": {},
}


@pytest.mark.parametrize("case", list(MODEL_MASKS))
def test_each_layers_mask_is_the_one_its_transformers_model_builds(case):
    """The converted mask of every layer against the attention_mask the model passes it."""
    transformers = pytest.importorskip("transformers")
    family, L = case.split(" (")[0], 13
    config_prefix = hf_prefixes(family)[0]
    config = tiny_config(
        family,
        vocab_size=16,
        hidden_size=32,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        **({"vocab_size_per_layer_input": 16, "global_head_dim": 16} if family == "gemma4" else {}),
        **MODEL_MASKS[case],
    )
    config._attn_implementation = "eager"
    model = getattr(transformers, f"{config_prefix}Model")(config).eval()
    passed = {}
    for layer in model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda attn, args, kwargs: passed.update({attn: kwargs["attention_mask"]}),
            with_kwargs=True,
        )
    with torch.no_grad():
        model(torch.arange(L)[None])
    for attn, additive in passed.items():
        expected = torch.ones(L, L, dtype=torch.bool) if additive is None else additive[0, 0] == 0
        mask = from_transformers(attn).mask
        got = torch.ones(L, L, dtype=torch.bool) if mask is None else mask.dense(L, L)[0, 0]
        assert torch.equal(got, expected), f"{attn.layer_type}: {mask!r}"


def test_what_each_family_turns_into():
    qwen2 = from_transformers(hf_attention("qwen2", **FAMILIES["qwen2"]))
    assert qwen2.q_proj.bias is not None
    assert qwen2.out_proj.bias is None  # Qwen2 has q/k/v biases and none on o_proj
    qwen3 = from_transformers(hf_attention("qwen3", **FAMILIES["qwen3"]))
    assert (qwen3.head_dim, qwen3.q_norm is not None) == (16, True)
    oss = from_transformers(hf_attention("gpt_oss", **FAMILIES["gpt_oss"]))
    assert oss.sinks is not None
    assert repr(oss.mask) == "sliding_window(left=3, right=0)"
    assert oss.rope is not None
    assert oss.rope.attention_factor != 1.0  # gpt-oss's default YaRN
    deepseek = hf_attention(
        "deepseek_v3",
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=20,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
    )
    deepseek.attention_dropout = 0.25
    latent = from_transformers(deepseek)
    assert isinstance(latent, MultiHeadLatentAttention)
    assert (latent.dropout, latent.training) == (0.25, False)  # hf_attention's are in eval
    with pytest.raises(ValueError, match="Linear has none"):
        from_transformers(torch.nn.Linear(2, 2))
    qwen3_next = from_transformers(hf_attention("qwen3_next", **FAMILIES["qwen3_next"]))
    assert qwen3_next.gate_proj is not None
    assert qwen3_next.rope.rotary_dim == 4
    assert "rotary_dim=4" in repr(qwen3_next.rope)
    persimmon = from_transformers(hf_attention("persimmon", **FAMILIES["persimmon"]))
    assert isinstance(persimmon.q_norm, torch.nn.LayerNorm)
    assert "qk_norm='layer'" in repr(persimmon)
    neox = from_transformers(hf_attention("gpt_neox", **FAMILIES["gpt_neox"]))
    assert (neox.num_kv_heads, neox.gate_proj, neox.rope.rotary_dim) == (4, None, 4)
    # a fused projection's rows count its kv heads, whatever the config says beside them
    # (num_key_value_heads, which GPT-NeoX ignores, once split its rows as grouped heads)
    stray = hf_attention("gpt_neox", **FAMILIES["gpt_neox"], num_key_value_heads=2)
    assert from_transformers(stray).num_kv_heads == 4
    variants = ("multi-query", "new architecture", "a kv head per head")
    falcons = [
        from_transformers(hf_attention("falcon", **FAMILIES[f"falcon ({v})"])) for v in variants
    ]
    assert [f.num_kv_heads for f in falcons] == [1, 2, 4]
    gemma4 = from_transformers(hf_attention("gemma4", **FAMILIES["gemma4 (global, k = v)"]))
    assert gemma4.v_proj is gemma4.k_proj  # one projection for keys and values, trained as one
    assert (gemma4.head_dim, gemma4.num_kv_heads, gemma4.scale) == (32, 1, 1.0)
    assert "v_norm=True" in repr(gemma4)
    llama = hf_attention("llama", **FAMILIES["llama"])
    llama.attention_dropout = 0.125
    assert from_transformers(llama).dropout == 0.125  # kept for fine-tuning


def test_refuses_what_it_cannot_convert():
    """Parts with no attnkit equivalent raise, naming them, rather than being dropped."""
    stablelm = hf_attention(  # a LayerNorm per head
        "stablelm", hidden_size=64, num_attention_heads=4, qk_layernorm=True
    )
    with pytest.raises(ValueError, match=r"q_layernorm \(StableLmLayerNormPerHead\) is not one"):
        from_transformers(stablelm)
    phi = hf_attention("phi", **FAMILIES["phi"])
    phi.extra = torch.nn.Linear(2, 2)  # a submodule it does not know
    with pytest.raises(ValueError, match="submodules it does not know: extra"):
        from_transformers(phi)

    class PerCodebookLinear(torch.nn.Module):  # as Moshi's: no single weight
        pass

    qwen2 = hf_attention("qwen2", **FAMILIES["qwen2"])
    qwen2.k_proj = PerCodebookLinear()
    with pytest.raises(ValueError, match="must be torch Linear layers, got PerCodebookLinear"):
        from_transformers(qwen2)
    olmo2 = hf_attention("olmo2", hidden_size=64, num_attention_heads=4)  # norm over all heads
    with pytest.raises(ValueError, match=r"q_norm \(Olmo2RMSNorm\) is not an RMS norm over each"):
        from_transformers(olmo2)
    qwen3 = hf_attention("qwen3", **FAMILIES["qwen3"])
    qwen3.q_norm = torch.nn.LayerNorm(16)  # the right size, but it subtracts the mean
    with pytest.raises(ValueError, match=r"q_norm \(LayerNorm\) is not an RMS norm"):
        from_transformers(qwen3)
    reusing = hf_attention(  # layer 1 reuses layer 0's keys and values
        "gemma4",
        layer_idx=1,
        **FAMILIES["gemma4 (global, k = v)"]
        | {
            "num_hidden_layers": 2,
            "layer_types": ["full_attention"] * 2,
            "num_kv_shared_layers": 1,
        },
    )
    with pytest.raises(ValueError, match=r"\(layer 1\) reuses the keys and values of an earlier"):
        from_transformers(reusing)
    for family, config, option in (  # options that change what the layer computes
        ("olmo", {"clip_qkv": 0.5}, r"clip_qkv=0\.5 \(OLMo clamps q, k and v"),
        ("falcon", {"alibi": True}, r"alibi=True \(Falcon adds ALiBi biases"),
        ("ministral3", {"head_dim": 16}, r"llama_4_scaling_beta=0\.1 \(Ministral 3 scales"),
    ):
        layer = hf_attention(family, hidden_size=64, num_attention_heads=4, **config)
        with pytest.raises(ValueError, match=option):
            from_transformers(layer)
    odd = hf_attention(
        "phi", **{**FAMILIES["phi"], "rope_parameters": {"partial_rotary_factor": 0.45}}
    )  # 0.45 · 20 = 9 channels: no pairs
    with pytest.raises(ValueError, match=r"rotary_dim must be even and in 2 \.\. head_dim = 20"):
        from_transformers(odd)


class _Converted(torch.nn.Module):
    """A converted attention in its transformers model's place: positions and mask its own."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        return self.attention(hidden_states)[0], None


WHOLE_MODELS = {  # family -> config of a two-layer model whose layers differ in their positions
    "cohere2": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "flint": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "exaone4": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "smollm3": {"no_rope_layers": [1, 0]},
    "mellum": {  # a base per layer type
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        },
    },
    "granite_swa": {  # a base per layer, 0 for none
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "layer_rope_theta": [50.0, 0.0],
    },
}


@pytest.mark.parametrize("family", list(WHOLE_MODELS))
def test_converted_layers_give_their_models_logits(family):
    """Every attention layer of a model replaced by its conversion, the model's logits stay:
    the positions each layer rotates (none in some: NoPE; a base per layer or layer type)
    and its mask, whatever the family's rule, as the model applies them."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tiny_config(family, pad_token_id=0, **WHOLE_MODELS[family])
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])(config).eval()
    ids = torch.randint(1, 64, (1, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn = _Converted(from_transformers(layer.self_attn))
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_rotation_under_a_condition_it_cannot_evaluate_is_refused():
    """A layer that rotates only under a condition on its call's arguments is refused: the
    layer alone does not say which way it goes."""
    llama = importlib.import_module("transformers.models.llama.modeling_llama")

    class CallDependent(llama.LlamaAttention):
        def forward(self, hidden_states, position_embeddings, attention_mask, rotate=True):
            q = k = hidden_states
            if rotate:
                q, k = llama.apply_rotary_pos_emb(q, k, *position_embeddings)
            return q, k

    config = hf_attention("llama", **FAMILIES["qwen2"]).config
    with pytest.raises(ValueError, match="rotates positions only if rotate, which cannot be told"):
        from_transformers(CallDependent(config, layer_idx=0))


SEQ2SEQ = {  # family -> (config class, model class); their attentions are BART's
    "bart": ("BartConfig", "BartForConditionalGeneration"),
    "marian": ("MarianConfig", "MarianMTModel"),
    "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration"),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration"),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration"),  # k_proj without bias
}


def seq2seq_model(family):
    """A one-layer encoder–decoder of ``family``: 4 encoder heads, 2 decoder heads (its
    config's num_attention_heads is the encoder's), random weights, eager attention."""
    transformers = pytest.importorskip("transformers")
    config_class, model_class = SEQ2SEQ[family]
    sizes = {"encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
    config = getattr(transformers, config_class)(
        vocab_size=64,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        max_position_embeddings=64,
        max_source_positions=32,
        max_target_positions=32,
        num_mel_bins=8,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        attention_dropout=0.1,  # (eval mode: kept, not applied)
        attn_implementation="eager",
        **sizes,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def additive(keep):
    """transformers' eager attention mask (B, 1, Lq, Lk) from a bool one, True = attend."""
    return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -1e30)[:, None]


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_encoder_decoder_attentions_convert(family):
    """BART-style attention (out_proj, heads of the module's own, a float dropout): the
    encoder's bidirectional self-attention over a padded batch, the decoder's causal one,
    and the decoder's cross-attention over the padded encoder output, in float64."""
    model = seq2seq_model(family).double()
    core = model.model
    attentions = {
        "encoder": core.encoder.layers[0].self_attn,
        "decoder": core.decoder.layers[0].self_attn,
        "cross": core.decoder.layers[0].encoder_attn,
    }
    g = torch.Generator().manual_seed(0)
    x, memory = (torch.randn(2, n, 32, dtype=torch.float64, generator=g) for n in (7, 9))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True  # the second source has 6 tokens
    for kind, hf in attentions.items():
        ours = from_transformers(hf)
        assert ours.num_heads == hf.num_heads
        assert ours.dropout == hf.dropout == 0.1
        with torch.no_grad():
            if kind == "encoder":
                want = hf(memory, attention_mask=additive(~padding[:, None].expand(2, 9, 9)))[0]
                got = ours(memory, key_padding_mask=padding)[0]
            elif kind == "decoder":
                causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
                want, got = hf(x, attention_mask=additive(causal))[0], ours(x)[0]
            else:
                keep = ~padding[:, None].expand(2, 7, 9)
                want = hf(x, key_value_states=memory, attention_mask=additive(keep))[0]
                got = ours(x, memory, memory, key_padding_mask=padding)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"{family} {kind}")


class _Seq2SeqConverted(torch.nn.Module):
    """A converted attention in its model's place: self-attention, or cross-attention over
    the memory BART (``key_value_states``) or GPT-2 (``encoder_hidden_states``) passes it."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, key_value_states=None, *args, **kwargs):
        memory = key_value_states
        if memory is None:
            memory = kwargs.get("encoder_hidden_states")
        return self.attention(hidden_states, *(() if memory is None else (memory, memory)))[0], None


def causal_lm_config(family):
    """A two-layer config of a causal LM family at test sizes (OPT's with a
    num_key_value_heads it ignores; GPT-2's scaled by 1 / (layer + 1), with cross-attention)."""
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": 64, "attn_implementation": "eager", "pad_token_id": 1}
    gpt = {"n_embd": 32, "n_head": 4, "n_layer": 2, "bos_token_id": 0, "eos_token_id": 2}
    return {
        "opt": lambda: transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            word_embed_proj_dim=32, num_key_value_heads=2, **common,
        ),
        "gpt2": lambda: transformers.GPT2Config(
            scale_attn_by_inverse_layer_idx=True, add_cross_attention=True, **gpt, **common
        ),
        "gpt_bigcode (multi-query)": lambda: transformers.GPTBigCodeConfig(
            multi_query=True, **gpt, **common
        ),
        "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(multi_query=False, **gpt, **common),
    }[family]()  # fmt: skip


@pytest.mark.parametrize(
    ("family", "attentions"),
    [("bart", 3), ("opt", 2), ("gpt2", 4), ("gpt_bigcode (multi-query)", 2), ("gpt_bigcode", 2)],
)
def test_converted_attentions_give_their_models_logits(family, attentions):
    """Every attention of a translation model (encoder, decoder, cross), of OPT, of GPT-2
    (Conv1D projections fused as c_attn; its cross-attention's q_attn) and of GPT-BigCode
    (c_attn fused per head, or multi-query) replaced by its conversion: the logits stay."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inputs = {
        "input_ids": torch.randint(3, 64, (1, 11), generator=torch.Generator().manual_seed(0))
    }
    if family == "bart":
        model = seq2seq_model(family)
        inputs["decoder_input_ids"] = torch.tensor([[2, 5, 9]])
    else:
        config = causal_lm_config(family)
        torch.manual_seed(0)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
        model = getattr(transformers, model_class)(config).eval()
    if family == "gpt2":  # a source its cross-attention reads
        inputs["encoder_hidden_states"] = torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = model(**inputs).logits
        found = [
            (name, module)
            for name, module in model.named_modules()
            if name.endswith(("self_attn", "encoder_attn", ".attn", ".crossattention"))
        ]
        converted = [from_transformers(module) for _, module in found]
        for (name, _), attention in zip(found, converted, strict=True):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _Seq2SeqConverted(attention))
        got = model(**inputs).logits
    assert len(found) == attentions
    if family == "gpt2":  # its attention dropout is an nn.Dropout named attn_dropout
        assert {a.dropout for a in converted} == {model.config.attn_pdrop} == {0.1}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_encoder_attention_converts(family):
    """CLIP's and SigLIP's vision attention (its softmax scale kept as ``scale``, out_proj,
    bidirectional) over 10 patches: against the module in float32, and in float64 against
    its arithmetic by hand (its eager softmax runs in float32 whatever the dtype)."""
    transformers = pytest.importorskip("transformers")
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = {"clip": "CLIP", "siglip": "Siglip"}[family]
    config = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=32, num_attention_heads=4, attention_dropout=0.0
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(modeling, f"{prefix}Attention")(config).eval()
    ours = from_transformers(hf)
    assert ours.mask is None
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x)[0], rtol=1e-5, atol=1e-6)
        hf, ours, x = hf.double(), ours.double(), x.double()

        def heads(t):
            return t.view(2, 10, 4, 8).transpose(1, 2)

        q, k, v = (heads(getattr(hf, f"{n}_proj")(x)) for n in "qkv")
        weights = (q @ k.transpose(-1, -2) * hf.scale).softmax(-1)
        want = hf.out_proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
        torch.testing.assert_close(ours(x)[0], want, rtol=0, atol=1e-12)
