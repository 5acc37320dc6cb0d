"""torch.export with a dynamic sequence length: one exported graph serves every length.

Choices that only tune speed (tile heights, SDPA or tiled, GQA packing, kv splits) are made
without guarding symbolic lengths (``attnkit._symbolic.surely``), so exporting with
``Dim("L", min=2, max=4096)`` succeeds and the graph is right at lengths on either side of
every threshold. Masks whose tile map is built in Python for each length cannot be in such a
graph: tiled refuses them by name under export, and ``auto`` gives them to SDPA. Padding
masks & a band are in the graph as tensors (the kept keys), which the compiled kernels read.
Decoding exports through ``DecodingStep`` / ``TranslationStep``: caches in and out as tensors.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

import attnkit
from attnkit import masks, score_mods
from attnkit.nn import CausalLM, MultiHeadAttention

pytestmark = pytest.mark.slow

LENGTH = Dim("L", min=2, max=4096)
KEYS = Dim("S", min=2, max=4096)
#: around each threshold a length choice had: 16/32/64-row tiles, auto's SDPA/tiled turn
LENGTHS = (3, 17, 33, 64, 65, 100, 300)

SLOPES = score_mods.alibi_slopes(4)
CASES = {
    "none": {},
    "causal": {"mask": masks.causal()},
    "window": {"mask": masks.sliding_window(7)},
    "causal & padding": {"mask": masks.causal() & masks.key_padding([5, 30])},
    "alibi, causal": {"mask": masks.causal(), "score_mod": score_mods.alibi(SLOPES)},
    "softcap": {"score_mod": score_mods.softcap(20.0)},
    "dilated": {"mask": masks.dilated(3, 2)},  # a tile map per length: SDPA under export
    "prefix_lm": {"mask": masks.prefix_lm(5)},
}
#: what each backend serves under export with a dynamic length
SERVES = {
    "reference": set(CASES),
    "sdpa": set(CASES) - {"alibi, causal", "softcap"},
    "tiled": {"none", "causal", "window", "causal & padding", "alibi, causal", "softcap"},
    "auto": set(CASES),
}


class Attention(nn.Module):
    """attnkit.attention with fixed keyword arguments, as a module torch.export takes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = attnkit.attention(q, k, v, **self.kwargs)
        return out


