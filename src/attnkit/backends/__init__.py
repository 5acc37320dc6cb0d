"""Attention backends. Each module has ``NAME``, ``unsupported_reason(req)`` and ``run(req)``.

    reference  the spec: materialised softmax in float32/64 (backends/reference.py)
    sdpa       torch.nn.functional.scaled_dot_product_attention (backends/sdpa.py)
"""

from __future__ import annotations

from types import ModuleType

from attnkit.backends import reference, sdpa

_REGISTRY: dict[str, ModuleType] = {reference.NAME: reference, sdpa.NAME: sdpa}


def get(name: str) -> ModuleType:
    """The backend module called ``name``."""
    return _REGISTRY[name]


def names() -> list[str]:
    """Names of the backends available in this installation."""
    return list(_REGISTRY)
