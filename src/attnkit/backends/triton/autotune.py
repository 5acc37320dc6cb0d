"""Opt-in autotuning of each triton kernel's tiles: ``ATTNKIT_TRITON_AUTOTUNE=1``.

The launcher's tiles come from compiler figures (no register spills, shared memory fits, the
arch's tensor-core instruction), not from timings. With autotuning on, the first call for a
problem times a few variants of each kernel's tiles on the caller's device and keeps the
fastest for every later call with the same key (kernel, device, dtype, head dims, GQA group,
score mods, mask, and sequence lengths rounded up to a power of two). The forward is tuned
on the first call; dK/dV and dQ on the first call that needs gradients. An inference call
that packs query heads (decoding, ``decoding_launch``) tunes that packed tile instead, under
a key of its own.

Variants are few: the table's choice, one pipeline stage fewer, half the warps, and half the
tile along the kernel's loop. One the GPU refuses (``OutOfResources``) is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.utils.benchmark import Timer

from attnkit.backends._common import Request
from attnkit.backends.triton import _inference_tiles
from attnkit.backends.triton.calls import (
    Scalars,
    backward_calls,
    forward_calls,
    kernel_input,
    with_gradient,
)
from attnkit.backends.triton.launches import Launch, Launches
from attnkit.backends.triton.walks import tile_walk


def variants(launch: Launch, kernel: str) -> list[Launch]:
    """The table's ``launch`` first, then at most three variants, without duplicates.

    ``kernel``: "forward" or "dq" (they loop over key tiles: block_n halves) or "dkdv" (loops
    over query tiles: block_m halves). Tiles stay at least 16 (the smallest tl.dot).
    """
    found = [launch]
    if launch.num_stages > 1:
        found.append(replace(launch, num_stages=launch.num_stages - 1))
    if launch.num_warps > 1:
        found.append(replace(launch, num_warps=launch.num_warps // 2))
    if kernel == "dkdv" and launch.block_m >= 32:
        found.append(replace(launch, block_m=launch.block_m // 2))
    elif kernel != "dkdv" and launch.block_n >= 32:
        found.append(replace(launch, block_n=launch.block_n // 2))
    return list(dict.fromkeys(found))


def median_seconds(launch: Launch, run: Callable[[], None]) -> float:
    """Seconds per call of ``run``, after one untimed call that compiles the kernel.

    torch's Timer synchronises the GPU around the timed calls.
    """
    run()
    return float(Timer(stmt="run()", globals={"run": run}).timeit(3).median)


@dataclass
class Tuner:
    """Times the variants of a kernel's tiles once per key and remembers the fastest.

    ``timer(launch, run)``: seconds per ``run()``, the kernel launched with ``launch``.
    """

    timer: Callable[[Launch, Callable[[], None]], float] = median_seconds
    chosen: dict[Hashable, Launch] = field(default_factory=dict)

    def pick(
        self,
        key: Hashable,
        candidates: list[Launch],
        runner: Callable[[Launch], Callable[[], None]],
    ) -> Launch:
        """The fastest of ``candidates`` for ``key``; ``runner(launch)`` prepares one run."""
        if key in self.chosen:
            return self.chosen[key]
        from triton.runtime.errors import OutOfResources

        times = {}
        for launch in candidates:
            try:
                times[launch] = self.timer(launch, runner(launch))
            except OutOfResources:  # more shared memory than this GPU has
                continue
        if not times:
            raise RuntimeError(f"no tile choice could run for {key}: tried {candidates}")
        best = min(times, key=times.__getitem__)
        self.chosen[key] = best
        return best


#: The process-wide tuner: its choices last as long as the process.
TUNER = Tuner()


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _mask_name(req: Request) -> str:
    mask = req.mask
    if mask is None:
        return "none"
    if isinstance(mask, Tensor):
        return f"tensor{tuple(mask.shape)}"
    return mask.name


@torch.compiler.disable  # type: ignore[untyped-decorator]  # timing runs eagerly, no graph
def tune(req: Request, launches: Launches, sc: Scalars, slopes: Tensor, grads: bool) -> Launches:
    """``launches`` with each kernel's tiles replaced by its fastest variant.

    The backward's two kernels are tuned only when ``grads``. Once every kernel the call
    needs is remembered, no scratch tensor is made and no kernel runs here.
    """
    B, H, Lq, D = req.q.shape
    Hkv, Lk, Dv = req.k.shape[1], req.k.shape[2], req.v.shape[3]
    base = (
        str(req.q.device),
        req.q.dtype,
        D,
        Dv,
        H // Hkv,
        (sc.has_alibi, sc.softcap > 0),
        _mask_name(req),
        _pow2(Lq),
        _pow2(Lk),
    )
    tuned: tuple[str, ...]
    if grads:
        first, packed, tuned = launches.forward, False, ("forward", "dkdv", "dq")
    else:
        # a packed decoding tile goes in the forward's place: the launcher derives the packed
        # tile from the forward's, and a packed tile derives itself
        first, _, packed = _inference_tiles(req, launches.forward)
        tuned = ("decoding" if packed else "forward",)
    keys = [(name, *base) for name in tuned]
    if all(key in TUNER.chosen for key in keys):
        remembered = [TUNER.chosen[key] for key in keys]
        return Launches(*remembered) if grads else replace(launches, forward=remembered[0])
    q, k, v = (kernel_input(x) for x in (req.q, req.k, req.v))
    out = q.new_empty(1, B, H, Lq, Dv)  # one split: the tables' tiles serve every split count
    lse = q.new_empty(1, B, H, Lq, dtype=torch.float32)

    def forward(launch: Launch) -> Callable[[], None]:
        walk = tile_walk(req, launch)
        (call,) = forward_calls(q, k, v, out, lse, walk, slopes, sc, launch, packed)
        return call.launch

    best_forward = TUNER.pick(keys[0], variants(first, "forward"), forward)
    if not grads:
        return replace(launches, forward=best_forward)
    forward(best_forward)()  # the backward kernels read out and lse
    # (B, H, Lq, ...) as the backward op gets them: dO's strides are the kernels' (batch, head,
    # row) strides, so the forward's leading split dim must not reach them
    out1, lse1 = out[0], lse[0]
    dout = torch.randn_like(out1)
    delta = (dout.float() * out1.float()).sum(-1)
    # as the backward op runs them: a layout with no gradient of its strides is copied
    (qb, dq), (kb, dk), (vb, dv) = (with_gradient(x) for x in (q, k, v))

    def backward(dkdv: Launch, dq_: Launch, which: int) -> Callable[[], None]:
        calls = backward_calls(
            qb,
            kb,
            vb,
            dout,
            lse1,
            delta,
            dq,
            dk,
            dv,
            tile_walk(req, dkdv, by_columns=True),
            tile_walk(req, dq_),
            slopes,
            sc,
            dkdv,
            dq_,
        )
        return calls[which].launch

    best_dkdv = TUNER.pick(
        keys[1],
        variants(launches.dkdv, "dkdv"),
        lambda c: backward(c, launches.dq, 0),
    )
    best_dq = TUNER.pick(keys[2], variants(launches.dq, "dq"), lambda c: backward(best_dkdv, c, 1))
    return Launches(best_forward, best_dkdv, best_dq)
