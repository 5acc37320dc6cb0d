"""Random whole requests on the triton backend against the float64 reference (DESIGN §7).

As ``tests/test_random_requests.py`` for the CPU backends, at the interpreter's small shapes
(``tests/strategies.py``). Its own file: a GPU image without hypothesis still runs the rest of
the Triton tests (``benchmarks/gpu_session.sh``).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
pytest.importorskip("triton", reason="triton is not installed (pip install 'attnkit[triton]')")
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")

from hypothesis import event, given, settings

from conftest import TRITON_DEVICE, needs_triton_device
from strategies import check_against_reference, requests

pytestmark = needs_triton_device
DEVICE = TRITON_DEVICE


@pytest.mark.slow
@settings(max_examples=30)
@given(request=requests(lengths=(1, 2, 17, 33), head_dims=(8, 16, 40), dropout=False))
def test_random_requests_match_the_reference(request):
    """Random shapes, masks (patterns and their combinations), score mods, scale, sinks and
    dtypes."""
    ran = check_against_reference(*request, backend="triton", device=DEVICE)
    event("ran" if ran else "triton refused it")
