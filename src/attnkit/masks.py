"""Masks: which keys each query may attend to, as predicates plus exact per-tile rules.

A ``Mask`` is a recipe that, bound to lengths (Lq, Lk), gives

* a predicate ``fn(b, h, q_idx, kv_idx) -> bool tensor`` (True = attend) over broadcasting
  index tensors, as FlexAttention's ``mask_mod``; and
* a tile rule that says, for every (q-tile, kv-tile) pair at once, whether *any* and whether
  *all* of its positions attend. For built-in patterns the rule is exact and analytic, so a
  BlockMask for 65,536 tokens builds without evaluating N² points.

Positions line up bottom-right (query i sits at key i + Lk - Lq, as FlashAttention >= 2.1
and KV-cache decoding need); pass ``align="top_left"`` for SDPA's ``is_causal`` convention.

Example:
    >>> from attnkit import masks
    >>> m = masks.sliding_window(2) | masks.global_tokens([0])
    >>> m.dense(5, 5)[0, 0].int()
    tensor([[1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 0, 1, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec

import torch
from torch import Tensor

from attnkit import _validation as check
from attnkit._types import EMPTY, FULL, PARTIAL, MaskFn
from attnkit.block_mask import BlockMask, count_attended, refine_partial_tiles

#: ``rule(q_lo, q_hi, k_lo, k_hi, B, H) -> (any, all)``: q_lo/q_hi (nQ, 1) and k_lo/k_hi (1, nK)
#: are the first/last index of each tile; results broadcast to (B|1, H|1, nQ, nK).
TileRule = Callable[[Tensor, Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor]]

__all__ = [
    "BlockMask",
    "Mask",
    "band",
    "bigbird",
    "block_sparse",
    "causal",
    "custom",
    "dilated",
    "document",
    "fixed",
    "from_dense",
    "from_padding_mask",
    "from_spec",
    "full",
    "global_tokens",
    "key_padding",
    "key_ranges",
    "lookback",
    "padded_band",
    "padded_ranges",
    "prefix_lm",
    "sliding_window",
    "strided",
]


#: How many BlockMasks (different lengths / tile sizes / devices) a Mask keeps: the triton
#: kernels walk three tile sizes per shape.
_BLOCKS_CACHE_SIZE = 16
# _build_blocks reads a tile's any() as int8 directly: False/True must be EMPTY/PARTIAL
assert (EMPTY, PARTIAL) == (0, 1)

#: BlockMasks of masks that a plain spec describes, shared by every mask with that spec: each
#: layer of a model makes its own ``masks.causal()``, and ``a & b`` is a new Mask at every
#: call, yet all of them need the same tiles (decoding needs new ones at every step).
_SHARED_BLOCKS: OrderedDict[tuple[Any, ...], BlockMask] = OrderedDict()
_SHARED_BLOCKS_SIZE = 64


def _plain_key(spec: object) -> object | None:
    """A spec of strings, numbers and sequences of them as a hashable key, else None.

    Equal keys mean equal masks. Specs holding tensors (document ids, layouts, dense masks)
    compare by identity, so the masks made from them cache on their own.
    """
    if isinstance(spec, tuple | list):
        parts = [_plain_key(part) for part in spec]
        return None if any(p is None for p in parts) else (type(spec).__name__, *parts)
    return spec if isinstance(spec, str | int | float) else None


@dataclass(frozen=True)
class BoundMask:
    """A mask bound to lengths: its predicate, its tile rule, and whether the rule is exact.

    ``any_ranges``: the rule answers for any ranges of queries and keys within the grid, not
    only for a grid of equal tiles from (0, 0) (what ``Mask.part`` needs).
    """

    fn: MaskFn
    tiles: TileRule
    exact: bool
    any_ranges: bool = False


class Mask:
    """A named mask pattern, combinable with ``&``, ``|`` and ``~``.

    Args:
        name: readable description, shown by ``repr``.
        bind: ``bind(Lq, Lk) -> BoundMask``; patterns whose meaning depends on the lengths
            (bottom-right alignment, BigBird's random blocks) resolve them here.
        batch: the batch size the mask is tied to (e.g. per-sequence padding), or None.
        heads: the head count the mask is tied to (e.g. a per-head layout), or None.
        spec: how a built-in pattern was made, so ``from_spec`` can rebuild it and backends can
            recognise it: the factory's name and its arguments in signature order, e.g.
            ("causal", align) or ("sliding_window", left, right, align); ("&", spec_a, spec_b),
            ("|", …) and ("~", spec) for combinations; None for ``custom`` masks.
    """

    def __init__(
        self,
        name: str,
        bind: Callable[[int, int], BoundMask],
        *,
        batch: int | None = None,
        heads: int | None = None,
        spec: tuple[Any, ...] | None = None,
    ) -> None:
        self.name = name
        self._bind = bind
        self.batch = batch
        self.heads = heads
        self.spec = spec  # also sets _shared_key (see the property)
        # blocks() results by arguments: every layer and step that reuses this mask object
        # skips the tile classification and the partial tiles' bitmaps (~10 ms at 16k tokens)
        self._blocks_cache: OrderedDict[tuple[Any, ...], BlockMask] = OrderedDict()
        # padded_ranges by (Lq, Lk), kept by the tiled backend for the calls sharing this mask,
        # and the triton backend's ranges and tile walks made from them (keys start with a name)
        self._ranges_cache: dict[tuple[Any, ...], Any] = {}

    @property
    def spec(self) -> tuple[Any, ...] | None:
        """How a built-in pattern was made (see the class docstring); None for custom masks."""
        return self._spec

    @spec.setter
    def spec(self, value: tuple[Any, ...] | None) -> None:
        self._spec = value
        self._shared_key = _plain_key(value)  # once, not at every blocks() call
        # padded_band of the last (Lq, Lk) the tiled backend asked for (dispatch, the kernels'
        # arguments and every layer sharing the mask ask alike), found from the spec
        self._band_cache: tuple[tuple[int, int], Any] | None = None

    @property
    def shares_tiles(self) -> bool:
        """Whether equal masks share this one's tile maps.

        True when its spec is plain (no tensors, no custom predicate): a mask made anew at
        every call then finds its tile maps built.
        """
        return self._shared_key is not None

    def bind(self, Lq: int, Lk: int) -> BoundMask:
        """Resolve the pattern for query length Lq and key length Lk."""
        check.check_int("Lq", Lq)
        check.check_int("Lk", Lk)
        return self._bind(Lq, Lk)

    def __repr__(self) -> str:
        return self.name

    def part(self, Lq: int, Lk: int, q_start: int, k_start: int) -> Mask:
        """The part of this mask over an Lq × Lk grid from query q_start and key k_start on.

        A mask of its own, its positions counted from the part's corner (ring attention's
        blocks of one long sequence): bound to the part's lengths, it answers as this mask
        bound to (Lq, Lk) does at the shifted positions, tile rule included.
        """
        for name, n in (("Lq", Lq), ("Lk", Lk)):
            check.check_int(name, n)
        for name, n in (("q_start", q_start), ("k_start", k_start)):
            check.check_int(name, n, least=0)
        whole = self.bind(Lq, Lk)
        if not whole.any_ranges:
            raise ValueError(
                f"{self.name} finds its tiles for a whole grid only, not for a part of it "
                "(documents, padding from a tensor, key ranges and dense masks; for documents "
                "ring_attention takes document_ids=)"
            )

        def bind(lq: int, lk: int) -> BoundMask:
            if q_start + lq > Lq or k_start + lk > Lk:
                raise ValueError(
                    f"{lq} queries from {q_start} and {lk} keys from {k_start} do not fit the "
                    f"{Lq} x {Lk} grid of {self.name}"
                )

            def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                return whole.fn(b, h, q + q_start, kv + k_start)

            def tiles(
                q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
            ) -> tuple[Tensor, Tensor]:
                return whole.tiles(
                    q_lo + q_start, q_hi + q_start, k_lo + k_start, k_hi + k_start, B, H
                )

            return BoundMask(fn, tiles, whole.exact, any_ranges=True)

        name = f"{self.name}[q {q_start}.., k {k_start}.. of {Lq}x{Lk}]"
        return Mask(name, bind, batch=self.batch, heads=self.heads)

    # ---- combinators -------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return _combine(self, other, "&")

    def __or__(self, other: Mask) -> Mask:
        return _combine(self, other, "|")

    def __invert__(self) -> Mask:
        def bind(Lq: int, Lk: int) -> BoundMask:
            a = self.bind(Lq, Lk)

            def tiles(*args: object) -> tuple[Tensor, Tensor]:
                any_a, all_a = a.tiles(*args)  # type: ignore[arg-type]
                return ~all_a, ~any_a  # exact: complement swaps "all" and "any"

            return BoundMask(lambda b, h, q, kv: ~a.fn(b, h, q, kv), tiles, a.exact, a.any_ranges)

        spec = None if self.spec is None else ("~", self.spec)
        return Mask(f"~{self.name}", bind, batch=self.batch, heads=self.heads, spec=spec)

    # ---- materialisation ---------------------------------------------------------------
    def _sizes(self, B: int | None, H: int | None) -> tuple[int, int]:
        for arg, own, what in ((B, self.batch, "B"), (H, self.heads, "H")):
            if arg is not None and own is not None and arg != own:
                raise ValueError(f"{self!r} is built for {what}={own}, but {what}={arg} was asked")
        B = B if B is not None else self.batch
        H = H if H is not None else self.heads
        return (1 if B is None else B, 1 if H is None else H)

    def dense(
        self,
        Lq: int,
        Lk: int,
        B: int | None = None,
        H: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Evaluate the predicate at every position.

        Returns:
            bool tensor (B|1, H|1, Lq, Lk); dims 0/1 are 1 when the mask does not vary there.
        """
        B, H = self._sizes(B, H)
        bound = self.bind(Lq, Lk)
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.arange(H, device=device).view(1, H, 1, 1)
        q = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
        kv = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
        out = torch.as_tensor(bound.fn(b, h, q, kv), device=device)
        shape = _broadcast_shapes(out.shape, (1, 1, Lq, Lk))
        return out.expand(shape).contiguous()

    def blocks(
        self,
        Lq: int,
        Lk: int,
        block_q: int = 128,
        block_k: int = 128,
        *,
        B: int | None = None,
        H: int | None = None,
        device: torch.device | str | None = None,
        refine: bool = True,
    ) -> BlockMask:
        """Classify every (q-tile, kv-tile) pair as empty, partial or full.

        Built-in patterns use their analytic rule; combinations refine the tiles their rule
        leaves undecided by evaluating the predicate on those tiles only (``refine=False``
        leaves them partial: enough to estimate the work, as the tiled backend does to pick
        its tile height). Masks are immutable values, so the result is cached (the last few
        argument sets): on this mask, or, for a mask that a plain spec describes, shared by
        every mask with the same spec.
        """
        check.check_int("block_q", block_q)
        check.check_int("block_k", block_k)
        check.check_flag("refine", refine)
        B, H = self._sizes(B, H)
        device_name = str(torch.device(device or "cpu"))
        key: tuple[Any, ...] = (Lq, Lk, block_q, block_k, B, H, device_name, refine)
        cache, size = self._blocks_cache, _BLOCKS_CACHE_SIZE
        if self._shared_key is not None:
            cache, size, key = _SHARED_BLOCKS, _SHARED_BLOCKS_SIZE, (self._shared_key, *key)
        if (cached := cache.get(key)) is not None:
            cache.move_to_end(key)
            return cached
        bm = self._build_blocks(Lq, Lk, block_q, block_k, B, H, device, refine)
        cache[key] = bm
        if len(cache) > size:
            cache.popitem(last=False)
        return bm

    def _build_blocks(
        self,
        Lq: int,
        Lk: int,
        block_q: int,
        block_k: int,
        B: int,
        H: int,
        device: torch.device | str | None,
        refine: bool,
    ) -> BlockMask:
        bound = self.bind(Lq, Lk)
        # few torch ops: decoding builds a tile map at every step, and each costs microseconds
        q_lo, q_hi = _tile_bounds(Lq, block_q, device)
        k_lo, k_hi = _tile_bounds(Lk, block_k, device)
        any_, all_ = bound.tiles(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :], B, H)
        kinds = torch.where(all_, FULL, any_.to(torch.int8))  # any_ as 0/1: EMPTY/PARTIAL
        shape = _broadcast_shapes(kinds.shape, (1, 1, q_lo.numel(), k_lo.numel()))
        kinds = kinds.expand(shape).contiguous()
        bm = BlockMask(kinds, block_q, block_k, Lq, Lk, bound.fn, name=self.name)
        return bm if bound.exact or not refine else refine_partial_tiles(bm)

    def kind_by_rule(self, Lq: int, Lk: int) -> int:
        """EMPTY, PARTIAL or FULL for the whole Lq × Lk grid (every batch row and head).

        From the tile rule alone, without evaluating the predicate pair by pair (``blocks``
        would, over one Lq × Lk tile, on a combination): EMPTY and FULL are certain, PARTIAL
        may hide either where a combination's rule cannot tell. Ring attention skips blocks
        of keys with it.
        """
        bound = self.bind(Lq, Lk)
        first = torch.zeros(1, 1, dtype=torch.long)
        any_, all_ = bound.tiles(
            first, first + Lq - 1, first, first + Lk - 1, *self._sizes(None, None)
        )
        return EMPTY if not bool(any_.any()) else FULL if bool(all_.all()) else PARTIAL

    def density(self, Lq: int, Lk: int, B: int | None = None, H: int | None = None) -> float:
        """Fraction of (query, key) pairs that attend, averaged over batch and heads."""
        bm = self.blocks(Lq, Lk, 64, 64, B=B, H=H)
        return float(count_attended(bm).double().mean()) / (Lq * Lk)


