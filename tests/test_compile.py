"""DESIGN §6: the functional API compiles without graph breaks on the reference/sdpa paths,
and on the tiled path's compiled CPU kernels (custom ops with fake kernels) under the masks
their tiles come from without data (none, causal, windows) and in-kernel score mods, once for
every length past one query tile."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnkit
from attnkit import masks, score_mods
from attnkit.backends import tiled
from attnkit.nn import CausalLM


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own function anew (one code object, many parametrizations)."""
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_compiles_fullgraph(backend):
    q = torch.randn(1, 2, 16, 8)
    k = torch.randn(1, 1, 16, 8)

    def f(q, k):
        return attnkit.attention(q, k, k, mask=masks.causal(), backend=backend)

    compiled = torch.compile(f, fullgraph=True)  # raises on any graph break
    torch.testing.assert_close(compiled(q, k), f(q, k))


def assert_same_outputs_and_gradients(got, expected, leaves):
    """Bit for bit the same output and, where it has them, the same gradients of the leaves."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if expected.requires_grad:
        dout = torch.randn_like(expected)
        for g, e in zip(
            torch.autograd.grad(got, leaves, dout),
            torch.autograd.grad(expected, leaves, dout),
            strict=True,
        ):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def ops_in(graphs):
    """attnkit ops called by the captured graphs, autograd.Function subgraphs included."""
    return {
        str(node.target)
        for graph in graphs.graphs
        for _, module in graph.named_modules()
        if hasattr(module, "graph")
        for node in module.graph.nodes
        if str(node.target).startswith("attnkit.")
    }


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mask": masks.sliding_window(5, 2)},
        {
            "mask": masks.causal(),
            "score_mod": score_mods.compose(
                score_mods.alibi(score_mods.alibi_slopes(4)), score_mods.softcap(5.0)
            ),
        },
    ],
    ids=["dense", "window", "causal-alibi-softcap"],
)
def test_tiled_compiles_fullgraph_around_its_cpu_kernels(kwargs, dtype, grad):
    """One graph calling the kernels' ops; the same outputs and gradients as eager, bit for bit."""
    torch.manual_seed(0)
    leaves = [torch.randn(2, h, 37, 16, dtype=dtype, requires_grad=grad) for h in (4, 2, 2)]

    def f(q, k, v):
        return attnkit.attention(q, k, v, backend="tiled", **kwargs)

    graphs = CompileCounterWithBackend("aot_eager")
    got = torch.compile(f, backend=graphs, fullgraph=True)(*leaves)
    assert_same_outputs_and_gradients(got, f(*leaves), leaves)
    assert graphs.frame_count == 1
    assert ops_in(graphs) == (
        {"attnkit.tiled_forward", "attnkit.tiled_backward"} if grad else {"attnkit.tiled_forward"}
    )


