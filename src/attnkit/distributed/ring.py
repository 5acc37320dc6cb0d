"""Ring attention over torch.distributed: a sequence too long for one device, split over P ranks.

Each rank keeps its queries and passes its key/value block around the ring. In step s, rank r
attends over the block of rank r - s while the block of rank r - s - 1 is already in flight
(isend/irecv overlap communication with compute). Partial results merge exactly through their
log-sum-exp. Blocks a causal or window mask leaves empty are skipped (but still passed on);
with packed documents, so are blocks that share no document with the rank's queries (the
keys' document ids travel the ring with their block). Any other mask over the whole sequence
applies to each pair of chunks as its part (``Mask.part``), and skips what it leaves empty.
Cross-attention (each rank's queries of one sequence, its keys and values of another) takes
the same path over the Lq x Lk grid.

Backward (FlashAttention-2 style) runs the ring once more: each block travels with the
gradient accumulators of its keys and values; every rank adds its queries' contribution,
computed from the global output and LSE, and after P hops the accumulators are home.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit import _validation as check
from attnkit import score_mods as mods
from attnkit._types import EMPTY, FULL, ScoreModFn, Shapes
from attnkit.backends import tiled, triton
from attnkit.backends._common import compute_dtype, first_order_only
from attnkit.distributed.layout import check_layout, check_shards, chunks_of
from attnkit.distributed.merge import merge_partials
from attnkit.functional import (
    _check_score_mod,
    _request,
    attention,
    autocast_inputs,
    autocast_off,
)
from attnkit.masks import Mask, causal, document, sliding_window
from attnkit.score_mods import ScoreMod
from attnkit.sinks import apply_sinks, check_sinks


@dataclass(frozen=True)
class _Setup:
    group: dist.ProcessGroup | None
    rank: int
    world: int
    q_length: int  # the whole sequence's queries
    k_length: int  # and keys (the same but for cross-attention)
    layout: str
    causal: bool
    window: tuple[int, int] | None
    scale: float
    backend: Literal["tiled", "triton"]  # what computes each block
    mask: Mask | None = None  # over the whole sequence, beside causal, window and documents
    score_mod: ScoreMod | ScoreModFn | None = None  # over the whole sequence
    # ``mask``'s part for each (query chunk, key chunk): one object per call, so forward and
    # backward share its tile maps
    parts: dict[tuple[int, int], Mask] = field(default_factory=dict, compare=False)

    @functools.cached_property
    def whole_score_mod(self) -> ScoreModFn | None:
        """``score_mod`` bound to the whole sequence, once per call (every block shifts it)."""
        return mods.resolve(self.score_mod, self.q_length, self.k_length)


def _pair_score_mod(s: _Setup, corner: tuple[int, int]) -> ScoreMod | ScoreModFn | None:
    """``s.score_mod`` on the block whose first query and key sit at global ``corner``.

    The kernels' mods stay in the kernels: a softcap reads no position, and ALiBi's distance
    takes the block's offset (its query i is global query q_start + i, its key j global key
    k_start + j). Any other mod is called at the global positions (``mods.resolve`` over the
    whole sequence, shifted).
    """
    kernel = mods.kernel_mods(s.score_mod)
    q_start, k_start = corner
    if kernel is not None:
        if kernel.slopes is None:
            return s.score_mod
        whole = kernel.offset_for(s.q_length, s.k_length)
        return replace(kernel, alibi_offset=whole + q_start - k_start).score_mod()
    whole_fn = s.whole_score_mod
    assert whole_fn is not None

    def fn(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return whole_fn(score, b, h, q + q_start, kv + k_start)

    return fn


def _pair_mask(
    s: _Setup,
    q_chunk: tuple[int, int],
    k_chunk: tuple[int, int],
    ids: tuple[Tensor, Tensor] | None,
) -> tuple[bool, Mask | None]:
    """(visit, mask) for global query range × key range; mask None means every pair attends.

    ``ids``: the query and key chunks' document ids (B|1, chunk length), or None.
    """
    # local query i sits at local key i + offset (the whole grid's queries aligned to the
    # end of its keys, as causal() and sliding_window() align them)
    offset = q_chunk[0] - k_chunk[0] + s.k_length - s.q_length
    mask: Mask | None = None
    if s.window is not None:
        left, right = s.window
        mask = sliding_window(left, 0 if s.causal else right, align=offset)
    elif s.causal:
        mask = causal(align=offset)
    if ids is not None:
        same_document = document(ids[0], kv_ids=ids[1])
        mask = same_document if mask is None else mask & same_document
    if s.mask is not None:
        corner = (q_chunk[0], k_chunk[0])
        if corner not in s.parts:
            s.parts[corner] = s.mask.part(s.q_length, s.k_length, *corner)
        mask = s.parts[corner] if mask is None else mask & s.parts[corner]
    if mask is None:
        return True, None
    kind = mask.kind_by_rule(q_chunk[1] - q_chunk[0], k_chunk[1] - k_chunk[0])
    return kind != EMPTY, (None if kind in (EMPTY, FULL) else mask)


def _local_slices(chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Local [start, end) of each global chunk within a rank's shard."""
    out, offset = [], 0
    for a, b in chunks:
        out.append((offset, offset + b - a))
        offset += b - a
    return out


