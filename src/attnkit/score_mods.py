"""Score modifiers: ``fn(score, b, h, q_idx, kv_idx) -> score``.

They are applied after scaling and before masking, as FlexAttention's ``score_mod``.

Built-ins follow FlashAttention's conventions so results compare one to one: ALiBi is
bottom-right aligned (query i sits at key i + Lk - Lq) and symmetric. Any plain callable with
that signature works as a score_mod too; the ``ScoreMod`` wrapper adds a name and lets a mod
depend on the lengths (Lq, Lk).

Example:
    >>> import torch, attnkit
    >>> from attnkit import score_mods
    >>> mod = score_mods.compose(score_mods.alibi(score_mods.alibi_slopes(2)),
    ...                          score_mods.softcap(30.0))
    >>> q = torch.randn(1, 2, 4, 8)
    >>> attnkit.attention(q, q, q, score_mod=mod).shape
    torch.Size([1, 2, 4, 8])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._types import ScoreModFn
from attnkit._validation import check_int

__all__ = [
    "KernelMods",
    "ScoreMod",
    "alibi",
    "alibi_slopes",
    "compose",
    "custom",
    "kernel_mods",
    "learns",
    "relative_bias",
    "resolve",
    "softcap",
    "t5_bucket",
]


class ScoreMod:
    """A named score modifier whose function may depend on the lengths (Lq, Lk).

    Args:
        name: readable description.
        bind: ``bind(Lq, Lk) -> fn(score, b, h, q_idx, kv_idx)``.
        kind: "alibi", "softcap", "relative_bias", "compose" or "custom" (lets a kernel
            recognise mods it can apply in-kernel).
        params: the mod's parameters (e.g. ``slopes`` for alibi, ``cap`` for softcap).
        heads: the number of query heads its parameters are built for (checked against q),
            or None when it serves any number (one slope, one table row, or no table).
    """

    def __init__(
        self,
        name: str,
        bind: Callable[[int, int], ScoreModFn],
        *,
        kind: str = "custom",
        params: dict[str, Any] | None = None,
        heads: int | None = None,
    ) -> None:
        self.name = name
        self.bind = bind
        self.kind = kind
        self.params = params or {}
        self.heads = heads

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        """Apply assuming Lq == Lk (no alignment offset); backends call ``bind(Lq, Lk)``."""
        return self.bind(1, 1)(score, b, h, q, kv)

    def __repr__(self) -> str:
        return self.name


def resolve(score_mod: ScoreMod | ScoreModFn | None, Lq: int, Lk: int) -> ScoreModFn | None:
    """Bind a ``ScoreMod`` to (Lq, Lk); plain callables and None pass through."""
    if score_mod is None:
        return None
    if isinstance(score_mod, ScoreMod):
        return score_mod.bind(Lq, Lk)
    if callable(score_mod):
        # not repr(score_mod) as the default: torch.compile cannot trace the repr of a bound
        # method of an nn.Module (an internal dynamo error, not a graph break)
        name = getattr(score_mod, "__name__", None) or type(score_mod).__name__
        return result_checked(score_mod, name)
    raise TypeError(
        f"score_mod must be callable as fn(score, b, h, q_idx, kv_idx), got {score_mod!r}"
    )


def result_checked(fn: ScoreModFn, name: str) -> ScoreModFn:
    """``fn``, raising a clear error when its result is not a float tensor shaped like its score.

    A user's score_mod that drops or adds a dim would otherwise fail deep in a backend, or
    broadcast silently into a wrong shape. A float result of another dtype (scores plus a
    float64 bias, say) is cast to the score's: every backend computes scores in one dtype
    (float32, float64 for float64 inputs), and the cast passes gradients to the bias.
    """

    def checked(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = fn(score, b, h, q_idx, kv_idx)
        if not isinstance(out, Tensor) or out.shape != score.shape or not out.is_floating_point():
            got = (
                f"{out.dtype} {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            )
            raise ValueError(
                f"score_mod {name} must return a float tensor shaped like its score "
                f"{tuple(score.shape)}, got {got}"
            )
        return out if out.dtype == score.dtype else out.to(score.dtype)

    return checked


def _select(idx: Tensor, size: int) -> Tensor:
    return idx if size > 1 else torch.zeros_like(idx)


def _per_head(size: int) -> int | None:
    """A parameter with one entry per head pins the head count; a single entry broadcasts."""
    return size if size > 1 else None


def alibi_slopes(num_heads: int) -> Tensor:
    """The standard ALiBi slopes (Press et al.), float32 (H,).

    2^(-8h/H) for h = 1..H when H is a power of 2; otherwise the slopes of the closest lower
    power of two followed by every other slope of the next power.
    """
    check_int("num_heads", num_heads)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi(slopes: Tensor, *, offset: int | None = None) -> ScoreMod:
    """ALiBi: adds -slope_h · |i + offset - j| to score (h, i, j).

    Args:
        slopes: (Hq,) per query head (see ``alibi_slopes``), or (1,) shared by every head;
            may require grad.
        offset: where the queries sit among the keys: query i at key i + offset. None (the
            default) aligns the last query with the last key, offset = Lk - Lq, as
            FlashAttention does (a decoding step's queries are the cache's last positions).
            A part of a longer sequence gives its own (a ring block: q_start - k_start).
    """
    if not isinstance(slopes, Tensor) or slopes.dim() != 1:
        raise TypeError("alibi slopes must be a 1-D tensor (Hq,)")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise TypeError(f"alibi offset must be an int or None, got {offset!r}")

    def bind(Lq: int, Lk: int) -> ScoreModFn:
        off = Lk - Lq if offset is None else offset

        def fn(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            s = slopes.to(device=score.device, dtype=score.dtype)[_select(h, slopes.numel())]
            return score - s * (q + off - kv).abs().to(score.dtype)

        return fn

    return ScoreMod(
        f"alibi(H={slopes.numel()}" + ("" if offset is None else f", offset={offset}") + ")",
        bind,
        kind="alibi",
        params={"slopes": slopes, "offset": offset},
        heads=_per_head(slopes.numel()),
    )


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2, Grok): s -> cap · tanh(s / cap)."""
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not cap > 0:
        raise ValueError(f"softcap cap must be a positive number, got {cap!r}")
    c = float(cap)

    def bind(Lq: int, Lk: int) -> ScoreModFn:
        return lambda score, b, h, q, kv: c * torch.tanh(score / c)

    return ScoreMod(f"softcap({c:g})", bind, kind="softcap", params={"cap": c})


