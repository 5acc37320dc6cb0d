"""Differential attention (DIFF Transformer, Ye et al. 2024; transformers' DiffLlama).

Each head computes two softmax maps from two query/key pairs and subtracts one from the other,
(softmax(Q1·K1ᵀ·s) − λ·softmax(Q2·K2ᵀ·s))·V, so attention both maps give to irrelevant
context (the "noise" a single softmax cannot set to zero) cancels. λ is learned per layer as
exp(λq1·λk1) − exp(λq2·λk2) + λ_init; each head's output is RMS-normalised and scaled by
1 − λ_init before W0.

Shape legend: B batch, L length, E model width, h differential heads, g kv heads, d query/key
width of one map, 2d value width of a head (h · 2d = E by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import masks
from attnkit._validation import check_flag, check_int
from attnkit.backends._common import MaskLike
from attnkit.functional import BackendName, attention, attention_weights, autocast_dtype
from attnkit.masks import Mask
from attnkit.nn.attention import append_to_cache, combine_masks
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rope import RotaryEmbedding


def lambda_init(depth: int) -> float:
    """The paper's λ_init for the layer ``depth`` layers from the input.

    0.8 − 0.6·e^(−0.3·depth): deeper layers subtract more of their second map.
    """
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DifferentialAttention(nn.Module):
    """Self-attention with differential heads (two softmax maps per head, one subtracted).

    The projections keep transformers' DiffLlama layout: ``q_proj`` gives 2h query heads of
    width d (the h first maps' queries, then the h second maps'), ``k_proj`` 2g key heads
    likewise, ``v_proj`` 2g heads of width d, of which head j and head g + j form the 2d-wide
    value of kv head j. Queries share kv heads in groups of h / g, as in grouped-query attention.

    Args:
        embed_dim: E.
        num_heads: h, differential heads.
        num_kv_heads: g (divides h); default h.
        head_dim: d; default E / (2h).
        depth: the layer's index from the input (0 first), which sets λ_init.
        lambda_std: standard deviation of the λ vectors' initial values (0.1 as DiffLlama).
        mask: a mask applied on every call (e.g. ``masks.causal()``), combined with the call's.
        rope: a ``RotaryEmbedding`` of d applied to both maps' queries and keys.
        bias: biases in the four projections.
        eps: of the per-head RMS norm.
        scale: softmax scale; default 1/sqrt(d).
        backend: attention backend (see ``attnkit.attention``).

    Shapes:
        x (B, L, E); output (B, L, E); weights (B, h, L, Lk), the differential map
        A1 − λ·A2 (rows sum to 1 − λ).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        depth: int = 0,
        lambda_std: float = 0.1,
        mask: Mask | None = None,
        rope: RotaryEmbedding | None = None,
        bias: bool = False,
        eps: float = 1e-5,
        scale: float | None = None,
        backend: BackendName = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        check_int("depth", depth, least=0)
        kv_heads = check_int("num_kv_heads", num_kv_heads or num_heads)
        if num_heads % kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
        if head_dim is None and embed_dim % (2 * num_heads):
            raise ValueError(
                f"embed_dim {embed_dim} is not divisible by 2 · num_heads = {2 * num_heads}; "
                f"give head_dim"
            )
        d = embed_dim // (2 * num_heads) if head_dim is None else check_int("head_dim", head_dim)
        if rope is not None and rope.head_dim != d:
            raise ValueError(f"rope head_dim {rope.head_dim} != head_dim {d}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = (
            embed_dim, num_heads, kv_heads, d,
        )  # fmt: skip
        self.lambda_init = lambda_init(depth)
        self.mask, self.rope, self.scale, self.backend = mask, rope, scale, backend
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, 2 * num_heads * d, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, 2 * kv_heads * d, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, 2 * kv_heads * d, bias=bias, **kw)
        self.out_proj = nn.Linear(2 * num_heads * d, embed_dim, bias=bias, **kw)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(d, **kw) * lambda_std) for _ in range(4)
        )
        self.norm = nn.RMSNorm(2 * d, eps=eps, elementwise_affine=False, **kw)

    def lambda_(self) -> Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, a scalar (at least float32)."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        q1, k1, q2, k2 = (
            p.to(dtype) for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2)
        )
        return torch.exp(q1 @ k1) - torch.exp(q2 @ k2) + self.lambda_init

    def new_cache(self, batch: int, max_len: int, window: int | None = None) -> KVCache:
        """A cache of keys [K1 | K2] and values [V1 | V2], (B, g, max_len, 2d) each.

        Its dtype is what the projections output here: autocast's inside ``torch.autocast``.
        """
        w = self.k_proj.weight
        dtype = autocast_dtype(w)
        return KVCache(
            batch, self.num_kv_heads, max_len, 2 * self.head_dim, dtype, w.device, None, window
        )

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
            mask: this call's mask (True = attend), combined with the module's.
            key_padding_mask: bool (B, Lk), True = padding; with a cache also over every
                position since its reset, as ``MultiHeadAttention`` takes it.
            cache: from ``new_cache``; appends this call's keys and values and attends over
                every cached one (positions continue from ``cache.position``).
            need_weights: also return the differential weights A1 − λ·A2 (B, h, L, Lk).

        Returns:
            (output (B, L, E), weights or None).
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, E={self.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        start = 0 if cache is None else cache.position
        q = self.q_proj(x).view(B, L, 2 * h, d).transpose(1, 2)
        k = self.k_proj(x).view(B, L, 2 * g, d).transpose(1, 2)
        if self.rope is not None:
            q, k = self.rope.rotate_qk(q, k, offset=start)
        # kv head j: keys [K1_j | K2_j] and value [V_j | V_{g+j}], each (B, g, L, 2d)
        k = torch.cat([k[:, :g], k[:, g:]], dim=-1)
        v = self.v_proj(x).view(B, L, 2, g, d).permute(0, 3, 1, 2, 4).reshape(B, g, L, 2 * d)
        if cache is not None:
            k, v, key_padding_mask = append_to_cache(
                cache, k, v, [self.mask, mask], key_padding_mask
            )
        full_mask = combine_masks(
            [self.mask, mask], key_padding_mask, B, h, L, k.shape[2], x.device
        )
        maps = [(q[:, :h], k[..., :d]), (q[:, h:], k[..., d:])]  # (queries, keys) per map
        first, second = (
            attention(qm, km, v, mask=full_mask, scale=self.scale, backend=self.backend)
            for qm, km in maps
        )
        lam = self.lambda_().to(first.dtype)
        out = self.norm(first - lam * second) * (1 - self.lambda_init)  # (B, h, L, 2d)
        weights = None
        if check_flag("need_weights", need_weights):
            a1, a2 = (
                attention_weights(qm, km, v, mask=full_mask, scale=self.scale) for qm, km in maps
            )
            weights = a1 - lam * a2
        return self.out_proj(out.transpose(1, 2).reshape(B, L, 2 * h * d)), weights

    @classmethod
    def from_transformers(cls, module: Any) -> DifferentialAttention:
        """The same attention as a transformers ``DiffLlamaAttention``, weights copied.

        Causal; rotary positions from its config's ``rope_parameters``.
        """
        config = module.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % 2 or kv_heads % 2:
            raise ValueError(
                f"DiffLlama pairs its heads: num_attention_heads {heads} and "
                f"num_key_value_heads {kv_heads} must be even"
            )
        d = int(module.head_dim)
        weight = module.q_proj.weight
        new = cls(
            module.q_proj.in_features,
            heads // 2,
            num_kv_heads=kv_heads // 2,
            head_dim=d,
            mask=masks.causal(),
            rope=RotaryEmbedding.from_parameters(
                d, dict(config.rope_parameters or {}), config.max_position_embeddings
            ),
            bias=module.q_proj.bias is not None,
            eps=float(module.groupnorm.eps or 1e-6),
            scale=None if module.scaling == d**-0.5 else float(module.scaling),
            device=weight.device,
            dtype=weight.dtype,
        )
        new.lambda_init = float(module.lambda_init)
        theirs = {"o_proj": "out_proj", "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj"}
        with torch.no_grad():
            for name, ours in theirs.items():
                getattr(new, ours).load_state_dict(getattr(module, name).state_dict())
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(new, name).copy_(getattr(module, name))
        return new.train(module.training)

    def extra_repr(self) -> str:
        """Shown inside the module's repr."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"lambda_init={self.lambda_init:.3g}, mask={self.mask!r}, backend={self.backend!r}"
        )
