"""Opt-in autotuning (ATTNKIT_TRITON_AUTOTUNE=1), under TRITON_INTERPRET=1 on CPU.

The tuner times a few tile variants per kernel once per problem key and keeps the fastest;
the answer must stay right whichever variant wins, and the winner must be what then runs.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
pytest.importorskip("triton", reason="triton is not installed (pip install 'attnkit[triton]')")

import attnkit
from attnkit import masks
from attnkit.backends import triton as tr
from attnkit.backends.triton import autotune
from conftest import rand_qkv
from test_triton import DEVICE, check, pytestmark  # noqa: F401  (same skip rule)

L = tr.Launch
TABLE = tr.launches.Launches(L(32, 32, 2, 2), L(32, 32, 2, 2), L(32, 32, 2, 2))
# half the tile along each kernel's loop: what the fake timer below calls fastest
HALVED = {"forward": L(32, 16, 2, 2), "dkdv": L(16, 32, 2, 2), "dq": L(32, 16, 2, 2)}


def test_variants_are_few_and_start_with_the_table_choice():
    assert autotune.variants(L(128, 64, 8, 3), "forward") == [
        L(128, 64, 8, 3),
        L(128, 64, 8, 2),
        L(128, 64, 4, 3),
        L(128, 32, 8, 3),
    ]
    assert autotune.variants(L(32, 128, 8, 1), "dkdv") == [
        L(32, 128, 8, 1),
        L(32, 128, 4, 1),
        L(16, 128, 8, 1),
    ]
    assert autotune.variants(L(16, 16, 1, 1), "dq") == [L(16, 16, 1, 1)]


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on, the table at 32x32 tiles, and a timer that runs each variant for real
    but calls the halved tiles fastest. Yields (tuner, timed launches, launches that ran)."""
    monkeypatch.setenv(tr.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tr, "choose_launches", lambda D, dtype, arch: TABLE)
    timed = []

    def timer(launch, run):
        run()
        timed.append(launch)
        return 0.5 if launch.block_m != launch.block_n else 1.0

    tuner = autotune.Tuner(timer=timer)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    ran = []  # the launches the custom ops ran with (the tuner's own runs call these too)
    for name in ("forward_calls", "backward_calls"):
        real = getattr(tr, name)

        def spy(*args, real=real):
            calls = real(*args)
            ran.extend((c.kernel.fn.__name__, c.meta["BLOCK_M"], c.meta["BLOCK_N"]) for c in calls)
            return calls

        monkeypatch.setattr(tr, name, spy)
    return tuner, timed, ran


#: walked through tile lists and bitmaps at the table's stages (bands and key ranges, which
#: the kernels compute, take one stage fewer)
WALKED = masks.dilated(20, 2) & masks.key_padding([60])


@pytest.mark.slow
# a NaN in the interpreter's matmuls was dO read through the wrong strides, past its end
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_picks_the_fastest_variant_per_kernel_once_per_key(tuning):
    tuner, timed, ran = tuning
    shape = (1, 4, 2, 45, 70, 32, 32)
    check(shape, mask=WALKED, return_lse=True)
    assert {key[0]: launch for key, launch in tuner.chosen.items()} == HALVED
    assert len(timed) == 12  # four variants of each of three kernels
    assert ran == [
        ("attention_forward_kernel", 32, 16),
        ("attention_backward_dkdv_kernel", 16, 32),
        ("attention_backward_dq_kernel", 32, 16),
    ]
    with pytest.MonkeyPatch.context() as mp:  # same key: remembered, the tuner runs nothing
        for name in ("forward_calls", "backward_calls"):
            mp.setattr(autotune, name, lambda *a: pytest.fail("the tuner ran a kernel again"))
        check(shape, mask=WALKED)
    assert len(timed) == 12
    check((1, 4, 2, 90, 70, 32, 32), mask=WALKED)  # Lq 45 → 90: new key
    assert len(timed) == 24


def test_forward_only_calls_tune_only_the_forward(tuning):
    tuner, _, _ = tuning
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 40, 40, 16))
    want = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    got = attnkit.attention(q, k, v, mask=masks.causal(), backend="triton")
    assert [key[0] for key in tuner.chosen] == ["forward"]
    assert (got - want).abs().max() < 1e-5


def test_a_variant_the_gpu_refuses_is_skipped(tuning, monkeypatch):
    from triton.runtime.errors import OutOfResources

    tuner, _, _ = tuning

    def timer(launch, run):
        if launch.block_m != launch.block_n:
            raise OutOfResources(300_000, 232_448, "shared memory")
        run()
        return 1.0 if launch.num_stages == 2 else 0.5

    tuner.timer = timer
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 40, 40, 16))
    attnkit.attention(q, k, v, backend="triton")
    assert list(tuner.chosen.values()) == [L(32, 32, 2, 1)]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # as above: dO read in place
def test_real_timer_and_off_by_default(monkeypatch):
    """torch's Timer times the variants under the interpreter too; unset, nothing is timed."""
    tuner = autotune.Tuner()
    monkeypatch.setattr(autotune, "TUNER", tuner)
    monkeypatch.setattr(tr, "choose_launches", lambda D, dtype, arch: TABLE)
    monkeypatch.delenv(tr.AUTOTUNE_ENV, raising=False)
    check((1, 2, 1, 20, 33, 16, 16), mask=masks.causal())
    assert tuner.chosen == {}
    monkeypatch.setenv(tr.AUTOTUNE_ENV, "1")
    check((1, 2, 1, 20, 33, 16, 16), mask=masks.causal())
    assert sorted(key[0] for key in tuner.chosen) == ["dkdv", "dq", "forward"]


def test_decoding_tunes_its_packed_tile_under_a_key_of_its_own(tuning, monkeypatch):
    """A decoding step runs the packed tile (``decoding_launch``): that is what is timed and
    remembered, apart from the same shapes' unpacked forward, and what then runs."""
    from conftest import record_launches

    tuner, _, _ = tuning
    tuner.timer = lambda launch, run: (run(), 0.5 if launch.num_warps == 1 else 1.0)[1]
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 4, 2, 1, 70, 16))
    launched = record_launches(monkeypatch)
    got = attnkit.attention(q, k, v, mask=masks.causal(), backend="triton")
    packed = tr.decoding_launch(TABLE.forward, group=2, Lq=1)
    assert packed == L(16, 32, 2, 2)
    assert [key[0] for key in tuner.chosen] == ["decoding"]
    assert list(tuner.chosen.values()) == [L(16, 32, 1, 2)]  # half the warps: "fastest"
    assert len(launched) == 4 + 1  # four variants timed, then the winner runs
    final = launched[-1]
    assert (final.meta["PACK_GQA"], final.meta["BLOCK_M"], final.meta["num_warps"]) == (True, 16, 1)
    assert all(c.meta["PACK_GQA"] for c in launched)  # every variant timed packed
    want = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    assert (got - want).abs().max() < 1e-5
