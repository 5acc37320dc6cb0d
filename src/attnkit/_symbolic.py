"""Choices on lengths that torch.compile and torch.export may leave symbolic.

Under ``torch.compile(dynamic=...)`` and ``torch.export`` with a dynamic dim, a sequence length
is a SymInt. Comparing it in Python (``if Lq <= 16``) adds a guard: the graph then holds only
for lengths on that side, torch.compile recompiles when one crosses it, and torch.export
refuses a dynamic range that spans it. Choices that only tune speed (tile heights, SDPA or
tiled) are therefore made with ``surely``: the branch for short sequences where the length is
known to be short, else the one for long sequences, which serves every length.
"""

from __future__ import annotations

import torch


def surely(condition: bool | torch.SymBool) -> bool:
    """Whether ``condition`` holds for every value its symbolic lengths may take.

    A plain bool is returned as it is; a symbolic one is decided without adding a guard, False
    where the lengths' known range leaves it open.
    """
    if isinstance(condition, bool):
        return condition
    # imported here: symbolic_shapes pulls in sympy, ~0.3 s of `import attnkit` otherwise
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(condition))
