"""Beam search over a KV-cached decoder: the K most probable continuations kept at each step.

Shape legend: B batch (sources or prompts), K beams per row, N = B·K decoding rows (row b's
beams are rows b·K .. b·K + K - 1), V vocabulary, T tokens generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit._validation import check_int
from attnkit.nn.kv_cache import KVCache


class Decoding(NamedTuple):
    """A decoder part-way through its rows (N): what beam search drives."""

    #: (N, V) the next-token logits after what each row was fed so far
    logits: Tensor
    #: ``step(tokens (N,), t)`` feeds token t of every row's continuation to its caches and
    #: returns the logits (N, V) that follow it
    step: Callable[[Tensor, int], Tensor]
    #: ``reorder(index (N,))``: row i continues as row ``index[i]`` (``KVCache.reorder``)
    reorder: Callable[[Tensor], None]


def padding_upto(padding: Tensor | None, end: int) -> Tensor | None:
    """``padding`` (N, ·) over positions 0 .. end - 1, or None."""
    return None if padding is None else padding[:, :end]


def over_caches(
    feed: Callable[[Tensor, int, Tensor | None], Tensor],
    caches: Sequence[KVCache],
    padding: Tensor | None,
    fed: int,
    logits: Tensor,
) -> Decoding:
    """The ``Decoding`` of a decoder whose ``caches`` hold ``fed`` positions of every row.

    ``feed(ids (N, 1), start, padding so far)`` runs the decoder over the caches and returns
    the next logits (N, V); ``padding`` (N, fed + new) bool, True = pad, over the whole text,
    or None; ``logits`` (N, V): those after the fed positions. Reordering moves the caches'
    rows and the padding's.
    """

    def step(token: Tensor, t: int) -> Tensor:  # token t of the continuation in, logits out
        return feed(token[:, None], fed + t, padding_upto(padding, fed + t + 1))

    def reorder(index: Tensor) -> None:  # row i continues as row index[i]
        nonlocal padding
        for cache in caches:
            cache.reorder(index)
        padding = None if padding is None else padding[index]

    return Decoding(logits, step, reorder)


class Beams(NamedTuple):
    """Each row's K continuations, best first, and their scores."""

    tokens: Tensor  # (B, K, T): after its end token, a finished continuation holds fill_id
    scores: Tensor  # (B, K) float32: log-probability / length ** length_penalty; -inf: none


def check_search(num_beams: int, max_new_tokens: int, length_penalty: float) -> None:
    """Refuse bad search arguments by name, before any decoding is done."""
    check_int("num_beams", num_beams)
    check_int("max_new_tokens", max_new_tokens, least=0)
    if isinstance(length_penalty, bool) or not (
        isinstance(length_penalty, int | float) and math.isfinite(length_penalty)
    ):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")


def beam_search(
    decoding: Decoding,
    *,
    num_beams: int,
    max_new_tokens: int,
    end_id: int | None,
    fill_id: int,
    length_penalty: float = 1.0,
) -> Beams:
    """The continuations of highest log-probability / length ** length_penalty found.

    Args:
        decoding: N = B·K rows, the K of a batch row fed alike so far.
        num_beams: K.
        max_new_tokens: the most tokens a continuation gets.
        end_id: the token that finishes a continuation (kept in it); None: none does.
        fill_id: what a finished continuation holds after its end, at no cost in score.
        length_penalty: the exponent of the length a score is divided by: 0 ranks by
            log-probability alone (which favours short continuations), 1 per token.

    A finished continuation stays among the beams with its log-probability frozen and
    competes with the unfinished ones; the search stops when all K of every row have
    finished, or after ``max_new_tokens``. With K = 1 it is greedy decoding. Where fewer
    than K continuations exist (K > V at the first step), the rest score -inf.
    """
    check_search(num_beams, max_new_tokens, length_penalty)
    logits, step, reorder = decoding
    N, V = logits.shape
    K = num_beams
    if N % K:
        raise ValueError(f"beam_search: {N} decoding rows are not num_beams={K} per batch row")
    for name, token_id in (("end_id", end_id), ("fill_id", fill_id)):
        if token_id is not None and not 0 <= token_id < V:
            raise ValueError(f"beam_search: {name} {token_id} is not a token of the {V} logits")
    B = N // K
    device = logits.device
    # The K rows of a batch row start alike: only the first may expand, or the first step
    # would fill the beams with K copies of the same best token.
    log_probs = torch.zeros(B, K, device=device)
    log_probs[:, 1:] = float("-inf")
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, K, device=device)
    tokens = torch.empty(B, K, 0, dtype=torch.long, device=device)
    # a finished beam's only continuation: fill_id, at log-probability 0
    frozen = torch.full((V,), float("-inf"), device=device)
    frozen[fill_id] = 0.0
    first_row = torch.arange(B, device=device)[:, None] * K
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, K, V)
        logp = torch.where(finished[..., None], frozen, logp)
        log_probs, flat = (log_probs[..., None] + logp).view(B, K * V).topk(K, dim=-1)
        beam, token = flat // V, flat % V
        tokens = torch.cat(
            [tokens.gather(1, beam[..., None].expand(-1, -1, t)), token[..., None]], 2
        )
        finished, lengths = finished.gather(1, beam), lengths.gather(1, beam)
        lengths += ~finished
        if end_id is not None:
            finished |= token == end_id
        if bool(finished.all()) or t + 1 == max_new_tokens:
            break
        reorder((first_row + beam).flatten())
        logits = step(token.flatten(), t)
    scores, order = (log_probs / lengths.clamp(min=1) ** length_penalty).sort(
        dim=1, descending=True
    )
    return Beams(tokens.gather(1, order[..., None].expand_as(tokens)), scores)
