"""sharded_cache_attention (context-parallel decoding) against one process's attention.

Each case runs on gloo ranks holding uneven shards of one cache (an empty one too, in any
rank order), and is checked against the full L x L attention of one process sliced to the
queries' rows, in float64 to 1e-9: output, LSE, and the gradients of each rank's k and v,
of q (summed over ranks) and of the sinks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attnkit
from attnkit import masks, score_mods
from attnkit.distributed import sharded_cache_attention
from attnkit.nn import CausalLM
from conftest import assert_close_scaled, gloo_rank, spawn_ok

L, B, HQ, HKV, D, DV = 23, 2, 4, 2, 8, 6

#: per world size, each rank's (kv_start, S): out of order, uneven, one empty
SHARDS = {
    1: [(0, L)],
    2: [(9, 14), (0, 9)],
    3: [(14, 9), (0, 0), (0, 14)],
}

#: (name, T, q_start, causal, window, whole mask, score_mod, sinks)
CASES = [
    ("full_one_query", 1, None, False, None, None, None, False),
    ("causal_three_queries", 3, None, True, None, None, None, False),
    ("window_skips_far_shards", 2, None, True, 4, None, None, False),
    ("alibi_causal", 2, None, True, None, None, "alibi", False),
    ("alibi_softcap_window_sinks", 1, None, True, (6, 0), None, "alibi+softcap", True),
    ("relative_bias", 2, None, False, None, None, "relative", False),
    ("dilated|global", 3, None, True, None, "dilated|global", None, True),
    ("mid_sequence_queries", 4, 10, True, None, None, "alibi", False),
    ("left_padded_batch", 2, None, True, None, "padding", None, False),
]
#: a left-padded batch's pads (B, L), True = padding: row 1's run past the first shards
PADDING = torch.arange(L)[None, :] < torch.tensor([3, 12])[:, None]


def _score_mod(name):
    slopes = score_mods.alibi_slopes(HQ).double()
    return {
        None: None,
        "alibi": score_mods.alibi(slopes),
        "alibi+softcap": score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(2.0)),
        "relative": score_mods.relative_bias(torch.linspace(-1, 1, 2 * 9 + 1).repeat(HQ, 1)),
    }[name]


def _whole_mask(causal, window, extra):
    found = []
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        found.append(masks.sliding_window(left, 0 if causal else right))  # as the ring's
    elif causal:
        found.append(masks.causal())
    if extra == "dilated|global":
        found.append(masks.dilated(2, 2) | masks.global_tokens([0, 5]))
    if extra == "padding":
        found.append(masks.from_padding_mask(~PADDING))
    mask = None
    for m in found:
        mask = m if mask is None else mask & m
    return mask


def _reference(dtype, Q, K, V, sinks, mask, score_mod, rows, weight):
    """One process, in dtype: out, LSE and the gradients of q, K, V (and sinks) of the rows'
    queries, attending over the whole L x L grid (its masks and mods aligned as the ranks')."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (Q, K, V)]
    sk = None if sinks is None else sinks.detach().to(dtype).requires_grad_()
    out, lse = attnkit.attention(
        *inputs, mask=mask, score_mod=score_mod, sinks=sk, return_lse=True, backend="reference"
    )
    out, lse = out[:, :, rows], lse[:, :, rows]
    loss = (out * weight.to(dtype)).sum() + 0.1 * lse.sum()
    grads = torch.autograd.grad(loss, inputs + ([] if sk is None else [sk]))
    return [out, lse, grads[0][:, :, rows], *grads[1:]]


def _case_worker(rank, world, init_file, results_dir, dtype):
    with gloo_rank(rank, world, init_file, results_dir):
        start, S = SHARDS[world][rank]
        for name, T, q_start, causal, window, extra, mod_name, with_sinks in CASES:
            torch.manual_seed(0)  # the same global tensors on every rank
            Q = torch.randn(B, HQ, L, D, dtype=torch.float64)
            K = torch.randn(B, HKV, L, D, dtype=torch.float64)
            V = torch.randn(B, HKV, L, DV, dtype=torch.float64)
            sinks = torch.randn(HQ, dtype=torch.float64) if with_sinks else None
            weight = torch.randn(B, HQ, T, DV, dtype=torch.float64)
            first = L - T if q_start is None else q_start
            rows = slice(first, first + T)
            mod = _score_mod(mod_name)
            whole = _whole_mask(causal, window, extra)

            args = (Q, K, V, sinks, whole, mod, rows, weight)
            want = _reference(torch.float64, *args)
            low = want if dtype == torch.float64 else _reference(dtype, *args)
            q = Q[:, :, rows].to(dtype).requires_grad_()
            k, v = (t[:, :, start : start + S].to(dtype).requires_grad_() for t in (K, V))
            local_sinks = None if sinks is None else sinks.to(dtype).requires_grad_()
            out, lse = sharded_cache_attention(
                q, k, v, kv_start=start, q_start=q_start, causal=causal, window=window,
                mask=_whole_mask(False, None, extra) if extra == "dilated|global" else None,
                padding=PADDING[:, start : start + S] if extra == "padding" else None,
                score_mod=mod, sinks=local_sinks, return_lse=True,
            )  # fmt: skip
            ((out * weight.to(dtype)).sum() + 0.1 * lse.sum()).backward()
            dist.all_reduce(q.grad)  # each rank's covers its own keys
            got = [out, lse, q.grad, k.grad, v.grad]
            cut = [lambda t: t] * 3 + [lambda t, a=start, n=S: t[:, :, a : a + n]] * 2
            if local_sinks is not None:
                got.append(local_sinks.grad)  # whole on every rank: not summed
                cut.append(lambda t: t)
            names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
            for what, g, c, w, lo in zip(names, got, cut, want, low, strict=False):
                exact, low_exact = c(w), c(lo)
                if dtype == torch.float64 or exact.numel() == 0:
                    torch.testing.assert_close(
                        g,
                        exact.to(g.dtype),
                        rtol=1e-9,
                        atol=1e-9,
                        msg=lambda m, n=name, x=what: f"{n} {x}: {m}",
                    )
                else:
                    assert_close_scaled(
                        g, exact, low_exact, mult=4.0, floor=2e-5, what=f"{name} {what}"
                    )


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_cache_attention_matches_one_process(world, tmp_path):
    spawn_ok(_case_worker, world, tmp_path, torch.float64)


@pytest.mark.slow
def test_sharded_cache_attention_on_the_compiled_cpu_kernels(tmp_path):
    """float32: each rank's part on tiled's kernels, ALiBi at its shard's offset in them."""
    spawn_ok(_case_worker, 3, tmp_path, torch.float32)


def _random_layouts_worker(rank, world, init_file, results_dir):
    """Random caches split at random points over the ranks in a random order (empty runs
    too), random queries and options: output and LSE as one process's, float64."""
    with gloo_rank(rank, world, init_file, results_dir):
        g = torch.Generator().manual_seed(11)  # the same draws on every rank
        for trial in range(30):

            def draw(n, g=g):
                return int(torch.randint(n, (), generator=g))

            length, T = 1 + draw(40), 1 + draw(4)
            T = min(T, length)
            cuts = sorted(draw(length + 1) for _ in range(world - 1))
            bounds = [0, *cuts, length]
            owner = torch.randperm(world, generator=g).tolist()  # rank owner[i] holds run i
            start = bounds[owner.index(rank)]
            S = bounds[owner.index(rank) + 1] - start
            q_start = draw(length - T + 1) if draw(2) else None
            causal, window = bool(draw(2)), [None, 3, (2, 5)][draw(3)]
            mod = [None, score_mods.alibi(score_mods.alibi_slopes(HQ).double())][draw(2)]
            Q = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64)
            K = torch.randn(B, HKV, length, D, generator=g, dtype=torch.float64)
            V = torch.randn(B, HKV, length, DV, generator=g, dtype=torch.float64)
            first = length - T if q_start is None else q_start
            rows = slice(first, first + T)
            want, want_lse = attnkit.attention(
                Q, K, V, mask=_whole_mask(causal, window, None), score_mod=mod,
                return_lse=True, backend="reference",
            )  # fmt: skip
            out, lse = sharded_cache_attention(
                Q[:, :, rows], K[:, :, start : start + S], V[:, :, start : start + S],
                kv_start=start, q_start=q_start, causal=causal, window=window, score_mod=mod,
                return_lse=True,
            )  # fmt: skip
            what = f"trial {trial}: L={length} T={T} runs {bounds} q_start={q_start} {window}"
            torch.testing.assert_close(out, want[:, :, rows], msg=lambda m, w=what: f"{w}: {m}")
            torch.testing.assert_close(lse, want_lse[:, :, rows], msg=lambda m, w=what: f"{w}")


