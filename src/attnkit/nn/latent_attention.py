"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values from one small latent.

Each token's keys and values for all heads are decoded from one latent c (``kv_rank``
channels, RMS-normalised) plus one rotary key k_rope (``rope_dim`` channels) shared by
every head, so a KV cache holds kv_rank + rope_dim numbers per token instead of
2·H·head_dim. Per head h, with K_h, V_h the up-projections (``kv_up``):

    q_h = [q_nope_h | rope(q_rope_h)]        k_h = [K_h·c | rope(k_rope)]        v_h = V_h·c

    score = q_nope_h·(K_h·c) + rope(q_rope_h)·rope(k_rope)
          = (K_hᵀ·q_nope_h)·c + rope(q_rope_h)·rope(k_rope)

The second line is the "absorbed" form used for decoding: fold K_h into the query, attend
with queries [K_hᵀ·q_nope_h | rope(q_rope_h)] over keys [c | rope(k_rope)] and values c, then
apply V_h to the result. That is multi-query attention (one kv head) in latent space, which
every attnkit backend runs without repeating keys: the cache stores [c | rope(k_rope)] once
(``KVCache(value_dim=0)``) and the values are a view of its first ``kv_rank`` channels.
Without a cache, and over a cache for calls of many queries (a long prompt), the module
runs the expanded form (per-head keys and values, as training does), whichever needs fewer
FLOPs (``absorbs``); the tests check every path against transformers'
``DeepseekV3Attention``.