# ---- helpers -----------------------------------------------------------------------------


def _tile_bounds(L: int, block: int, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """First and last index of each ``block``-long tile along L (the last tile may be short)."""
    lo = torch.arange(0, L, block, device=device)
    hi = torch.arange(block - 1, L + block - 1, block, device=device).clamp_(max=L - 1)
    return lo, hi


def _broadcast_shapes(*shapes: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` in plain Python: that one takes ~25 µs, at every decoding step."""
    out = [1] * max(len(s) for s in shapes)
    for shape in shapes:
        for i, n in enumerate(shape, len(out) - len(shape)):
            if n == 1:
                continue
            if out[i] not in (1, n):
                raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            out[i] = n
    return tuple(out)


#: Where query i lines up: "bottom_right" (key i + Lk - Lq), "top_left" (key i), or an int
#: offset (key i + offset: a chunk of a longer sequence, as ring attention needs).
Align = str | int


def _offset(align: Align, Lq: int, Lk: int) -> int:
    if isinstance(align, int):
        return align
    return Lk - Lq if align == "bottom_right" else 0


def _select(idx: Tensor, size: int) -> Tensor:
    """Index a dim of ``size`` with ``idx``, broadcasting a size-1 dim."""
    return idx if size > 1 else torch.zeros_like(idx)


def _as_index_tensor(name: str, values: Sequence[int] | Tensor) -> Tensor:
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a sequence of ints or a tensor, got {values!r}") from e
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.long()


def _short(t: Tensor) -> str:
    flat = t.flatten()[:7].tolist()  # not all of it: a name, made at every call
    body = ", ".join(str(x) for x in flat[:6]) + (", …" if len(flat) > 6 else "")
    return f"[{body}]" if t.dim() <= 1 else f"tensor{tuple(t.shape)}[{body}]"


def _const_tiles(value: bool) -> TileRule:
    def tiles(q_lo: Tensor, *_: object) -> tuple[Tensor, Tensor]:
        t = torch.tensor(value, device=q_lo.device)
        return t, t

    return tiles


def _merged_size(a: int | None, b: int | None, what: str) -> int | None:
    if a is not None and b is not None and a != b:
        raise ValueError(f"cannot combine masks built for {what}={a} and {what}={b}")
    return a if a is not None else b


def _combine(a: Mask, b: Mask, op: str) -> Mask:
    if not isinstance(b, Mask):
        raise TypeError(f"can only combine a Mask with a Mask, got {type(b).__name__}")

    def bind(Lq: int, Lk: int) -> BoundMask:
        ba, bb = a.bind(Lq, Lk), b.bind(Lq, Lk)

        def fn(bi: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            x, y = ba.fn(bi, h, q, kv), bb.fn(bi, h, q, kv)
            return x & y if op == "&" else x | y

        def tiles(*args: object) -> tuple[Tensor, Tensor]:
            any_a, all_a = ba.tiles(*args)  # type: ignore[arg-type]
            any_b, all_b = bb.tiles(*args)  # type: ignore[arg-type]
            if op == "&":  # all() is exact for AND; any() is an upper bound
                return any_a & any_b, all_a & all_b
            return any_a | any_b, all_a | all_b  # any() exact for OR; all() a lower bound

        return BoundMask(fn, tiles, exact=False, any_ranges=ba.any_ranges and bb.any_ranges)

    return Mask(
        f"({a.name} {op} {b.name})",
        bind,
        batch=_merged_size(a.batch, b.batch, "B"),
        heads=_merged_size(a.heads, b.heads, "H"),
        spec=None if a.spec is None or b.spec is None else (op, a.spec, b.spec),
    )


def _prefix_sum(flags: Tensor) -> Tensor:
    """(n + 1,) counts of True in flags[:i] for every i."""
    return torch.nn.functional.pad(flags.long().cumsum(0), (1, 0))


def _tile_counts(flags: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-tile count of True (or sum) along the last dim, and each tile's length.

    flags: (..., L) bool or integer  ->  counts (..., nT), lengths (nT,)
    """
    L = flags.shape[-1]
    whole = L - L % block
    # bool counts of a tile fit int16 and sum 2x faster than int32, and nothing is padded or
    # widened: a dense mask over 16k tokens is 256 MB as bytes, 2 GB as int64
    dtype = torch.int16 if flags.dtype == torch.bool and block < 2**15 else torch.int32
    counts = (
        flags[..., :whole].reshape(*flags.shape[:-1], whole // block, block).sum(-1, dtype=dtype)
    )
    if whole < L:
        tail = flags[..., whole:].sum(-1, keepdim=True, dtype=dtype)
        counts = torch.cat([counts, tail], -1)
    lengths = (L - torch.arange(0, L, block, device=flags.device)).clamp(max=block)
    return counts, lengths


def _diff_mask(name: str, keep: Callable[[Tensor], Tensor], align: Align) -> Mask:
    """A mask that depends only on d = kv - (q + offset): causal, windows, dilated, strided.

    A rectangular tile contains exactly the differences [k_lo - q_hi, k_hi - q_lo], so a prefix
    sum of ``keep`` over all differences answers any()/all() for every tile in O(1): exact.
    """
    check.check_align(align)

    def bind(Lq: int, Lk: int) -> BoundMask:
        off = _offset(align, Lq, Lk)

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return keep(kv - q - off)

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            d_min = -(Lq - 1) - off
            d = torch.arange(d_min, Lk - off, device=q_lo.device)
            csum = _prefix_sum(keep(d))
            shift = off + d_min  # a difference's index in d
            lo = k_lo - q_hi - shift
            hi = k_hi - q_lo - shift
            n = csum[hi + 1] - csum[lo]
            return n > 0, n == hi - lo + 1

        return BoundMask(fn, tiles, exact=True, any_ranges=True)

    return Mask(name, bind)


# ---- the pattern library -----------------------------------------------------------------

_P = ParamSpec("_P")
#: built-in factories by name, for ``from_spec``
_FACTORIES: dict[str, Callable[..., Mask]] = {}


def _copied(arg: object) -> object:
    return arg.clone() if isinstance(arg, Tensor) else arg


def _builtin(factory: Callable[_P, Mask]) -> Callable[_P, Mask]:
    """Record each call of a built-in factory as its mask's ``spec``: name, then arguments."""
    params = inspect.signature(factory).parameters
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params.values())
    names = tuple(params)
    defaults = {name: p.default for name, p in params.items()}

    @functools.wraps(factory)
    def make(*args: _P.args, **kwargs: _P.kwargs) -> Mask:
        # Masks are values (their tile maps are cached): tensor arguments are copied, so that
        # writing to the caller's tensor later changes no mask (it reached the predicate and
        # the kernels' padding and ranges, not the cached tile maps)
        args = tuple(_copied(a) for a in args)  # type: ignore[assignment]
        kwargs = {name: _copied(a) for name, a in kwargs.items()}  # type: ignore[assignment]
        mask = factory(*args, **kwargs)  # arguments that do not bind raise here
        # by hand, not Signature.bind (~12 µs): models make masks at every call of a layer
        given = {**dict(zip(names, args, strict=False)), **kwargs}  # the rest: keywords, defaults
        mask.spec = (factory.__name__, *(given.get(name, defaults[name]) for name in names))
        return mask

    _FACTORIES[factory.__name__] = make
    return make


@_builtin
def full() -> Mask:
    """Every query attends to every key."""

    def bind(Lq: int, Lk: int) -> BoundMask:
        return BoundMask(
            lambda b, h, q, kv: torch.ones_like(q - kv, dtype=torch.bool),
            _const_tiles(True),
            exact=True,
            any_ranges=True,
        )

    return Mask("full()", bind)


@_builtin
def causal(*, align: Align = "bottom_right") -> Mask:
    """Query i attends to keys j <= i + offset (offset = Lk - Lq bottom-right, 0 top-left)."""
    name = f"causal(align={align!r})" if align != "bottom_right" else "causal()"
    return _diff_mask(name, lambda d: d <= 0, align)


@_builtin
def sliding_window(left: int, right: int = 0, *, align: Align = "bottom_right") -> Mask:
    """Keys in [i + off - left, i + off + right]; -1 leaves that side unbounded.

    FlashAttention's ``window_size=(left, right)``: ``sliding_window(w)`` is a causal window of
    w keys back plus the query's own position; ``sliding_window(-1, -1)`` is full attention.
    """
    left = check.check_window("left", left)
    right = check.check_window("right", right)

    def keep(d: Tensor) -> Tensor:
        # out-of-place ops only: predicates must also trace under torch.compile (FlexAttention)
        ok = d == d
        if left >= 0:
            ok = ok & (d >= -left)
        if right >= 0:
            ok = ok & (d <= right)
        return ok

    name = f"sliding_window(left={left}, right={right})"
    return _diff_mask(name, keep, align)


def from_spec(spec: Sequence[Any]) -> Mask:
    """Rebuild a built-in mask (or a combination of them) from its ``Mask.spec``.

    >>> from_spec(sliding_window(32).spec)
    sliding_window(left=32, right=0)
    >>> from_spec((causal() | global_tokens([0])).spec)
    (causal() | global_tokens([0]))
    """
    name, *args = spec
    if name in ("&", "|"):
        a, b = (from_spec(s) for s in args)
        return a & b if name == "&" else a | b
    if name == "~":
        return ~from_spec(args[0])
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"no built-in mask has the spec {tuple(spec)!r}")
    params = list(inspect.signature(factory).parameters)
    if len(args) != len(params):
        raise ValueError(f"spec {tuple(spec)!r}: {name} takes {len(params)} arguments")
    return factory(**dict(zip(params, args, strict=True)))


def lookback(mask: Mask) -> float | None:
    """How many positions back from its own a query can attend, for masks of relative position.

    A windowed ``KVCache`` keeps only the last ``window`` positions. That is exact for a mask
    whose every query attends only keys at most ``window`` positions before its own, and whose
    pattern depends only on the distance between them (so dropping the oldest keys moves
    nothing):

    >>> lookback(sliding_window(256)), lookback(causal()), lookback(document([0, 0, 1]))
    (256, inf, None)

    Returns:
        an int; ``math.inf`` for a pattern of relative position with no bound (causal,
        strided); None when the pattern depends on more than the distance (absolute
        positions, the lengths, tensors, top-left alignment) or is unknown (``custom``).
    """
    return _lookback(mask.spec)


def _lookback(spec: tuple[Any, ...] | None) -> float | None:
    if spec is None:
        return None
    name, *args = spec
    if name in ("&", "|"):
        a, b = _lookback(args[0]), _lookback(args[1])
        if a is None or b is None:
            return None
        return min(a, b) if name == "&" else max(a, b)
    if name == "~":  # the complement of a window attends everything outside it
        return None if _lookback(args[0]) is None else math.inf
    if name == "full":
        return math.inf
    # the rest (prefix_lm, fixed, global_tokens, documents, layouts, ...) need more than the
    # distance; top-left alignment lines the queries up with the cache's first key
    if name not in ("causal", "strided", "sliding_window", "dilated"):
        return None
    if args[-1] != "bottom_right":
        return None
    if name == "sliding_window":
        return math.inf if args[0] < 0 else int(args[0])
    if name == "dilated":
        window, dilation = args[0], args[1]
        return int(window * dilation)
    return math.inf  # causal, strided


def band(mask: Mask, Lq: int, Lk: int) -> tuple[int, int] | None:
    """The diagonals a mask keeps, for masks that keep one unbroken band of them.

    Query i attends key j exactly where ``lo <= j - i <= hi``: causal and sliding-window
    masks (any alignment), ``full()``, and ``&`` of such masks. A kernel then needs no tile
    map: a tile's keys, and whether the band's edge crosses it, follow from its bounds.

    >>> band(causal(), 4, 10), band(sliding_window(2, 1), 3, 3), band(full(), 2, 5)
    ((-3, 6), (-2, 1), (-1, 4))

    Returns:
        (lo, hi), clamped to the differences the lengths hold, [-(Lq - 1), Lk - 1] (so lo > hi
        keeps nothing); None for any other mask.
    """
    found = padded_band(mask, Lq, Lk)
    return None if found is None or found[2] is not None else found[:2]


def padded_band(mask: Mask, Lq: int, Lk: int) -> tuple[int, int, Tensor | None] | None:
    """``band``, and the keys each sequence keeps, for a band ``&`` padding masks.

    Sequence b's query i attends key j exactly where ``lo <= j - i <= hi`` and ``keys[b, j]``:
    ``band``'s masks ``&`` ``key_padding`` and ``from_padding_mask`` (any padding, left or
    right). Kernels then need no tile map: a tile's kind follows from its bounds and from
    how many of its keys the sequence keeps.

    >>> padded_band(causal() & key_padding([2, 3]), 3, 3)
    (-2, 0, tensor([[ True,  True, False],
            [ True,  True,  True]]))

    Returns:
        (lo, hi, keys): lo and hi as ``band`` gives them; keys a bool (B or 1, Lk) tensor, or
        None where the mask pads nothing. None for any other mask.
    """
    lo, hi, paddings, others = _bands_and_paddings(mask, Lq, Lk)
    if others:
        return None
    lo_hi = _clamped(lo, 1 - Lq, torch.sym_max), _clamped(hi, Lk - 1, torch.sym_min)
    return (*lo_hi, _kept_by_all(paddings, Lk))


def padded_ranges(mask: Mask, Lq: int, Lk: int) -> tuple[Tensor, Tensor | None] | None:
    """Each query's range of keys, and the keys each sequence keeps, for masks made of them.

    Sequence b's query i attends key j exactly where ``ranges[b, 0, i] <= j <= ranges[b, 1, i]``
    and ``keys[b, j]``: ``key_ranges``, ``document`` where each document's keys lie side by
    side (as packing lays them out; its ids in any order), ``prefix_lm``, and ``&`` of those with
    ``band``'s masks and padding masks, where at least one part is not a band (``padded_band``
    serves those). Kernels then need no tile map: a tile's kind follows from its rows' least
    and greatest first and last keys.

    >>> padded_ranges(document([0, 0, 1, 1, 1]) & causal(), 5, 5)[0]
    tensor([[[0, 0, 2, 2, 2],
             [0, 1, 2, 3, 4]]])

    Returns:
        (ranges, keys): ranges an int64 (B or 1, 2, Lq) tensor of first and last keys (first >
        last: the query keeps none); keys a bool (B or 1, Lk) tensor or None, as
        ``padded_band``'s. None for any other mask.
    """
    lo, hi, paddings, others = _bands_and_paddings(mask, Lq, Lk)
    if not others:
        return None  # bands and padding alone: padded_band's
    ranges = [r for part in others if (r := _ranges(part, Lq, Lk)) is not None]
    if len(ranges) < len(others):  # a part that is none of these
        return None
    # all of them: the latest first key, the earliest last one
    first = functools.reduce(torch.maximum, [r[:, 0] for r in ranges])
    last = functools.reduce(torch.minimum, [r[:, 1] for r in ranges])
    i = torch.arange(Lq, device=first.device)
    if lo > -math.inf:  # the band's diagonals: keys i + lo … i + hi
        first = first.maximum(i + int(lo))
    if hi < math.inf:
        last = last.minimum(i + int(hi))
    keys = _kept_by_all(paddings, Lk)
    return torch.stack((first.clamp(min=0), last.clamp(max=Lk - 1)), 1), keys


def _bands_and_paddings(
    mask: Mask, Lq: int, Lk: int
) -> tuple[Any, Any, list[tuple[Any, ...]], list[tuple[Any, ...] | None]]:
    """The parts of ``mask``'s ``&``, sorted for ``padded_band`` and ``padded_ranges``.

    Returns the diagonals (lo, hi) its bands keep together (maybe ±inf; symbolic lengths stay
    symbolic), its padding parts (their keys are found only if asked: ``_kept_by_all``), and
    the other parts.
    """
    lo: Any = -math.inf
    hi: Any = math.inf
    paddings: list[tuple[Any, ...]] = []
    others: list[tuple[Any, ...] | None] = []
    for part in _and_parts(mask.spec):
        if part is not None and part[0] in _PADDING_SPECS:
            paddings.append(part)
        elif (d := _band(part, Lq, Lk)) is not None:
            lo, hi = _clamped(d[0], lo, torch.sym_max), _clamped(d[1], hi, torch.sym_min)
        else:
            others.append(part)
    return lo, hi, paddings, others


def _kept_by_all(paddings: list[tuple[Any, ...]], Lk: int) -> Tensor | None:
    """The keys every one of the padding specs keeps, bool (B or 1, Lk); None if none."""
    keys: Tensor | None = None
    for part in paddings:
        kept = _kept_keys(part, Lk)
        keys = kept if keys is None else keys & kept
    return keys


def _ranges(spec: tuple[Any, ...] | None, Lq: int, Lk: int) -> Tensor | None:
    """The (B|1, 2, Lq) first and last keys of one part of an ``&``, or None (``padded_ranges``)."""
    if spec is None:
        return None
    name, *args = spec
    if name == "key_ranges":
        first, last = (_as_index_tensor(n, t) for n, t in zip(("first", "last"), args, strict=True))
        if first.shape[-1] != Lq:
            raise ValueError(f"key_ranges for {first.shape[-1]} queries, but Lq={Lq}")
        return torch.stack((first, last), -2).view(-1, 2, Lq)
    if name == "prefix_lm":  # keys [0, max(prefix_len - 1, i + offset)]
        prefix_len, align = args
        last = (torch.arange(Lq) + _offset(align, Lq, Lk)).clamp(min=prefix_len - 1)
        return torch.stack((torch.zeros_like(last), last))[None]
    if name == "document":
        ids, kv_ids, align = args
        q2, k2 = (
            t if t.dim() == 2 else t[None]
            for t in (
                _as_index_tensor("ids", ids),
                _as_index_tensor("kv_ids", ids if kv_ids is None else kv_ids),
            )
        )
        qi = _document_query_ids(q2, k2, kv_ids is not None, align, Lq, Lk)
        n = max(qi.shape[0], k2.shape[0])
        qi, k2 = qi.expand(n, Lq).contiguous(), k2.expand(n, Lk).contiguous()
        if bool((k2.diff(dim=1) < 0).any()):  # ids out of order: each one's keys may still
            return _document_runs(qi, k2)  # lie side by side
        first = torch.searchsorted(k2, qi)  # a query's document's first and last key
        last = torch.searchsorted(k2, qi, right=True) - 1
        return torch.stack((first, last), 1)
    return None


def _document_runs(qi: Tensor, k2: Tensor) -> Tensor | None:
    """(n, 2, Lq) first and last keys of each query's document, its ids in any order.

    Each document's keys lie side by side ([2, 2, 0, 0, 1]); None where one's lie apart.
    ``qi`` (n, Lq) the queries' ids, ``k2`` (n, Lk) the keys'. A query whose id no key has
    keeps none (first > last).
    """
    rows = []
    for q_ids, k_ids in zip(qi, k2, strict=True):
        starts = torch.cat((k_ids.new_zeros(1), (k_ids.diff() != 0).nonzero()[:, 0] + 1))
        ends = torch.cat((starts[1:], k_ids.new_tensor([k_ids.numel()]))) - 1
        run_ids, order = k_ids[starts].sort()
        if bool((run_ids.diff() == 0).any()):  # one id in two runs: its keys lie apart
            return None
        at = torch.searchsorted(run_ids, q_ids).clamp(max=run_ids.numel() - 1)
        found = run_ids[at] == q_ids
        first = torch.where(found, starts[order][at], 0)
        last = torch.where(found, ends[order][at], -1)
        rows.append(torch.stack((first, last)))
    return torch.stack(rows)


def _and_parts(spec: tuple[Any, ...] | None) -> list[tuple[Any, ...] | None]:
    """The specs that ``spec`` ANDs together (itself, if it is no ``&``)."""
    if spec is not None and spec[0] == "&":
        return [*_and_parts(spec[1]), *_and_parts(spec[2])]
    return [spec]


#: the specs of padding masks, whose kept keys ``_kept_keys`` gives
_PADDING_SPECS = ("key_padding", "from_padding_mask")


def _kept_keys(spec: tuple[Any, ...], Lk: int) -> Tensor:
    """The keys a padding mask's spec keeps, bool (B or 1, Lk)."""
    if spec[0] == "from_padding_mask":
        valid: Tensor = spec[1]
        _check_padding_width(valid, Lk)
        return valid
    lengths = _as_index_tensor("lengths", spec[1]).flatten()
    return torch.arange(Lk, device=lengths.device) < lengths[:, None]


def _clamped(diagonal: float, bound: float, sym_op: Any) -> Any:
    """``sym_op`` (sym_max / sym_min) of a diagonal and a bound, either maybe ±inf.

    torch's sym_max / sym_min keep symbolic lengths (torch.compile, torch.export) symbolic:
    Python's max and int() would specialise the graph to the traced length.
    """
    if isinstance(diagonal, float) and math.isinf(diagonal):
        return bound
    if isinstance(bound, float) and math.isinf(bound):
        return diagonal
    diagonal = int(diagonal) if isinstance(diagonal, float) else diagonal
    if type(diagonal) is int and type(bound) is int:  # eager: Python's, 1 µs less a call
        return max(diagonal, bound) if sym_op is torch.sym_max else min(diagonal, bound)
    return sym_op(diagonal, bound)


def _band(spec: tuple[Any, ...] | None, Lq: int, Lk: int) -> tuple[float, float] | None:
    """The diagonals (lo, hi), maybe infinite, that one part of an ``&`` keeps, or None."""
    if spec is None:
        return None
    name, *args = spec
    if name == "full":
        return (-math.inf, math.inf)
    if name not in ("causal", "sliding_window"):
        return None
    off = _offset(args[-1], Lq, Lk)  # key i + off lines up with query i
    if name == "causal":
        return (-math.inf, off)
    left, right = args[0], args[1]
    return (-math.inf if left < 0 else off - left, math.inf if right < 0 else off + right)


@_builtin
def dilated(
    window: int, dilation: int, *, causal: bool = False, align: Align = "bottom_right"
) -> Mask:
    """Longformer's dilated window: ``window`` keys each side, ``dilation`` positions apart.

    Attends where d = kv - (q + off) is a multiple of ``dilation`` with |d| <= window·dilation
    (and d <= 0 when ``causal``).
    """
    check.check_int("window", window)
    check.check_int("dilation", dilation)

    def keep(d: Tensor) -> Tensor:
        ok = (torch.remainder(d, dilation) == 0) & (d.abs() <= window * dilation)
        return ok & (d <= 0) if causal else ok

    return _diff_mask(
        f"dilated(window={window}, dilation={dilation}, causal={causal})", keep, align
    )


@_builtin
def strided(stride: int, *, align: Align = "bottom_right") -> Mask:
    """Sparse Transformer's strided pattern (causal).

    Attends to the last ``stride`` keys, plus every key a multiple of ``stride`` back.
    """
    check.check_int("stride", stride)

    def keep(d: Tensor) -> Tensor:
        back = -d
        return (back >= 0) & ((back < stride) | (torch.remainder(back, stride) == 0))

    return _diff_mask(f"strided(stride={stride})", keep, align)


@_builtin
def fixed(block: int, summary: int = 1, *, align: Align = "bottom_right") -> Mask:
    """Sparse Transformer's fixed pattern (causal).

    Attends to keys in the query's own block of ``block`` positions, plus the last
    ``summary`` "summary" keys of every block.
    """
    check.check_int("block", block)
    if isinstance(summary, bool) or not isinstance(summary, int) or not 0 <= summary <= block:
        raise ValueError(f"summary must be an int in [0, block={block}], got {summary!r}")
    check.check_align(align)
    cut = block - summary  # columns with (j % block) >= cut are summary columns

    def bind(Lq: int, Lk: int) -> BoundMask:
        off = _offset(align, Lq, Lk)

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            p = q + off
            return (kv <= p) & ((kv // block == p // block) | (kv % block >= cut))

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            a, z = q_lo + off, q_hi + off  # aligned query range [a, z]; keys [k_lo, k_hi]
            # some key in the query's own block, at or before it
            n_lo = torch.maximum(a // block, k_lo // block)
            n_hi = torch.minimum(z // block, k_hi // block)
            any_same = (n_lo <= n_hi) & (k_lo <= z)
            # some summary column in [k_lo, min(k_hi, z)]
            r = k_lo % block
            first_summary = torch.where(r >= cut, k_lo, k_lo - r + cut)
            any_summary = (first_summary <= torch.minimum(k_hi, z)) & (summary > 0)
            # all: every key precedes every query, and every non-summary key shares the
            # (single) block of all queries
            first_ns = torch.where(r < cut, k_lo, k_lo - r + block)
            re = k_hi % block
            last_ns = torch.where(re < cut, k_hi, k_hi - re + cut - 1)
            has_ns = (first_ns <= k_hi) & (cut > 0)
            one_block = (
                (first_ns // block == last_ns // block)
                & (last_ns // block == a // block)
                & (a // block == z // block)
            )
            return any_same | any_summary, (k_hi <= a) & (~has_ns | one_block)

        return BoundMask(fn, tiles, exact=True, any_ranges=True)

    return Mask(f"fixed(block={block}, summary={summary})", bind)


@_builtin
def prefix_lm(prefix_len: int, *, align: Align = "bottom_right") -> Mask:
    """Bidirectional over the first ``prefix_len`` keys, causal after them."""
    check.check_int("prefix_len", prefix_len, least=0)
    check.check_align(align)

    def bind(Lq: int, Lk: int) -> BoundMask:
        off = _offset(align, Lq, Lk)

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (kv < prefix_len) | (kv <= q + off)

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            return (k_lo < prefix_len) | (k_lo <= q_hi + off), (k_hi < prefix_len) | (
                k_hi <= q_lo + off
            )

        return BoundMask(fn, tiles, exact=True, any_ranges=True)

    return Mask(f"prefix_lm(prefix_len={prefix_len})", bind)


@_builtin
def global_tokens(indices: Sequence[int] | Tensor, *, align: Align = "bottom_right") -> Mask:
    """Global tokens (Longformer/BigBird): they attend to all keys and all queries attend to them.

    ``indices`` are key positions; query i is global when i + offset is one of them. Combine
    with a window: ``sliding_window(w, w) | global_tokens([0])``.
    """
    idx = _as_index_tensor("indices", indices).flatten()
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"global token indices must be >= 0, got {_short(idx)}")
    check.check_align(align)

    def bind(Lq: int, Lk: int) -> BoundMask:
        if idx.numel() and int(idx.max()) >= Lk:
            raise ValueError(f"global token index {int(idx.max())} is out of range for Lk={Lk}")
        off = _offset(align, Lq, Lk)
        g_k = torch.zeros(Lk, dtype=torch.bool)
        g_k[idx] = True
        pos = torch.arange(Lq) + off
        g_q = torch.zeros(Lq, dtype=torch.bool)
        inside = (pos >= 0) & (pos < Lk)
        g_q[inside] = g_k[pos[inside]]

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return g_q.to(q.device)[q] | g_k.to(kv.device)[kv]

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            # global queries in [q_lo, q_hi] and global keys in [k_lo, k_hi], by prefix sums
            cq, ck = (_prefix_sum(g.to(q_lo.device)) for g in (g_q, g_k))
            nq, nk = cq[q_hi + 1] - cq[q_lo], ck[k_hi + 1] - ck[k_lo]
            any_ = (nq > 0) | (nk > 0)
            all_ = (nq == q_hi - q_lo + 1) | (nk == k_hi - k_lo + 1)
            return any_, all_

        return BoundMask(fn, tiles, exact=True, any_ranges=True)

    return Mask(f"global_tokens({_short(idx)})", bind)


@_builtin
def key_padding(lengths: Sequence[int] | Tensor) -> Mask:
    """Sequence b attends to its first ``lengths[b]`` keys only (right padding)."""
    lens = _as_index_tensor("lengths", lengths).flatten()
    if lens.numel() > 0 and int(lens.min()) < 0:  # (an empty batch has no lengths)
        raise ValueError(f"lengths must be a list of ints >= 0, got {_short(lens)}")

    def bind(Lq: int, Lk: int) -> BoundMask:
        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return kv < lens.to(kv.device)[_select(b, lens.numel())]

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            n = lens.to(q_lo.device).view(-1, 1, 1, 1)
            return k_lo < n, k_hi < n

        return BoundMask(fn, tiles, exact=True, any_ranges=True)

    return Mask(f"key_padding(lengths={_short(lens)})", bind, batch=_batch_of(lens.numel()))


@_builtin
def from_padding_mask(valid: Tensor) -> Mask:
    """Keys where ``valid`` (B, Lk) is True are real tokens; False keys are padding.

    Note the convention: True = keep (attend), as everywhere in attnkit. torch's
    ``key_padding_mask`` is the opposite (True = ignore): pass ``~key_padding_mask``.
    """
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.dim() != 2:
        raise TypeError("from_padding_mask expects a bool tensor of shape (B, Lk), True = keep")

    def bind(Lq: int, Lk: int) -> BoundMask:
        _check_padding_width(valid, Lk)

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return valid.to(kv.device)[_select(b, valid.shape[0]), kv]

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            block_k = int(k_hi[0, 0] - k_lo[0, 0]) + 1
            counts, lengths = _tile_counts(valid.to(q_lo.device), block_k)  # (B, nK)
            return (counts > 0)[:, None, None, :], (counts == lengths)[:, None, None, :]

        return BoundMask(fn, tiles, exact=True)

    return Mask(f"from_padding_mask(B={valid.shape[0]})", bind, batch=_batch_of(valid.shape[0]))


def _check_padding_width(valid: Tensor, Lk: int) -> None:
    if valid.shape[1] != Lk:
        raise ValueError(f"padding mask has shape {tuple(valid.shape)}, but Lk={Lk}")


@_builtin
def document(
    ids: Sequence[int] | Tensor,
    kv_ids: Sequence[int] | Tensor | None = None,
    *,
    align: Align = "bottom_right",
) -> Mask:
    """Packed sequences (varlen): a query attends only to keys of its own document.

    Args:
        ids: document id of every key position, (Lk,) or (B, Lk). Queries take the ids of
            their aligned key positions (bottom-right: query i is key i + Lk - Lq).
        kv_ids: give separate key ids, (Lk,) or (B, Lk), when ``ids`` are the query ids (Lq).
        align: "bottom_right" or "top_left", as for ``causal``.

    Combine with ``causal()`` for packed causal LM training.
    """
    q_src = _as_index_tensor("ids", ids)
    k_src = q_src if kv_ids is None else _as_index_tensor("kv_ids", kv_ids)
    for name, t in (("ids", q_src), ("kv_ids", k_src)):
        if t.dim() not in (1, 2):
            raise ValueError(f"{name} must be (L,) or (B, L), got shape {tuple(t.shape)}")
    q2, k2 = (t if t.dim() == 2 else t[None] for t in (q_src, k_src))  # (B | 1, L)
    if q2.shape[0] != k2.shape[0] and 1 not in (q2.shape[0], k2.shape[0]):
        raise ValueError(f"ids and kv_ids batch sizes differ: {q2.shape[0]} vs {k2.shape[0]}")
    check.check_align(align)
    nb = max(q2.shape[0], k2.shape[0])

    def bind(Lq: int, Lk: int) -> BoundMask:
        qi = _document_query_ids(q2, k2, kv_ids is not None, align, Lq, Lk)

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            qd = qi.to(q.device)[_select(b, qi.shape[0]), q]
            kd = k2.to(kv.device)[_select(b, k2.shape[0]), kv]
            return qd == kd

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            q_min, q_max = _tile_min_max(qi.to(q_lo.device), int(q_hi[0, 0] - q_lo[0, 0]) + 1)
            k_min, k_max = _tile_min_max(k2.to(q_lo.device), int(k_hi[0, 0] - k_lo[0, 0]) + 1)
            q_min, q_max = q_min[:, None, :, None], q_max[:, None, :, None]
            k_min, k_max = k_min[:, None, None, :], k_max[:, None, None, :]
            any_ = torch.maximum(q_min, k_min) <= torch.minimum(q_max, k_max)
            all_ = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
            return any_, all_

        # With ids sorted along the sequence, overlapping id ranges share an id: exact.
        is_sorted = bool((qi.diff(dim=1) >= 0).all() and (k2.diff(dim=1) >= 0).all())
        return BoundMask(fn, tiles, exact=is_sorted)

    return Mask(f"document(ids={_short(q_src)})", bind, batch=_batch_of(nb))


def _document_query_ids(
    q2: Tensor, k2: Tensor, own_query_ids: bool, align: Align, Lq: int, Lk: int
) -> Tensor:
    """The queries' document ids (B|1, Lq): their own, or their aligned keys' (``document``)."""
    if k2.shape[1] != Lk:
        raise ValueError(f"document ids have length {k2.shape[1]}, but Lk={Lk}")
    if own_query_ids:
        if q2.shape[1] != Lq:
            raise ValueError(f"query document ids have length {q2.shape[1]}, but Lq={Lq}")
        return q2
    off = _offset(align, Lq, Lk)
    if off < 0:
        raise ValueError(f"document(ids) needs Lq <= Lk, got Lq={Lq}, Lk={Lk}")
    return q2[:, off : off + Lq]


@_builtin
def key_ranges(first: Sequence[int] | Tensor, last: Sequence[int] | Tensor) -> Mask:
    """Query i attends keys ``first[i]`` … ``last[i]``: one unbroken range of keys per query.

    The shape of packed sequences (``document`` with each one's keys side by side,
    ``varlen.varlen_mask``),
    ``causal`` and windows within them, and ``prefix_lm``: the CPU kernels read such masks
    as the ranges themselves (``padded_ranges``), with no tile map, however often the ranges
    change (a varlen decoding batch's change at every step).

    Args:
        first: (Lq,) or (B, Lq) integer key indices, where each query's keys begin.
        last: the same shape, where they end (inclusive); ``first > last`` keeps nothing.
    """
    lo = _as_index_tensor("first", first)
    hi = _as_index_tensor("last", last)
    if lo.shape != hi.shape or lo.dim() not in (1, 2):
        raise ValueError(
            "first and last must share one shape, (Lq,) or (B, Lq); got "
            f"{tuple(lo.shape)} and {tuple(hi.shape)}"
        )
    lo2, hi2 = (t if t.dim() == 2 else t[None] for t in (lo, hi))  # (B | 1, Lq)

    def bind(Lq: int, Lk: int) -> BoundMask:
        if lo2.shape[1] != Lq:
            raise ValueError(f"key_ranges for {lo2.shape[1]} queries, but Lq={Lq}")

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            rows = _select(b, lo2.shape[0])
            return (kv >= lo2.to(q.device)[rows, q]) & (kv <= hi2.to(q.device)[rows, q])

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            block = int(q_hi[0, 0] - q_lo[0, 0]) + 1
            f_min, f_max = (x[:, None, :, None] for x in _tile_min_max(lo2.to(q_lo), block))
            l_min, l_max = (x[:, None, :, None] for x in _tile_min_max(hi2.to(q_lo), block))
            # a tile of rows keeps keys [f_min, l_max] at most, [f_max, l_min] for sure
            return (k_hi >= f_min) & (k_lo <= l_max), (k_lo >= f_max) & (k_hi <= l_min)

        return BoundMask(fn, tiles, exact=False)

    return Mask(
        f"key_ranges(first={_short(lo)}, last={_short(hi)})", bind, batch=_batch_of(lo2.shape[0])
    )


def _tile_min_max(ids: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-tile min and max of ids (B, L) -> (B, nT) each; the last tile is padded by repeats."""
    pad = (-ids.shape[1]) % block
    padded = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1) if pad else ids
    tiles = padded.view(ids.shape[0], -1, block)
    return tiles.amin(-1), tiles.amax(-1)


def _batch_of(n: int) -> int | None:
    """The batch a mask made from n rows is for: None (any) for one row; an empty one: 0."""
    return None if n == 1 else n


def _layout_bound(layout: Tensor, block: int, q_shift: int) -> BoundMask:
    """Predicate and exact tile rule of a block layout (H|1, nbq, nbk) of ``block``-sized cells.

    Query i falls in layout row (i + q_shift) // block, key j in column j // block.
    """
    heads = layout.shape[0]
    # 2-D prefix sums count attended cells in any rectangle of the layout in O(1).
    csum = torch.nn.functional.pad(layout.long().cumsum(1).cumsum(2), (1, 0, 1, 0))

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        lay = layout.to(q.device)
        return lay[_select(h, heads), (q + q_shift) // block, kv // block]

    def tiles(
        q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
    ) -> tuple[Tensor, Tensor]:
        c = csum.to(q_lo.device)
        r0, r1 = (q_lo + q_shift) // block, (q_hi + q_shift) // block
        c0, c1 = k_lo // block, k_hi // block
        n = c[:, r1 + 1, c1 + 1] - c[:, r0, c1 + 1] - c[:, r1 + 1, c0] + c[:, r0, c0]
        area = (r1 - r0 + 1) * (c1 - c0 + 1)
        return (n > 0)[None], (n == area)[None]

    return BoundMask(fn, tiles, exact=True, any_ranges=True)


@_builtin
def block_sparse(layout: Tensor, block: int) -> Mask:
    """DeepSpeed-style block-sparse attention from a block layout.

    Args:
        layout: bool (nbq, nbk) or per head (H, nbq, nbk); cell (r, c) True lets queries of
            block r attend to keys of block c. Needs nbq >= ceil(Lq/block), nbk >= ceil(Lk/block).
        block: cell size in tokens.
    """
    check.check_int("block", block)
    if not isinstance(layout, Tensor) or layout.dim() not in (2, 3):
        raise TypeError("layout must be a tensor of shape (nbq, nbk) or (H, nbq, nbk)")
    if layout.is_floating_point() or layout.is_complex():
        # a float layout is likely scores or probabilities: nonzero would silently mean True
        raise TypeError(f"layout must be bool (or integer 0/1), got {layout.dtype}")
    lay = layout.bool().view(-1, *layout.shape[-2:])

    def bind(Lq: int, Lk: int) -> BoundMask:
        need = (-(-Lq // block), -(-Lk // block))
        if lay.shape[1] < need[0] or lay.shape[2] < need[1]:
            raise ValueError(
                f"layout of shape {tuple(layout.shape)} is too small for Lq={Lq}, Lk={Lk} with "
                f"block={block}: need at least {need} blocks"
            )
        return _layout_bound(lay, block, 0)

    return Mask(
        f"block_sparse(block={block}, layout={tuple(layout.shape)})",
        bind,
        heads=_batch_of(lay.shape[0]),
    )


@_builtin
def bigbird(
    block: int,
    num_window: int = 3,
    num_global: int = 1,
    num_random: int = 2,
    seed: int = 0,
    *,
    align: Align = "bottom_right",
) -> Mask:
    """BigBird's block pattern.

    Per block of queries: ``num_window`` neighbouring key blocks (centred), ``num_global``
    global blocks at the start (attending and attended everywhere) and ``num_random``
    random key blocks drawn with ``seed`` (reproducible).
    """
    check.check_int("block", block)
    for name, value in (
        ("num_window", num_window),
        ("num_global", num_global),
        ("num_random", num_random),
    ):
        check.check_int(name, value, least=0)
    check.check_align(align)

    def bind(Lq: int, Lk: int) -> BoundMask:
        off = _offset(align, Lq, Lk)
        if off < 0:
            raise ValueError(f"bigbird with bottom-right alignment needs Lq <= Lk, got {Lq}, {Lk}")
        nb = -(-Lk // block)
        rows = -(-(Lq + off) // block)  # query blocks, in aligned positions
        r, c = torch.arange(rows), torch.arange(nb)
        layout = (r[:, None] - c[None, :]).abs() <= num_window // 2
        layout[:num_global, :] = True
        layout[:, :num_global] = True
        gen = torch.Generator().manual_seed(seed)
        for row in range(rows):
            layout[row, torch.randperm(nb, generator=gen)[:num_random]] = True
        return _layout_bound(layout[None], block, off)

    return Mask(
        f"bigbird(block={block}, window={num_window}, global={num_global}, "
        f"random={num_random}, seed={seed})",
        bind,
    )


@_builtin
def from_dense(mask: Tensor) -> Mask:
    """Wrap a dense bool tensor (Lq, Lk), (H|1, Lq, Lk) or (B|1, H|1, Lq, Lk); True = attend."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or not 2 <= mask.dim() <= 4:
        raise TypeError("from_dense expects a bool tensor with 2 to 4 dims (..., Lq, Lk)")
    m4 = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def bind(Lq: int, Lk: int) -> BoundMask:
        if tuple(m4.shape[2:]) != (Lq, Lk):
            raise ValueError(f"dense mask has shape {tuple(mask.shape)}, but (Lq, Lk)=({Lq}, {Lk})")

        def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            t = m4.to(q.device)
            return t[_select(b, t.shape[0]), _select(h, t.shape[1]), q, kv]

        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            bq = int(q_hi[0, 0] - q_lo[0, 0]) + 1
            bk = int(k_hi[0, 0] - k_lo[0, 0]) + 1
            t = m4.to(q_lo.device)
            cols, len_k = _tile_counts(t, bk)  # (B, H, Lq, nK)
            counts, len_q = _tile_counts(cols.transpose(-1, -2), bq)  # (B, H, nK, nQ)
            counts = counts.transpose(-1, -2)
            return counts > 0, counts == len_q[:, None] * len_k[None, :]

        return BoundMask(fn, tiles, exact=True)

    return Mask(
        f"from_dense(shape={tuple(mask.shape)})",
        bind,
        batch=_batch_of(m4.shape[0]),
        heads=_batch_of(m4.shape[1]),
    )


def custom(fn: MaskFn, name: str | None = None) -> Mask:
    """Any predicate ``fn(b, h, q_idx, kv_idx) -> bool tensor`` over broadcasting indices.

    Its tiles are classified by evaluating ``fn`` (O(Lq·Lk) once per BlockMask). The batch
    and head dims it varies over are read off the shape of its result at the ``B``, ``H``
    passed to ``blocks`` / ``dense`` (backends pass the request's B and Hq): a predicate that
    uses ``h`` gets tiles per head. Without them it is evaluated at b = h = 0 only.

    A mask's tile maps are cached (masks are values; the built-in patterns copy the tensors
    they are given): a predicate that reads a tensor written to later needs a new mask.
    """
    if not callable(fn):
        raise TypeError(f"custom mask needs a callable fn(b, h, q_idx, kv_idx), got {fn!r}")
    name = name or f"custom({getattr(fn, '__name__', 'fn')})"
    fn = _result_checked(fn, name)

    def bind(Lq: int, Lk: int) -> BoundMask:
        def tiles(
            q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, B: int, H: int
        ) -> tuple[Tensor, Tensor]:
            dev = q_lo.device
            zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
            probe = torch.as_tensor(
                fn(
                    torch.arange(B, device=dev).view(B, 1, 1, 1),
                    torch.arange(H, device=dev).view(1, H, 1, 1),
                    zero,
                    zero,
                ),
                device=dev,
            )
            shape = (*_broadcast_shapes(probe.shape, (1, 1, 1, 1))[:2], 1, 1)
            # Undecided everywhere: refinement evaluates fn on every tile.
            return torch.ones(shape, dtype=torch.bool, device=dev), torch.zeros(
                shape, dtype=torch.bool, device=dev
            )

        return BoundMask(fn, tiles, exact=False, any_ranges=True)

    return Mask(name, bind)


def _result_checked(fn: MaskFn, name: str) -> MaskFn:
    """``fn``, raising a clear error unless it returns a bool tensor broadcasting to its indices.

    A user's predicate is evaluated deep inside tile maps, where a float result or a wrong
    shape would otherwise fail with an error that names neither the mask nor the problem.
    """

    def checked(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = torch.as_tensor(fn(b, h, q, kv))
        if out.dtype != torch.bool:
            raise TypeError(
                f"mask {name} must return a bool tensor (True = attend), got {out.dtype}"
            )
        grid = _broadcast_shapes(b.shape, h.shape, q.shape, kv.shape)
        try:
            fits = _broadcast_shapes(out.shape, grid) == grid
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask {name} returned shape {tuple(out.shape)}, which does not broadcast to "
                f"its indices' shape {grid}"
            )
        return out

    return checked