def qkv(heads: tuple[int, int], Lq: int, Lk: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    shapes = ((2, Hq, Lq, 16), (2, Hkv, Lk, 16), (2, Hkv, Lk, 16))
    return tuple(torch.randn(s, generator=g) for s in shapes)


def expected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The float64 reference: the spec, in float32."""
    kwargs = {**kwargs, "backend": "reference"}
    out: torch.Tensor = attnkit.attention(q.double(), k.double(), v.double(), **kwargs)
    return out.float()


@pytest.mark.parametrize(
    ("backend", "case"), [(b, c) for b, served in SERVES.items() for c in CASES if c in served]
)
def test_one_exported_graph_serves_every_length(backend, case):
    """Self-attention with GQA (4 query heads over 2 kv heads), exported at 40 tokens."""
    module = Attention(backend=backend, **CASES[case])
    dims = {"q": {2: LENGTH}, "k": {2: LENGTH}, "v": {2: LENGTH}}
    graph = torch.export.export(module, qkv((4, 2), 40, 40, seed=0), dynamic_shapes=dims)
    for n in LENGTHS:
        q, k, v = qkv((4, 2), n, n, seed=n)
        torch.testing.assert_close(graph.module()(q, k, v), expected(q, k, v, **CASES[case]))


@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(64)], ids=str)
@pytest.mark.parametrize("backend", ["tiled", "auto"])
@pytest.mark.parametrize("heads", [(4, 1), (8, 2)], ids=["mqa", "gqa"])
def test_an_exported_decoding_step_serves_every_cache_length(backend, mask, heads):
    """One query over a dynamic number of cached keys: packed GQA, and keys split over
    threads where there are fewer units than threads (MQA at 3,000 keys)."""
    module = Attention(mask=mask, backend=backend)
    dims = {"q": None, "k": {2: KEYS}, "v": {2: KEYS}}
    graph = torch.export.export(module, qkv(heads, 1, 100, seed=0), dynamic_shapes=dims)
    for n in (5, 64, 65, 1000, 3000):
        q, k, v = qkv(heads, 1, n, seed=n)
        torch.testing.assert_close(graph.module()(q, k, v), expected(q, k, v, mask=mask))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled", "auto"])
def test_cross_attention_with_two_dynamic_lengths(backend):
    """Queries and keys of independent lengths under bottom-right causal: the mask's offset
    Lk - Lq stays symbolic, and SDPA's top-left is_causal is not taken for it."""
    module = Attention(mask=masks.causal(), backend=backend)
    dims = {"q": {2: LENGTH}, "k": {2: KEYS}, "v": {2: KEYS}}
    graph = torch.export.export(module, qkv((4, 4), 40, 47, seed=0), dynamic_shapes=dims)
    for Lq, Lk in ((3, 10), (40, 47), (100, 300), (70, 70)):
        q, k, v = qkv((4, 4), Lq, Lk, seed=Lq)
        want = expected(q, k, v, mask=masks.causal())
        torch.testing.assert_close(graph.module()(q, k, v), want)


@pytest.mark.parametrize("length", [LENGTH, None], ids=["dynamic", "static"])
def test_tiled_names_why_it_refuses_a_tile_map_under_export(length):
    """A BlockMask is built from data (its partial tiles' bitmaps): no exported graph holds it.
    ``auto`` gives the mask to SDPA there; outside export tiled still serves it."""
    dims = {"q": {2: length}, "k": {2: length}, "v": {2: length}} if length else None
    q, k, v = qkv((4, 2), 40, 40, seed=0)
    with pytest.raises(attnkit.UnsupportedError, match=r"under torch\.export, tiled serves"):
        torch.export.export(
            Attention(mask=masks.dilated(3, 2), backend="tiled"), (q, k, v), dynamic_shapes=dims
        )
    graph = torch.export.export(Attention(mask=masks.dilated(3, 2)), (q, k, v), dynamic_shapes=dims)
    want = expected(q, k, v, mask=masks.dilated(3, 2))
    torch.testing.assert_close(graph.module()(q, k, v), want)
    assert attnkit.dispatch(q, k, v, mask=masks.dilated(3, 2)).backend == "tiled"


@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_an_exported_causal_lm_serves_every_length(backend):
    """RoPE, GQA and a sliding window through every layer; the logits of eager runs."""
    torch.manual_seed(0)
    lm = CausalLM(
        50,
        d_model=32,
        nhead=4,
        num_kv_heads=2,
        num_layers=2,
        positions="rope",
        mask=masks.sliding_window(8),
        backend=backend,
        max_len=512,
    ).eval()
    ids = torch.randint(0, 50, (2, 40))
    graph = torch.export.export(lm, (ids,), dynamic_shapes={"ids": {1: Dim("T", min=2, max=512)}})
    for n in (2, 17, 100, 512):
        ids = torch.randint(0, 50, (2, n))
        torch.testing.assert_close(graph.module()(ids)[0], lm(ids)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["none", "causal", "alibi, causal", "dilated"])
def test_exporting_leaves_no_fake_tensor_in_a_cache(case):
    """Export runs the Python around the kernels on fake tensors: nothing it makes may be kept
    for later calls (eager calls after an export give the reference's results)."""
    kwargs = CASES[case]
    dims = {"q": {2: LENGTH}, "k": {2: LENGTH}, "v": {2: LENGTH}}
    torch.export.export(Attention(**kwargs), qkv((4, 2), 40, 40, seed=0), dynamic_shapes=dims)
    for backend in ("tiled", "auto", "sdpa") if case != "alibi, causal" else ("tiled", "auto"):
        q, k, v = qkv((4, 2), 40, 40, seed=1)
        got = attnkit.attention(q, k, v, backend=backend, **kwargs)
        torch.testing.assert_close(got, expected(q, k, v, **kwargs))


class SentenceEmbedding(nn.Module):
    """A pretrained encoder's mean-pooled sentence embedding: what one deploys of MiniLM."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask).last_hidden_state
        keep = attention_mask[..., None].to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1)


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "auto"])
def test_the_pretrained_encoder_exports_for_any_batch_and_length(backend):
    """all-MiniLM-L6-v2 with its padding mask, batch and length dynamic: the exported graph
    gives the eager model's sentence embeddings for padded batches of other sizes (tiled's
    kernels read the padding's kept keys, a tensor of the graph; ``auto`` takes tiled)."""
    from attnkit.models import load_pretrained

    model = SentenceEmbedding(load_pretrained("all-MiniLM-L6-v2", backend=backend).encoder)
    batch, length = Dim("B", min=1, max=64), Dim("T", min=2, max=512)
    dims = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}

    def padded(sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, 2000, (len(sizes), max(sizes)), generator=g)
        keep = (torch.arange(max(sizes))[None, :] < torch.tensor(sizes)[:, None]).long()
        return ids * keep, keep

    graph = torch.export.export(model, padded([7, 12], seed=0), dynamic_shapes=dims)
    assert ("attnkit.tiled_forward" in graph.graph_module.code) is (backend != "sdpa")
    for sizes in ([5], [3, 40, 17], [128, 90]):
        ids, keep = padded(sizes, seed=len(sizes))
        torch.testing.assert_close(
            graph.module()(ids, keep), model(ids, keep), rtol=1e-5, atol=1e-5
        )