Shapes: x (B, L, E); q (B, H, L, nope_dim + rope_dim); latent keys (B, 1, Lk, kv_rank +
rope_dim); output (B, L, E).
"""

from __future__ import annotations

from functools import partial
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from attnkit import masks as _masks
from attnkit._symbolic import surely
from attnkit._types import ScoreModFn
from attnkit._validation import check_dropout, check_flag, check_int
from attnkit.backends._common import MaskLike
from attnkit.functional import BackendName, attention, attention_weights, autocast_dtype
from attnkit.masks import Mask
from attnkit.nn.attention import append_to_cache, combine_masks
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rope import RotaryEmbedding
from attnkit.score_mods import ScoreMod

#: transformers' DeepseekV3Attention submodule names -> ours (the rest are the same)
TRANSFORMERS_NAMES = {
    "q_a_proj": "q_proj.0",
    "q_a_layernorm": "q_proj.1",
    "q_b_proj": "q_proj.2",
    "kv_a_proj_with_mqa": "kv_down",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "kv_up",
    "o_proj": "out_proj",
}


class _RequiredSizes(TypedDict):
    kv_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int


class LatentSizes(_RequiredSizes, total=False):
    """The sizes that make attention latent (``MultiHeadLatentAttention``'s arguments)."""

    q_rank: int | None


class MultiHeadLatentAttention(nn.Module):
    """Self-attention whose keys and values come from a low-rank latent (DeepSeek MLA).

    Args:
        embed_dim: E, width of input and output.
        num_heads: H.
        kv_rank: channels of the key/value latent c (DeepSeek-V3: 512).
        nope_dim: per-head query/key channels without positions (128).
        rope_dim: per-head query channels and the shared key channels with rotary positions
            (64).
        v_dim: per-head value channels (128).
        q_rank: if given, queries also go through a latent of this width (down-projection,
            RMSNorm, up-projection; 1536); None projects them directly.
        rope_base: rotary frequency base.
        rope: a ``RotaryEmbedding`` of ``rope_dim`` to use instead (e.g.
            ``RotaryEmbedding.yarn``, as DeepSeek-V3 extends its context).
        scale: softmax scale; default 1/sqrt(nope_dim + rope_dim) (DeepSeek's YaRN models
            multiply it by the square of their mscale term).
        mask: applied on every call (default causal), combined with the call's.
        dropout: attention-weight dropout while training.
        score_mod: applied on every call.
        bias: biases in the down-projections and the output projection (DeepSeek: none).
        backend: attention backend (see ``attnkit.attention``).

    Use ``new_cache`` for decoding: it holds kv_rank + rope_dim numbers per token.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kv_rank: int,
        nope_dim: int,
        rope_dim: int,
        v_dim: int,
        q_rank: int | None = None,
        rope_base: float = 10000.0,
        rope: RotaryEmbedding | None = None,
        scale: float | None = None,
        mask: Mask | None = None,
        dropout: float = 0.0,
        score_mod: ScoreMod | ScoreModFn | None = None,
        bias: bool = False,
        backend: BackendName = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, n in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("kv_rank", kv_rank),
            ("rope_dim", rope_dim),
            ("v_dim", v_dim),
        ):
            check_int(name, n)
        check_int("nope_dim", nope_dim, least=0)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kv_rank, self.nope_dim, self.rope_dim, self.v_dim = kv_rank, nope_dim, rope_dim, v_dim
        self.scale = (nope_dim + rope_dim) ** -0.5 if scale is None else scale
        self.mask = _masks.causal() if mask is None else mask
        self.score_mod, self.backend = score_mod, backend
        self.dropout = check_dropout(dropout)
        linear = partial(nn.Linear, device=device, dtype=dtype)
        norm = partial(nn.RMSNorm, eps=1e-6, device=device, dtype=dtype)  # eps as DeepSeek's
        q_width = num_heads * (nope_dim + rope_dim)
        self.q_rank = q_rank
        if q_rank is None:
            self.q_proj: nn.Module = linear(embed_dim, q_width, bias=False)
        else:
            check_int("q_rank", q_rank)
            self.q_proj = nn.Sequential(
                linear(embed_dim, q_rank, bias=bias),
                norm(q_rank),
                linear(q_rank, q_width, bias=False),
            )
        self.kv_down = linear(embed_dim, kv_rank + rope_dim, bias=bias)  # -> [c | k_rope]
        self.kv_norm = norm(kv_rank)
        self.kv_up = linear(kv_rank, num_heads * (nope_dim + v_dim), bias=False)  # K_h, V_h
        self.out_proj = linear(num_heads * v_dim, embed_dim, bias=bias)
        if rope is not None and rope.head_dim != rope_dim:
            raise ValueError(f"rope has head_dim {rope.head_dim}, but rope_dim is {rope_dim}")
        self.rope = RotaryEmbedding(rope_dim, rope_base) if rope is None else rope

    @classmethod
    def from_transformers(cls, module: Any) -> MultiHeadLatentAttention:
        """The same attention as a transformers ``DeepseekV3Attention``, weights copied.

        Sizes, softmax scale, attention dropout and rotary positions (default or YaRN) come
        from its config.
        DeepSeek checkpoints rotate interleaved channel pairs (``rope_interleave``); this
        module rotates halves, so the rotary rows of the q and kv down-projections are put
        in even-then-odd order, which gives the same scores and the same rotated values.
        """
        config = module.config
        rope_dim = config.qk_rope_head_dim
        params = config.rope_parameters or {}
        rope = RotaryEmbedding.from_parameters(rope_dim, params, config.max_position_embeddings)
        weight = module.kv_b_proj.weight
        new = cls(
            config.hidden_size,
            config.num_attention_heads,
            kv_rank=config.kv_lora_rank,
            nope_dim=config.qk_nope_head_dim,
            rope_dim=rope_dim,
            v_dim=config.v_head_dim,
            q_rank=config.q_lora_rank,
            rope=rope,
            scale=float(module.scaling),
            bias=bool(config.attention_bias),
            dropout=float(getattr(module, "attention_dropout", 0.0) or 0.0),
            device=weight.device,
            dtype=weight.dtype,
        )
        state = {}
        for name, value in module.state_dict().items():
            owner, _, param = name.rpartition(".")
            state[f"{TRANSFORMERS_NAMES.get(owner, owner)}.{param}"] = value
        if getattr(config, "rope_interleave", False):
            order = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
            r, nope, H = config.kv_lora_rank, config.qk_nope_head_dim, config.num_attention_heads
            q_up = "q_proj.weight" if config.q_lora_rank is None else "q_proj.2.weight"
            rows = state[q_up].view(H, nope + rope_dim, -1)
            state[q_up] = torch.cat([rows[:, :nope], rows[:, nope:][:, order]], 1).flatten(0, 1)
            for key in ("kv_down.weight", "kv_down.bias"):
                if key in state:
                    state[key] = torch.cat([state[key][:r], state[key][r:][order]])
        if unknown := sorted(set(state) - set(new.state_dict())):
            raise ValueError(  # (DeepSeek-V3.2's indexer, sinks: parts with no counterpart here)
                f"from_transformers: {type(module).__name__} has parameters "
                f"MultiHeadLatentAttention has no place for: {', '.join(unknown)}"
            )
        new.load_state_dict(state)
        return new.train(module.training)

    def new_cache(self, batch: int, max_len: int, window: int | None = None) -> KVCache:
        """A cache of latent keys [c | rope(k_rope)] (B, 1, max_len, kv_rank + rope_dim).

        Its dtype is what the projections output here: autocast's inside ``torch.autocast``.
        """
        w = self.kv_up.weight
        dtype = autocast_dtype(w)
        return KVCache(batch, 1, max_len, self.kv_rank + self.rope_dim, dtype, w.device, 0, window)

    def absorbs(self, Lq: int) -> bool:
        """Whether ``Lq`` queries over a cache run the absorbed form (fewer FLOPs).

        The other way expands every cached latent into per-head keys and values. Per
        (query, key) pair and head the absorbed form multiplies 2·kv_rank + rope_dim
        numbers, the expanded nope_dim + rope_dim + v_dim plus kv_rank·(nope_dim + v_dim)
        per key to expand it: absorbed below kv_rank·(nope + v) / (2·kv_rank − nope − v)
        queries (170 at DeepSeek-V3's sizes), so decoding steps absorb and long prompts
        do not. A symbolic ``Lq`` (torch.export, torch.compile) absorbs only where its
        range is known to be short: the expanded form serves every length.
        """
        r, nope, v = self.kv_rank, self.nope_dim, self.v_dim
        extra = 2 * r - nope - v  # absorbed minus expanded, per pair
        return extra <= 0 or surely(Lq * extra < r * (nope + v))

    def _up(self) -> tuple[Tensor, Tensor]:
        """K (H, nope_dim, kv_rank) and V (H, v_dim, kv_rank), the per-head up-projections."""
        w = self.kv_up.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = None,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from x (B, L, E) to itself (and to the cache's earlier positions).

        Args:
            x: (B, L, E).
            mask: this call's mask, combined with the module's.
            key_padding_mask: bool (B, Lk), True = padding; with a cache also over every
                position since its reset, as ``MultiHeadAttention`` takes it.
            cache: from ``new_cache``: appends this call's latent keys and attends over all
                cached ones, in the absorbed form for few queries (``absorbs``).
            need_weights: also return the weights (B, H, L, Lk).

        Returns:
            (output (B, L, E), weights or None).
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, E={self.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        H, nope, r = self.num_heads, self.nope_dim, self.kv_rank
        start = 0 if cache is None else cache.position
        q = self.q_proj(x).view(B, L, H, nope + self.rope_dim).transpose(1, 2)
        c, k_rope = self.kv_down(x).split([r, self.rope_dim], dim=-1)
        c = self.kv_norm(c)[:, None]  # (B, 1, L, r)
        q_nope = q[..., :nope]
        q_rope, k_rope = self.rope.rotate_qk(q[..., nope:], k_rope[:, None], offset=start)
        K, V = self._up()
        if cache is not None:
            latents, _, key_padding_mask = append_to_cache(
                cache, torch.cat([c, k_rope], -1), c.new_empty(B, 1, L, 0), [self.mask, mask],
                key_padding_mask,
            )  # fmt: skip
            c, k_rope = latents[..., :r], latents[..., r:]  # every cached position
        absorbed = cache is not None and self.absorbs(L)
        if absorbed:  # MQA over the latent keys [c | k_rope], values c (a view of the keys)
            k, v = latents, c
            q = torch.cat([torch.einsum("bhld,hdr->bhlr", q_nope, K), q_rope], -1)
        else:  # expanded: per-head keys [K_h·c | k_rope] and values V_h·c
            k = torch.cat([torch.einsum("bxlr,hdr->bhld", c, K), k_rope.expand(-1, H, -1, -1)], -1)
            v = torch.einsum("bxlr,hdr->bhld", c, V)
            q = torch.cat([q_nope, q_rope], -1)
        Lk = k.shape[2]
        full_mask = combine_masks([self.mask, mask], key_padding_mask, B, H, L, Lk, x.device)
        mod, scale = self.score_mod, self.scale
        drop = self.dropout if self.training else 0.0
        out = attention(
            q, k, v, mask=full_mask, score_mod=mod, scale=scale, dropout_p=drop,
            backend=self.backend,
        )  # fmt: skip
        if absorbed:  # back from latent space: V_h applied to the attended latents
            out = torch.einsum("bhlr,hdr->bhld", out, V)
        weights = None
        if check_flag("need_weights", need_weights):
            weights = attention_weights(q, k, v, mask=full_mask, score_mod=mod, scale=scale)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * self.v_dim)), weights

    def extra_repr(self) -> str:
        """Shown inside the module's repr."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kv_rank={self.kv_rank}, "
            f"nope_dim={self.nope_dim}, rope_dim={self.rope_dim}, v_dim={self.v_dim}, "
            f"q_rank={self.q_rank}, mask={self.mask!r}, backend={self.backend!r}"
        )
