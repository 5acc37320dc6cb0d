"""What every backend receives: one validated request, plus helpers shared by backends."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from attnkit._types import ScoreModFn, Shapes, UnsupportedError
from attnkit.block_mask import BlockMask
from attnkit.masks import Mask

MaskLike = Mask | BlockMask | Tensor | None


class Request(NamedTuple):
    """One validated attention call (a NamedTuple: made at every call, it costs least).

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); ``score_mod`` is already bound
    to (Lq, Lk) and ``score_mod_source`` is what the caller passed (kernels recognise built-in
    ScoreMods by it); ``seed`` is the dropout seed (None when dropout_p == 0).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    shapes: Shapes
    mask: MaskLike
    score_mod: ScoreModFn | None
    score_mod_source: object
    scale: float
    dropout_p: float
    seed: int | None
    return_lse: bool

    @property
    def needs_grad(self) -> bool:
        """Whether autograd will want gradients of q, k or v from this call."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


def inside_torch_func() -> str | None:
    """Why a call inside a torch.func transform cannot go to a fused backend; None outside.

    The tiled and triton backends are autograd.Functions over kernels, which torch.func's
    grad, vjp, jacrev and vmap do not compose with.
    """
    if torch._C._are_functorch_transforms_active():
        return (
            "inside a torch.func transform (grad, vjp, jacrev, vmap), which its fused kernels "
            "do not compose with; the reference and sdpa backends do"
        )
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulation: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_grid(s: Shapes, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcasting index tensors b (B,1,1,1), h (1,Hq,1,1), q (1,1,Lq,1), kv (1,1,1,Lk)."""
    return (
        torch.arange(s.B, device=device).view(-1, 1, 1, 1),
        torch.arange(s.Hq, device=device).view(1, -1, 1, 1),
        torch.arange(s.Lq, device=device).view(1, 1, -1, 1),
        torch.arange(s.Lk, device=device).view(1, 1, 1, -1),
    )


def dense_mask(mask: MaskLike, s: Shapes, device: torch.device) -> Tensor | None:
    """The mask as a bool tensor (B|1, H|1, Lq, Lk), True = attend; None for no mask."""
    if mask is None:
        return None
    if isinstance(mask, Mask):
        return mask.dense(s.Lq, s.Lk, B=s.B, H=s.Hq, device=device)  # (B|1, H|1): as it varies
    if isinstance(mask, BlockMask):
        return mask.to_dense().to(device)
    # a bool tensor of fewer dims, (Lk,) say, gets its leading 1s: SDPA wants at least (Lq, Lk)
    return mask.to(device).view((1,) * (4 - mask.dim()) + tuple(mask.shape))


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, Hkv·groups, L, D): each kv head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


_Backward = Callable[..., tuple[Tensor | None, ...]]


def first_order_only(who: str) -> Callable[[_Backward], _Backward]:
    """Mark an ``autograd.Function.backward`` whose gradients cannot be differentiated again.

    Fused backward passes compute dq, dk, dv with kernels (or from tensors saved outside
    autograd), so a second derivative through them would come out silently wrong, or silently
    zero where the incoming gradient is constant. The backward runs without building a graph;
    under ``create_graph=True`` its gradients pass through a node, linked to the saved inputs
    so that autograd reaches it, that raises ``UnsupportedError`` naming ``who`` if anything
    differentiates them. First-order gradients are unchanged.
    (``torch.autograd.function.once_differentiable`` guards only when the incoming gradient
    itself requires grad.)
    """

    def decorate(backward: _Backward) -> _Backward:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grad_outputs: Any) -> tuple[Tensor | None, ...]:
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            tensors = [g.detach().requires_grad_() for g in grads if isinstance(g, Tensor)]
            inputs = [t for t in ctx.saved_tensors if t.requires_grad]
            guarded = iter(
                _NoSecondDerivative.apply(who, len(tensors), *tensors, *inputs)  # type: ignore[no-untyped-call]
            )
            return tuple(next(guarded) if isinstance(g, Tensor) else g for g in grads)

        return wrapper

    return decorate


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on ``n`` gradients; differentiating them raises (see ``first_order_only``).

    The inputs after the gradients only link this node to the graph; they pass nothing on.
    """

    @staticmethod
    def forward(ctx: Any, who: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.who = who
        return tuple(g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *_: Tensor) -> tuple[None, ...]:
        raise UnsupportedError(
            f"{ctx.who} computes first-order gradients only: differentiating its gradients "
            "again (a second derivative, e.g. a gradient penalty or a Hessian-vector product) "
            "is not supported; use backend='reference', whose gradients are plain autograd ops"
        )