def test_an_aot_inductor_package_runs_in_a_fresh_process(tmp_path):
    """AOTInductor compiles the exported graph to a package whose C++ calls attnkit's tiled
    ops; a new process registers them (``cpu_kernel.available()``) before loading it, and the
    package gives the module's outputs at lengths it was not traced at, causal & a left
    padding that the kernels read as kept keys."""
    module = MultiHeadAttention(32, 4, num_kv_heads=2, mask=masks.causal(), backend="tiled")
    module.eval()
    length = Dim("L", min=2, max=1024)
    dims = {"query": {1: length}, "key_padding_mask": {1: length}}

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        padding = torch.arange(n)[None, :] < n // 3  # batch 1, as traced
        return torch.randn(1, n, 32), padding

    x, padding = inputs(40)
    kwargs = {"key_padding_mask": padding}
    graph = torch.export.export(module, (x,), kwargs=kwargs, dynamic_shapes=dims)
    package = torch._inductor.aoti_compile_and_package(graph, package_path=str(tmp_path / "a.pt2"))
    cases = [inputs(n) for n in (3, 300)]
    torch.save(cases, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from attnkit.backends import cpu_kernel\n"
        "assert cpu_kernel.available()\n"
        "run = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "cases = torch.load(sys.argv[2])\n"
        "torch.save([run(x, key_padding_mask=p)[0] for x, p in cases], sys.argv[3])\n"
    )
    args = [package, tmp_path / "inputs.pt", tmp_path / "outputs.pt"]
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True)
    for (x, padding), got in zip(cases, torch.load(tmp_path / "outputs.pt"), strict=True):
        want = module(x, key_padding_mask=padding)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


#: CausalLM options of the models a DecodingStep exports, one per kind of attention and cache
DECODERS = {
    "rope, gqa, window": {"positions": "rope", "num_kv_heads": 2, "mask": masks.sliding_window(8)},
    "learned, causal": {"positions": "learned"},
    "latent": {
        "positions": "rope",
        "latent": {"kv_rank": 16, "nope_dim": 8, "rope_dim": 8, "v_dim": 16},
    },
    "differential": {"positions": "rope", "differential": True},
    "alibi, sinks, qk-norm, gate": {
        "positions": "alibi",
        "sinks": True,
        "qk_norm": True,
        "output_gate": True,
    },
}


def decoder(kind: str, **extra: object) -> CausalLM:
    torch.manual_seed(0)
    options = {
        "d_model": 32,
        "nhead": 4,
        "num_layers": 2,
        "max_len": 256,
        **DECODERS[kind],
        **extra,
    }
    return CausalLM(50, **options).eval()


@pytest.mark.parametrize("kind", list(DECODERS))
def test_one_exported_decoding_step_serves_the_prompt_and_every_step(kind):
    """DecodingStep.export(): one graph, the prompt (no cache) then steps over ever longer
    caches, gives the logits of the model's full pass and the greedy tokens of its generate."""
    from attnkit.nn import DecodingStep

    lm = decoder(kind)
    step = DecodingStep(lm)
    graph = step.export(batch=2).module()
    text = torch.randint(0, 50, (2, 60))
    full, _ = lm(text)
    keys, values = step.empty_caches(2)
    logits, keys, values = graph(text[:, :37], keys, values)  # a prompt of 37
    torch.testing.assert_close(logits, full[:, :37], rtol=1e-5, atol=1e-5)
    for t in range(37, 60):  # a token at a time
        logits, keys, values = graph(text[:, t : t + 1], keys, values)
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert keys.shape[3] == values.shape[3] == 60
    # greedy decoding through the graph writes what generate writes
    prompt = text[:, :5]
    keys, values = step.empty_caches(2)
    logits, keys, values = graph(prompt, keys, values)
    written = []
    for _ in range(12):
        written.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, keys, values = graph(written[-1], keys, values)
    torch.testing.assert_close(
        torch.cat(written, 1), lm.generate(prompt, max_new_tokens=12, temperature=0.0)[:, 5:]
    )


