"""Every mask's dense() against a direct definition; blocks() against dense() tile by tile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import block_mask, masks
from attnkit._types import EMPTY, FULL, PARTIAL
from attnkit.block_mask import BlockMask, partial_bitmaps, retile
from conftest import MASK_NAMES, every_mask, per_head_predicate


def direct(Lq, Lk, rule, B=1, H=1):
    """Evaluate ``rule(b, h, i, j, off)`` position by position (off = Lk - Lq)."""
    off = Lk - Lq
    out = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    out[b, h, i, j] = bool(rule(b, h, i, j, off))
    return out


IDS = [0] * 9 + [1] * 14 + [2] * 3 + [3] * 27
LAYOUT = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.4
DENSE = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(2)) < 0.5
VALID = torch.arange(53)[None, :] < torch.tensor([[40], [53]])

# (name, mask, direct rule, B, H) at Lq=37, Lk=53
CASES = [
    ("full", masks.full(), lambda b, h, i, j, o: True, 1, 1),
    ("causal", masks.causal(), lambda b, h, i, j, o: j <= i + o, 1, 1),
    ("causal_tl", masks.causal(align="top_left"), lambda b, h, i, j, o: j <= i, 1, 1),
    ("window", masks.sliding_window(5), lambda b, h, i, j, o: i + o - 5 <= j <= i + o, 1, 1),
    (
        "window2",
        masks.sliding_window(3, 4),
        lambda b, h, i, j, o: i + o - 3 <= j <= i + o + 4,
        1,
        1,
    ),
    ("window_left_unb", masks.sliding_window(-1, 2), lambda b, h, i, j, o: j <= i + o + 2, 1, 1),
    (
        "window_tl",
        masks.sliding_window(4, align="top_left"),
        lambda b, h, i, j, o: i - 4 <= j <= i,
        1,
        1,
    ),
    (
        "dilated",
        masks.dilated(3, 2),
        lambda b, h, i, j, o: (j - i - o) % 2 == 0 and abs(j - i - o) <= 6,
        1,
        1,
    ),
    (
        "dilated_causal",
        masks.dilated(4, 3, causal=True),
        lambda b, h, i, j, o: (j - i - o) % 3 == 0 and -12 <= j - i - o <= 0,
        1,
        1,
    ),
    (
        "strided",
        masks.strided(4),
        lambda b, h, i, j, o: i + o - j >= 0 and ((i + o - j) < 4 or (i + o - j) % 4 == 0),
        1,
        1,
    ),
    (
        "fixed",
        masks.fixed(8, 2),
        lambda b, h, i, j, o: j <= i + o and (j // 8 == (i + o) // 8 or j % 8 >= 6),
        1,
        1,
    ),
    (
        "fixed_nosum",
        masks.fixed(5, 0),
        lambda b, h, i, j, o: j <= i + o and j // 5 == (i + o) // 5,
        1,
        1,
    ),
    ("prefix_lm", masks.prefix_lm(20), lambda b, h, i, j, o: j < 20 or j <= i + o, 1, 1),
    (
        "global",
        masks.global_tokens([0, 17, 40]),
        lambda b, h, i, j, o: j in (0, 17, 40) or i + o in (0, 17, 40),
        1,
        1,
    ),
    ("key_padding", masks.key_padding([53, 20]), lambda b, h, i, j, o: j < [53, 20][b], 2, 1),
    ("padding_mask", masks.from_padding_mask(VALID), lambda b, h, i, j, o: bool(VALID[b, j]), 2, 1),
    ("document", masks.document(IDS), lambda b, h, i, j, o: IDS[i + o] == IDS[j], 1, 1),
    (
        "block_sparse",
        masks.block_sparse(LAYOUT, 7),
        lambda b, h, i, j, o: bool(LAYOUT[h, i // 7, j // 7]),
        1,
        3,
    ),
    ("from_dense", masks.from_dense(DENSE), lambda b, h, i, j, o: bool(DENSE[b, 0, i, j]), 2, 1),
    (
        "custom",
        masks.custom(lambda b, h, q, kv: (q * 3 + kv) % 5 == 0),
        lambda b, h, i, j, o: (i * 3 + j) % 5 == 0,
        1,
        1,
    ),
]


@pytest.mark.parametrize(("name", "mask", "rule", "B", "H"), CASES, ids=[c[0] for c in CASES])
def test_dense_matches_direct_definition(name, mask, rule, B, H):
    got = mask.dense(37, 53, B=B, H=H).expand(B, H, 37, 53)
    torch.testing.assert_close(got, direct(37, 53, rule, B, H))


def test_bigbird_structure_and_seed():
    m = masks.bigbird(block=4, num_window=3, num_global=1, num_random=2, seed=3)
    d = m.dense(32, 32)[0, 0]
    blocks = d.view(8, 4, 8, 4)
    # block-constant
    assert bool((blocks.all(dim=(1, 3)) == blocks.any(dim=(1, 3))).all())
    lay = blocks.any(dim=(1, 3))
    r = torch.arange(8)
    assert bool(lay[(r[:, None] - r[None, :]).abs() <= 1].all())  # window
    assert bool(lay[0].all())
    assert bool(lay[:, 0].all())
    assert bool((lay.sum(1) >= 3).all())  # window (+ randoms)
    torch.testing.assert_close(d, masks.bigbird(4, 3, 1, 2, seed=3).dense(32, 32)[0, 0])


def test_bigbird_random_blocks_differ_by_seed():
    a = masks.bigbird(4, 1, 0, 3, seed=0).dense(64, 64)
    b = masks.bigbird(4, 1, 0, 3, seed=1).dense(64, 64)
    assert not torch.equal(a, b)
    lay = a[0, 0].view(16, 4, 16, 4).any(dim=(1, 3))
    assert bool((lay.sum(1) <= 1 + 3).all())
    assert bool((lay.sum(1) >= 1).all())


def kinds_from_dense(dense, bq, bk):
    """Tile kinds computed the slow, obvious way from a dense mask (B, H, Lq, Lk)."""
    B, H, Lq, Lk = dense.shape
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    out = torch.empty(B, H, nq, nk, dtype=torch.int8)
    for a in range(nq):
        for c in range(nk):
            tile = dense[:, :, a * bq : (a + 1) * bq, c * bk : (c + 1) * bk].flatten(2)
            out[:, :, a, c] = torch.where(
                tile.all(-1), FULL, torch.where(tile.any(-1), PARTIAL, EMPTY)
            )
    return out


def big_cases():
    ids = torch.repeat_interleave(torch.arange(6), torch.tensor([100, 3, 200, 50, 60, 100]))
    unsorted = ids[torch.randperm(513, generator=torch.Generator().manual_seed(0))]
    layout = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(5)) < 0.3
    band = masks.sliding_window(150, 40).dense(257, 513)
    holes = torch.rand(2, 1, 257, 513, generator=torch.Generator().manual_seed(6)) < 0.999
    base = {
        "full": masks.full(),
        "causal": masks.causal(),
        "causal_tl": masks.causal(align="top_left"),
        "window": masks.sliding_window(100),
        "window_sym": masks.sliding_window(70, 70),
        "window_unb": masks.sliding_window(-1, 30),
        "dilated": masks.dilated(40, 3),
        "dilated_causal": masks.dilated(20, 5, causal=True),
        "strided": masks.strided(64),
        "fixed": masks.fixed(64, 8),
        "fixed_odd": masks.fixed(50, 3),
        "prefix_lm": masks.prefix_lm(300),
        "global": masks.global_tokens([0, 5, 300, 512]),
        "key_padding": masks.key_padding([513, 100, 0]),
        "document": masks.document(ids),
        "document_unsorted": masks.document(unsorted),
        "block_sparse": masks.block_sparse(layout, 64),
        "bigbird": masks.bigbird(32, 3, 2, 2, seed=1),
        "custom": masks.custom(lambda b, h, q, kv: (q + kv) % 7 < 2),
        # full, empty and partial tiles, and edge tiles at 257 x 513
        "from_dense": masks.from_dense(band & holes),
        "padding_mask": masks.from_padding_mask(torch.arange(513) < torch.tensor([[500], [64]])),
    }
    combos = {
        "causal&padding": masks.causal() & masks.key_padding([400, 513]),
        "window|global": masks.sliding_window(64, 64) | masks.global_tokens([0, 200]),
        "~window": ~masks.sliding_window(50),
        "document&causal": masks.document(unsorted) & masks.causal(),
        "window&~dilated": masks.sliding_window(128) & ~masks.dilated(10, 4),
    }
    return {**base, **combos}


CASES_BIG = big_cases()


@pytest.mark.parametrize("name", list(CASES_BIG))
@pytest.mark.parametrize(("bq", "bk"), [(32, 128), (64, 64)])
def test_blocks_exact_against_dense(name, bq, bk):
    mask = CASES_BIG[name]
    Lq, Lk = 257, 513
    bm = mask.blocks(Lq, Lk, bq, bk)
    dense = mask.dense(Lq, Lk)
    expected = kinds_from_dense(dense, bq, bk)
    assert bm.kinds.shape[:2] == expected.shape[:2]
    torch.testing.assert_close(bm.kinds, expected)
    torch.testing.assert_close(bm.to_dense(), dense)


@pytest.mark.parametrize("name", list(CASES_BIG))
def test_kind_by_rule_is_never_wrong_about_empty_or_full(name):
    """A whole grid said EMPTY attends nowhere, FULL everywhere; where the mask's tile rule is
    exact, so is its kind. At every size the mask binds to (some hold tensors of one size)."""
    mask = CASES_BIG[name]
    for Lq, Lk in [(257, 513), (1, 513), (1, 1), (5, 5), (257, 1), (513, 257)]:
        try:
            dense = mask.dense(Lq, Lk)
        except ValueError:
            continue
        truth = FULL if dense.all() else EMPTY if not dense.any() else PARTIAL
        kind = mask.kind_by_rule(Lq, Lk)
        exact = mask.bind(Lq, Lk).exact
        assert kind == truth or (kind == PARTIAL and not exact), (Lq, Lk)


def test_kind_by_rule_finds_blocks_a_ring_skips_without_evaluating_pairs():
    """The blocks ring attention meets: keys all before or after the queries, other
    documents; a predicate that cannot run is never called."""
    before, after = masks.causal(align=600), masks.causal(align=-600)
    assert (before.kind_by_rule(257, 513), after.kind_by_rule(257, 513)) == (FULL, EMPTY)
    own, other = torch.zeros(1, 257, dtype=torch.long), torch.ones(1, 513, dtype=torch.long)
    assert masks.document(own, kv_ids=other).kind_by_rule(257, 513) == EMPTY
    same = masks.document(own, kv_ids=own[:, :1].expand(1, 513))
    assert (before & same).kind_by_rule(257, 513) == FULL
    assert (after & same).kind_by_rule(257, 513) == EMPTY
    rows = torch.cat([own, own + 1])  # batch row 0 sees the keys' document, row 1 does not
    assert masks.document(rows, kv_ids=other.expand(2, 513)).kind_by_rule(257, 513) == PARTIAL

    pairs_evaluated = []

    def counted(b, h, q, kv):
        pairs_evaluated.append(torch.broadcast_shapes(q.shape, kv.shape).numel())
        return q >= kv

    assert (before & masks.custom(counted)).kind_by_rule(257, 513) == PARTIAL
    assert pairs_evaluated == [1]  # custom's rule probes one pair for its batch and head dims


@pytest.mark.parametrize("name", [n for n in MASK_NAMES if n != "bool_tensor"])
def test_a_part_of_a_mask_is_the_same_pairs_and_tiles(name):
    """``Mask.part``: the queries and keys of a part of the grid, counted from its corner, attend
    as in the whole; its tiles (at tile sizes that do not divide the corner) are those of its
    pairs, exactly where the whole's rule is exact. Masks whose rule reads whole grids only
    refuse."""
    mask = every_mask(150, 150)[name]
    whole = mask.dense(150, 150, B=2, H=2)
    for q0, k0, lq, lk in [(0, 0, 150, 150), (37, 101, 60, 49), (75, 0, 75, 75), (149, 3, 1, 5)]:
        if not mask.bind(150, 150).any_ranges:
            with pytest.raises(ValueError, match="for a whole grid only"):
                mask.part(150, 150, q0, k0)
            return
        part = mask.part(150, 150, q0, k0)
        dense = part.dense(lq, lk, B=2, H=2)
        want = whole[..., q0 : q0 + lq, k0 : k0 + lk]
        assert torch.equal(*torch.broadcast_tensors(dense, want)), (q0, k0)
        kinds = part.blocks(lq, lk, 16, 32, B=2, H=2).kinds
        expected = kinds_from_dense(dense, 16, 32)
        assert torch.equal(*torch.broadcast_tensors(kinds, expected)), (q0, k0)
    with pytest.raises(ValueError, match="do not fit the 150 x 150 grid"):
        mask.part(150, 150, 100, 0).dense(51, 10)


def test_custom_mask_tiles_per_batch_and_head_when_its_predicate_varies():
    """blocks(B=, H=) reads off the predicate's result which of b and h it depends on: tiles
    are classified per (b, h) for one that does, once for one that does not."""
    per_head = masks.custom(per_head_predicate)
    bm = per_head.blocks(70, 90, 16, 32, B=2, H=3)
    dense = per_head.dense(70, 90, B=2, H=3)
    assert dense.shape == (2, 3, 70, 90)
    torch.testing.assert_close(bm.kinds, kinds_from_dense(dense, 16, 32))
    torch.testing.assert_close(bm.to_dense(), dense)
    same_everywhere = masks.custom(lambda b, h, q, kv: (q + kv) % 3 != 0)
    assert same_everywhere.blocks(70, 90, 16, 32, B=2, H=3).kinds.shape[:2] == (1, 1)


@pytest.mark.parametrize("name", ["causal", "window", "fixed", "strided", "document", "bigbird"])
def test_blocks_exact_when_queries_outnumber_keys(name):
    mask = {
        "causal": masks.causal(),
        "window": masks.sliding_window(30, 10),
        "fixed": masks.fixed(16, 4),
        "strided": masks.strided(8),
        "document": masks.document([0] * 50 + [1] * 100, kv_ids=[0] * 40 + [1] * 60),
        "bigbird": masks.bigbird(16, align="top_left"),
    }[name]
    bm = mask.blocks(150, 100, 16, 32)
    torch.testing.assert_close(bm.kinds, kinds_from_dense(mask.dense(150, 100), 16, 32))


@pytest.mark.parametrize("name", list(CASES_BIG))
def test_retile_matches_building_at_the_new_tiles(name):
    """A BlockMask re-tiled for a kernel's tile sizes is exact: same kinds as building it there,
    same dense mask, whether the new tiles nest in the old (128x32 from 32x128) or not (48x80)."""
    mask = CASES_BIG[name]
    Lq, Lk = 257, 513
    dense = mask.dense(Lq, Lk)
    bm = mask.blocks(Lq, Lk, 32, 128)
    for bq, bk in [(128, 32), (64, 256), (48, 80)]:
        moved = retile(bm, bq, bk)
        assert (moved.block_q, moved.block_k) == (bq, bk)
        torch.testing.assert_close(moved.kinds, kinds_from_dense(dense, bq, bk))
        torch.testing.assert_close(moved.to_dense(), dense)
        assert retile(bm, bq, bk) is moved  # built once per BlockMask and tile size
    assert retile(bm, 32, 128) is bm


@settings(max_examples=60)
@given(
    kinds=st.lists(st.sampled_from([EMPTY, FULL]), min_size=6, max_size=6),
    old=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    edge=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    bq=st.integers(1, 40),
    bk=st.integers(1, 40),
)
def test_retile_a_tile_map_without_predicate(kinds, old, edge, bq, bk):
    """A BlockMask given only as a tile map (no predicate, no partial tiles) keeps its meaning
    at tiles that cut across its own: the new partial tiles read the old map."""
    grid = torch.tensor(kinds, dtype=torch.int8).view(1, 1, 2, 3)
    (obq, obk), (eq, ek) = old, edge
    Lq, Lk = obq + min(eq, obq), 2 * obk + min(ek, obk)  # 2x3 old tiles, ragged last ones
    bm = BlockMask(grid, obq, obk, Lq, Lk, None)
    dense = bm.to_dense()
    moved = retile(bm, bq, bk)
    torch.testing.assert_close(moved.to_dense(), dense)
    torch.testing.assert_close(moved.kinds, kinds_from_dense(dense, bq, bk))


def test_dense_independent_of_tile_size():
    mask = masks.sliding_window(33) | masks.global_tokens([3])
    ref = mask.dense(200, 300)
    for bq, bk in [(1, 1), (7, 13), (64, 128), (256, 512)]:
        torch.testing.assert_close(mask.blocks(200, 300, bq, bk).to_dense(), ref)


def test_sliding_window_65536_is_analytic():
    """A 65,536-token BlockMask never evaluates the predicate on all N² points."""
    calls = []
    mask = masks.sliding_window(512)
    real_bind = mask._bind

    def spy(Lq, Lk):
        bound = real_bind(Lq, Lk)
        return type(bound)(lambda *a: calls.append(1) or bound.fn(*a), bound.tiles, bound.exact)

    mask._bind = spy
    bm = mask.blocks(65536, 65536, 128, 128)
    assert calls == []
    # rows 0-3 reach back to key 0 (full tiles r' < r); later rows: 3 full + 2 partial tiles
    full, partial = (0 + 1 + 2 + 3) + 508 * 3, 4 + 508 * 2
    assert bm.counts() == {"empty": 512 * 512 - full - partial, "partial": partial, "full": full}
    # band structure: tile row r has full tiles r-3..r-1 (all keys 512 back), partial r-4 and r
    row = bm.kinds[0, 0, 100]
    assert row[100].item() == PARTIAL
    assert row[96].item() == PARTIAL
    assert bool((row[97:100] == FULL).all())
    assert int((row != EMPTY).sum()) == 5


def test_density_and_repr():
    m = masks.causal()
    assert abs(m.density(100, 100) - 5050 / 10000) < 1e-12
    bm = m.blocks(100, 100, 32, 32)
    assert "causal()" in repr(bm)
    assert "tiles=4x4" in repr(bm)
    drawing = str(bm).splitlines()[1:]
    assert drawing == ["+...", "#+..", "##+.", "###+"]
    assert (
        repr(masks.sliding_window(3) & ~masks.causal())
        == "(sliding_window(left=3, right=0) & ~causal())"
    )


def test_batch_size_checks():
    m = masks.key_padding([3, 4])
    with pytest.raises(ValueError, match="B=2"):
        m.dense(4, 4, B=3)
    with pytest.raises(ValueError, match="cannot combine"):
        _ = m & masks.key_padding([1, 2, 3])


@pytest.mark.parametrize(
    ("make", "err"),
    [
        (lambda: masks.sliding_window(-2), ValueError),
        (lambda: masks.sliding_window(1.5), TypeError),
        (lambda: masks.dilated(0, 2), ValueError),
        (lambda: masks.strided(0), ValueError),
        (lambda: masks.fixed(4, 5), ValueError),
        (lambda: masks.prefix_lm(-1), ValueError),
        (lambda: masks.global_tokens([-1]), ValueError),
        (lambda: masks.global_tokens({0, 3}), TypeError),  # a set has no order
        (lambda: masks.document([[0, 0], [1]]), TypeError),
        (lambda: masks.key_padding([-1]), ValueError),
        (lambda: masks.causal(align="left"), ValueError),
        (lambda: masks.from_dense(torch.ones(3, 3)), TypeError),
        (lambda: masks.block_sparse(torch.ones(3), 4), TypeError),
        (lambda: masks.block_sparse(torch.rand(3, 3), 4), TypeError),  # scores, not a layout
        (lambda: masks.bigbird(0), ValueError),
        (lambda: masks.custom(3), TypeError),
    ],
)
def test_bad_pattern_arguments(make, err):
    with pytest.raises(err):
        make()


def test_bad_lengths_at_bind():
    with pytest.raises(ValueError, match="out of range"):
        masks.global_tokens([10]).dense(5, 5)
    with pytest.raises(ValueError, match="too small"):
        masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4).dense(16, 16)
    with pytest.raises(ValueError, match="Lk=7"):
        masks.document([0, 0, 1]).dense(3, 7)


def test_blocks_cached_per_arguments():
    """A mask reuses its BlockMask (and partial bitmaps) for the same arguments only."""
    from attnkit.block_mask import partial_bitmaps

    m = masks.sliding_window(40)
    a = m.blocks(300, 300, 32, 32)
    assert m.blocks(300, 300, 32, 32) is a
    assert partial_bitmaps(a) is partial_bitmaps(a)
    for other in (m.blocks(301, 300, 32, 32), m.blocks(300, 300, 64, 32), m.blocks(300, 300)):
        assert other is not a
        assert torch.equal(other.to_dense(), m.dense(other.q_len, other.kv_len))
    custom = masks.custom(lambda b, h, q, kv: (q + kv) % 3 > 0)
    first = custom.blocks(300, 300, 32, 32)
    for Lq in range(1, 21):  # the cache is bounded: old entries go
        custom.blocks(Lq, 300, 32, 32)
    assert custom.blocks(300, 300, 32, 32) is not first


def test_blocks_shared_by_masks_with_the_same_spec():
    """Each layer's own ``masks.causal()``, and ``a & b`` made anew at each call, build their
    tiles once; masks whose spec holds tensors, or another spec, do not share."""
    for make in (
        masks.causal,
        lambda: masks.sliding_window(40, 3) & ~masks.global_tokens([0, 5]),
        lambda: masks.bigbird(16, num_random=2, seed=1),
    ):
        a, b = make(), make()
        assert a is not b
        assert a.blocks(1, 517, 16, 64, H=4) is b.blocks(1, 517, 16, 64, H=4)
    assert masks.sliding_window(40).blocks(90, 90) is not masks.sliding_window(41).blocks(90, 90)
    ids = torch.tensor([0] * 50 + [1] * 40)
    a, b = masks.document(ids), masks.document(ids.clone())
    assert a.blocks(90, 90) is not b.blocks(90, 90)
    assert torch.equal(a.blocks(90, 90).kinds, b.blocks(90, 90).kinds)
    first = masks.causal().blocks(1, 1000, 16, 64)
    for Lk in range(1001, 1001 + masks._SHARED_BLOCKS_SIZE):  # decoding: one length per step
        masks.causal().blocks(1, Lk, 16, 64)
    assert masks.causal().blocks(1, 1000, 16, 64) is not first  # bounded: old entries go


@pytest.mark.parametrize("name", MASK_NAMES)
def test_from_spec_rebuilds_every_built_in_mask(name):
    """``from_spec(m.spec)`` gives the same pattern; only custom masks have no spec."""
    mask = every_mask(45, 70)[name]
    if not isinstance(mask, masks.Mask):
        mask = masks.from_dense(mask)
    if name.startswith("custom"):
        assert mask.spec is None
        assert (mask & masks.causal()).spec is None
        return
    again = masks.from_spec(mask.spec)
    assert repr(again) == repr(mask)
    assert torch.equal(again.dense(45, 70, B=2), mask.dense(45, 70, B=2))


def test_from_spec_rejects_unknown_specs():
    with pytest.raises(ValueError, match="no built-in mask"):
        masks.from_spec(("spiral", 3))
    with pytest.raises(ValueError, match="causal takes 1 arguments"):
        masks.from_spec(("causal", "bottom_right", 5))


LOOKBACKS = [
    (masks.full(), math.inf),
    (masks.causal(), math.inf),
    (masks.strided(4), math.inf),
    (masks.sliding_window(5), 5),
    (masks.sliding_window(0), 0),
    (masks.sliding_window(-1, 3), math.inf),
    (masks.dilated(3, 2, causal=True), 6),
    (masks.sliding_window(7, 2) & masks.causal(), 7),
    (masks.sliding_window(2) | masks.dilated(2, 3), 6),
    (~masks.sliding_window(3), math.inf),
    (masks.causal(align="top_left"), None),
    (masks.sliding_window(3, align="top_left"), None),
    (masks.prefix_lm(4), None),
    (masks.global_tokens([0]) & masks.sliding_window(3), None),
    (masks.document(torch.tensor(IDS)), None),
    (masks.custom(lambda b, h, q, kv: q >= kv), None),
]


@pytest.mark.parametrize(("mask", "expected"), LOOKBACKS, ids=[repr(m) for m, _ in LOOKBACKS])
def test_lookback_is_the_farthest_key_a_query_attends(mask, expected):
    """A finite lookback is exact: attended at that distance back, never beyond it."""
    assert masks.lookback(mask) == expected
    if expected is None or expected == math.inf:
        return
    for Lq, Lk in ((30, 30), (1, 30), (7, 30)):
        dense = mask.dense(Lq, Lk)[0, 0]
        back = (torch.arange(Lq)[:, None] + Lk - Lq) - torch.arange(Lk)[None, :]
        assert int(back[dense].max()) == expected


BANDS = [
    masks.full(),
    masks.causal(),
    masks.causal(align="top_left"),
    masks.causal(align=-3),
    masks.sliding_window(4),
    masks.sliding_window(3, 2),
    masks.sliding_window(-1, 2),
    masks.sliding_window(0, -1, align="top_left"),
    masks.sliding_window(50),  # wider than the lengths: clamped
    masks.sliding_window(7, 2) & masks.causal(),
    masks.sliding_window(2, align=40),  # past every key: keeps nothing
]


@pytest.mark.parametrize("mask", BANDS, ids=repr)
@pytest.mark.parametrize(("Lq", "Lk"), [(1, 1), (1, 30), (9, 30), (30, 9), (17, 17)])
def test_band_is_exactly_the_diagonals_a_mask_keeps(mask, Lq, Lk):
    lo, hi = masks.band(mask, Lq, Lk)
    assert 1 - Lq <= lo  # clamped to the differences the lengths hold
    assert hi <= Lk - 1
    d = torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None]
    assert torch.equal(mask.dense(Lq, Lk)[0, 0], (d >= lo) & (d <= hi))


@pytest.mark.parametrize(
    "mask",
    [
        masks.sliding_window(2) | masks.sliding_window(0, 2),
        ~masks.causal(),
        masks.dilated(3, 2),
        masks.causal() & masks.key_padding([5]),
        masks.custom(lambda b, h, q, kv: q >= kv),
    ],
    ids=repr,
)
def test_band_is_none_for_other_masks(mask):
    assert masks.band(mask, 9, 9) is None


PADDINGS = [
    masks.key_padding([3, 30]),
    masks.key_padding([7]),  # one length for every sequence: (1, Lk)
    masks.from_padding_mask(torch.tensor([[False] * 4 + [True] * 26, [True, False] * 15])),
]


@pytest.mark.parametrize("band_mask", [*BANDS[:5], BANDS[-2]], ids=repr)
@pytest.mark.parametrize("padding", PADDINGS, ids=repr)
@pytest.mark.parametrize(("Lq", "Lk"), [(1, 30), (9, 30), (30, 30)])
def test_padded_band_is_exactly_what_a_band_and_padding_keep(band_mask, padding, Lq, Lk):
    """``padded_band``: the band's diagonals and the keys each sequence keeps, whichever side
    of the ``&`` the padding stands on, two paddings ANDed too."""
    for mask in (band_mask & padding, padding & band_mask, band_mask & padding & padding):
        lo, hi, keys = masks.padded_band(mask, Lq, Lk)
        d = torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None]
        kept = ((d >= lo) & (d <= hi))[None] & keys[:, None, :]  # (B or 1, Lq, Lk)
        assert torch.equal(mask.dense(Lq, Lk, B=2)[:, 0], kept.expand(2, Lq, Lk)), mask
    assert masks.padded_band(band_mask, Lq, Lk) == (*masks.band(band_mask, Lq, Lk), None)


@pytest.mark.parametrize(
    "mask",
    [
        masks.dilated(3, 2) & masks.key_padding([5]),
        masks.causal() | masks.key_padding([5]),
        ~masks.key_padding([5]),
        masks.document([0] * 4 + [1] * 5) & masks.key_padding([5]),
    ],
    ids=repr,
)
def test_padded_band_is_none_for_other_masks(mask):
    assert masks.padded_band(mask, 9, 9) is None


RANGE_MASKS = [  # masks of one range of keys per query, with bands and padding ANDed
    masks.key_ranges([0, 3, 9, 4, 29, 12, 0, 5, 30], [29, 2, 20, 4, 29, 40, -1, 17, 31]),
    masks.key_ranges(torch.tensor([[0] * 9, [20] * 9]), torch.tensor([[10] * 9, [25] * 9])),
    masks.document([0] * 7 + [1] * 3 + [2] * 20) & masks.causal(),
    masks.document(torch.tensor([[0] * 12 + [1] * 18, [0] * 3 + [1] * 5 + [3] * 22])),
    masks.document(torch.arange(9) // 3, torch.arange(30) // 7) & masks.sliding_window(4, 2),
    masks.prefix_lm(25),  # the prefix beyond some queries' diagonal
    masks.prefix_lm(6, align="top_left") & PADDINGS[2],
    masks.key_ranges(list(range(9)), [29] * 9) & masks.causal() & masks.key_padding([20, 30]),
    # ids out of order, each document's keys side by side (dataset ids, not renumbered)
    masks.document([7] * 10 + [2] * 5 + [4] * 15) & masks.causal(),
    masks.document(
        torch.tensor([[5, 5, 5, 1, 1, 9, 9, 9, 8], [0] * 9]),
        torch.tensor([[5] * 10 + [1] * 10 + [9] * 10, [3] * 20 + [0] * 10]),
    ),
]


@pytest.mark.parametrize("mask", RANGE_MASKS, ids=repr)
def test_padded_ranges_is_exactly_what_the_mask_keeps(mask):
    """``padded_ranges``: each query's first and last key and the keys each sequence keeps,
    the mask's pairs exactly (empty rows too: first > last)."""
    Lq, Lk = 9, 30
    ranges, keys = masks.padded_ranges(mask, Lq, Lk)
    assert ranges.dtype == torch.int64
    assert ranges.shape[1:] == (2, Lq)
    j = torch.arange(Lk)
    kept = (j >= ranges[:, 0, :, None]) & (j <= ranges[:, 1, :, None])  # (B or 1, Lq, Lk)
    if keys is not None:
        kept = kept & keys[:, None, :]
    dense = mask.dense(Lq, Lk, B=2)[:, 0]
    assert torch.equal(dense.expand(2, Lq, Lk), kept.expand(2, Lq, Lk))


