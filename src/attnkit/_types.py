"""Shape legends, type aliases and the small records passed between modules.

Shape legend used in every docstring of attnkit:

    B    batch size
    Hq   query heads;  Hkv key/value heads (Hq % Hkv == 0: MHA, GQA, MQA)
    Lq   query length; Lk key/value length
    D    query/key head dim; Dv value head dim
    E    model (embedding) width
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeAlias

from torch import Tensor

#: A mask predicate ``fn(b, h, q_idx, kv_idx) -> bool tensor`` (True = attend).
#: Its arguments are broadcasting integer index tensors, as in FlexAttention's ``mask_mod``.
MaskFn: TypeAlias = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

#: A score modifier ``fn(score, b, h, q_idx, kv_idx) -> score`` applied after scaling,
#: before masking, as in FlexAttention's ``score_mod``.
ScoreModFn: TypeAlias = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

#: Tile kinds stored in ``BlockMask.kinds``.
EMPTY, PARTIAL, FULL = 0, 1, 2


class UnsupportedError(RuntimeError):
    """An explicitly named backend cannot do the request (the message says why)."""


class DispatchDecision(NamedTuple):
    """Which backend ``attention(backend="auto")`` picks, and why."""

    backend: str
    reason: str


class Shapes(NamedTuple):
    """The sizes of one attention call, read off q, k and v after validation.

    (A NamedTuple, as ``Request``: every call makes one, at a third of a frozen dataclass's
    cost.)
    """

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int

    @property
    def no_pairs(self) -> bool:
        """Whether there is no (query, key) pair to score: B, Lq or Lk is 0."""
        return 0 in (self.B, self.Lq, self.Lk)
