"""Every bad input gets a clear error that names the argument and the shapes seen."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.nn import KVCache, MultiHeadAttention, RotaryEmbedding

q4 = torch.randn(2, 4, 8, 16)
k2 = torch.randn(2, 2, 10, 16)
v2 = torch.randn(2, 2, 10, 12)


def ids(*shape: int, value: int = 0) -> torch.Tensor:
    """An int64 index tensor, as the patterns take them."""
    return torch.full(shape, value)


@pytest.mark.parametrize(
    ("args", "kwargs", "err", "match"),
    [
        ((q4[0], k2, v2), {}, ValueError, r"q must have 4 dims.*\(4, 8, 16\)"),
        ((q4, k2, v2.double()), {}, TypeError, "share a dtype"),
        ((q4.int(), k2.int(), v2.int()), {}, TypeError, "q must be float16"),
        (
            (q4, torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 12)),
            {},
            ValueError,
            r"multiple of key/value heads.*\(2, 3, 10, 16\)",
        ),
        ((q4, torch.randn(2, 2, 10, 8), v2), {}, ValueError, r"head dims differ.*\(2, 2, 10, 8\)"),
        ((q4, k2, torch.randn(2, 2, 9, 12)), {}, ValueError, "k and v must agree"),
        (
            (q4, torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 12)),
            {},
            ValueError,
            "batch sizes differ",
        ),
        ((q4, k2.to("meta"), v2), {}, ValueError, "must be on one device, got cpu, meta, cpu"),
        ((q4, k2, v2), {"scale": "0.1"}, TypeError, "scale must be a float or None, got str"),
        ((q4, k2, v2), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float, got str"),
        (
            (q4, k2, v2),
            {"mask": torch.ones(1, 2, 4, 8, 10, dtype=torch.bool)},
            ValueError,
            r"mask has 5 dims, shape \(1, 2, 4, 8, 10\); at most 4 allowed",
        ),
        (
            (q4, k2, v2),
            {"mask": masks.block_sparse(torch.ones(3, 2, 2, dtype=torch.bool), 8)},
            ValueError,
            "is built for 3 heads, but q has Hq=4",
        ),
        (
            (q4, k2, v2),
            {"mask": masks.key_padding([1, 2, 3]).blocks(8, 10, 4, 4)},
            ValueError,
            r"BlockMask kinds \(3, 1, 2, 3\) do not broadcast to B=2, H=4",
        ),
        ((q4, k2, v2), {"scale": float("nan")}, ValueError, "scale must be finite"),
        ((q4, k2, v2), {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ((q4, k2, v2), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ((q4, k2, v2), {"dropout_p": float("nan")}, ValueError, "dropout_p"),
        ((q4, k2, v2), {"backend": "cuda-magic"}, ValueError, "backend must be one of"),
        (
            (q4, k2, v2),
            {"mask": torch.ones(8, 11, dtype=torch.bool)},
            ValueError,
            r"does not broadcast to \(B, H, Lq, Lk\) = \(2, 4, 8, 10\)",
        ),
        ((q4, k2, v2), {"mask": torch.ones(8, 10)}, TypeError, "must be bool"),
        ((q4, k2, v2), {"mask": "causal"}, TypeError, "mask must be an attnkit Mask"),
        ((q4, k2, v2), {"mask": masks.key_padding([1, 2, 3])}, ValueError, "batch 3"),
        (
            (q4, k2, v2),
            {"mask": masks.causal().blocks(8, 12, 4, 4)},
            ValueError,
            r"\(Lq, Lk\) = \(8, 12\)",
        ),
        (
            (q4, k2, torch.randn(2, 2, 10, 0)),
            {},
            ValueError,
            r"empty dimension: .* \(heads and head dims must be >= 1\)",
        ),
        (("q", k2, v2), {}, TypeError, "q must be a torch.Tensor"),
        ((q4, k2, v2), {"dropout_p": 0.1, "generator": 3}, TypeError, "generator must be"),
        ((q4, k2, v2), {"return_lse": "yes"}, TypeError, "return_lse must be a bool, got str"),
        ((q4, k2, v2), {"mask": torch.zeros(8, 10)}, TypeError, "use a score_mod"),
        (
            (q4, k2, v2),
            {"score_mod": lambda s, b, h, i, j: s[..., :3]},
            ValueError,
            r"score_mod <lambda> must return a float tensor shaped like its score .*, got .*3\)",
        ),
        (
            (q4, k2, v2),
            {"score_mod": lambda s, b, h, i, j: (i >= j).expand_as(s)},
            ValueError,
            r"score_mod <lambda> must return a float tensor .*, got torch.bool",
        ),
        (
            (q4, k2, v2),
            {"mask": masks.custom(lambda b, h, i, j: (i - j).float(), name="diff")},
            TypeError,
            "mask diff must return a bool tensor",
        ),
        (
            (q4, k2, v2),
            {"mask": masks.custom(lambda b, h, i, j: torch.ones(3, dtype=torch.bool))},
            ValueError,
            r"returned shape \(3,\), which does not broadcast",
        ),
    ],
)
def test_attention_rejects(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        attnkit.attention(*args, **kwargs)


def test_model_configuration_errors():
    """Typos that would build a model without positions, or with no padding, are refused."""
    from attnkit.nn import CausalLM, Transformer

    with pytest.raises(ValueError, match="positions must be one of 'learned', 'rope', 'alibi'"):
        CausalLM(10, positions="rotary")
    with pytest.raises(ValueError, match="vocab must be an int >= 1, got 0"):
        CausalLM(0)
    with pytest.raises(ValueError, match="pad_id 12 is not a token of both vocabularies"):
        Transformer(20, 12, pad_id=12)
    with pytest.raises(TypeError, match="need_weights must be a bool, got str"):
        MultiHeadAttention(8, 2)(torch.randn(1, 3, 8), need_weights="yes")


def test_token_ids_are_checked_before_the_embedding():
    """Ids of the wrong dtype, shape or range get their own message, not the embedding's
    "index out of range in self" or an IndexError of a shape read."""
    from attnkit.nn import CausalLM, Transformer

    lm = CausalLM(50, d_model=16, nhead=2, max_len=32)
    with pytest.raises(TypeError, match=r"ids must be an int64 or int32 .* got torch.float32"):
        lm(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"ids must be \(B, L\) token ids, got shape \(3\)"):
        lm(torch.tensor([1, 2, 3]))
    for bad in (50, -1):
        with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary 0\.\.49"):
            lm(torch.tensor([[1, bad, 2]]))
    assert lm(torch.tensor([[0, 49]], dtype=torch.int32))[0].shape == (1, 2, 50)
    seq2seq = Transformer(20, 12, d_model=16, nhead=2)
    with pytest.raises(ValueError, match=r"token id 12, outside the vocabulary 0\.\.11"):
        seq2seq.generate(torch.tensor([[1, 2]]), bos_id=12, eos_id=2)


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (lambda: masks.key_padding([1.5]), TypeError, "lengths must hold integers, got dtype"),
        (lambda: masks.causal() & "causal", TypeError, "can only combine a Mask with a Mask"),
        (lambda: masks.from_padding_mask(torch.ones(2, 10)), TypeError, r"bool tensor .*\(B, Lk\)"),
        (
            lambda: masks.from_padding_mask(torch.ones(2, 9, dtype=torch.bool)).dense(8, 10),
            ValueError,
            r"padding mask has shape \(2, 9\), but Lk=10",
        ),
        (
            lambda: masks.document(ids(1, 2, 3)),
            ValueError,
            r"\(L,\) or \(B, L\)",
        ),
        (
            lambda: masks.document(ids(2, 10), kv_ids=ids(3, 10)),
            ValueError,
            "ids and kv_ids batch sizes differ: 2 vs 3",
        ),
        (
            lambda: masks.document(ids(7), kv_ids=ids(10)).dense(8, 10),
            ValueError,
            "query document ids have length 7, but Lq=8",
        ),
        (lambda: masks.document(ids(5)).dense(8, 5), ValueError, "needs Lq <= Lk"),
        (lambda: masks.bigbird(2).dense(12, 8), ValueError, "needs Lq <= Lk, got 12, 8"),
        (
            lambda: masks.key_ranges(ids(7), ids(7, value=1)).dense(8, 10),
            ValueError,
            "key_ranges for 7 queries, but Lq=8",
        ),
    ],
)
def test_masks_reject(make, err, match):
    """Bad pattern arguments, at the factory or where the lengths meet them."""
    with pytest.raises(err, match=match):
        make()


def test_dispatch_rejects_what_attention_rejects():
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        attnkit.dispatch(q4, k2, v2, return_lse=torch.tensor(True))


def test_named_backend_that_cannot_run_here_raises_unsupported(monkeypatch):
    """CPU tensors without TRITON_INTERPRET: triton says why (not installed, or needs CUDA)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(attnkit.UnsupportedError, match=r"triton (is not installed|runs on CUDA)"):
        attnkit.attention(q4, k2, v2, backend="triton")