@pytest.mark.slow
def test_sharded_cache_attention_over_random_layouts(tmp_path):
    spawn_ok(_random_layouts_worker, 3, tmp_path)


def _refusal_worker(rank, world, init_file, results_dir):
    with gloo_rank(rank, world, init_file, results_dir):
        q = torch.randn(1, 2, 1, 8)
        kv = torch.randn(1, 2, 5, 8)
        with pytest.raises(
            ValueError, match=r"they overlap at position 0 .*\[\(0, 5\), \(0, 5\)\]"
        ):
            sharded_cache_attention(q, kv, kv, kv_start=0)
        with pytest.raises(ValueError, match=r"they leave a gap at position 5"):
            sharded_cache_attention(q, kv, kv, kv_start=6 * rank)
        with pytest.raises(ValueError, match=r"the same queries \(B, Hq, T, D\)"):
            sharded_cache_attention(q.expand(1, 2, 1 + rank, 8), kv, kv, kv_start=5 * rank)
        with pytest.raises(ValueError, match=r"positions 9 \.\. 10 run past the cache's 10"):
            sharded_cache_attention(
                q.expand(1, 2, 2, 8), kv, kv, kv_start=5 * rank, q_start=9, causal=True
            )
        # with nothing that places them (a decoder's queries over an encoder's memory), more
        # queries than the cache holds positions
        torch.manual_seed(0)  # the same on every rank
        many, whole = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 10, 8)
        mine = whole[:, :, 5 * rank : 5 * rank + 5]
        torch.testing.assert_close(
            sharded_cache_attention(many, mine, mine, kv_start=5 * rank),
            attnkit.attention(many, whole, whole),
        )
        with pytest.raises(
            ValueError, match=r"sharded_cache_attention takes a Mask over the whole"
        ):
            sharded_cache_attention(
                q, kv, kv, kv_start=5 * rank, mask=torch.ones(1, 10, dtype=torch.bool)
            )
        with pytest.raises(ValueError, match=r"padding must be a bool tensor \(B, S\) = \(1, 5\)"):
            sharded_cache_attention(q, kv, kv, kv_start=5 * rank, padding=torch.ones(1, 4) > 0)
        with pytest.raises(TypeError, match="kv_start must be an int"):
            sharded_cache_attention(q, kv, kv, kv_start=5.0)
        # a CausalLM over sharded caches: chunks that are not rank r's r·n, then misuse
        lm = CausalLM(40, d_model=16, nhead=2, num_layers=1, max_len=32).eval()
        ids = torch.randint(0, 40, (1, 4))
        with torch.no_grad():
            caches = lm.new_sharded_caches(1, 8, kv_start=1)
            with pytest.raises(ValueError, match=r"equal chunks, rank r's at r·n, in one call"):
                lm(ids, start=1, caches=caches)  # neither rank's chunk starts at 1
            caches = lm.new_sharded_caches(1, 8, kv_start=4 * rank)
            lm(ids, start=4 * rank, caches=caches)
            caches[0].start_decoding()
            assert caches[0].position == 8
            with pytest.raises(RuntimeError, match="start_decoding was called already"):
                caches[0].start_decoding()
            attn = lm.layers[0].self_attn
            x = torch.randn(1, 1, 16)
            with pytest.raises(ValueError, match="need_weights is not served"):
                attn(x, cache=caches[0], need_weights=True)
            with pytest.raises(ValueError, match=r"masks must be attnkit\.masks Mask objects"):
                attn(x, cache=caches[0], mask=torch.ones(1, 9, dtype=torch.bool))
            with pytest.raises(ValueError, match=r"every position so far\) = \(1, 9\), got"):
                attn(x, cache=caches[0], key_padding_mask=torch.zeros(1, 1, dtype=torch.bool))