@pytest.fixture
def deterministic():
    """dQ's parts added in a fixed order, so compiled and eager gradients match bit for bit."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask": masks.causal()},
        {"mask": masks.sliding_window(20, 3)},
        {"score_mod": score_mods.alibi(score_mods.alibi_slopes(4))},
    ],
    ids=["causal", "window", "alibi"],
)
def test_tiled_compiles_once_for_every_length(kwargs, deterministic):
    """The lengths stay symbolic: the band's bounds reach the ops as SymInts, and tile choices
    compare lengths without fixing them. The first graph is for 70 tokens; at 90 torch marks
    the length dynamic and compiles once more; 130 and 300 run that graph, bit for bit eager."""
    graphs = CompileCounterWithBackend("aot_eager")

    def f(q, k, v):
        return attnkit.attention(q, k, v, backend="tiled", **kwargs)

    compiled = torch.compile(f, backend=graphs, fullgraph=True)
    for length in (70, 90, 130, 300):
        leaves = [torch.randn(1, h, length, 16, requires_grad=True) for h in (4, 2, 2)]
        assert_same_outputs_and_gradients(compiled(*leaves), f(*leaves), leaves)
    assert graphs.frame_count == 2


@pytest.mark.slow
def test_tiled_compiles_fullgraph_with_dynamic_true():
    """``dynamic=True`` also makes Python scalars symbolic: the argument checks must not call
    functions dynamo cannot trace on them (``math.isnan(dropout_p)`` broke the graph)."""
    f = functools.partial(attnkit.attention, mask=masks.causal(), backend="tiled")
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for length in (37, 70):
        q, k, v = (torch.randn(1, h, length, 16) for h in (4, 2, 2))
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(64)], ids=str)
def test_decoding_over_a_growing_cache_compiles_once(mask):
    """One query over 100 … 3,000 keys (the forward splits long rows over threads): two graphs."""
    graphs = CompileCounterWithBackend("aot_eager")

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=mask, backend="tiled")

    compiled = torch.compile(f, backend=graphs, fullgraph=True)
    for keys in (100, 200, 1500, 3000):
        q, k, v = (torch.randn(1, h, n, 16) for h, n in ((8, 1), (2, keys), (2, keys)))
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)
    assert graphs.frame_count == 2


@pytest.mark.slow
def test_self_attention_on_one_tensor_compiles_fullgraph():
    """attention(x, x, x): dynamo refuses one tensor as several inputs of an autograd.Function,
    so attention passes views of the repeats to the backends."""
    x = torch.randn(1, 2, 40, 16, requires_grad=True)

    def f(x):
        return attnkit.attention(x, x, x, mask=masks.causal(), backend="tiled")

    got, expected = torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # x's three gradients are summed in another order: equal up to rounding
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), x), torch.autograd.grad(expected.sum(), x)
    )


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_tiled_compiles_fullgraph_under_a_padding_mask_made_in_the_graph(grad):
    """A model makes its padding mask from an input at every call: causal & that padding is
    one graph whose ops take the kept keys as an argument (no BlockMask is built)."""
    torch.manual_seed(0)
    leaves = [torch.randn(2, h, 37, 16, requires_grad=grad) for h in (4, 2, 2)]
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :20] = False  # left padding: a whole kv tile and a part of one

    def f(q, k, v, valid):
        mask = masks.causal() & masks.from_padding_mask(valid)
        return attnkit.attention(q, k, v, mask=mask, backend="tiled")

    graphs = CompileCounterWithBackend("aot_eager")
    got = torch.compile(f, backend=graphs, fullgraph=True)(*leaves, valid)
    assert_same_outputs_and_gradients(got, f(*leaves, valid), leaves)
    assert graphs.frame_count == 1
    assert "attnkit.tiled_forward" in ops_in(graphs)


@pytest.mark.slow
def test_tiled_compiles_under_masks_whose_tiles_come_from_data():
    """A document mask's BlockMask is built from its ids: graph breaks, the same results."""
    torch.manual_seed(0)
    leaves = [torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3)]

    def f(q, k, v):
        mask = masks.document([0] * 23 + [1] * 17)
        return attnkit.attention(q, k, v, mask=mask, backend="tiled")

    compiled = torch.compile(f, backend="aot_eager")
    assert_same_outputs_and_gradients(compiled(*leaves), f(*leaves), leaves)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_a_causal_lm_training_step_compiles_fullgraph(backend):
    """One graph for 33 tokens, then one for every length past a query tile (70, 90, 110;
    auto's rule compares the size too: past its threshold, where it turns to tiled, one more)."""
    torch.manual_seed(0)
    lm = CausalLM(40, d_model=32, nhead=4, num_layers=2, positions="rope", backend=backend)
    graphs = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lm, backend=graphs, fullgraph=True)
    for length in (33, 70, 90, 110):
        ids = torch.randint(0, 40, (2, length))
        eager_logits, _ = lm(ids)
        logits, _ = compiled(ids)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-6, atol=1e-6)
        lm.zero_grad()
        logits.sum().backward()
        assert all(p.grad is not None for p in lm.parameters())
    assert graphs.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 6], ids=["cache", "windowed-cache"])
