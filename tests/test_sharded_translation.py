"""A Transformer over a source split along the sequence over gloo ranks, against one process.

``Transformer.encode(src, group=)`` gives each rank its shard of the memory (ring attention
in the encoder), and ``generate`` / ``beam_search`` with ``group=`` decode over the sharded
cross-attention keys and values: the tokens (and beam scores) must be those of one process,
in float64, for sources that split evenly, leave the last rank short or are shorter than
the ranks, with padded tokens among them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attnkit import masks
from attnkit.nn import MultiHeadAttention, ShardedKVCache, Transformer
from conftest import gloo_rank, spawn_ok

VOCAB, PAD, BOS, EOS = 30, 0, 1, 2

#: (name, Transformer options): each kind of position, grouped heads, a windowed encoder,
#: sinks and gates in every attention (the cross-attention's too)
MODELS = [
    ("learned_gqa", {"positions": "learned", "num_kv_heads": 2}),
    ("rope_window", {"positions": "rope", "encoder_mask": masks.sliding_window(3, 3)}),
    ("alibi_sinks_gate", {"positions": "alibi", "sinks": True, "output_gate": True}),
]

#: source lengths per world size: equal shards and a short last shard (2 ranks); a short last
#: shard and fewer tokens than ranks (3 ranks)
SOURCES = {2: [10, 7], 3: [13, 2]}


def _model(options):
    torch.manual_seed(0)  # the same weights on every rank
    model = Transformer(VOCAB, VOCAB, d_model=32, nhead=4, max_len=32, **options)
    with torch.no_grad():  # sinks that differ by head (they start equal)
        for module in model.modules():
            if isinstance(module, MultiHeadAttention) and module.sinks is not None:
                module.sinks.normal_()
    return model.double().eval()


def _source(length):
    """(2, length) tokens; row 1 has pads at both ends and (when long enough) inside."""
    src = torch.randint(3, VOCAB, (2, length))
    if length > 3:
        src[1, :2] = PAD
        src[1, -1] = PAD
    if length > 6:
        src[1, 4] = PAD
    return src


def _translation_worker(rank, world, init_file, results_dir):
    with gloo_rank(rank, world, init_file, results_dir):
        everyone = dist.group.WORLD
        for i, (name, options) in enumerate(MODELS):
            model = _model(options)
            lengths = SOURCES[world]
            for S in lengths:
                torch.manual_seed(S)
                src = _source(S)
                what = f"{name}, source {S}"
                with torch.no_grad():
                    memory, padding = model.encode(src)
                    shard, pads = model.encode(src, group=everyone)
                n = shard.shape[1]
                assert n == -(-S // world), what
                mine = slice(rank * n, min((rank + 1) * n, S))
                real = mine.stop - mine.start
                assert torch.equal(pads[:, :real], padding[:, mine]), what
                assert bool(pads[:, real:].all()), what  # past S: padding
                kept = ~padding[:, mine, None]  # a pad's memory is no key of anyone's
                torch.testing.assert_close(
                    shard[:, :real] * kept,
                    memory[:, mine] * kept,
                    msg=lambda m, w=what: f"{w}: {m}",
                )
                alone = model.generate(src, bos_id=BOS, eos_id=EOS, max_len=6)
                shared = model.generate(src, bos_id=BOS, eos_id=EOS, max_len=6, group=everyone)
                assert torch.equal(shared, alone), what
                if lengths[i % len(lengths)] != S:
                    continue
                found = model.beam_search(src, bos_id=BOS, eos_id=EOS, num_beams=3, max_len=5)
                shared = model.beam_search(
                    src, bos_id=BOS, eos_id=EOS, num_beams=3, max_len=5, group=everyone
                )
                assert torch.equal(shared.tokens, found.tokens), f"{what}, beams"
                torch.testing.assert_close(shared.scores, found.scores)
                seed = torch.Generator().manual_seed(7 + world - 1)  # the last rank's draws
                alone = model.generate(
                    src, bos_id=BOS, eos_id=EOS, max_len=6, temperature=1.5, generator=seed
                )
                mine_seed = torch.Generator().manual_seed(7 + rank)
                shared = model.generate(
                    src, bos_id=BOS, eos_id=EOS, max_len=6, temperature=1.5,
                    generator=mine_seed, group=everyone,
                )  # fmt: skip
                assert torch.equal(shared, alone), f"{what}, sampled"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_a_transformer_translates_a_source_split_over_ranks_as_one_process(world, tmp_path):
    spawn_ok(_translation_worker, world, tmp_path)


def _disagreeing_worker(rank, world, init_file, results_dir):
    """Ranks passing different sources, or a source with a bad token, all raise; the group
    still works after."""
    with gloo_rank(rank, world, init_file, results_dir):
        everyone = dist.group.WORLD
        model = _model({})
        src = torch.full((1, 6), 3 + rank)
        with pytest.raises(ValueError, match=r"rank 0: src \(1, 6\) checksum \d+, bos_id 1"):
            model.generate(src, bos_id=BOS, eos_id=EOS, max_len=3, group=everyone)
        with pytest.raises(ValueError, match=r"num_beams 2; rank 1: src \(1, 6\)"):
            model.beam_search(src, bos_id=BOS, eos_id=EOS, num_beams=2, max_len=3, group=everyone)
        bad = torch.full((1, 6), 3)
        bad[0, -1] = VOCAB  # on rank 1's shard only: every rank refuses it
        with pytest.raises(ValueError, match="src"):
            model.generate(bad, bos_id=BOS, eos_id=EOS, max_len=3, group=everyone)
        same = torch.full((1, 6), 3)
        with pytest.raises(ValueError, match=r"rank 0: eos_id 2, sampled 0; rank 1: eos_id 3"):
            model.generate(same, bos_id=BOS, eos_id=EOS + rank, max_len=3, group=everyone)
        with pytest.raises(ValueError, match=r"rank 1: eos_id 2, sampled 1"):
            model.generate(same, bos_id=BOS, eos_id=EOS, temperature=rank, group=everyone)
        with pytest.raises(ValueError, match=r"rank 1: eos_id 2, length_penalty 2\.0"):
            model.beam_search(
                same, bos_id=BOS, eos_id=EOS, num_beams=2, length_penalty=1 + rank,
                group=everyone,
            )  # fmt: skip
        with pytest.raises(ValueError, match="source length 40 exceeds max_len 32"):
            model.generate(torch.full((1, 40), 3), bos_id=BOS, eos_id=EOS, group=everyone)
        src = torch.arange(3, 9)[None]
        alone = model.generate(src, bos_id=BOS, eos_id=EOS, max_len=3)
        assert torch.equal(
            model.generate(src, bos_id=BOS, eos_id=EOS, max_len=3, group=everyone), alone
        )


def test_translation_over_a_process_group_refuses_ranks_that_disagree(tmp_path):
    spawn_ok(_disagreeing_worker, 2, tmp_path)


def test_cross_attention_over_a_sharded_memory_refuses_masks_and_weights():
    """Refused before any collective (no process group is needed to see it)."""
    attn = MultiHeadAttention(16, 2, batch_first=True)
    memory, query = torch.randn(1, 5, 16), torch.randn(1, 1, 16)
    cache = attn.new_sharded_cache(1, 5, kv_start=0)
    assert isinstance(cache, ShardedKVCache)
    with pytest.raises(ValueError, match=r"takes no masks or score mods .* got mask"):
        attn(query, memory, cache=cache, mask=masks.causal())
    with pytest.raises(ValueError, match="need_weights is not served over a ShardedKVCache"):
        attn(query, memory, cache=cache, need_weights=True)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(B, this rank's"):
        attn(query, memory, cache=cache, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    assert cache.length == 0  # nothing was stored
