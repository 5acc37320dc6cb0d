"""Empty batches and lengths (B, Lq or Lk = 0) give what torch SDPA gives, on every backend.

A data pipeline hands a model an empty batch; a decoder's cross-attention meets an encoder
output of no tokens. Both used to stop with "empty dimension" where SDPA, which attnkit
stands in for (``integrations.transformers``, ``MultiHeadAttention.from_torch``), answers:
an empty output, or zeros (every row fully masked, DESIGN §2) with LSE -inf, and zero
gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks, score_mods
from attnkit.nn import CausalLM, MultiHeadAttention, Transformer
from conftest import TRITON_DEVICE, rand_qkv

HQ, HKV, D, DV = 4, 2, 16, 8  # GQA, D != Dv
SIZES = [(0, 5, 7), (2, 0, 7), (2, 5, 0), (2, 0, 0)]  # (B, Lq, Lk)
# CPU tensors: triton too under its interpreter (a GPU run tests it in test_triton.py)
BACKENDS = ["reference", "tiled", "sdpa", "auto"] + (["triton"] if TRITON_DEVICE == "cpu" else [])
MASKS = ["none", "causal", "window", "bool tensor", "alibi"]


def _mask_kwargs(name: str, B: int, Lq: int, Lk: int) -> dict[str, object]:
    return {
        "none": {},
        "causal": {"mask": masks.causal()},
        "window": {"mask": masks.sliding_window(3)},
        "bool tensor": {"mask": torch.ones(B, 1, Lq, Lk, dtype=torch.bool)},
        "alibi": {"score_mod": score_mods.alibi(score_mods.alibi_slopes(HQ))},
    }[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("backend", "mask"), [(b, m) for b in BACKENDS for m in MASKS if (b, m) != ("sdpa", "alibi")]
)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_empty_sizes_give_sdpas_output_and_gradients(sizes, backend, mask, dtype):
    B, Lq, Lk = sizes
    kwargs = _mask_kwargs(mask, B, Lq, Lk)
    q, k, v = rand_qkv(B, HQ, HKV, Lq, Lk, D, DV, dtype=dtype, requires_grad=True)
    out = attnkit.attention(q, k, v, backend=backend, **kwargs)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want_grads = torch.autograd.grad(want.float().sum(), (q, k, v))
    assert out.shape == (B, HQ, Lq, DV)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if backend != "sdpa":
        _, lse = attnkit.attention(q, k, v, backend=backend, return_lse=True, **kwargs)
        assert lse.shape == (B, HQ, Lq)
        assert lse.dtype == torch.float32
        assert (lse == float("-inf")).all()


def test_no_keys_give_zeros_even_for_a_nan_query():
    """Zeros, not NaN: no key means no product for the NaN to reach.

    (torch SDPA itself gives zeros in float32 here but NaN in float64.)
    """
    q, k, v = rand_qkv(1, HQ, HKV, 3, 0, D, DV)
    q[0, 1, 2, 5] = float("nan")
    for backend in BACKENDS:
        assert (attnkit.attention(q, k, v, backend=backend) == 0).all(), backend
    _, lse = attnkit.attention(q, k, v, return_lse=True)
    assert (lse == float("-inf")).all()


def test_empty_sizes_with_sinks_dropout_and_weights():
    q, k, v = rand_qkv(2, HQ, HKV, 3, 0, D, DV, requires_grad=True)
    sinks = torch.zeros(HQ, requires_grad=True)
    out, lse = attnkit.attention(q, k, v, sinks=sinks, return_lse=True)
    # the sink takes every row's weight and carries no value: zeros, lse = the sink's logit
    assert (out == 0).all()
    assert (lse == 0).all()
    assert (attnkit.attention(q, k, v, dropout_p=0.5) == 0).all()
    weights = attnkit.attention_weights(q, k, v)
    assert weights.shape == (2, HQ, 3, 0)
    assert weights.dtype == torch.float32
    (dq,) = torch.autograd.grad(weights.sum(), (q,))
    assert (dq == 0).all()
    decision = attnkit.dispatch(q, k, v)
    assert decision.backend == "reference"
    assert "no (query, key) pair" in decision.reason


def test_a_named_backend_still_says_what_it_cannot_do():
    q, k, v = rand_qkv(0, HQ, HKV, 3, 5, D, DV, dtype=torch.float64)
    with pytest.raises(attnkit.UnsupportedError, match="triton kernels take float16"):
        attnkit.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="heads and head dims must be >= 1"):
        attnkit.attention(q, k, v[..., :0])


def test_a_mask_made_for_an_empty_batch_is_for_that_batch_only():
    for mask in (
        masks.key_padding(torch.zeros(0, dtype=torch.long)),
        masks.from_padding_mask(torch.ones(0, 5, dtype=torch.bool)),
        masks.document(torch.zeros(0, 5, dtype=torch.long)),
    ):
        empty = torch.randn(0, HQ, 5, D)
        for backend in BACKENDS:
            assert attnkit.attention(empty, empty, empty, mask=mask, backend=backend).shape == (
                0,
                HQ,
                5,
                D,
            )
        one = torch.randn(1, HQ, 5, D)
        with pytest.raises(ValueError, match="built for batch 0, but q has B=1"):
            attnkit.attention(one, one, one, mask=mask)


def test_modules_take_an_empty_batch_and_an_empty_memory_as_torch_does():
    torch_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    mha = MultiHeadAttention.from_torch(torch_mha)
    for x, memory in (
        (torch.randn(0, 5, 32), torch.randn(0, 6, 32)),  # no sequence
        (torch.randn(2, 5, 32), torch.randn(2, 0, 32)),  # cross-attention over no token
        (torch.randn(2, 0, 32), torch.randn(2, 6, 32)),  # no query
    ):
        x.requires_grad_(True)
        out, weights = mha(x, memory, memory, need_weights=True)
        want, _ = torch_mha(x, memory, memory)
        torch.testing.assert_close(out, want)
        assert weights is not None
        assert weights.shape == (x.shape[0], 4, x.shape[1], memory.shape[1])
        (dx,) = torch.autograd.grad(out.sum(), (x,))
        (want_dx,) = torch.autograd.grad(want.sum(), (x,))
        torch.testing.assert_close(dx, want_dx)


def test_models_take_an_empty_batch_and_an_empty_source():
    torch.manual_seed(0)
    lm = CausalLM(50, d_model=32, nhead=4, num_layers=2, num_kv_heads=2, positions="rope")
    logits = lm(torch.zeros(0, 5, dtype=torch.long))[0]
    assert logits.shape == (0, 5, 50)
    # (every row of none has finished: it stops after the first token, "up to" max_new_tokens)
    assert lm.generate(torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2).shape == (0, 4)
    translator = Transformer(30, 30, d_model=32, nhead=4, num_encoder_layers=1)
    target = torch.ones(2, 4, dtype=torch.long)
    # over no source token, cross-attention adds nothing: the decoder runs on its own
    without_source = translator(torch.ones(2, 0, dtype=torch.long), target)
    assert without_source.shape == (2, 4, 30)
    assert without_source.isfinite().all()


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_batches_of_empty_sequences(causal):
    cu_q, cu_k = torch.tensor([0, 1, 3]), torch.tensor([0, 0, 0])  # two sequences, no keys
    q = torch.randn(3, HQ, D, requires_grad=True)
    k, v = torch.randn(0, HKV, D), torch.randn(0, HKV, DV)
    out, lse = attnkit.varlen_attention(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, return_lse=True
    )
    assert out.shape == (3, HQ, DV)
    assert (out == 0).all()
    assert (lse == float("-inf")).all()
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert (dq == 0).all()
    none = torch.randn(0, HQ, D)
    cu = torch.tensor([0, 0])
    assert attnkit.varlen_attention(none, none, none, cu_seqlens_q=cu).shape == (0, HQ, D)