@pytest.mark.slow
def test_sharded_cache_attention_refuses_shards_that_do_not_tile_the_cache(tmp_path):
    spawn_ok(_refusal_worker, 2, tmp_path)


def test_sharded_caches_refuse_what_they_cannot_serve():
    """Cropping (the positions may lie on other ranks), latent and differential attention."""
    from attnkit.nn import LatentSizes, ShardedKVCache

    cache = ShardedKVCache(1, 2, 8, 4, kv_start=4)
    assert (cache.position, cache.start, cache.length) == (4, 4, 0)
    with pytest.raises(attnkit.UnsupportedError, match="ShardedKVCache cannot crop"):
        cache.crop(4)
    latent = LatentSizes(kv_rank=8, nope_dim=4, rope_dim=4, v_dim=8)
    for options in ({"latent": latent, "positions": "rope"}, {"differential": True}):
        lm = CausalLM(40, d_model=16, nhead=2, num_layers=1, max_len=32, **options)
        with pytest.raises(ValueError, match="sharded caches need MultiHeadAttention layers"):
            lm.new_sharded_caches(1, 8, kv_start=0)
        with pytest.raises(ValueError, match="served by MultiHeadAttention only"):
            lm(torch.randint(0, 40, (1, 3)), caches=[ShardedKVCache(1, 2, 8, 4, kv_start=0)])


