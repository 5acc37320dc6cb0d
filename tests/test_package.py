"""The package's public names: DESIGN §3's API at the top, the backends' modules below it."""

from __future__ import annotations

import importlib

import attnkit


def test_every_public_name_exists():
    for name in attnkit.__all__:
        assert getattr(attnkit, name) is not None, name


def test_backends_is_the_function_and_its_modules_import_by_dotted_name():
    """``attnkit.backends`` is DESIGN's function, while the sub-package of kernels has the same
    name: ``import attnkit.backends.tiled as t`` raised "cannot import name 'tiled' from
    'backends'" (Python looks the module up by the name of what ``attnkit.backends`` holds)."""
    import attnkit.backends.cpu_kernel as cpu_kernel_module
    import attnkit.backends.tiled as tiled_module
    from attnkit.backends import tiled

    assert tiled_module is tiled
    assert cpu_kernel_module is importlib.import_module("attnkit.backends.cpu_kernel")
    assert callable(attnkit.backends)
    assert {"reference", "sdpa", "tiled"} <= set(attnkit.backends())
