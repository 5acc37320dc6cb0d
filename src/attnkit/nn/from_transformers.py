"""attnkit attention modules from transformers' attention modules, weights copied.

Modules with q/k/v/o projections over ``head_dim``-wide heads (separate, or fused as Phi-3's
``qkv_proj`` and GPT-NeoX's and Falcon's ``query_key_value``; the output named ``o_proj``,
``dense`` or ``out_proj``: BART's self- and cross-attention, OPT's, CLIP's; GPT-2's Conv1D
``c_attn`` / ``c_proj`` and GPT-BigCode's),
grouped kv heads and rotary positions from ``config.rope_parameters`` (full or partial,
rotate-half or GLM's interleaved pairs, per layer type as Gemma 3) become
``MultiHeadAttention``, with their q/k norms (RMS: Qwen3, Gemma 3, Qwen3-Next; LayerNorm: Phi,
Persimmon), value norms and keys-as-values (Gemma 4), attention sinks (gpt-oss), logit
softcapping and softmax scale (Gemma 2), output gates (Qwen3-Next), attention dropout and
sliding-window layers, causal or bidirectional. Llama, Mistral, Qwen2/3, Qwen3-Next,
Gemma 2/3/4, gpt-oss, Phi, Phi-3, GPT-NeoX, Persimmon, GLM, Nemotron, Falcon, Cohere 2,
Flint, SmolLM3, EXAONE 4, Mellum and Granite SWA (their layers without positions, and bases
per layer, too), LFM2, BART, Marian, M2M100, Pegasus, Whisper, OPT, GPT-2, GPT-BigCode,
CLIP and SigLIP are tested.
DeepSeek-V2/V3 (multi-head latent attention) become ``MultiHeadLatentAttention``, DiffLlama
``DifferentialAttention``. The tests run each against the transformers module it came from.
Config options with no attnkit counterpart (``_DROPPED_OPTIONS``) are refused by name.
"""

from __future__ import annotations

import ast
import inspect
import math
import sys
import textwrap
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from attnkit import masks, score_mods
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.differential_attention import DifferentialAttention
from attnkit.nn.latent_attention import MultiHeadLatentAttention
from attnkit.nn.rope import RotaryEmbedding

Linear = tuple[Tensor, Tensor | None]  # (weight (out, in), bias (out,) or None)
#: q/k norm attribute names by kind: RMS norms (Qwen3, Gemma 3), LayerNorms (Phi, Persimmon)
NormKind = Literal["rms", "layer"]
_NORMS: dict[NormKind, tuple[str, str]] = {
    "rms": ("q_norm", "k_norm"),
    "layer": ("q_layernorm", "k_layernorm"),
}
_KNOWN_CHILDREN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value"}
_KNOWN_CHILDREN |= {"o_proj", "dense", "out_proj", "c_attn", "q_attn", "c_proj"}
_KNOWN_CHILDREN |= {name for names in _NORMS.values() for name in names} | {"v_norm"}
Norm = tuple[Tensor, Tensor | None, float]  # (gain, bias or None, eps)
#: options of a config (or its rope_parameters) that change what an attention layer computes
#: and have no attnkit counterpart: a layer whose config sets one is refused, not converted
#: without it (its outputs would differ, at long positions only for the last)
_DROPPED_OPTIONS = {
    "clip_qkv": "OLMo clamps q, k and v to ±clip_qkv",
    "alibi": "Falcon adds ALiBi biases through its attention mask",
    "llama_4_scaling_beta": "Ministral 3 scales queries past original_max_position_embeddings",
}