@pytest.mark.parametrize("kind", ["rope, gqa, window", "learned, causal"])
def test_an_exported_decoding_step_decodes_left_padded_prompts_as_generate(kind):
    """Prompts of 6, 2 and 4 tokens left-padded into one batch: the graph (``pads`` an input)
    writes what generate writes for the padded batch, and each row what it writes alone."""
    from attnkit.nn import DecodingStep

    lm = decoder(kind)
    step = DecodingStep(lm)
    graph = step.export(batch=3, padded=True).module()
    pads = torch.tensor([0, 4, 2])
    prompt = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(5))
    prompt[torch.arange(6)[None, :] < pads[:, None]] = 0  # (whatever a pad's id)
    logits, keys, values = graph(prompt, *step.empty_caches(3), pads)
    written = []
    for _ in range(8):
        written.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, keys, values = graph(written[-1], keys, values, pads)
    written = torch.cat(written, 1)
    padding = torch.arange(6)[None, :] < pads[:, None]
    want = lm.generate(prompt, max_new_tokens=8, temperature=0.0, prompt_padding=padding)
    torch.testing.assert_close(written, want[:, 6:])
    for row, n in enumerate(pads.tolist()):
        alone = lm.generate(prompt[row : row + 1, n:], max_new_tokens=8, temperature=0.0)
        torch.testing.assert_close(written[row], alone[0, 6 - n :])


def test_exported_steps_refuse_positions_past_the_learned_table_by_name():
    """Learned positions end at max_len: an exported step asked past it says so (an op in the
    graph checks it at run time; a guard at export would bound the lengths), where the table's
    lookup raised a bare IndexError. (A Transformer's decoder embeds its targets alike.)"""
    from attnkit.nn import DecodingStep

    step = DecodingStep(decoder("learned, causal", max_len=16))
    graph = step.export().module()
    _, keys, values = graph(torch.randint(0, 50, (1, 12)), *step.empty_caches(1))
    logits, _, _ = graph(torch.randint(0, 50, (1, 4)), keys, values)  # positions 12 .. 15
    assert logits.shape == (1, 4, 50)
    with pytest.raises(RuntimeError, match=r"exceed max_len 16 \(the learned position table"):
        graph(torch.randint(0, 50, (1, 5)), keys, values)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_exported_encoder_and_translation_step_translate_as_generate(positions):
    """TranslationStep.export(): the encoder graph and the step graph, sources of two lengths
    padded into one batch, write generate's greedy translation, and the step's logits are
    the teacher-forced pass's."""
    from attnkit.nn import Transformer, TranslationStep

    torch.manual_seed(0)
    model = Transformer(
        30, 30, d_model=32, nhead=4, num_kv_heads=2, max_len=64, positions=positions
    )
    model.eval()
    step = TranslationStep(model)
    encode, decode = (program.module() for program in step.export(batch=2))
    src = torch.randint(3, 30, (2, 11), generator=torch.Generator().manual_seed(1))
    src[1, 7:] = model.pad_id  # the second source is 7 tokens long
    source = encode(src)  # every layer's cross-attention keys and values, and the padding
    keys, values = step.empty_caches(2)
    bos, eos = 1, 2
    logits, keys, values = decode(torch.full((2, 1), bos), keys, values, *source)
    written = []
    for _ in range(9):
        written.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, keys, values = decode(written[-1], keys, values, *source)
    written = torch.cat(written, 1)
    want = model.generate(src, bos_id=bos, eos_id=eos, max_len=9)
    got = written[:, : want.shape[1]]
    ended = (got == eos).long().cumsum(1) - (got == eos).long() > 0  # after each row's eos
    torch.testing.assert_close(got.masked_fill(ended, model.pad_id), want)
    # a chunk of targets at once over the cache: the teacher-forced logits
    tgt = torch.cat([torch.full((2, 1), bos), written], 1)
    full = model(src, tgt)
    logits, keys, values = decode(tgt[:, :4], *step.empty_caches(2), *source)
    torch.testing.assert_close(logits, full[:, :4], rtol=1e-5, atol=1e-5)
    logits, _, _ = decode(tgt[:, 4:], keys, values, *source)
    torch.testing.assert_close(logits, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_a_translation_step_reads_the_sources_keys_and_values_it_is_given():
    """Projected once by ``encode``: a step projects no cross-attention keys or values, and
    what it is given is what it reads."""
    from attnkit.nn import Transformer, TranslationStep

    torch.manual_seed(0)
    model = Transformer(20, 20, d_model=16, nhead=2, num_decoder_layers=2).eval()
    step = TranslationStep(model)
    ids = torch.tensor([[1, 5]])
    with torch.no_grad():
        source = step.encode(torch.tensor([[3, 4, 5, 6]]))
        projected = []
        for layer in model.decoder:
            for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj):
                proj.register_forward_hook(lambda *_: projected.append(1))
        logits, _, _ = step(ids, *step.empty_caches(1), *source)
        assert projected == []
        other_values = source[1].flip(3)  # the same values at other source positions
        changed, _, _ = step(ids, *step.empty_caches(1), source[0], other_values, source[2])
    assert not torch.allclose(logits, changed)