@pytest.mark.parametrize(
    "mask",
    [
        masks.causal() & masks.key_padding([5]),  # a band: padded_band serves it
        masks.document([0, 1, 0, 1, 0, 1, 1, 1, 1]),  # a document's keys apart
        masks.document([2, 2, 0, 0, 2, 1, 1, 1, 1]),  # apart, the ids out of order
        masks.document([0] * 4 + [1] * 5) | masks.causal(),
        masks.prefix_lm(3) & masks.dilated(2, 2),
        masks.global_tokens([0]),
        masks.custom(lambda b, h, q, kv: q >= kv),
    ],
    ids=repr,
)
def test_padded_ranges_is_none_for_bands_and_other_masks(mask):
    assert masks.padded_ranges(mask, 9, 9) is None


def test_key_ranges_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"first and last must share one shape"):
        masks.key_ranges([0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="key_ranges for 2 queries, but Lq=3"):
        masks.key_ranges([0, 1], [1, 2]).dense(3, 5)
    assert masks.from_spec(masks.key_ranges([0, 1], [1, 2]).spec).dense(2, 3).tolist() == [
        [[[True, True, False], [False, True, True]]]
    ]


@pytest.mark.parametrize("name", [n for n in MASK_NAMES if n != "bool_tensor"])
def test_refined_tiles_keep_the_bitmaps_a_fresh_evaluation_gives(name):
    """Refinement keeps the bitmaps of the tiles it leaves partial (the kernels then skip a
    second evaluation): exactly what evaluating the predicate on them again gives. (A bool
    tensor has no predicate: its BlockMask is built from the tensor.)"""
    mask = every_mask(130, 150)[name]
    assert isinstance(mask, masks.Mask)
    for bm in (mask.blocks(130, 150, 32, 16, B=2, H=2), retile(mask.blocks(130, 150), 16, 8)):
        kept = partial_bitmaps(bm)
        fresh = block_mask._evaluate_partial_tiles(bm)
        assert torch.equal(kept[0], fresh[0])
        assert torch.equal(kept[1], fresh[1])


@pytest.mark.parametrize("name", [n for n in MASK_NAMES if n != "bool_tensor"])
def test_refinement_in_chunks_of_few_tiles_finds_what_one_chunk_does(name, monkeypatch):
    """Partial tiles are evaluated in chunks (a few hundred thousand pairs on CPUs, to stay in
    cache): chunks of three tiles give the same kinds and bitmaps as one chunk, and the
    bitmaps are the dense mask's."""
    mask = every_mask(130, 150)[name]
    assert isinstance(mask, masks.Mask)
    found = {}
    for tiles_per_chunk in (3, 10_000):
        monkeypatch.setitem(block_mask._REFINE_CHUNK_ELEMENTS, "cpu", tiles_per_chunk * 32 * 16)
        bm = mask._build_blocks(130, 150, 32, 16, 2, 2, None, refine=True)
        found[tiles_per_chunk] = (bm.kinds, *partial_bitmaps(bm))
    for mine, theirs in zip(found[3], found[10_000], strict=True):
        assert torch.equal(mine, theirs)
    kinds, tile_index, bitmaps = found[3]
    dense = mask.dense(130, 150, B=2, H=2).expand(2, 2, 130, 150)
    padded = torch.zeros(2, 2, 5 * 32, 10 * 16, dtype=torch.bool)
    padded[..., :130, :150] = dense
    for b, h, i, j in (kinds == PARTIAL).nonzero().tolist():
        tile = padded[b if kinds.shape[0] > 1 else 0, h if kinds.shape[1] > 1 else 0]
        want = tile[i * 32 : (i + 1) * 32, j * 16 : (j + 1) * 16]
        assert torch.equal(bitmaps[tile_index[b, h, i, j]], want)


@pytest.mark.parametrize("name", [n for n in MASK_NAMES if n != "bool_tensor"])
def test_blocks_without_refinement_keep_the_rules_tiles(name):
    """``refine=False`` evaluates nothing: the rule's EMPTY and FULL tiles are the refined
    map's, and what it leaves PARTIAL the refined map may have decided either way."""
    mask = every_mask(130, 150)[name]
    assert isinstance(mask, masks.Mask)
    rough = mask.blocks(130, 150, 32, 16, B=2, H=2, refine=False)
    exact = mask.blocks(130, 150, 32, 16, B=2, H=2)
    rough_kinds, exact_kinds = (bm.kinds.expand(2, 2, -1, -1) for bm in (rough, exact))
    decided = rough_kinds != PARTIAL
    assert torch.equal(rough_kinds[decided], exact_kinds[decided])
    if mask.bind(130, 150).exact:
        assert torch.equal(rough_kinds, exact_kinds)


#: the built-in patterns made from tensors
TENSOR_FACTORIES = (
    "document",
    "from_padding_mask",
    "from_dense",
    "block_sparse",
    "global_tokens",
    "key_padding",
    "key_ranges",
)


def _written_after(name: str):
    """A built-in mask made from a tensor, and a write to that tensor afterwards."""
    L = 200
    t = {
        "document": torch.repeat_interleave(torch.arange(2), L // 2),
        "from_padding_mask": torch.arange(L)[None] < 150,
        "from_dense": torch.rand(L, L, generator=torch.Generator().manual_seed(0)) < 0.5,
        "block_sparse": torch.eye(13, dtype=torch.bool),
        "global_tokens": torch.tensor([3, 7]),
        "key_padding": torch.tensor([150]),
        "key_ranges": torch.zeros(L, dtype=torch.long),
    }[name]
    make = {
        "block_sparse": lambda: masks.block_sparse(t, 16),
        "key_ranges": lambda: masks.key_ranges(t, torch.arange(L)),
    }.get(name, lambda: getattr(masks, name)(t))
    write = {"global_tokens": lambda: t.fill_(100), "key_padding": lambda: t.fill_(20)}.get(
        name, lambda: t.fill_(True if t.dtype == torch.bool else 1)
    )
    return make(), write


@pytest.mark.parametrize("name", TENSOR_FACTORIES)
def test_a_mask_keeps_its_tensors_when_the_caller_writes_to_them(name):
    """Masks are values: their tile maps and ranges are cached, so a mask that read the
    caller's tensor would change for the predicate but not for the cache. Once the tiled
    backend ran such a mask with its old tiles and the reference with the new values."""
    mask, write = _written_after(name)
    q, k, v = (
        torch.randn(1, 2, 200, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    before = mask.dense(200, 200)
    outputs = {b: attnkit.attention(q, k, v, mask=mask, backend=b) for b in ("tiled", "sdpa")}
    write()
    assert torch.equal(mask.dense(200, 200), before)
    want = attnkit.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
    for backend, first in outputs.items():
        again = attnkit.attention(q, k, v, mask=mask, backend=backend)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        torch.testing.assert_close(again.double(), want, rtol=1e-5, atol=1e-5)
