"""MultiHeadAttention: self-, cross- and grouped-query attention with the W0 output projection."""

from __future__ import annotations

import math
import operator
from functools import partial, reduce
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from attnkit import masks as _masks
from attnkit import score_mods as _score_mods
from attnkit._types import ScoreModFn
from attnkit._validation import check_flag, check_int
from attnkit.backends._common import MaskLike
from attnkit.block_mask import BlockMask
from attnkit.functional import (
    BackendName,
    attention,
    attention_weights,
    autocast_dtype,
    check_mask_kind,
)
from attnkit.masks import Mask
from attnkit.nn.beam_kv_cache import BeamKVCache
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rope import RotaryEmbedding
from attnkit.nn.sharded_kv_cache import ShardedKVCache
from attnkit.score_mods import ScoreMod
from attnkit.sinks import apply_sinks


def check_window(window: int, mask_parts: list[Mask]) -> None:
    """A cache that keeps only the last ``window`` positions is exact for these masks, or raise.

    Tensor and BlockMask masks of a call are given for the keys the cache holds, so they need
    no check; Mask objects must depend only on relative positions and look back at most
    ``window`` (``masks.lookback``).
    """
    reaches = [_masks.lookback(m) for m in mask_parts]
    unknown = [m for m, r in zip(mask_parts, reaches, strict=True) if r is None]
    reach = min([r for r in reaches if r is not None], default=math.inf)  # (dynamo: a list)
    if unknown or reach > window:
        far = "without bound" if reach == math.inf else f"{reach} positions"
        what = (
            f"mask {unknown[0]!r} depends on more than relative positions"
            if unknown
            else f"mask {' & '.join(map(repr, mask_parts))} looks back {far}"
            if mask_parts
            else "no mask limits how far back queries look"
        )
        raise ValueError(
            f"this KVCache keeps only the last {window} positions (window={window}), but {what};"
            f" use a mask such as masks.sliding_window({window}), or a cache without a window"
        )