def from_transformers(
    module: Any,
) -> MultiHeadAttention | MultiHeadLatentAttention | DifferentialAttention:
    """The attnkit module that computes what ``module`` (a transformers attention) computes.

    Its mask is causal, or a sliding window where the layer has one; a bidirectional layer
    has none, or a band around each query (see ``_mask``). Call it like any attnkit module:
    positions come from the rotary embedding it builds (or a cache), not from the caller.
    A layer that reuses another layer's keys and values (Gemma 4's KV sharing) is refused.
    """
    if hasattr(module, "kv_a_proj_with_mqa"):
        return MultiHeadLatentAttention.from_transformers(module)
    if hasattr(module, "lambda_q1"):
        return DifferentialAttention.from_transformers(module)
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(
            f"from_transformers takes a transformers attention module with a config; "
            f"{type(module).__name__} has none"
        )
    _check_children(module)
    if getattr(module, "is_kv_shared_layer", False):
        raise ValueError(
            f"from_transformers: {type(module).__name__} (layer {module.layer_idx}) reuses the "
            "keys and values of an earlier layer (Gemma 4's KV sharing) and has no k/v "
            "projections of its own; only layers that compute their keys and values convert"
        )
    rope_parameters = _rope_parameters(module)
    for option, what in _DROPPED_OPTIONS.items():
        value = rope_parameters.get(option, getattr(config, option, None))
        if value not in (None, False, 0):
            raise ValueError(
                f"from_transformers: {type(module).__name__}'s config sets {option}={value!r} "
                f"({what}), which the conversion would drop"
            )
    # (BART's own: its config's num_attention_heads is the encoder's)
    heads = int(getattr(module, "num_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(module, "head_dim", None) or module.head_size)
    kv_heads = _kv_heads(module, heads, head_dim)
    weights = _projections(module, heads, kv_heads, head_dim)
    rope = (
        RotaryEmbedding.from_parameters(
            head_dim, rope_parameters, getattr(config, "max_position_embeddings", None)
        )
        if _rotates_positions(module)
        else None
    )
    if rope is not None and _rotates_interleaved_pairs(module):  # GLM: reorder rotary rows
        for name, n in (("q", heads), ("k", kv_heads)):
            weights[name] = _deinterleave(weights[name], n, head_dim, rope.rotary_dim)
    norm_kind, norms = _qk_norms(module, head_dim)
    v_norm_eps = _v_norm_eps(module, head_dim)
    sinks = getattr(module, "sinks", None)
    cap = getattr(module, "attn_logit_softcapping", None)  # Gemma 2: c·tanh(s / c)
    scale = _softmax_scale(module)
    weight = weights["q"][0]
    new = MultiHeadAttention(
        weight.shape[1],
        heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        bias=any(b is not None for _, b in weights.values()),
        dropout=_attention_dropout(module),
        mask=_mask(module),
        rope=rope,
        score_mod=None if cap is None else score_mods.softcap(float(cap)),
        qk_norm=norm_kind or False,
        v_norm=v_norm_eps is not None,
        sinks=sinks is not None,
        output_gate="gate" in weights,
        scale=None if scale == head_dim**-0.5 else scale,
        device=weight.device,
        dtype=weight.dtype,
    )
    values_are_keys = _values_are_keys(module)
    with torch.no_grad():
        for name, (w, b) in weights.items():
            if name == "v" and values_are_keys:
                continue  # v_proj becomes k_proj below
            target = getattr(new, f"{name}_proj" if name != "o" else "out_proj")
            target.weight.copy_(w)
            if b is None:
                target.register_parameter("bias", None)  # Qwen2: q/k/v biases, none on o
            else:
                target.bias.copy_(b)
        for (gain, bias, eps), target in zip(norms, (new.q_norm, new.k_norm), strict=False):
            assert target is not None
            target.weight.copy_(gain)
            target.eps = eps
            if isinstance(target, nn.LayerNorm):
                target.bias.copy_(torch.zeros_like(target.bias) if bias is None else bias)
        if sinks is not None and new.sinks is not None:
            new.sinks.copy_(sinks)
    if new.v_norm is not None:
        new.v_norm.eps = v_norm_eps
    if values_are_keys:  # Gemma 4's global layers: one projection for both
        new.v_proj = new.k_proj
    return new.train(module.training)


def _mask(module: Any) -> masks.Mask | None:
    """The layer's mask: causal or a sliding window; on a bidirectional layer none or a band.

    transformers' ``sliding_window=W`` on a causal layer: the query and the W - 1 keys before
    it, ``sliding_window(W - 1)``. How far a bidirectional window reaches differs by family
    (Gemma 3: |q - kv| < W, masking_utils and so Gemma 4: |q - kv| <= W), so it is read off
    the overlay that builds it, as the model does.
    """
    window = getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
    if getattr(module, "is_sliding", True) is False:  # EXAONE 4 keeps the window on every layer
        window = None
    if getattr(module, "is_causal", True) is not False:
        return masks.sliding_window(window - 1) if window else masks.causal()
    if not window:
        return None
    from transformers import masking_utils

    modeling = sys.modules.get(type(module).__module__)
    overlay = getattr(  # Gemma 3 defines its own; the rest build theirs in masking_utils
        modeling,
        "_bidirectional_window_overlay",
        masking_utils.sliding_window_bidirectional_overlay,
    )
    keeps = overlay(window)
    reach = max(d for d in range(window + 2) if keeps(0, 0, torch.tensor(d), torch.tensor(0)))
    return masks.sliding_window(reach, reach)


def _attention_dropout(module: Any) -> float:
    """The module's attention-weight dropout p.

    A float, or an ``nn.Dropout`` (Persimmon); BART and OPT keep it as a float ``dropout``,
    GPT-2 as ``attn_dropout``. (Dropout of the output, GPT-2's ``resid_dropout``, is its
    block's business: the converted module does not apply it.)
    """
    p = getattr(module, "attention_dropout", None)
    for name in ("dropout", "attn_dropout"):  # BART's, OPT's float; GPT-2's nn.Dropout
        if p is None and isinstance(getattr(module, name, None), float | nn.Dropout):
            p = getattr(module, name)
    return float(p.p if isinstance(p, nn.Dropout) else p or 0.0)


def _check_children(module: nn.Module) -> None:
    """Refuse a module with a submodule the conversion would drop (its output would differ)."""
    unknown = [
        name
        for name, child in module.named_children()
        if name not in _KNOWN_CHILDREN
        and not isinstance(child, nn.Dropout)
        and not type(child).__name__.endswith("RotaryEmbedding")  # positions are rebuilt
    ]
    if unknown:
        raise ValueError(
            f"from_transformers: {type(module).__name__} has submodules it does not know: "
            f"{', '.join(unknown)}"
        )


def _is_conv1d(layer: object) -> bool:
    """Whether ``layer`` is transformers' ``Conv1D`` (GPT-2's): weight (in, out), ``nf`` outputs."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _projections(module: Any, heads: int, kv_heads: int, head_dim: int) -> dict[str, Linear]:
    """q, k, v, o (and gate) weights and biases, split from fused projections where fused."""

    def linear(layer: nn.Module) -> Linear:
        if _is_conv1d(layer):  # GPT-2's: weight (in, out)
            weight, bias = cast(Tensor, layer.weight), cast(Tensor | None, layer.bias)
            return weight.t(), bias
        if not isinstance(layer, nn.Linear):  # (Moshi's per-codebook projections)
            raise ValueError(
                f"from_transformers: {type(module).__name__}'s projections must be torch "
                f"Linear layers, got {type(layer).__name__}"
            )
        return layer.weight, layer.bias

    def rows(layer: nn.Linear, heads: int, parts: int) -> list[Linear]:
        """Weight and bias of ``layer`` whose rows are (heads, parts, head_dim), split by part."""
        w = layer.weight.view(heads, parts, head_dim, -1)
        b = None if layer.bias is None else layer.bias.view(heads, parts, head_dim)
        return [
            (w[:, i].reshape(-1, w.shape[-1]), None if b is None else b[:, i].reshape(-1))
            for i in range(parts)
        ]

    out = next(
        (
            getattr(module, name)
            for name in ("o_proj", "dense", "out_proj", "c_proj")
            if getattr(module, name, None) is not None
        ),
        None,
    )
    if out is None:
        raise ValueError(
            f"from_transformers: {type(module).__name__} has no output projection (o_proj, "
            "dense, out_proj or c_proj)"
        )
    found: dict[str, Linear] = {"o": linear(out)}
    fused_qkv = getattr(module, "qkv_proj", None) or getattr(module, "c_attn", None)
    if getattr(module, "multi_query", None) is False and isinstance(fused_qkv, nn.Linear):
        # GPT-BigCode with a kv head per head: per head its query, key and value rows
        found |= dict(zip("qkv", rows(fused_qkv, heads, 3), strict=True))
    elif fused_qkv is not None:  # Phi-3's qkv_proj, GPT-2's c_attn: [all q; all k; all v]
        w, b = linear(fused_qkv)
        names = "qkv"
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        if getattr(module, "is_cross_attention", False):  # GPT-2's: c_attn [k; v], q_attn q
            names, sizes = "kv", sizes[1:]
            found["q"] = linear(module.q_attn)
        biases = (None,) * len(sizes) if b is None else torch.split(b, sizes)
        found |= {
            name: (ws, bs)
            for name, ws, bs in zip(names, torch.split(w, sizes), biases, strict=True)
        }
    elif hasattr(module, "query_key_value"):
        fused = module.query_key_value
        assert fused is not None
        for name, index in _query_key_value_rows(module, heads, kv_heads, head_dim).items():
            index = index.flatten()
            found[name] = (fused.weight[index], None if fused.bias is None else fused.bias[index])
    elif all(hasattr(module, f"{name}_proj") for name in "qkv"):
        found["k"] = linear(module.k_proj)
        found["v"] = found["k"] if _values_are_keys(module) else linear(module.v_proj)
        q = module.q_proj
        if q.out_features == 2 * heads * head_dim:  # Qwen3-Next: a query and a gate per head
            found |= dict(zip(("q", "gate"), rows(q, heads, 2), strict=True))
        else:
            found["q"] = linear(q)
    else:
        raise ValueError(
            f"from_transformers takes a transformers attention module with q/k/v projections "
            f"(q_proj/k_proj/v_proj, qkv_proj or query_key_value); {type(module).__name__} has "
            f"none"
        )
    return found


def _kv_heads(module: Any, heads: int, head_dim: int) -> int:
    """The layer's key/value heads, counted from its weights.

    A separate ``k_proj`` has kv_heads · head_dim rows, a fused ``query_key_value``,
    ``qkv_proj`` or ``c_attn`` (heads + 2 · kv_heads) · head_dim (GPT-2's cross-attention's
    2 · kv_heads · head_dim): a config's ``num_key_value_heads`` may be
    one its model ignores (OPT's, GPT-NeoX's given one), and some models vary them by layer.
    Else the layer's groups, else the config's.
    """
    for name in ("query_key_value", "qkv_proj", "c_attn"):
        if (fused := getattr(module, name, None)) is None:
            continue
        rows = fused.nf if _is_conv1d(fused) else fused.out_features
        if getattr(module, "is_cross_attention", False):  # GPT-2's: [k; v] only
            return int(rows // head_dim // 2)
        return int((rows // head_dim - heads) // 2)
    if isinstance(k := getattr(module, "k_proj", None), nn.Linear):
        return int(k.out_features // head_dim)
    if groups := getattr(module, "num_key_value_groups", None):
        return int(heads // groups)
    return int(getattr(module.config, "num_key_value_heads", None) or heads)


def _softmax_scale(module: Any) -> float:
    """The factor scores are multiplied by: ``scaling`` (most), ``scale`` (CLIP's vision)."""
    for name in ("scaling", "scale"):
        value = getattr(module, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    raise ValueError(
        f"from_transformers: {type(module).__name__} keeps its softmax scale in neither "
        "`scaling` nor `scale`"
    )


def _query_key_value_rows(
    module: Any, heads: int, kv_heads: int, head_dim: int
) -> dict[str, Tensor]:
    """Which rows of a fused ``query_key_value`` projection are q's, k's and v's.

    GPT-NeoX, Persimmon and Falcon with a kv head per head: (heads, 3, head_dim), per head its
    query, key and value. Falcon's ``multi_query``: every query, then the one key and value.
    Falcon's ``new_decoder_architecture``: (kv_heads, G + 2, head_dim), per kv head its group
    of G queries, its key and its value.
    """
    if getattr(module, "new_decoder_architecture", False):
        group = heads // kv_heads
        rows = torch.arange(kv_heads * (group + 2) * head_dim).view(kv_heads, group + 2, head_dim)
        return {"q": rows[:, :group], "k": rows[:, group], "v": rows[:, -1]}
    if kv_heads != heads:  # multi-query: [all queries; key; value]
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        rows = torch.arange(q_rows + 2 * kv_rows)
        return {"q": rows[:q_rows], "k": rows[q_rows:-kv_rows], "v": rows[-kv_rows:]}
    rows = torch.arange(heads * 3 * head_dim).view(heads, 3, head_dim)
    return {"q": rows[:, 0], "k": rows[:, 1], "v": rows[:, 2]}


def _values_are_keys(module: Any) -> bool:
    """Whether the values are the key projection's output (Gemma 4's ``attention_k_eq_v``).

    Such a layer's ``v_proj`` is None: the keys' projection, before their norm and rotation,
    serves both.
    """
    return hasattr(module, "k_proj") and hasattr(module, "v_proj") and module.v_proj is None


def _rope_parameters(module: Any) -> dict[str, Any]:
    """The layer's rope_parameters.

    Where the config keeps one dict per layer type (Gemma 3, Mellum: local and global), the
    one of the layer's type: its ``layer_type``, else ``config.layer_types[layer_idx]``. Where
    it gives each layer its own base (Granite SWA's ``layer_rope_theta``), that base.
    """
    config = module.config
    params = dict(getattr(config, "rope_parameters", None) or {})  # (none: Jamba)
    per_type = {name: value for name, value in params.items() if isinstance(value, dict)}
    if per_type:
        layer_type = getattr(module, "layer_type", None)
        if layer_type is None and getattr(config, "layer_types", None) is not None:
            layer_type = config.layer_types[module.layer_idx]
        if layer_type not in per_type:
            raise ValueError(
                f"from_transformers: {type(module).__name__}'s config has rope_parameters per "
                f"layer type ({', '.join(per_type)}), but not for its type {layer_type!r}"
            )
        params = dict(per_type[layer_type])
    if getattr(config, "layer_rope_theta", None):
        params["rope_theta"] = config.layer_rope_theta[module.layer_idx]
    return params


def _rotates_positions(module: Any) -> bool:
    """Whether the layer rotates q and k, read off its ``forward`` as it runs.

    Most rotate always. Some families leave positions out of some layers (NoPE) and say so
    in an ``if`` around their rotation: on the layer's attributes (SmolLM3's
    ``self.use_rope``, Cohere 2's ``self.sliding_window is not None``, EXAONE 4's, CodeGen's,
    ...), evaluated here on the layer; or on the position embeddings the model passes it,
    which it leaves out where its config says so (``position_embedding_type`` other than
    "rope", a ``layer_rope_theta`` of 0). Any other condition is refused: nothing here could
    tell which way it goes.
    """
    condition = _rotation_condition(type(module))
    if condition is None:
        return True
    if condition is _NEVER:  # no rotary call at all (Jamba: positions come from its Mamba layers)
        return False
    names = {node.id for node in ast.walk(condition) if isinstance(node, ast.Name)}
    if names == {"self"}:  # transformers' own expression on the layer's attributes
        return bool(eval(compile(ast.Expression(condition), "<forward>", "eval"), {"self": module}))
    config = module.config
    if ast.unparse(condition) == "position_embeddings is not None":
        if getattr(config, "position_embedding_type", "rope") != "rope":
            return False
        return not getattr(config, "layer_rope_theta", None) or bool(
            config.layer_rope_theta[module.layer_idx]
        )
    raise ValueError(
        f"from_transformers: {type(module).__name__} rotates positions only "
        f"if {ast.unparse(condition)}, which cannot be told from the layer"
    )


#: ``_rotation_condition`` of a forward that calls no rotary function
_NEVER = ast.Constant(value=False)


def _rotation_condition(cls: type[nn.Module]) -> ast.expr | None:
    """The condition of the ``if`` around the rotary call in ``cls.forward``.

    None where it rotates unconditionally (or its source is not at hand), ``_NEVER`` where it
    calls no function named ``*rotary*``.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError):  # no source at hand: as most layers, rotating always
        return None

    def rotates(statements: list[ast.stmt]) -> bool:
        return any(
            isinstance(call, ast.Call) and "rotary" in ast.unparse(call.func)
            for statement in statements
            for call in ast.walk(statement)
        )

    if not rotates(tree.body):
        return _NEVER
    for node in ast.walk(tree):  # (an if whose else rotates too, as DeepSeek's, rotates always)
        if isinstance(node, ast.If) and rotates(node.body) and not rotates(node.orelse):
            return node.test
    return None


def _rotates_interleaved_pairs(module: Any) -> bool:
    """Whether rotation pairs channels (2i, 2i + 1) (GLM), not (i, i + R/2).

    Read off the ``rotate_half`` that the module's modeling file applies.
    """
    rotate_half = getattr(sys.modules.get(type(module).__module__), "rotate_half", None)
    if rotate_half is None:
        return False
    x = torch.arange(4.0)
    if torch.equal(rotate_half(x), torch.tensor([-2.0, -3.0, 0.0, 1.0])):
        return False
    if torch.equal(rotate_half(x), torch.tensor([-1.0, 0.0, -3.0, 2.0])):
        return True
    raise ValueError(f"from_transformers: {type(module).__name__}'s rotate_half is neither layout")


def _deinterleave(projection: Linear, heads: int, head_dim: int, rotary_dim: int) -> Linear:
    """Rows of each head reordered so pair (2i, 2i + 1) becomes (i, i + R/2).

    q·k is the same under one permutation of both q's and k's channels, and this one turns the
    interleaved rotation into rotate-half with the same frequency per pair.
    """
    order = torch.cat(
        [
            torch.arange(0, rotary_dim, 2),
            torch.arange(1, rotary_dim, 2),
            torch.arange(rotary_dim, head_dim),
        ]
    )
    index = (torch.arange(heads)[:, None] * head_dim + order).reshape(-1)
    weight, bias = projection
    return weight[index.to(weight.device)], None if bias is None else bias[index.to(bias.device)]


def _qk_norms(module: Any, head_dim: int) -> tuple[NormKind | None, list[Norm]]:
    """The kind ("rms", "layer" or None) and the q and k norms' parameters."""
    for kind, names in _NORMS.items():
        found = [getattr(module, name, None) for name in names]
        if all(n is None for n in found):
            continue
        if kind == "layer" and not any(isinstance(n, nn.LayerNorm) for n in found):
            try:  # LFM2 names its RMS norms q_layernorm, k_layernorm
                return "rms", [_rms_gain(n, head_dim, m) for n, m in zip(found, names, strict=True)]
            except ValueError:
                pass  # neither kind: refused by the LayerNorm reader, which says why
        read = _rms_gain if kind == "rms" else _layer_norm
        return kind, [read(n, head_dim, name) for n, name in zip(found, names, strict=True)]
    return None, []


def _layer_norm(norm: nn.Module | None, head_dim: int, name: str) -> Norm:
    """Gain, bias and eps of a LayerNorm over each head's channels, shared by the heads."""
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (head_dim,):
        raise ValueError(
            f"from_transformers: {name} ({type(norm).__name__}) is not one LayerNorm over each "
            f"head's {head_dim} channels (StableLM's per-head norms are not supported)"
        )
    if not norm.elementwise_affine:
        return torch.ones(head_dim), None, float(norm.eps)
    return norm.weight, norm.bias, float(norm.eps)


def _rms_gain(norm: nn.Module | None, head_dim: int, name: str, gain: bool = True) -> Norm:
    """The per-channel gain and eps of a per-head RMS norm, whatever its parameterisation.

    Qwen3 multiplies by its weight, Gemma 3 and Qwen3-Next by 1 + weight; either way the gain
    is what the norm does to a vector of RMS 1 (undoing eps). A norm that does not act as
    x / rms(x) · gain on a random vector (a LayerNorm, a norm over all heads as OLMo 2) is
    refused. ``gain=False``: the norm must have no weight and a gain of 1 (Gemma 4's v_norm).
    """
    weight = getattr(norm, "weight", None)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)) or 1e-6)
    refusal = ValueError(
        f"from_transformers: {name} ({type(norm).__name__}) is not an RMS norm over each head's "
        f"{head_dim} channels{'' if gain else ' without a gain'}; only those are supported"
    )
    has_weight = isinstance(weight, Tensor) and weight.numel() == head_dim
    if norm is None or has_weight != gain:
        raise refusal
    like = weight if isinstance(weight, Tensor) else torch.empty(0)  # a weightless norm
    probe = torch.randn(head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ones = torch.ones(head_dim, dtype=like.dtype, device=like.device)
        found = norm(ones).double().cpu() * math.sqrt(1 + eps)
        expected = probe * torch.rsqrt(probe.pow(2).mean() + eps) * found
        got = norm(probe.to(ones)).double().cpu()
    tolerance = 1e-2 * float(found.abs().max())
    if not torch.allclose(got, expected, rtol=1e-2, atol=tolerance) or (
        not gain and not torch.allclose(found, torch.ones_like(found), rtol=1e-3, atol=0)
    ):
        raise refusal
    return found.to(ones), None, eps


def _v_norm_eps(module: Any, head_dim: int) -> float | None:
    """The eps of the module's value RMS norm without a gain (Gemma 4), or None if it has none."""
    norm = getattr(module, "v_norm", None)
    return None if norm is None else _rms_gain(norm, head_dim, "v_norm", gain=False)[2]