def test_sharded_cache_attention_needs_a_process_group():
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(RuntimeError, match=r"sharded_cache_attention needs torch\.distributed"):
        sharded_cache_attention(q, q, q, kv_start=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranks", "more"),
    [(2, []), (3, ["--alibi", "--window", "300"])],
    ids=["causal", "alibi_window_3_ranks"],
)
def test_the_sharded_decoding_example_runs_under_torchrun_and_matches_one_process(ranks, more):
    """examples/sharded_decoding.py as its docstring runs it, smaller: it reports its error
    against one process holding the whole cache, and that error is small."""
    example = Path(__file__).parents[1] / "examples" / "sharded_decoding.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    options = ["--context", "1000", "--steps", "3", "--heads", "4", "--kv-heads", "2", *more]
    run = subprocess.run(
        [*torchrun, str(ranks), str(example), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"sharded-cache decoding, P={ranks} (gloo), context=1000" in run.stdout
    assert "per step:" in run.stdout
    error = re.search(r"max \|sharded - one process\|: (\S+)", run.stdout)
    assert error is not None, run.stdout
    assert float(error.group(1)) < 1e-5


#: (name, CausalLM options): positions of each kind, grouped heads, a window, sinks, a gate
MODELS = [
    ("rope_gqa", {"positions": "rope", "num_kv_heads": 2}),
    (
        "learned_window_sinks",
        {"positions": "learned", "mask": masks.sliding_window(5), "sinks": True},
    ),
    ("alibi_gate", {"positions": "alibi", "output_gate": True}),
]


def _generation_worker(rank, world, init_file, results_dir):
    """A CausalLM's prompt in equal chunks over the ranks' sharded caches (ring attention),
    then greedy tokens decoded over them: every step's logits as the model's full pass."""
    with gloo_rank(rank, world, init_file, results_dir):
        n, new = 4, 5  # prompt tokens per rank, tokens decoded
        for name, options in MODELS:
            torch.manual_seed(0)  # the same model and prompt on every rank
            lm = CausalLM(40, d_model=32, nhead=4, num_layers=2, max_len=64, **options).eval()
            lm = lm.double()
            prompt = torch.randint(0, 40, (2, n * world))
            with torch.no_grad():
                caches = lm.new_sharded_caches(2, n + new, kv_start=rank * n)
                chunk = prompt[:, rank * n : (rank + 1) * n]
                logits, _ = lm(chunk, start=rank * n, caches=caches)
                full, _ = lm(prompt)
                torch.testing.assert_close(logits, full[:, rank * n : (rank + 1) * n])
                token = logits[:, -1:].argmax(-1)
                dist.broadcast(token, src=world - 1)  # the last rank's logits chose it
                for cache in caches:
                    cache.start_decoding()
                assert [c.takes_new for c in caches] == [rank == world - 1] * 2, name
                text = torch.cat([prompt, token], dim=1)
                for _ in range(new - 1):
                    logits, _ = lm(token, start=caches[0].position, caches=caches)
                    full, _ = lm(text)
                    torch.testing.assert_close(
                        logits[:, -1], full[:, -1], msg=lambda m, x=name: f"{x}: {m}"
                    )
                    token = logits[:, -1:].argmax(-1)
                    text = torch.cat([text, token], dim=1)
                assert caches[0].position == n * world + new - 1
                held = sum(c.length for c in caches[:1])
                assert held == n + (new - 1 if rank == world - 1 else 0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_a_causal_lm_generates_over_sharded_caches_as_over_one(world, tmp_path):
    spawn_ok(_generation_worker, world, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("translate", [[], ["--translate"]], ids=["lm", "translate"])
def test_the_sharded_generation_example_generates_what_one_process_does(translate):
    """examples/sharded_generation.py as its docstring runs it, smaller, on a prompt (a
    source) that does not split evenly: its tokens are those ``generate`` picks in one
    process."""
    example = Path(__file__).parents[1] / "examples" / "sharded_generation.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    options = ["--prompt", "97", "--new", "6", "--d-model", "64", "--layers", "2", *translate]
    run = subprocess.run(
        [*torchrun, "2", str(example), *options], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    kind = "translation (source" if translate else "generation (prompt"
    assert f"sharded {kind}=97), P=2 (gloo), new=6 (made " in run.stdout, run.stdout
    assert "tokens match one process: True" in run.stdout, run.stdout


#: prompt lengths per world size: equal chunks, a rest for the last rank, shorter than world
PROMPTS = {2: [8, 7], 3: [9, 11, 2]}


def _generate_worker(rank, world, init_file, results_dir):
    """``lm.generate(..., group=WORLD)`` on every rank against ``lm.generate`` in one
    process: greedy on every prompt length; for one length per model (a different one each)
    also a left-padded batch (greedy and beam search), sampled (each rank's generator seeded
    apart: the last rank's draws), with an end token, and beam search."""
    with gloo_rank(rank, world, init_file, results_dir):
        everyone = dist.group.WORLD
        for i, (name, options) in enumerate(MODELS):
            torch.manual_seed(0)  # the same model and prompts on every rank
            lm = CausalLM(40, d_model=32, nhead=4, num_layers=2, max_len=64, **options).eval()
            lm = lm.double()
            # the beams share the sharded prompt's caches (RoPE, ALiBi), or copy them (a window)
            shared = lm._beams_share_prompts(windowed=False)
            assert shared == (name != "learned_window_sinks"), name
            lengths = PROMPTS[world]
            for P in lengths:
                prompt = torch.randint(0, 40, (2, P))
                what = f"{name}, prompt {P}"
                alone = lm.generate(prompt, max_new_tokens=6, temperature=0)
                shared = lm.generate(prompt, max_new_tokens=6, temperature=0, group=everyone)
                assert torch.equal(shared, alone), what
                if lengths[i % len(lengths)] != P:
                    continue
                pads = (
                    torch.arange(P)[None, :] < torch.tensor([0, P - 1])[:, None]
                )  # row 1: 1 token
                alone = lm.generate(prompt, max_new_tokens=6, temperature=0, prompt_padding=pads)
                shared = lm.generate(
                    prompt, max_new_tokens=6, temperature=0, prompt_padding=pads, group=everyone
                )
                assert torch.equal(shared, alone), f"{what}, left-padded"
                found = lm.beam_search(prompt, num_beams=2, max_new_tokens=4, prompt_padding=pads)
                shared = lm.beam_search(
                    prompt, num_beams=2, max_new_tokens=4, prompt_padding=pads, group=everyone
                )
                assert torch.equal(shared.tokens, found.tokens), f"{what}, left-padded beams"
                eos = int(alone[0, P + 2])  # row 0 ends there; then every row ends or stops
                alone = lm.generate(prompt, max_new_tokens=6, temperature=0, eos_id=eos)
                shared = lm.generate(
                    prompt, max_new_tokens=6, temperature=0, eos_id=eos, group=everyone
                )
                assert torch.equal(shared, alone), what
                seed = torch.Generator().manual_seed(100 + world - 1)  # the last rank's
                alone = lm.generate(prompt, max_new_tokens=6, top_k=5, generator=seed)
                mine = torch.Generator().manual_seed(100 + rank)
                shared = lm.generate(
                    prompt, max_new_tokens=6, top_k=5, generator=mine, group=everyone
                )
                assert torch.equal(shared, alone), what
                found = lm.beam_search(prompt, num_beams=3, max_new_tokens=5)
                shared = lm.beam_search(prompt, num_beams=3, max_new_tokens=5, group=everyone)
                assert torch.equal(shared.tokens, found.tokens), what
                torch.testing.assert_close(shared.scores, found.scores)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_generate_over_a_process_group_matches_one_process(world, tmp_path):
    spawn_ok(_generate_worker, world, tmp_path)


def _disagreeing_worker(rank, world, init_file, results_dir):
    """Ranks passing different prompts, or different padding, all raise, naming what each
    passed; the group still works after."""
    with gloo_rank(rank, world, init_file, results_dir):
        torch.manual_seed(0)
        lm = CausalLM(40, d_model=32, nhead=4, num_layers=1, max_len=64).eval()
        prompt = torch.full((1, 6), 3 + rank)
        with pytest.raises(
            ValueError, match="same prompt, prompt_padding, max_new_tokens on every rank"
        ):
            lm.generate(prompt, max_new_tokens=2, group=dist.group.WORLD)
        pads = torch.arange(6)[None, :] < rank  # rank 1 pads one token, rank 0 none
        with pytest.raises(
            ValueError,
            match=r"rank 0: .*prompt_padding None.*rank 1: .*prompt_padding \(1, 8\) checksum",
        ):
            lm.generate(
                torch.ones(1, 6, dtype=torch.long), max_new_tokens=2, prompt_padding=pads,
                group=dist.group.WORLD,
            )  # fmt: skip
        ones = torch.ones(1, 6, dtype=torch.long)
        with pytest.raises(ValueError, match=r"rank 1: eos_id 5, sampled 0"):
            lm.generate(ones, max_new_tokens=2, temperature=0, eos_id=4 + rank,
                        group=dist.group.WORLD)  # fmt: skip
        with pytest.raises(ValueError, match=r"rank 0: eos_id None, length_penalty 1\.0; "):
            lm.beam_search(ones, num_beams=2, max_new_tokens=2, length_penalty=1.0 + rank,
                           group=dist.group.WORLD)  # fmt: skip
        # the group still works after the refusals
        out = lm.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=3,
                          temperature=0, group=dist.group.WORLD)  # fmt: skip
        assert torch.equal(out, lm.generate(torch.ones(1, 5, dtype=torch.long),
                                            max_new_tokens=3, temperature=0))  # fmt: skip


def test_generate_over_a_process_group_refuses_ranks_that_disagree(tmp_path):
    spawn_ok(_disagreeing_worker, 2, tmp_path)