def test_module_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(32, 4, num_kv_heads=3)
    m = MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match=r"query must be \(B, L, E=32\)"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(B, Lk\) = \(2, 5\)"):
        m(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"rotary_dim must be even and in 2 \.\. head_dim = 8"):
        RotaryEmbedding(8, rotary_dim=10)
    with pytest.raises(ValueError, match="qk_norm must be a bool, 'rms' or 'layer', got 'group'"):
        MultiHeadAttention(32, 4, qk_norm="group")
    cache = KVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match="KVCache is full"):
        cache.append(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))
    with pytest.raises(ValueError, match=r"expected \(B, Hkv, n, D\)"):
        cache.append(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(TypeError, match=r"KVCache holds torch\.float32 on cpu, got k torch\.bf"):
        cache.append(torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 8))
    with pytest.raises(TypeError, match=r"got v torch\.float64"):
        cache.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8, dtype=torch.float64))
    assert cache.length == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.new_cache(1, 4).keys.dtype == torch.bfloat16
    float32_cache = m.new_cache(2, 8)
    with (
        pytest.raises(TypeError, match=r"new_cache\(\) takes the dtype .* torch\.autocast"),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        m(torch.randn(2, 5, 32), cache=float32_cache)
    x = torch.randn(2, 5, 32)
    for bad_mask in ("causal", torch.zeros(5, 5)):  # with the module's own mask too
        with pytest.raises(TypeError, match="mask"):
            MultiHeadAttention(32, 4, mask=masks.causal())(x, mask=bad_mask)


def test_torch_func_transforms_get_a_backend_that_composes_with_them():
    """torch.func's grad and vmap do not compose with the fused backends' autograd.Functions:
    named, they say so; auto picks sdpa, or the reference where SDPA cannot serve."""
    from attnkit import score_mods

    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    for mod in (None, score_mods.softcap(3.0)):
        q_ = q.clone().requires_grad_()
        out = attnkit.attention(q_, k, v, mask=masks.causal(), score_mod=mod, backend="reference")
        (expected,) = torch.autograd.grad(out.sum(), q_)

        def loss(q, backend="auto", mod=mod):
            return attnkit.attention(q, k, v, mask=masks.causal(), score_mod=mod, backend=backend)

        got = torch.func.grad(lambda q: loss(q).sum())(q)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        batched = torch.vmap(loss)(q[None].expand(3, -1, -1, -1, -1))
        torch.testing.assert_close(batched, loss(q).expand(3, -1, -1, -1, -1))
        with pytest.raises(attnkit.UnsupportedError, match=r"inside a torch\.func transform"):
            torch.func.grad(lambda q: loss(q, "tiled").sum())(q)