def _exchange(s: _Setup, send: list[Tensor]) -> tuple[list[Any], list[Tensor]]:
    """Start sending ``send`` to the next rank and receiving as many tensors from the previous."""
    if s.world == 1:  # a ring of one: the block comes straight back
        return [], list(send)
    nxt = (
        dist.get_global_rank(s.group, (s.rank + 1) % s.world) if s.group else (s.rank + 1) % s.world
    )
    prv = (
        dist.get_global_rank(s.group, (s.rank - 1) % s.world) if s.group else (s.rank - 1) % s.world
    )
    recv = [torch.empty_like(t) for t in send]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, s.group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, prv, s.group) for t in recv]
    return dist.batch_isend_irecv(ops), recv


def _pairs(
    s: _Setup, src: int, q_ids: Tensor | None = None, k_ids: Tensor | None = None
) -> list[
    tuple[int, int, tuple[int, int], tuple[int, int], Mask | None, ScoreMod | ScoreModFn | None]
]:
    """Pairs of chunks to compute when this rank's queries meet rank ``src``'s block.

    ``q_ids``, ``k_ids``: the document ids (B|1, L/P) of this rank's queries and of the
    block's keys, with packed documents. Each pair is (q chunk index, k chunk index, local q
    range, local k range, mask, score_mod).
    """
    q_chunks = chunks_of(s.rank, s.world, s.q_length, s.layout)
    k_chunks = chunks_of(src, s.world, s.k_length, s.layout)
    q_local, k_local = _local_slices(q_chunks), _local_slices(k_chunks)
    todo = []
    for i, qc in enumerate(q_chunks):
        for j, kc in enumerate(k_chunks):
            (qa, qb), (ka, kb) = q_local[i], k_local[j]
            ids = None
            if q_ids is not None and k_ids is not None:
                ids = (q_ids[:, qa:qb], k_ids[:, ka:kb])
            visit, mask = _pair_mask(s, qc, kc, ids)
            if visit:
                mod = _pair_score_mod(s, (qc[0], kc[0]))
                todo.append((i, j, q_local[i], k_local[j], mask, mod))
    return todo


def _block_forward(
    s: _Setup,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | None,
    score_mod: ScoreMod | ScoreModFn | None,
) -> tuple[Tensor, Tensor]:
    """Attention of q over one block of keys, without autograd: out in q's dtype, LSE float32."""
    with torch.no_grad():
        out, lse = attention(
            q,
            k,
            v,
            mask=mask,
            score_mod=score_mod,
            scale=s.scale,
            backend=s.backend,
            return_lse=True,
        )
    return out, lse


def _block(k: Tensor, v: Tensor, ids: Tensor | None) -> list[Tensor]:
    """What travels the ring: a rank's keys and values, and their document ids if any."""
    return [k, v] if ids is None else [k, v, ids]


def _ids_of(block: list[Tensor]) -> Tensor | None:
    """The document ids of a ``_block``'s keys, or None."""
    return block[2] if len(block) == 3 else None


