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
    stacked = torch.stack([lse.to(ct) for lse in lses])
    lse = torch.logsumexp(stacked, dim=0)
    # exp(-inf - -inf) is NaN: a part with no key contributes nothing
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(stacked - safe)
    out = sum(w.unsqueeze(-1) * o.to(ct) for w, o in zip(weights, outs, strict=True))
    assert isinstance(out, Tensor)
    return out.to(outs[0].dtype), lse
