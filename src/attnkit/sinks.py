"""Attention sinks: one learned logit per head that joins every softmax row and carries no value.

gpt-oss gives each head a logit s_h that competes in the softmax with the row's scores, as if
every query also saw one extra key with score s_h and value 0 ("off-by-one" softmax): a head
can give weight to nothing instead of piling it onto some token, and rows no longer have to
sum to 1 over the real keys. The sink is not a key, so it needs no mask, position or cache
slot.

It needs no kernel either. Given a row's output and log-sum-exp over its real keys, the sink
changes them to

    out' = out · σ(lse − s_h)        σ(lse − s_h) = e^lse / (e^lse + e^s_h), the real keys' share
    lse' = logaddexp(lse, s_h)

so every backend that returns the LSE serves it, and gradients reach q, k, v (through out and
lse) and s_h by autograd through these two lines. A row with no key keeps out = 0 and gets
lse' = s_h.

Shape legend: out (B, Hq, Lq, Dv), lse (B, Hq, Lq), sinks (Hq,), probabilities (B, Hq, Lq, Lk).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_sinks(sinks: object, Hq: int, device: torch.device) -> None:
    """``sinks`` must be a floating (Hq,) tensor on q's device."""
    if not isinstance(sinks, Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape (Hq,), got {type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
    if tuple(sinks.shape) != (Hq,):
        raise ValueError(
            f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, "
            f"got {tuple(sinks.shape)}"
        )
    if sinks.device != device:
        raise ValueError(f"sinks must be on q's device {device}, got {sinks.device}")


def _real_key_share(lse: Tensor, sinks: Tensor) -> Tensor:
    """σ(lse − s_h) (B, Hq, Lq) in lse's dtype: the probability mass left on the real keys.

    A row with no key under a sink of -inf (a head without one) has lse − s_h = -inf + inf:
    its share is 0, not NaN (and a `where` before the sigmoid keeps NaN out of gradients).
    """
    gap = lse - sinks.to(lse.dtype)[:, None]
    return torch.sigmoid(torch.where(gap.isnan() & lse.isneginf(), -torch.inf, gap))


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Add one sink logit per head to attention already computed over the real keys.

    Args:
        out: attention output (B, Hq, Lq, Dv), any dtype.
        lse: its log-sum-exp (B, Hq, Lq), float32 or float64 (-inf for a row with no key).
        sinks: logits (Hq,).

    Returns:
        out' (B, Hq, Lq, Dv) in out's dtype and lse' (B, Hq, Lq) in lse's dtype.
    """
    share = _real_key_share(lse, sinks)
    scaled = (out.to(lse.dtype) * share[..., None]).to(out.dtype)
    return scaled, torch.logaddexp(lse, sinks.to(lse.dtype)[:, None])


def sink_probabilities(probs: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Softmax probabilities over the real keys (B, Hq, Lq, Lk) rescaled for the sinks.

    Each row then sums to σ(lse − s_h) < 1; the rest is the weight given to the sink.
    """
    return probs * _real_key_share(lse, sinks).to(probs.dtype)[..., None]