def _forward(
    s: _Setup, q: Tensor, k: Tensor, v: Tensor, q_ids: Tensor | None, kv_ids: Tensor | None
) -> tuple[Tensor, Tensor]:
    n_chunks = len(chunks_of(s.rank, s.world, s.q_length, s.layout))
    parts: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in range(n_chunks)]
    kv = _block(k, v, kv_ids)
    for step in range(s.world):
        src = (s.rank - step) % s.world
        pending = _exchange(s, kv) if step < s.world - 1 else None
        for i, _, (qa, qb), (ka, kb), mask, mod in _pairs(s, src, q_ids, _ids_of(kv)):
            o, lse = _block_forward(
                s, q[:, :, qa:qb], kv[0][:, :, ka:kb], kv[1][:, :, ka:kb], mask, mod
            )
            parts[i][0].append(o)
            parts[i][1].append(lse)
        if pending is not None:
            for req in pending[0]:
                req.wait()
            kv = pending[1]
    outs, lses = [], []
    for (qa, qb), (os_, ls) in zip(
        _local_slices(chunks_of(s.rank, s.world, s.q_length, s.layout)), parts, strict=True
    ):
        if os_:
            o, lse = merge_partials(os_, ls)
        else:  # no key at all for these queries
            o = q.new_zeros(*q.shape[:2], qb - qa, v.shape[-1])
            lse = torch.full(
                (*q.shape[:2], qb - qa), -math.inf, dtype=torch.float32, device=q.device
            )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _backward(
    s: _Setup,
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_ids: Tensor | None,
    kv_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    ct = compute_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=ct)
    kv = _block(k, v, kv_ids)
    dkv = [torch.zeros_like(k, dtype=ct), torch.zeros_like(v, dtype=ct)]
    block_backward = (triton if s.backend == "triton" else tiled).block_backward
    for step in range(s.world):
        src = (s.rank - step) % s.world
        pending_kv = _exchange(s, kv) if step < s.world - 1 else None
        for _, _, (qa, qb), (ka, kb), mask, mod in _pairs(s, src, q_ids, _ids_of(kv)):
            dq_p, dk_p, dv_p = block_backward(
                dout[:, :, qa:qb],
                q[:, :, qa:qb],
                kv[0][:, :, ka:kb],
                kv[1][:, :, ka:kb],
                out[:, :, qa:qb],
                lse[:, :, qa:qb],
                mask=mask,
                score_mod=mod,
                scale=s.scale,
                dlse=None if dlse is None else dlse[:, :, qa:qb],
            )
            dq[:, :, qa:qb] += dq_p
            dkv[0][:, :, ka:kb] += dk_p
            dkv[1][:, :, ka:kb] += dv_p
        # the accumulators follow their block; after P hops they are back with its owner
        reqs, dkv = _exchange(s, dkv)
        for req in reqs:
            req.wait()
        if pending_kv is not None:
            for req in pending_kv[0]:
                req.wait()
            kv = pending_kv[1]
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_ids: Tensor | None,
        kv_ids: Tensor | None,
        s: _Setup,
    ) -> tuple[Tensor, Tensor]:
        out, lse = _forward(s, q, k, v, q_ids, kv_ids)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ids, ctx.setup = (q_ids, kv_ids), s
        return out, lse

    @staticmethod
    @first_order_only("ring_attention")
    def backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = _backward(ctx.setup, dout, dlse, q, k, v, out, lse, *ctx.ids)
        return dq, dk, dv, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    mask: Mask | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    sinks: Tensor | None = None,
    document_ids: Tensor | None = None,
    kv_document_ids: Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over sequences sharded along dim 2 across the ranks of ``group``.

    Self-attention, or cross-attention: queries of one sequence (Lq) over keys of another
    (Lk; a decoder's over an encoder's), each sharded over the ranks by ``layout``. Masks,
    score mods and windows read positions in the whole Lq x Lk grid, as ``attention``'s.

    Args:
        q: this rank's queries (B, Hq, Lq/P, D), sharded by ``layout`` (see
            ``shard_sequence``).
        k: this rank's keys (B, Hkv, Lk/P, D); GQA allowed.
        v: this rank's values (B, Hkv, Lk/P, Dv).
        causal: query at global position i sees keys j <= i (j <= i + Lk - Lq: the queries
            aligned to the end of the keys, as ``masks.causal()``).
        window: FlashAttention's window_size: (left, right), or an int w for (w, 0) when
            causal and (w, w) otherwise; -1 leaves a side unbounded.
        mask: any ``Mask`` over the whole grid (Lq, Lk), its positions global (dilated,
            BigBird, global tokens, block layouts, ...), on top of ``causal``, ``window`` and
            ``document_ids``; blocks it leaves empty are skipped. (Not a tensor or BlockMask:
            every rank would need the whole L x L.)
        score_mod: as ``attention``'s, over the whole sequence (positions global): ALiBi,
            relative biases, any ``fn(score, b, h, q, kv)``. ALiBi and softcap run in the
            blocks' kernels (ALiBi at each block's offset); other mods are called at each
            block's global positions, which the tiled backend's PyTorch loops do (and
            Triton's kernels do not: "auto" then computes the blocks on tiled). Gradients do
            not reach a mod's parameters: learnable ones are refused.
        scale: default 1/sqrt(D).
        group: the process group (default: the world).
        layout: "zigzag" (balanced causal work: chunks r and 2P-1-r of 2P) or "contiguous".
        sinks: attention-sink logits (Hq,), the same on every rank (``attnkit.sinks``),
            applied to the merged output. Each rank's gradient covers its own queries: sum
            it over ranks, as for any replicated parameter.
        document_ids: packed documents: this rank's shard (sharded as q is, along its last
            dim) of the global sequence's document ids, (Lq/P,) or (B, Lq/P), integers. A
            query sees only keys of its own document (``masks.document``), on top of
            ``causal`` and ``window``; blocks that share no document with a rank's queries
            are skipped.
        kv_document_ids: the keys' document ids, sharded as k is, (Lk/P,) or (B, Lk/P):
            for cross-attention over packed pairs (default: ``document_ids``, which
            self-attention's keys share).
        backend: what computes each block, forward and backward: "tiled" (any device; its
            compiled kernels on CPU), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), or
            "auto": triton on CUDA tensors it supports, tiled otherwise.
        return_lse: also return the LSE (B, Hq, L/P) of this rank's queries.

    Returns:
        this rank's output (B, Hq, Lq/P, Dv) (and LSE). Gradients flow to q, k and v.
    """
    q, k, v = autocast_inputs(q, k, v)
    shapes = check_shards(q, k, v, "ring_attention", cross=True)
    if shapes.no_pairs:
        raise ValueError(
            f"ring_attention needs a batch and a shard of at least one position, got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q_ids, kv_ids = _both_document_ids(document_ids, kv_document_ids, q, k, shapes)
    # shapes that travel the ring must agree on every rank (on q's device: NCCL takes no CPU)
    rows = [0 if ids is None else ids.shape[0] for ids in (q_ids, kv_ids)]
    mine = torch.tensor([shapes.Lq, shapes.Lk, *rows], device=q.device)
    agreed = torch.cat([mine, -mine])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    most, fewest = agreed[:4].tolist(), (-agreed[4:]).tolist()
    if most[:2] != fewest[:2]:
        raise ValueError(
            f"every rank must hold the same shard lengths (queries, keys); they range from "
            f"{tuple(fewest[:2])} to {tuple(most[:2])} (rank {rank} has "
            f"{(shapes.Lq, shapes.Lk)})"
        )
    if most[2:] != fewest[2:]:
        raise ValueError(
            "document_ids (and kv_document_ids) must be given on every rank or none, each of "
            f"the same shape; ranks have from {fewest[2:]} to {most[2:]} rows of ids (0: none; "
            f"rank {rank} has {rows})"
        )
    q_length, k_length = shapes.Lq * world, shapes.Lk * world
    check_layout(layout, q_length, world)
    check_layout(layout, k_length, world)
    win = window_sides(window, causal)
    setup = _Setup(
        group,
        rank,
        world,
        q_length,
        k_length,
        layout,
        causal,
        win,
        check.check_scale(scale, shapes.D),
        _block_backend(backend, q, k, v, _learning_nothing(score_mod, shapes)),
        _whole_sequence_mask(mask, q_length, "ring_attention", k_length),
        score_mod,
    )
    if sinks is not None:
        check_sinks(sinks, shapes.Hq, q.device)
    check.check_flag("return_lse", return_lse)
    with autocast_off(q):
        out, lse = _RingAttention.apply(  # type: ignore[no-untyped-call]
            q, k, v, q_ids, kv_ids, setup
        )
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def window_sides(window: int | tuple[int, int] | None, causal: bool) -> tuple[int, int] | None:
    """FlashAttention's window_size (left, right) from ``window=``, or None.

    An int w is (w, 0) when causal and (w, w) otherwise; each side a non-negative int or -1
    (unbounded).
    """
    if window is None:
        return None
    pair = (window, 0 if causal else window) if isinstance(window, int) else tuple(window)
    return check.check_window("window left", pair[0]), check.check_window("window right", pair[1])


def _whole_sequence_mask(
    mask: object, length: int, caller: str, k_length: int | None = None
) -> Mask | None:
    """``mask`` if it is a Mask whose parts ``caller`` can take (or None), else ValueError.

    ``length`` x ``k_length`` (default: ``length``): the whole grid of queries and keys.
    """
    if mask is None:
        return None
    if isinstance(mask, Mask):
        # refuses, before any block travels, a rule that answers for whole grids only
        mask.part(length, length if k_length is None else k_length, 0, 0)
        return mask
    raise ValueError(
        f"{caller} takes a Mask over the whole sequence (attnkit.masks), got "
        f"{type(mask).__name__}: a bool tensor or BlockMask would need the whole L x L on "
        "every rank (causal= and window= take the common cases)"
    )


def _learning_nothing(
    score_mod: ScoreMod | ScoreModFn | None, shapes: Shapes
) -> ScoreMod | ScoreModFn | None:
    """``score_mod`` if it fits q's heads and has no parameter that learns, else an error."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(
            "score_mod must be a ScoreMod or fn(score, b, h, q, kv), got "
            f"{type(score_mod).__name__}"
        )
    _check_score_mod(score_mod, shapes)
    if mods.learns(score_mod):
        raise ValueError(
            f"ring_attention does not differentiate score_mod parameters, and {score_mod!r} "
            "has some that require grad (detach them, or use attention on one process)"
        )
    return score_mod