def append_to_cache(
    cache: KVCache,
    k: Tensor,
    v: Tensor,
    masks: list[MaskLike],
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Append this call's keys and values; every cached key and value, and the padding mask.

    A windowed cache first checks that ``masks`` (the module's and the call's) need no key
    it drops. A ``key_padding_mask`` over every position since the cache's reset is cut to
    the positions it still holds.
    """
    if isinstance(cache, ShardedKVCache | BeamKVCache):  # (MultiHeadAttention takes them)
        raise ValueError(
            f"a {type(cache).__name__} is served by MultiHeadAttention only (not latent or "
            "differential attention)"
        )
    if cache.window is not None:
        check_window(cache.window, [m for m in masks if isinstance(m, Mask)])
    k, v = cache.append(k, v)
    if key_padding_mask is not None and key_padding_mask.shape[-1] == cache.position:
        key_padding_mask = key_padding_mask[..., cache.start :]
    return k, v, key_padding_mask


def combine_masks(
    masks: list[MaskLike],
    key_padding_mask: Tensor | None,
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    device: torch.device,
) -> MaskLike:
    """One mask from a module's and a call's masks and torch's key_padding_mask (B, Lk).

    Mask objects combine with ``&`` (still tile-skippable); a mix with tensors or BlockMasks
    is materialised as one bool tensor (B, H, Lq, Lk).
    """
    parts: list[Mask | BlockMask | Tensor] = [m for m in masks if m is not None]
    for part in parts:
        check_mask_kind(part)  # here too: materialising would turn a float bias into bools
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must be bool (B, Lk) = ({B}, {Lk}) with True = padding, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        parts.append(_masks.from_padding_mask(~key_padding_mask))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    mask_objects = [p for p in parts if isinstance(p, Mask)]
    if len(mask_objects) == len(parts):
        return reduce(operator.and_, mask_objects)
    dense = [
        p.dense(Lq, Lk, B=B, H=H, device=device)
        if isinstance(p, Mask)
        else p.to_dense().to(device)
        if isinstance(p, BlockMask)
        else p
        for p in parts
    ]
    return reduce(torch.logical_and, dense)


def _check_key_padding(
    key_padding_mask: Tensor | None, shape: tuple[int, int], over: str, described: str
) -> None:
    """ValueError unless ``key_padding_mask`` is None or bool of ``shape`` (``described``).

    ``over`` names the cache it was given with.
    """
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != shape
    ):
        raise ValueError(
            f"over {over}, key_padding_mask must be bool ({described}) = {shape}, got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def _beams_as_heads(q: Tensor, beams: int) -> Tensor:
    """Beams' queries (B·K, H, T, D) as (B, H·K, T, D): beam k's head h is head h·K + k.

    Grouped-query attention then reads kv head (h·K + k) // (G·K) = h // G for it, the kv
    head its own head h reads: one prompt's keys serve all its beams.
    """
    N, H, T, D = q.shape
    return q.view(N // beams, beams, H, T, D).transpose(1, 2).reshape(N // beams, H * beams, T, D)


def _heads_as_beams(out: Tensor, beams: int) -> Tensor:
    """(B, H·K, T, Dv) back to (B·K, H, T, Dv), as ``_beams_as_heads`` folded them."""
    B, HK, T, Dv = out.shape
    return out.view(B, HK // beams, beams, T, Dv).transpose(1, 2).reshape(B * beams, -1, T, Dv)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend, concatenate, project with W0.

    ``key=None`` is self-attention; a ``key``/``value`` from another sequence is
    cross-attention (decoder queries over encoder keys and values). With ``num_kv_heads`` <
    ``num_heads`` it is grouped-query attention (1 = multi-query).

    Args:
        embed_dim: E, width of queries and output.
        num_heads: Hq.
        head_dim: per-head width; default E / Hq (Qwen3 and Gemma set their own).
        num_kv_heads: Hkv (divides Hq); default Hq.
        kdim, vdim: widths of key and value inputs (default E).
        bias: biases in the four projections.
        dropout: attention-weight dropout while training.
        mask: a mask applied on every call (e.g. ``masks.causal()``), combined with the call's.
        score_mod: applied on every call (e.g. ``score_mods.alibi(...)``).
        rope: a ``RotaryEmbedding`` applied to q and k in self-attention.
        qk_norm: RMS-normalise each head's queries and keys (learned gains, over head_dim)
            before rotary positions, as Qwen3, OLMo 2 and Gemma 3 do to keep logits bounded;
            ``"layer"``: a LayerNorm (gain and bias) instead, as Phi and Persimmon.
        v_norm: RMS-normalise each head's values, without a gain (Gemma 4), so every value
            vector a head mixes has RMS 1.
        sinks: learn one attention-sink logit per head (``self.sinks`` (Hq,), initialised to
            0), which takes a share of every row's weight and adds no value (gpt-oss).
        output_gate: multiply each head's output, channel by channel, by σ(``gate_proj``(query))
            before W0 (gated attention: Qwen3-Next, Qwen3.5; Qiu et al. 2025): a non-linearity
            between W_V and W_O that lets a head output nothing without a sink.
        scale: softmax scale; default 1/sqrt(head_dim).
        backend: attention backend (see ``attnkit.attention``).
        batch_first: inputs (B, L, E) when True, else (L, B, E).

    Shapes:
        query (B, Lq, E); key (B, Lk, kdim); value (B, Lk, vdim); output (B, Lq, E);
        weights (B, Hq, Lq, Lk).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        mask: Mask | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        rope: RotaryEmbedding | None = None,
        qk_norm: bool | Literal["rms", "layer"] = False,
        v_norm: bool = False,
        sinks: bool = False,
        output_gate: bool = False,
        scale: float | None = None,
        backend: BackendName = "auto",
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("embed_dim", embed_dim)
        check_int("num_heads", num_heads)
        kv_heads = check_int("num_kv_heads", num_kv_heads or num_heads)
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_heads % kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = (
            embed_dim // num_heads if head_dim is None else check_int("head_dim", head_dim)
        )
        self.scale = scale
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"rope head_dim {rope.head_dim} != head_dim {self.head_dim}")
        self.dropout, self.mask, self.score_mod, self.rope = dropout, mask, score_mod, rope
        self.backend: BackendName = backend
        self.batch_first = batch_first
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, kv_heads * self.head_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **kw)  # W0
        self.gate_proj = (
            nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **kw)
            if output_gate
            else None
        )
        if qk_norm not in (False, True, "rms", "layer"):
            raise ValueError(f"qk_norm must be a bool, 'rms' or 'layer', got {qk_norm!r}")
        # one norm over head_dim shared by the heads; eps as Qwen3 (RMS) and Phi (layer)
        norm = (
            partial(nn.LayerNorm, self.head_dim, 1e-5, device=device, dtype=dtype)
            if qk_norm == "layer"
            else partial(nn.RMSNorm, self.head_dim, 1e-6, device=device, dtype=dtype)
        )
        self.q_norm: nn.RMSNorm | nn.LayerNorm | None = norm() if qk_norm else None
        self.k_norm: nn.RMSNorm | nn.LayerNorm | None = norm() if qk_norm else None
        self.v_norm = (
            nn.RMSNorm(self.head_dim, 1e-6, elementwise_affine=False, device=device, dtype=dtype)
            if v_norm
            else None
        )
        zeros = torch.zeros(num_heads, device=device, dtype=dtype)
        self.sinks = nn.Parameter(zeros) if sinks else None

    def new_cache(self, batch: int, max_len: int, window: int | None = None) -> KVCache:
        """A KVCache for this module's keys and values (B, Hkv, max_len, head_dim).

        Its dtype is what the projections output here: autocast's inside ``torch.autocast``.
        """
        w = self.k_proj.weight
        return KVCache(
            batch,
            self.num_kv_heads,
            max_len,
            self.head_dim,
            autocast_dtype(w),
            w.device,
            window=window,
        )

    def new_sharded_cache(
        self, batch: int, max_len: int, *, kv_start: int, group: dist.ProcessGroup | None = None
    ) -> ShardedKVCache:
        """This rank's run of a cache sharded along the sequence over ``group``.

        A ``ShardedKVCache`` of ``max_len`` positions from global position ``kv_start``.
        """
        like = self.new_cache(batch, 1)
        return ShardedKVCache(
            batch, self.num_kv_heads, max_len, self.head_dim, like.keys.dtype, like.keys.device,
            kv_start=kv_start, group=group,
        )  # fmt: skip

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """(B, L, n·hd) -> (B, n, L, hd)."""
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def _check_query(self, query: Tensor) -> None:
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (B, L, E={self.embed_dim}), got {tuple(query.shape)}")

    def _query_heads(self, query: Tensor) -> Tensor:
        q = self._heads(self.q_proj(query), self.num_heads)
        return q if self.q_norm is None else self.q_norm(q)

    def heads(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        position: int = 0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The per-head queries, keys and values ``forward`` attends with (no cache).

        The projections, QK- and V-norms and, in self-attention (``key`` None), RoPE from
        position ``position``: softmax(q·kᵀ·scale) over them (each kv head serving its
        num_heads / num_kv_heads query heads), under the masks, is ``need_weights``' result.
        For looking inside the module (``attnkit explain``'s neuron view).

        Args:
            query: (B, Lq, E), batch first whatever ``batch_first`` says.
            key: (B, Lk, kdim) for cross-attention; None for self-attention.
            value: (B, Lk, vdim); defaults to ``key``.
            position: the position of the first query (and key) in self-attention.

        Returns:
            q (B, Hq, Lq, head_dim), k (B, Hkv, Lk, head_dim), v (B, Hkv, Lk, head_dim).
        """
        self._check_query(query)
        is_self = key is None
        k, v = self.key_value_heads(query if key is None else key, value)
        q = self._query_heads(query)
        if self.rope is not None and is_self:
            q, k = self.rope.rotate_qk(q, k, offset=position)
        return q, k, v

    def key_value_heads(self, key: Tensor, value: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-head keys and values, before RoPE: what a cross-attention's cache holds.

        Args:
            key: (B, Lk, kdim), batch first whatever ``batch_first`` says.
            value: (B, Lk, vdim); defaults to ``key``.

        Returns:
            k (B, Hkv, Lk, head_dim), v (B, Hkv, Lk, head_dim): projected and normed.
        """
        value = key if value is None else value
        if key.dim() != 3 or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key must be (B, Lk, kdim={self.kdim}) and value (B, Lk, vdim={self.vdim}), "
                f"got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        k = self._heads(self.k_proj(key), self.num_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self._heads(self.v_proj(value), self.num_kv_heads)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return k, v

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: MaskLike = None,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value`` (or to itself).

        Args:
            query: (B, Lq, E) (or (Lq, B, E) when not batch_first).
            key: (B, Lk, kdim) for cross-attention; None for self-attention.
            value: (B, Lk, vdim); defaults to ``key``.
            mask: attention mask for this call (attnkit convention: True = attend), combined
                with the module's ``mask``.
            key_padding_mask: bool (B, Lk), torch's convention: True = padding, ignored. With a
                cache it may also cover every position since the cache's reset,
                (B, cache.position) after this call's append; the positions the cache still
                holds are taken from it (a windowed cache drops the oldest).
            cache: a ``KVCache``. Self-attention appends this step's keys/values and attends
                over all cached ones (positions continue from ``cache.position``);
                cross-attention fills an empty cache from ``key``/``value`` and reuses it
                afterwards. A cache with a window needs masks of relative position that look
                back at most that far (see ``check_window``); masks and score mods index its
                keys from ``cache.start``.
            need_weights: also return per-head weights (B, Hq, Lq, Lk); with a cache, over
                its keys (positions ``cache.start ..``).

        Returns:
            (output (B, Lq, E), weights or None).
        """
        if not self.batch_first:
            query = query.transpose(0, 1)
            key = None if key is None else key.transpose(0, 1)
            value = None if value is None else value.transpose(0, 1)
        self._check_query(query)
        B, Lq, _ = query.shape
        if isinstance(cache, BeamKVCache) and key is not None:
            wanted = check_flag("need_weights", need_weights)
            out = self._over_beam_memory(
                self._query_heads(query), cache, mask, key_padding_mask, wanted
            )
            return self._output(out, query), None
        reuse_cross = cache is not None and key is not None and cache.length > 0
        if reuse_cross:
            assert cache is not None
            q, k, v = self._query_heads(query), cache.keys, cache.values
        else:
            start = cache.position if cache is not None else 0
            q, k, v = self.heads(query, key, value, position=start)
        if isinstance(cache, BeamKVCache):
            wanted = check_flag("need_weights", need_weights)
            out = self._over_beam_cache(q, k, v, cache, mask, key_padding_mask, wanted)
            return self._output(out, query), None
        if isinstance(cache, ShardedKVCache):
            wanted = check_flag("need_weights", need_weights)
            if key is None:
                out = self._over_sharded_cache(q, k, v, cache, mask, key_padding_mask, wanted)
            else:
                out = self._over_sharded_memory(
                    q, k, v, cache, mask, key_padding_mask, wanted, reuse_cross
                )
            return self._output(out, query), None
        if cache is not None and not reuse_cross:
            k, v, key_padding_mask = append_to_cache(
                cache, k, v, [self.mask, mask], key_padding_mask
            )
        full_mask = combine_masks(
            [self.mask, mask], key_padding_mask, B, self.num_heads, Lq, k.shape[2], q.device
        )
        dropout_p = self.dropout if self.training else 0.0
        out = attention(
            q,
            k,
            v,
            mask=full_mask,
            score_mod=self.score_mod,
            scale=self.scale,
            dropout_p=dropout_p,
            backend=self.backend,
            sinks=self.sinks,
        )
        weights = None
        if check_flag("need_weights", need_weights):
            weights = attention_weights(
                q, k, v, mask=full_mask, score_mod=self.score_mod, scale=self.scale,
                sinks=self.sinks,
            )  # fmt: skip
        return self._output(out, query), weights

    def _output(self, out: Tensor, query: Tensor) -> Tensor:
        """Heads' outputs (B, H, Lq, hd) -> (B, Lq, E) through the gate and W0.

        ``query`` is batch-first (B, Lq, E); the result is (Lq, B, E) when the module is not.
        """
        B, _, Lq, _ = out.shape
        out = out.transpose(1, 2).reshape(B, Lq, self.num_heads * self.head_dim)
        if self.gate_proj is not None:
            out = out * torch.sigmoid(self.gate_proj(query))
        out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)

    def _over_sharded_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cache: ShardedKVCache,
        mask: MaskLike,
        key_padding_mask: Tensor | None,
        need_weights: bool,
    ) -> Tensor:
        """Self-attention of q (B, H, Lq, hd) with a cache sharded over processes.

        Before ``cache.start_decoding``, q, k and v are this rank's prompt chunk, attended
        with ``ring_attention``; after it, every rank's same new tokens, attended over every
        rank's run with ``sharded_cache_attention``. Masks must be ``Mask`` objects (over the
        whole sequence); ``key_padding_mask`` (B, position after this call) must cover every
        position so far (the ring takes its pads as document ids: a token sees no pad).
        """
        from attnkit.distributed import ring_attention, sharded_cache_attention

        # refusals first: the cache is still as it was, and no rank has entered a collective
        self._check_sharded(need_weights)
        n = q.shape[2]
        end = (cache.kv_start if not cache.decoding else cache.position) + n
        _check_key_padding(
            key_padding_mask, (q.shape[0], end), "a ShardedKVCache", "B, every position so far"
        )
        given = [m for m in (self.mask, mask) if m is not None]
        parts = [m for m in given if isinstance(m, Mask)]
        if len(parts) != len(given):
            raise ValueError(
                "over a ShardedKVCache, masks must be attnkit.masks Mask objects (over the "
                f"whole sequence), got {[type(m).__name__ for m in given]}"
            )
        whole = reduce(operator.and_, parts) if parts else None
        prompt = not cache.decoding
        if prompt and (cache.length or cache.kv_start != dist.get_rank(cache.group) * n):
            raise ValueError(
                f"a ShardedKVCache's prompt goes in equal chunks, rank r's at r·n, in one "
                f"call: this rank's cache starts at {cache.kv_start} and holds "
                f"{cache.length} positions before a chunk of {n}"
            )
        k, v = cache.append(k, v)
        held = None  # the pads among this rank's keys (decided alike on every rank)
        if key_padding_mask is not None:
            held = key_padding_mask[:, cache.kv_start : cache.kv_start + cache.length]
        if prompt:
            blocks = self.backend if self.backend in ("tiled", "triton") else "auto"
            out = ring_attention(
                q, k, v, mask=whole, score_mod=self.score_mod, scale=self.scale,
                sinks=self.sinks, group=cache.group, layout="contiguous", backend=blocks,
                document_ids=None if held is None else (~held).long(),  # pads: document 0
            )  # fmt: skip
        else:
            out = sharded_cache_attention(
                q, k, v, kv_start=cache.kv_start, q_start=cache.position - n, mask=whole,
                score_mod=self.score_mod, scale=self.scale, sinks=self.sinks, group=cache.group,
                backend=self.backend, padding=held,
            )  # fmt: skip
        assert isinstance(out, Tensor)
        return out

    def shares_prompts(self) -> bool:
        """Whether beams may share a prompt's cache here (``BeamKVCache``).

        Under no mask or a causal one every new query sees the whole prompt, so the prompt's
        part needs no mask but its padding; ALiBi (or no score mod) is applied there at the
        queries' positions. The two parts merge by their log-sum-exps, which the "sdpa"
        backend does not return.
        """
        if self.backend == "sdpa":
            return False
        mask_ok = self.mask is None or (
            isinstance(self.mask, Mask) and self.mask.spec == _masks.causal().spec
        )
        mod = self.score_mod
        return mask_ok and (
            mod is None
            or (isinstance(mod, ScoreMod) and mod.kind == "alibi" and mod.params["offset"] is None)
        )

    def _over_beam_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cache: BeamKVCache,
        mask: MaskLike,
        key_padding_mask: Tensor | None,
        need_weights: bool,
    ) -> Tensor:
        """Self-attention of beams' queries q (N = B·K, H, T, hd) over a ``BeamKVCache``.

        Over the prompt's keys (B rows) with the K beams as K times the heads, head h·K + k
        reading kv head h // G as grouped-query attention does (its keys are read once for
        every beam); over each beam's own keys as usual; the two merged by their log-sum-exps.
        A prompt sharded over processes (a ``ShardedKVCache`` prefix) is attended with
        ``sharded_cache_attention`` over every rank's run; the beams' own keys, the same on
        every rank, are every rank's. ``key_padding_mask`` (N, position after this call):
        True = pad, over every position.
        """
        from attnkit.distributed import sharded_cache_attention
        from attnkit.distributed.merge import merge_partials

        if need_weights or (self.training and self.dropout) or mask is not None:
            raise ValueError(
                "attention over a BeamKVCache is served without need_weights, dropout or a "
                "call's mask"
            )
        if not self.shares_prompts():
            raise ValueError(
                "a BeamKVCache needs a module whose every new query sees the whole prompt (no "
                f"mask or a causal one; no score mod or ALiBi), got mask {self.mask} and "
                f"score_mod {self.score_mod}"
            )
        prefix = cache.prefix
        K, P = cache.beams, prefix.position  # the prompt: positions 0 .. P - 1
        N, Hq, T, _ = q.shape
        end = cache.position + T
        _check_key_padding(
            key_padding_mask, (N, end), "a BeamKVCache", "B·K, every position so far"
        )
        own_k, own_v = cache.append(k, v)  # positions P .. position - 1
        S = own_k.shape[2]
        run = slice(prefix.start, prefix.start + prefix.length)  # the prompt's keys held here
        prompt_pads = None if key_padding_mask is None else key_padding_mask[::K, run]
        first = P + S - T  # the queries' first position
        if isinstance(prefix, ShardedKVCache):  # ALiBi at the whole sequence's positions
            out_p, lse_p = sharded_cache_attention(
                _beams_as_heads(q, K), prefix.keys, prefix.values, kv_start=prefix.kv_start,
                q_start=first, score_mod=self._beams_alibi(K, None), scale=self.scale,
                group=prefix.group, backend=self.backend, padding=prompt_pads, return_lse=True,
            )  # fmt: skip
        else:
            out_p, lse_p = self._over_prompt(q, cache, prompt_pads, first)
        out_p, lse_p = _heads_as_beams(out_p, K), _heads_as_beams(lse_p[..., None], K)[..., 0]
        own_pads = None if key_padding_mask is None else key_padding_mask[:, P:]
        own_mask = combine_masks([self.mask], own_pads, N, Hq, T, S, q.device)
        out_o, lse_o = attention(
            q, own_k, own_v, mask=own_mask, score_mod=self.score_mod, scale=self.scale,
            backend=self.backend, return_lse=True,
        )  # fmt: skip
        out, lse = merge_partials([out_o, out_p], [lse_o, lse_p])
        if self.sinks is not None:
            out, _ = apply_sinks(out, lse, self.sinks)
        return out

    def _over_prompt(
        self, q: Tensor, cache: BeamKVCache, pads: Tensor | None, first: int
    ) -> tuple[Tensor, Tensor]:
        """Beams' queries (B·K, H, T, hd) at positions first .. over their prompt's keys.

        The beams as heads: out (B, H·K, T, Dv) and LSE (B, H·K, T).
        """
        K, prefix = cache.beams, cache.prefix
        prompt_mask = None if pads is None else _masks.from_padding_mask(~pads)
        found = attention(
            _beams_as_heads(q, K), prefix.keys, prefix.values, mask=prompt_mask,
            score_mod=self._beams_alibi(K, first), scale=self.scale, backend=self.backend,
            return_lse=True,
        )  # fmt: skip
        assert isinstance(found, tuple)
        return found

    def _beams_alibi(self, beams: int, offset: int | None) -> ScoreMod | None:
        """The module's ALiBi (or None) for its heads with K beams folded into each.

        Query i at key i + ``offset`` (None: at the whole sequence's positions).
        """
        if not isinstance(self.score_mod, ScoreMod):
            return None
        slopes = self.score_mod.params["slopes"]
        slopes = slopes if slopes.numel() == 1 else slopes.repeat_interleave(beams)
        return _score_mods.alibi(slopes, offset=offset)

    def _over_beam_memory(
        self,
        q: Tensor,
        cache: BeamKVCache,
        mask: MaskLike,
        key_padding_mask: Tensor | None,
        need_weights: bool,
    ) -> Tensor:
        """Cross-attention of beams' queries q (N = B·K, H, T, hd) over their sources' keys.

        ``cache.prefix`` holds each source's keys and values (B rows, filled by an earlier
        call); the K beams of a source read them as K times the heads, once for every beam.
        ``key_padding_mask`` (B, S): True = padded source token, the memory's rows. A memory
        sharded over processes (a ``ShardedKVCache`` prefix) is merged over every rank's.
        """
        given = self._placing(mask)
        if need_weights or (self.training and self.dropout) or given:
            raise ValueError(
                "cross-attention over a BeamKVCache is served without need_weights, dropout, "
                f"masks or score mods; got {', '.join(given) or 'need_weights or dropout'}"
            )
        K, prefix = cache.beams, cache.prefix
        B, S = prefix.keys.shape[0], prefix.length
        _check_key_padding(
            key_padding_mask, (B, S), "a BeamKVCache's cross-attention (the sources' rows)", "B, S"
        )
        sinks = None if self.sinks is None else self.sinks.repeat_interleave(K)
        if isinstance(prefix, ShardedKVCache):  # this rank's shard of the sources' memory
            from attnkit.distributed import sharded_cache_attention

            out = sharded_cache_attention(
                _beams_as_heads(q, K), prefix.keys, prefix.values, kv_start=prefix.kv_start,
                q_start=0, scale=self.scale, sinks=sinks, group=prefix.group,
                backend=self.backend, padding=key_padding_mask,
            )  # fmt: skip
        else:
            kept = None if key_padding_mask is None else ~key_padding_mask
            out = attention(
                _beams_as_heads(q, K), prefix.keys, prefix.values,
                mask=None if kept is None else _masks.from_padding_mask(kept),
                scale=self.scale, backend=self.backend, sinks=sinks,
            )  # fmt: skip
        assert isinstance(out, Tensor)
        return _heads_as_beams(out, K)

    def _placing(self, mask: MaskLike) -> list[str]:
        """The names of what would place queries among keys here: masks and a score mod.

        A cross-attention over keys split by rows or ranks takes none of them.
        """
        found = (("mask", mask), ("the module's mask", self.mask), ("score_mod", self.score_mod))
        return [name for name, given in found if given is not None]

    def _check_sharded(self, need_weights: bool) -> None:
        """What attention over a ShardedKVCache does not serve, refused before any collective."""
        if need_weights:
            raise ValueError("need_weights is not served over a ShardedKVCache")
        if self.training and self.dropout:
            raise ValueError("attention over a ShardedKVCache is served without dropout")

    def _over_sharded_memory(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cache: ShardedKVCache,
        mask: MaskLike,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        reused: bool,
    ) -> Tensor:
        """Cross-attention of q (B, H, T, hd), the same on every rank, over a sharded memory.

        The encoder memory is split along its sequence over ``cache.group``. This rank's k
        and v come from its shard of the memory (positions ``cache.kv_start`` on), projected
        into ``cache`` on the first call and reused after (``reused``); every rank's part is
        merged with ``sharded_cache_attention``. ``key_padding_mask`` (B, S) marks this
        rank's padded memory positions. Queries have no place in the memory's sequence, so
        masks and score mods are refused.
        """
        from attnkit.distributed import sharded_cache_attention

        self._check_sharded(need_weights)
        given = self._placing(mask)
        if given:
            raise ValueError(
                "cross-attention over a sharded memory (ShardedKVCache) takes no masks or "
                "score mods (its queries have no place in the memory's sequence); got "
                f"{', '.join(given)}"
            )
        S = cache.length if reused else k.shape[2]
        _check_key_padding(
            key_padding_mask, (q.shape[0], S), "a sharded memory", "B, this rank's memory positions"
        )
        if not reused:
            k, v = cache.append(k, v)
        out = sharded_cache_attention(
            q, k, v, kv_start=cache.kv_start, q_start=0, scale=self.scale, sinks=self.sinks,
            group=cache.group, backend=self.backend, padding=key_padding_mask,
        )  # fmt: skip
        assert isinstance(out, Tensor)
        return out

    # ---- conversion to and from torch.nn.MultiheadAttention -----------------------------
    def _in_projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """Build an equivalent module with ``m``'s weights (shares no storage)."""
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv and add_zero_attn are not supported")
        w = m.out_proj.weight
        bias = m.in_proj_bias is not None
        new = cls(
            m.embed_dim,
            m.num_heads,
            kdim=m.kdim,
            vdim=m.vdim,
            bias=bias,
            dropout=m.dropout,
            batch_first=m.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for proj, weight, b in zip(new._in_projections(), *_torch_in_proj(m), strict=True):
                proj.weight.copy_(weight)
                if proj.bias is not None and b is not None:
                    proj.bias.copy_(b)
            new.out_proj.load_state_dict(m.out_proj.state_dict())
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """An equivalent ``torch.nn.MultiheadAttention`` (needs num_kv_heads == num_heads)."""
        if self.num_kv_heads != self.num_heads:
            raise ValueError("to_torch: torch.nn.MultiheadAttention has no grouped-query heads")
        extras = (
            self.rope,
            self.score_mod,
            self.mask,
            self.sinks,
            self.q_norm,
            self.v_norm,
            self.gate_proj,
        )
        if (
            any(x is not None for x in extras)
            or self.scale is not None
            or self.head_dim * self.num_heads != self.embed_dim
        ):
            raise ValueError(
                "to_torch: rope, score_mod, qk_norm, v_norm, sinks, output_gate, scale, a head_dim "
                "other than E / num_heads and module masks have no torch equivalent"
            )
        w = self.q_proj.weight
        bias = self.q_proj.bias is not None
        m = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            ours = self._in_projections()
            if m._qkv_same_embed_dim:
                m.in_proj_weight.copy_(torch.cat([p.weight for p in ours]))
            else:
                for p, name in zip(ours, ("q", "k", "v"), strict=True):
                    getattr(m, f"{name}_proj_weight").copy_(p.weight)
            if bias:
                m.in_proj_bias.copy_(torch.cat([p.bias for p in ours if p.bias is not None]))
            m.out_proj.load_state_dict(self.out_proj.state_dict())
        return m

    def extra_repr(self) -> str:
        """Shown inside the module's repr."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, mask={self.mask!r}, "
            f"qk_norm={_norm_kind(self.q_norm)}, v_norm={self.v_norm is not None}, "
            f"sinks={self.sinks is not None}, "
            f"output_gate={self.gate_proj is not None}, backend={self.backend!r}"
        )


def _norm_kind(norm: nn.Module | None) -> str:
    """How a module's q/k norm is shown: False, True (RMS) or 'layer'."""
    return "False" if norm is None else "'layer'" if isinstance(norm, nn.LayerNorm) else "True"


def _torch_in_proj(
    m: nn.MultiheadAttention,
) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    """Torch's q, k, v input projection weights and biases, packed or separate."""
    if m._qkv_same_embed_dim:
        weights = tuple(m.in_proj_weight.chunk(3))
    else:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    biases = tuple(m.in_proj_bias.chunk(3)) if m.in_proj_bias is not None else (None,) * 3
    return weights, biases