def t5_bucket(relative: Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> Tensor:
    """T5's bucketing of relative positions (key - query).

    Exact for small distances, logarithmic up to ``max_distance``, clipped beyond.
    """
    buckets = torch.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets = buckets + (relative > 0).long() * n
        dist = relative.abs()
    else:
        dist = (-relative).clamp(min=0)
    max_exact = n // 2
    is_small = dist < max_exact
    log_ratio = torch.log(dist.clamp(min=1).float() / max_exact) / math.log(
        max_distance / max_exact
    )
    large = (max_exact + (log_ratio * (n - max_exact)).long()).clamp(max=n - 1)
    return buckets + torch.where(is_small, dist, large)


def relative_bias(
    table: Tensor,
    *,
    t5_buckets: bool = False,
    max_distance: int = 128,
    bidirectional: bool = True,
) -> ScoreMod:
    """A learned bias per head and relative position (key - query, bottom-right aligned).

    Args:
        table: (H|1, T), typically an ``nn.Parameter``; gradients flow into it.
            Plain mode: T = 2M + 1 and distances are clipped to [-M, M].
            ``t5_buckets=True``: T buckets as in T5 (``t5_bucket``).
        t5_buckets: bucket distances as T5 does instead of clipping them.
        max_distance: T5: distances beyond this share the last bucket.
        bidirectional: T5: separate buckets for keys before and after the query.
    """
    if not isinstance(table, Tensor) or table.dim() != 2:
        raise TypeError("relative_bias table must be a 2-D tensor (H|1, T)")
    T = table.shape[1]
    if not t5_buckets and T % 2 == 0:
        raise ValueError(f"relative_bias table needs an odd width 2M+1, got T={T}")
    radius = (T - 1) // 2

    def bind(Lq: int, Lk: int) -> ScoreModFn:
        off = Lk - Lq

        def fn(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            rel = kv - (q + off)
            if t5_buckets:
                idx = t5_bucket(rel, T, max_distance, bidirectional)
            else:
                idx = rel.clamp(-radius, radius) + radius
            tab = table.to(device=score.device, dtype=score.dtype)
            return score + tab[_select(h, tab.shape[0]), idx]

        return fn

    name = f"relative_bias(H={table.shape[0]}, T={T}{', t5' if t5_buckets else ''})"
    return ScoreMod(
        name, bind, kind="relative_bias", params={"table": table}, heads=_per_head(table.shape[0])
    )


def compose(*mods: ScoreMod | ScoreModFn) -> ScoreMod:
    """Apply score mods left to right."""

    def bind(Lq: int, Lk: int) -> ScoreModFn:
        fns = [resolve(m, Lq, Lk) for m in mods]

        def fn(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            for f in fns:
                assert f is not None
                score = f(score, b, h, q, kv)
            return score

        return fn

    names = ", ".join(repr(m) if isinstance(m, ScoreMod) else "custom" for m in mods)
    heads = {m.heads for m in mods if isinstance(m, ScoreMod) and m.heads is not None}
    if len(heads) > 1:
        raise ValueError(f"compose({names}): its mods are built for {sorted(heads)} heads")
    return ScoreMod(
        f"compose({names})",
        bind,
        kind="compose",
        params={"mods": mods},
        heads=heads.pop() if heads else None,
    )


def custom(fn: ScoreModFn, name: str | None = None) -> ScoreMod:
    """Wrap a plain ``fn(score, b, h, q_idx, kv_idx)`` with a name."""
    if not callable(fn):
        raise TypeError(f"custom score_mod needs a callable, got {fn!r}")
    name = name or f"custom({getattr(fn, '__name__', 'fn')})"
    checked = result_checked(fn, name)
    return ScoreMod(name, lambda Lq, Lk: checked)


def learns(score_mod: object) -> bool:
    """Whether a ``ScoreMod``'s parameters require grad (slopes, tables, composed mods').

    A plain callable's closure is not looked into: False.
    """
    if not isinstance(score_mod, ScoreMod):
        return False
    for value in score_mod.params.values():
        values = value if isinstance(value, tuple | list) else (value,)
        for v in values:
            if (isinstance(v, Tensor) and v.requires_grad) or learns(v):
                return True
    return False


@dataclass(frozen=True)
class KernelMods:
    """Score mods that attnkit's kernels apply themselves: ALiBi slopes and/or a softcap.

    Applied in that order, in natural units after scaling and before the mask, as
    ``compose(alibi(slopes, offset=alibi_offset), softcap(cap))`` would. ``softcap`` 0 means
    none; ``alibi_offset`` None means ALiBi's default alignment, Lk - Lq.
    """

    slopes: Tensor | None = None
    softcap: float = 0.0
    alibi_offset: int | None = None

    @property
    def learns_slopes(self) -> bool:
        """Whether the slopes want a gradient (kernels do not compute one)."""
        return self.slopes is not None and self.slopes.requires_grad and torch.is_grad_enabled()

    def offset_for(self, Lq: int, Lk: int) -> int:
        """ALiBi's offset for Lq queries over Lk keys: query i sits at key i + offset."""
        return Lk - Lq if self.alibi_offset is None else self.alibi_offset

    def score_mod(self) -> ScoreMod | None:
        """These mods as the ``ScoreMod`` that ``kernel_mods`` reads back as them (None: none)."""
        found = [] if self.slopes is None else [alibi(self.slopes, offset=self.alibi_offset)]
        if self.softcap:
            found.append(softcap(self.softcap))
        return None if not found else found[0] if len(found) == 1 else compose(*found)


def kernel_mods(score_mod: object) -> KernelMods | None:
    """None, alibi, softcap or compose(alibi, softcap) as ``KernelMods``; None for any other."""
    if score_mod is None:
        return KernelMods()
    if not isinstance(score_mod, ScoreMod):
        return None
    if score_mod.kind == "alibi":
        return KernelMods(score_mod.params["slopes"], 0.0, score_mod.params["offset"])
    if score_mod.kind == "softcap":
        return KernelMods(softcap=score_mod.params["cap"])
    if score_mod.kind == "compose":
        mods = score_mod.params["mods"]
        kinds = [m.kind if isinstance(m, ScoreMod) else "" for m in mods]
        if kinds == ["alibi", "softcap"]:
            first, cap = mods[0].params, mods[1].params["cap"]
            return KernelMods(first["slopes"], cap, first["offset"])
    return None