def _block_backend(
    backend: str, q: Tensor, k: Tensor, v: Tensor, score_mod: object
) -> Literal["tiled", "triton"]:
    """The backend that computes the ring's blocks, or ValueError saying why it cannot."""
    if backend not in ("auto", "tiled", "triton"):
        raise ValueError(f"backend must be 'auto', 'tiled' or 'triton', got {backend!r}")
    if backend == "tiled":
        return "tiled"
    # the blocks' masks are chunks of causal, window and document masks, all of which the
    # kernels take; their score_mods are kernel ones for ALiBi (at each block's offset) and
    # softcap
    why = triton.unsupported_reason(_request(q, k, v, None, None, None, 0.0, None, False))
    if why is None and mods.kernel_mods(score_mod) is None:
        why = (
            "a score_mod other than ALiBi and softcap is called at each block's global "
            "positions, which the kernels do not do (backend='tiled' does)"
        )
    if backend == "triton" and why is not None:
        raise ValueError(f"ring_attention backend='triton' cannot serve these inputs: {why}")
    return "triton" if why is None and (backend == "triton" or q.device.type == "cuda") else "tiled"


def _both_document_ids(
    ids: Tensor | None, kv_ids: Tensor | None, q: Tensor, k: Tensor, shapes: Shapes
) -> tuple[Tensor | None, Tensor | None]:
    """The queries' and the keys' document ids as (B|1, ·) int64 shards, or (None, None)."""
    if ids is None:
        if kv_ids is not None:
            raise ValueError("kv_document_ids needs document_ids (the queries' ids)")
        return None, None
    if kv_ids is None:
        if shapes.Lq != shapes.Lk:
            raise ValueError(
                f"cross-attention over packed documents takes the keys' ids as "
                f"kv_document_ids: queries and keys hold {shapes.Lq} and {shapes.Lk} positions"
            )
        kv_ids = ids
    return (
        _document_ids(ids, q, shapes.B, shapes.Lq),
        _document_ids(kv_ids, k, shapes.B, shapes.Lk, "kv_document_ids", "k"),
    )


def _document_ids(
    ids: Tensor, x: Tensor, B: int, length: int, name: str = "document_ids", of: str = "q"
) -> Tensor:
    """``ids`` as (B|1, L/P) int64 on x's device, or ValueError naming the shapes."""
    if not isinstance(ids, Tensor) or ids.dtype == torch.bool or ids.is_floating_point():
        what = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor, got {what}")
    shard = ids[None] if ids.dim() == 1 else ids
    if shard.dim() != 2 or shard.shape[0] not in (1, B) or shard.shape[1] != length:
        raise ValueError(
            f"{name} must be this rank's shard of the ids, ({length},) or ({B}, {length})"
            f" for {of} {tuple(x.shape)}; got {tuple(ids.shape)}"
        )
    return shard.to(x.device, torch.int64)
