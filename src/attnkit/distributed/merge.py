"""Exact merging of attention results computed over disjoint sets of keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.backends._common import compute_dtype


def merge_partials(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine partial attentions of the same queries over disjoint key sets.

    With lse = log Σ_i exp(lse_i), the whole is Σ_i exp(lse_i - lse) · out_i: each part's
    softmax is rescaled to the common denominator. Parts with lse = -inf (no key) weigh 0.

    Args:
        outs: each (B, H, L, Dv).
        lses: each (B, H, L), natural log.

    Returns:
        out (B, H, L, Dv) in the dtype of ``outs[0]``, lse (B, H, L) float32 (float64 in).
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    ct = compute_dtype(lses[0].dtype)
    out, lse = merge_stacked(torch.stack([o.to(ct) for o in outs]), torch.stack(list(lses)))
    return out.to(outs[0].dtype), lse


def merge_stacked(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """``merge_partials`` of S parts stacked along dim 0, in a handful of operations for any S.

    The split-KV decoding forward merges up to 128 parts: a pair of operations per part
    would cost more GPU kernel launches than the attention itself.

    Args:
        outs: (S, B, H, L, Dv).
        lses: (S, B, H, L), natural log.

    Returns:
        out (B, H, L, Dv) in the dtype of ``outs``, lse (B, H, L) float32 (float64 in).
    """
    lses = lses.to(compute_dtype(lses.dtype))
    lse = torch.logsumexp(lses, dim=0)
    # exp(-inf - -inf) is NaN: a part with no key contributes nothing
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - safe)
    out = torch.einsum("sbhl,sbhld->bhld", weights, outs.to(weights.dtype))
    return out.to(outs.dtype), lse