def test_a_decoding_step_refuses_caches_that_do_not_fit():
    from attnkit.nn import DecodingStep, Transformer, TranslationStep

    with pytest.raises(TypeError, match="DecodingStep takes a CausalLM, got Linear"):
        DecodingStep(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TranslationStep takes a Transformer, got CausalLM"):
        TranslationStep(decoder("latent"))
    translation = TranslationStep(Transformer(10, 10, d_model=16, nhead=2, num_kv_heads=1))
    ids = torch.zeros(2, 1, dtype=torch.long)
    caches = translation.empty_caches(2)
    cross_keys, cross_values, padding = translation.encode(torch.ones(2, 5, dtype=torch.long))
    assert cross_keys.shape == cross_values.shape == (2, 2, 1, 5, 8)  # layers, B, Hkv, S, D
    with pytest.raises(ValueError, match=r"memory_padding be \(B, S\) = \(2, 5\), got .* \(2, 4\)"):
        translation(ids, *caches, cross_keys, cross_values, padding[:, :4])
    with pytest.raises(ValueError, match="cross_values must hold as many positions as cross_k"):
        translation(ids, *caches, cross_keys, cross_values[:, :, :, :4], padding)
    with pytest.raises(
        ValueError,
        match=r"cross_keys must be \(layers, B, Hkv, S, D\) = \(2, 2, 1, S, 8\) .* \(2, 2, 2, 5,",
    ):
        translation(ids, *caches, cross_keys.view(2, 2, 2, 5, 4), cross_values, padding)
    with pytest.raises(
        ValueError, match=r"cross_values must be torch\.float32 on cpu as the model"
    ):
        translation(ids, *caches, cross_keys, cross_values.double(), padding)
    step = DecodingStep(decoder("rope, gqa, window"))
    keys, values = step.empty_caches(2)
    ids = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"ids must be \(B, T\) with T >= 1, got \(2, 0\)"):
        step(ids[:, :0], keys, values)
    with pytest.raises(
        ValueError,
        match=r"keys must be \(layers, B, Hkv, P, D\) = \(2, 3, 2, P, 8\) .* got \(2, 2, 2, 0, 8\)",
    ):
        step(torch.zeros(3, 1, dtype=torch.long), keys, values)
    with pytest.raises(ValueError, match=r"values must be \(layers, B, Hkv, P, Dv\)"):
        step(ids, keys, values[:1])
    with pytest.raises(ValueError, match="as many positions, got 3 and 0"):
        step(ids, torch.zeros(2, 2, 2, 3, 8), values)
    with pytest.raises(
        ValueError, match=r"pads must be \(B,\) = \(2,\) integers, got torch.float32"
    ):
        step(ids, keys, values, torch.zeros(2))


def test_an_aot_inductor_package_of_a_decoding_step_decodes_as_generate(tmp_path):
    """The DecodingStep graph compiled by AOTInductor: prompt and steps in C++ kernels, the
    caches handed from call to call, give generate's greedy tokens."""
    from attnkit.nn import DecodingStep

    lm = decoder("rope, gqa, window", num_layers=1)
    step = DecodingStep(lm)
    package = torch._inductor.aoti_compile_and_package(
        step.export(), package_path=str(tmp_path / "step.pt2")
    )
    run = torch._inductor.aoti_load_package(package)
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
    logits, keys, values = run(prompt, *step.empty_caches(1))
    written = []
    for _ in range(10):
        written.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, keys, values = run(written[-1], keys, values)
    want = lm.generate(prompt, max_new_tokens=10, temperature=0.0)[:, 5:]
    torch.testing.assert_close(torch.cat(written, 1), want)
    assert len(set(want[0].tolist())) > 1  # (a model that writes one token would prove little)