def test_a_decoding_step_over_kv_caches_compiles_once(window):
    """A prefill graph and a step graph serve every step (the caches' positions stay symbolic;
    a windowed cache's first move to its front adds two); what they decode is the full pass."""
    torch.manual_seed(0)
    mask = None if window is None else masks.sliding_window(window)
    lm = CausalLM(40, d_model=32, nhead=4, num_layers=2, positions="rope", mask=mask).eval()
    graphs = CompileCounterWithBackend("aot_eager")
    step = torch.compile(
        lambda ids, start, caches: lm(ids, start=start, caches=caches)[0],
        backend=graphs,
        fullgraph=True,
    )
    ids = torch.randint(0, 40, (2, 40))
    with torch.no_grad():
        full, _ = lm(ids)
        caches = lm.new_caches(2, 64) if window is None else lm.new_caches(2, 14, window=window)
        outs = [step(ids[:, :6], 0, caches)]
        outs += [step(ids[:, t : t + 1], t, caches) for t in range(6, 40)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)
    assert graphs.frame_count == (2 if window is None else 4)


def test_constant_marks_are_torch_compilers_own():
    """cpu_kernel marks its cached queries as torch.compiler.assume_constant_result does,
    without importing torch._dynamo at ``import attnkit``; a torch that marks differently
    fails here (the compiled graphs would then call them, or break on them)."""
    from attnkit.backends import cpu_kernel

    def probe() -> int:
        return 0

    torch.compiler.assume_constant_result(probe)
    for marked in (cpu_kernel.available, cpu_kernel._threads):
        assert {k: v for k, v in vars(marked).items() if k in vars(probe)} == vars(probe)


def test_eager_loops_carry_torch_compilers_disable_marks():
    """tiled's PyTorch loops carry the marks torch.compiler.disable(reason=...) sets (set by
    hand: it imports torch._dynamo); a torch that marks differently fails here (fullgraph
    would then fail inside the loops, not say why)."""
    probe = torch.compiler.disable(lambda: 0, reason="why")
    assert probe._torchdynamo_disable is True
    assert probe._torchdynamo_disable_msg == "why"
    assert tiled._run_loops._torchdynamo_disable is True
    assert "PyTorch loops" in tiled._run_loops._torchdynamo_disable_msg


def test_fullgraph_with_a_custom_score_mod_says_why_it_cannot():
    """A custom score_mod runs tiled's PyTorch loops, which no graph holds: fullgraph=True
    stops with the reason and the ways out (it used to fail inside the loops' torch function
    mode with "Observed exception ... AttributeError('found')")."""
    table = torch.randn(2, 9, 9, requires_grad=True)

    def f(q, k, v):
        return attnkit.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h, i, j])

    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="backend='reference'"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(q, q, q)


def test_import_leaves_dynamo_and_sympy_unloaded():
    """``import attnkit`` (and a first attention call) stays ~1 s lighter: neither
    torch._dynamo nor sympy (torch's symbolic shapes) is loaded by it."""
    import subprocess
    import sys

    code = (
        "import sys, torch, attnkit\n"
        "from attnkit import masks\n"
        "q = torch.randn(1, 2, 130, 16)\n"
        "attnkit.attention(q, q, q, mask=masks.sliding_window(20))\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_a_custom_score_mod_compiles_with_graph_breaks_and_trains_its_bias():
    """A score mod attnkit does not know runs tiled's PyTorch loops, which torch.compile
    reaches through graph breaks (fullgraph=True refuses them); the backward still finds the
    bias the mod reads through ``self`` and gives it eager's gradient. (Naming the bound
    method with ``repr`` once stopped dynamo with an internal error.)"""

    class Bias(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(2, 9, 9))

        def score_mod(self, s, b, h, i, j):
            return s + self.table[h, i, j]

    bias = Bias()

    def f(q, k, v):
        return attnkit.attention(q, k, v, score_mod=bias.score_mod, backend="tiled")

    leaves = [torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3)]
    grads = []
    for fn in (f, torch.compile(f)):
        out = fn(*leaves)
        grads.append(torch.autograd.grad((out**2).sum(), [*leaves, bias.table]))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
    assert grads[1][3].abs().sum() > 0
