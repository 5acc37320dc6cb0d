"""DESIGN §6: the functional API compiles without graph breaks on the reference/sdpa paths."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_compiles_fullgraph(backend):
    q = torch.randn(1, 2, 16, 8)
    k = torch.randn(1, 1, 16, 8)

    def f(q, k):
        return attnkit.attention(q, k, k, mask=masks.causal(), backend=backend)

    compiled = torch.compile(f, fullgraph=True)  # raises on any graph break
    torch.testing.assert_close(compiled(q, k), f(q, k))
