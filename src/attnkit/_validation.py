"""Every check of user input, in one place, with messages that name the argument and shapes.

Backends and modules call these at the boundary so that bad input never reaches a kernel.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from attnkit._types import Shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_qkv(q: Any, k: Any, v: Any) -> Shapes:
    """Validate q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) and return their sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, H, L, D), got shape {_shape(t)} with {t.dim()} dims"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (B, Hq, Lq, D), (Bk, Hkv, Lk, Dk), (Bv, Hv, Lv, Dv) = q.shape, k.shape, v.shape
    if Bk != B or Bv != B:
        raise ValueError(
            f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (dim 0 must match)"
        )
    if Hv != Hkv or Lv != Lk:
        raise ValueError(f"k and v must agree on heads and length: k {_shape(k)}, v {_shape(v)}")
    if Dk != D:
        raise ValueError(f"q and k head dims differ: q {_shape(q)}, k {_shape(k)} (dim 3)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA/MQA): "
            f"q {_shape(q)} has {Hq}, k {_shape(k)} has {Hkv}"
        )
    if 0 in (Hq, D, Dv):
        raise ValueError(
            f"empty dimension: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (heads and head dims "
            f"must be >= 1)"
        )
    return Shapes(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv)


def check_scale(scale: Any, D: int) -> float:
    """Return the softmax scale: ``scale`` if given (finite, non-zero), else 1/sqrt(D)."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    return float(scale)


def check_dropout(dropout_p: Any) -> float:
    """Dropout probability must lie in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, int | float):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:  # (NaN compares False)
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_generator(generator: Any) -> None:
    """The dropout generator must be a torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def check_bool_dtype(mask: Tensor) -> None:
    """A tensor mask must be bool: a float one is likely an additive bias (0 / -inf)."""
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask tensor must be bool (True = attend), got {mask.dtype}; "
            "use a score_mod for additive float biases"
        )


def check_mask_broadcasts(mask: Tensor, s: Shapes) -> None:
    """A tensor mask must broadcast to (B, Hq, Lq, Lk) (its dtype: ``check_bool_dtype``)."""
    target = (s.B, s.Hq, s.Lq, s.Lk)
    if mask.dim() > 4:
        raise ValueError(f"mask has {mask.dim()} dims, shape {_shape(mask)}; at most 4 allowed")
    padded = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if any(m not in (1, t) for m, t in zip(padded, target, strict=True)):
        raise ValueError(
            f"mask of shape {_shape(mask)} does not broadcast to (B, H, Lq, Lk) = {target}"
        )


def check_window(name: str, value: Any) -> int:
    """A window side is a non-negative int, or -1 for unbounded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (or -1 for unbounded), got {type(value).__name__}")
    if value < -1:
        raise ValueError(f"{name} must be >= 0, or -1 for unbounded, got {value}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """A yes/no argument must be a bool: a tensor or a string there is a mistake, not True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value: Any, least: int = 1) -> int:
    """A count or size: an int (not a bool) of at least ``least``.

    A symbolic size (torch.compile, torch.export) is checked when the graph runs, not traced.
    """
    if isinstance(value, torch.SymInt):
        message = f"{name} must be an int >= {least}"
        torch._check(value >= least, lambda: message)  # type: ignore[no-untyped-call]
        return cast(int, value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {least}, got {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value}")
    return value


def check_token_ids(name: str, ids: Any, vocab: int) -> None:
    """Token ids: an integer tensor (B, L) of ids in 0..vocab-1.

    The range is read on CPU tensors outside torch.compile and torch.export only: on a GPU it
    would wait for the device at every step (an id out of range then fails in the embedding).
    """
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got {got}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (B, L) token ids, got shape {_shape(ids)}")
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(x) for x in torch.aminmax(ids))
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{name} holds token id {lo if lo < 0 else hi}, outside the vocabulary 0..{vocab - 1}"
        )


def check_align(align: Any) -> str | int:
    """'bottom_right', 'top_left', or an int offset (query i lines up with key i + offset)."""
    if isinstance(align, int) and not isinstance(align, bool):
        return align
    if align not in ("bottom_right", "top_left"):
        raise ValueError(
            f"align must be 'bottom_right', 'top_left' or an int offset, got {align!r}"
        )
    return str(align)


def check_attention_map(
    name: str, weights: Any, n_queries: int, n_keys: int, signed: bool = False
) -> None:
    """A map to draw: (H, Lq, Lk) attention weights in [0, 1], Lq and Lk the token counts.

    The queries are ``n_queries`` tokens, the keys ``n_keys`` (the same in self-attention).
    ``signed``: differential attention's maps A1 − λ·A2, in [-1, 1].
    Scores (before the softmax) or NaN would be drawn as something they are not.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 3:
        got = _shape(weights) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"{name} must be (H, Lq, Lk) attention weights, got {got}")
    if tuple(weights.shape[1:]) != (n_queries, n_keys):
        tokens = (
            f"{n_queries} tokens"
            if n_queries == n_keys
            else f"{n_queries} query and {n_keys} key tokens"
        )
        raise ValueError(f"{name} is (H, Lq, Lk) = {_shape(weights)} but there are {tokens}")
    w = weights.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} holds NaN or inf weights")
    low, high = float(w.min()), float(w.max())
    least = -1.0 if signed else 0.0
    if low < least - 1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"{name} holds values in [{low:.3g}, {high:.3g}], not weights in [{least:g}, 1]: "
            "draw probabilities (attnkit.attention_weights), not scores"
        )
