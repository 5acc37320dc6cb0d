"""The reference backend: the spec of attention, written to be obviously right.

It materialises the (B, Hq, Lq, Lk) scores, computes softmax in float32 (float64 for float64
inputs), and defines the conventions every fast path is tested against:

* fully masked rows give an all-zero output row and LSE = -inf, never NaN;
* NaN in q or k makes every row whose scores it reaches NaN (the softmax's normaliser is NaN);
* dropout uses the counter-based mask of ``attnkit._dropout``;
* LSE is the natural-log log-sum-exp of the scaled, modified, masked scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit import _dropout
from attnkit.backends._common import Request, compute_dtype, dense_mask, index_grid, repeat_kv

NAME = "reference"


def unsupported_reason(req: Request) -> str | None:
    """The reference backend does every request (at O(Lq·Lk) memory)."""
    return None


def probabilities(req: Request) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (B, Hq, Lq, Lk) and LSE (B, Hq, Lq), both in the compute dtype."""
    s = req.shapes
    compute = compute_dtype(req.q.dtype)
    q = req.q.to(compute)
    k = repeat_kv(req.k.to(compute), s.Hq // s.Hkv)
    scores = (q @ k.transpose(-1, -2)) * req.scale
    if req.score_mod is not None:
        scores = req.score_mod(scores, *index_grid(s, scores.device))
    allowed = dense_mask(req.mask, s, scores.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; subtracting 0 instead keeps exp() at exactly 0.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    # only a row with no key has sum 0; a NaN sum (NaN scores) must make the whole row NaN
    probs = p / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    lse = (row_max + torch.log(row_sum)).squeeze(-1)
    return probs, lse


def run(req: Request) -> tuple[Tensor, Tensor]:
    """Output (B, Hq, Lq, Dv) in q's dtype and LSE (B, Hq, Lq) float32 (float64 for float64)."""
    s = req.shapes
    probs, lse = probabilities(req)
    if req.seed is not None:
        keep = _dropout.keep_mask(req.seed, req.dropout_p, *index_grid(s, probs.device))
        probs = probs * keep / (1.0 - req.dropout_p)
    v = repeat_kv(req.v.to(probs.dtype), s.Hq // s.Hkv)
    out = probs @ v
    lse = lse if lse.dtype == torch.float64 else lse.float()
    return out.to(req.q.dtype), lse
