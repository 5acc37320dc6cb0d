"""Transformers built on attnkit attention.

Encoder and decoder layers, an encoder–decoder ``Transformer`` and a decoder-only
``CausalLM``, with KV-cached generation.

Layers are pre-norm (x + f(LN(x))). Any attnkit mask drives self-attention, so the same model
trains with full, sliding-window or other sparse attention. Positions: learned absolute
embeddings, rotary (RoPE) or ALiBi; cross-attention uses none (it relates two sequences).

Shape legend: B batch, S source length, T target length, E model width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from attnkit import masks, score_mods
from attnkit._validation import check_int, check_token_ids
from attnkit.distributed.agreement import check_ranks_agree
from attnkit.functional import BackendName
from attnkit.masks import Mask
from attnkit.nn import beam_kv_cache
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.beam_kv_cache import BeamKVCache, beams_sharing
from attnkit.nn.beam_search import (
    Beams,
    Decoding,
    beam_search,
    check_search,
    over_caches,
    padding_upto,
)
from attnkit.nn.differential_attention import DifferentialAttention
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.latent_attention import LatentSizes, MultiHeadLatentAttention
from attnkit.nn.rope import RotaryEmbedding
from attnkit.nn.sharded_decoding import last_ranks, sharded_decoding
from attnkit.nn.sharded_encoding import sharded_encode
from attnkit.nn.sharded_kv_cache import ShardedKVCache

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's from Python 3.11

Positions = Literal["learned", "rope", "alibi"]


def check_positions(positions: object) -> Positions:
    """A typo there would build a model with no positions at all: refuse it."""
    if positions not in get_args(Positions):
        raise ValueError(
            f"positions must be one of {', '.join(map(repr, get_args(Positions)))}, "
            f"got {positions!r}"
        )
    return cast(Positions, positions)


#: ``check_causal`` evaluates a decoder's mask on this many positions at most.
CAUSAL_CHECK_POSITIONS = 1024


def check_causal(mask: Mask, max_len: int) -> Mask:
    """Refuse a decoder-only model's mask that lets a query see a later key.

    Such a model trains on the future, and decodes otherwise than its full pass. Checked on
    the first min(max_len, ``CAUSAL_CHECK_POSITIONS``) positions; a mask bound to other
    lengths (a document mask's ids) is left to the calls it serves.
    """
    n = min(max_len, CAUSAL_CHECK_POSITIONS)
    try:
        keep = mask.dense(n, n)
    except ValueError:
        return mask
    future = (keep & torch.ones(n, n, dtype=torch.bool).triu(1)).nonzero()
    if len(future):
        i, j = (int(x) for x in future[0, -2:])
        raise ValueError(
            f"CausalLM needs a causal mask, but {mask!r} lets query {i} attend key {j}, a later "
            "position; combine it with masks.causal() (mask & masks.causal())"
        )
    return mask


class AttentionOptions(TypedDict, total=False):
    """MultiHeadAttention's switches that the blocks pass through."""

    sinks: bool
    qk_norm: bool
    output_gate: bool


def _self_attention(
    d_model: int,
    nhead: int,
    num_kv_heads: int | None,
    dropout: float,
    mask: Mask | None,
    positions: Positions,
    backend: BackendName,
    **options: Unpack[AttentionOptions],
) -> MultiHeadAttention:
    """The blocks' self-attention; ``options``: MultiHeadAttention's sinks, qk_norm, output_gate."""
    check_positions(positions)
    rope = RotaryEmbedding(d_model // nhead) if positions == "rope" else None
    mod = score_mods.alibi(score_mods.alibi_slopes(nhead)) if positions == "alibi" else None
    return MultiHeadAttention(
        d_model,
        nhead,
        num_kv_heads=num_kv_heads,
        dropout=dropout,
        mask=mask,
        rope=rope,
        score_mod=mod,
        backend=backend,
        **options,
    )


class FeedForward(nn.Module):
    """Position-wise MLP: Linear(E, F) → GELU → dropout → Linear(F, E)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, dim_feedforward),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., E) -> (..., E)."""
        out: Tensor = self.net(x)
        return out


class TransformerEncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP. ``mask`` (any attnkit Mask) applies on every call.

    Also the block of ``CausalLM`` (with a causal or causal sliding-window mask).
    ``sinks``, ``qk_norm`` and ``output_gate`` are ``MultiHeadAttention``'s: a learned
    attention-sink logit per head, RMS-normalised queries and keys, and a sigmoid gate on
    each head's output. ``latent`` (the sizes ``kv_rank``,
    ``nope_dim``, ``rope_dim``, ``v_dim`` and optionally ``q_rank``) makes the block's
    attention ``MultiHeadLatentAttention`` (DeepSeek MLA) instead, ``differential``
    ``DifferentialAttention`` with nhead / 2 differential heads (as many softmax maps and
    parameters as nhead heads; ``depth``, the layer's index, sets its λ_init; no
    attention-weight dropout).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        *,
        num_kv_heads: int | None = None,
        mask: Mask | None = None,
        positions: Positions = "learned",
        sinks: bool = False,
        qk_norm: bool = False,
        output_gate: bool = False,
        latent: LatentSizes | None = None,
        differential: bool = False,
        depth: int = 0,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__()
        self.self_attn: MultiHeadAttention | MultiHeadLatentAttention | DifferentialAttention
        options = AttentionOptions(sinks=sinks, qk_norm=qk_norm, output_gate=output_gate)
        given = [name for name, value in options.items() if value]
        if positions == "alibi" and (latent or differential):
            given.append("positions='alibi'")
        if latent is not None:
            given = ["num_kv_heads"] * bool(num_kv_heads) + given + ["differential"] * differential
            if given:
                raise ValueError(
                    "latent attention has one latent per token (no kv heads) with its own "
                    f"rotary part, and no sinks, QK-norm, output gate or differential heads "
                    f"here; drop {', '.join(given)}"
                )
            self.self_attn = MultiHeadLatentAttention(
                d_model, nhead, **latent, mask=mask, dropout=dropout, backend=backend
            )
        elif differential:
            if given:
                raise ValueError(f"differential attention has no {', '.join(given)}; drop them")
            if nhead % 2 or (num_kv_heads or nhead) % 2:
                raise ValueError(
                    f"differential attention pairs heads: nhead {nhead} and num_kv_heads "
                    f"{num_kv_heads or nhead} must be even"
                )
            rope = RotaryEmbedding(d_model // nhead) if positions == "rope" else None
            self.self_attn = DifferentialAttention(
                d_model,
                nhead // 2,
                num_kv_heads=(num_kv_heads or nhead) // 2,
                depth=depth,
                mask=mask,
                rope=rope,
                backend=backend,
            )
        else:
            self.self_attn = _self_attention(
                d_model, nhead, num_kv_heads, dropout, mask, positions, backend, **options
            )
        self.ff = FeedForward(d_model, dim_feedforward or 4 * d_model, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, L, E) -> (B, L, E); weights (B, H, L, Lk) when asked.

        ``key_padding_mask`` (B, Lk): True = padding. ``cache``: incremental decoding.
        """
        a, w = self.self_attn(
            self.norm1(x), key_padding_mask=key_padding_mask, cache=cache, need_weights=need_weights
        )
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.norm2(x))), w


class TransformerDecoderLayer(nn.Module):
    """Pre-norm causal self-attention, then cross-attention over the encoder memory, then MLP.

    ``options`` (sinks, qk_norm, output_gate) apply to both attentions.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        *,
        num_kv_heads: int | None = None,
        mask: Mask | None = None,
        positions: Positions = "learned",
        backend: BackendName = "auto",
        **options: Unpack[AttentionOptions],
    ) -> None:
        super().__init__()
        self.self_attn = _self_attention(
            d_model,
            nhead,
            num_kv_heads,
            dropout,
            mask or masks.causal(),
            positions,
            backend,
            **options,
        )
        # decoder queries read the encoder's keys and values
        self.cross_attn = MultiHeadAttention(
            d_model, nhead, num_kv_heads=num_kv_heads, dropout=dropout, backend=backend, **options
        )
        self.ff = FeedForward(d_model, dim_feedforward or 4 * d_model, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        memory_key_padding_mask: Tensor | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, E), memory (B, S, E) -> (B, T, E); cross-attention weights (B, H, T, S).

        ``memory_key_padding_mask`` (B, S): True = padded source token (gets zero weight).
        Caches: ``self_cache`` grows each step; ``cross_cache`` is filled from ``memory`` once.
        """
        a, _ = self.self_attn(self.norm1(x), cache=self_cache)
        x = x + self.drop(a)
        c, w = self.cross_attn(
            self.norm2(x),
            memory,
            key_padding_mask=memory_key_padding_mask,
            cache=cross_cache,
            need_weights=need_weights,
        )
        x = x + self.drop(c)
        return x + self.drop(self.ff(self.norm3(x))), w


def _generation_padding(prompt_padding: Tensor | None, B: int, P: int, new: int) -> Tensor | None:
    """(B, P + new) padding over the whole text from the prompt's, or None when none is padded."""
    if prompt_padding is None:
        return None
    if prompt_padding.dtype != torch.bool or tuple(prompt_padding.shape) != (B, P):
        raise ValueError(
            f"prompt_padding must be bool (B, P) = ({B}, {P}), True = pad, got "
            f"{prompt_padding.dtype} {tuple(prompt_padding.shape)}"
        )
    if bool((prompt_padding[:, 1:] & ~prompt_padding[:, :-1]).any()) or bool(
        prompt_padding[:, -1].any()
    ):
        raise ValueError(
            "prompt_padding must pad on the left: each row's pads before its tokens, and at "
            "least one token per row"
        )
    if not bool(prompt_padding.any()):
        return None
    text = torch.zeros(B, new, dtype=torch.bool, device=prompt_padding.device)
    return torch.cat([prompt_padding, text], dim=1)


def _check_sampling(temperature: float, top_k: int | None, name: str, n: int, least: int) -> None:
    """Check generate()'s arguments once, before any work.

    ``name`` = n is how many tokens to make, at least ``least``.
    """
    check_int(name, n, least)
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        check_int("top_k", top_k)


def _check_beams(
    num_beams: int, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> None:
    """Beam search keeps the most probable continuations: it takes no sampling arguments."""
    check_int("num_beams", num_beams)
    if num_beams > 1 and (temperature != 0 or top_k is not None or generator is not None):
        raise ValueError(
            f"num_beams={num_beams} searches for the most probable continuations and does "
            f"not sample: pass temperature=0 and no top_k or generator (got temperature="
            f"{temperature}, top_k={top_k}, generator={'set' if generator else None})"
        )


def _check_ranks_stop_alike(
    group: dist.ProcessGroup | None, device: torch.device, **given: int | float | None
) -> None:
    """With ``group``: every rank picks and ends its tokens alike, or every rank raises.

    The end token, sampling or not, beams' length penalty: ranks that stop at different
    steps, or broadcast samples some do not wait for, hang in their next collective.
    """
    if group is not None:
        check_ranks_agree(group, "generation over a process group", device, **given)


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else sampled.

    With ``group`` (every rank holding the same logits), the last rank's sample, everywhere.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    drawn = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    return drawn if group is None else last_ranks(drawn, group)


class _Embedding(nn.Module):
    """Token embeddings (+ learned absolute positions when ``positions == 'learned'``)."""

    def __init__(
        self, vocab: int, d_model: int, max_len: int, positions: Positions, dropout: float
    ) -> None:
        super().__init__()
        check_int("vocab", vocab)
        check_positions(positions)
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(max_len, d_model) if positions == "learned" else None
        # small init (GPT-2's 0.02): the output head shares these weights, and N(0, 1)
        # embeddings would start training with logits of size ~sqrt(d_model)
        for table in (self.tokens, self.positions):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.max_len = max_len

    def forward(self, ids: Tensor, start: int = 0, pads: Tensor | None = None) -> Tensor:
        """ids (B, L) at positions start.. -> (B, L, E).

        ``pads`` (B,): how many padding tokens precede each row's first token; learned
        positions count from that token.
        """
        check_token_ids("ids", ids, self.tokens.num_embeddings)
        x = self.tokens(ids)
        if self.positions is not None:
            end = start + ids.shape[1]
            if torch.compiler.is_compiling():  # lengths may be symbolic (export, compile):
                # an op checks at run time, where a guard would bound the graph's lengths
                torch._assert_async(
                    torch.scalar_tensor(end) <= self.max_len,
                    f"positions (cached + new tokens) exceed max_len {self.max_len} (the "
                    "learned position table's size)",
                )
            elif end > self.max_len:
                raise ValueError(
                    f"positions up to {end} exceed max_len {self.max_len} "
                    "(the learned position table's size)"
                )
            at = torch.arange(start, end, device=ids.device)
            if pads is not None:
                at = (at[None, :] - pads[:, None]).clamp(min=0)  # (B, L); pads sit at 0
            x = x + self.positions(at)
        out: Tensor = self.drop(x)
        return out


class Transformer(nn.Module):
    """Encoder–decoder transformer (e.g. translation), with cached greedy/sampled generation.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes; with ``tie_embeddings`` (default) and equal
            sizes the source, target and output embeddings share one matrix.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            the usual sizes.
        max_len: longest sequence (learned positions, cache size).
        positions: "learned", "rope" or "alibi".
        encoder_mask: attnkit Mask for encoder self-attention (None = full).
        pad_id: padding token id of source and target.
        num_kv_heads: grouped-query kv heads in every attention (default nhead).
        sinks, qk_norm, output_gate: ``MultiHeadAttention``'s, in every attention (encoder,
            decoder and cross).
        backend: attention backend.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        d_model: int = 128,
        nhead: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        max_len: int = 256,
        positions: Positions = "learned",
        encoder_mask: Mask | None = None,
        tie_embeddings: bool = True,
        pad_id: int = 0,
        num_kv_heads: int | None = None,
        sinks: bool = False,
        qk_norm: bool = False,
        output_gate: bool = False,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__()
        #: the constructor's arguments, so checkpoints can rebuild the model
        self.config: dict[str, Any] = {
            "src_vocab": src_vocab,
            "tgt_vocab": tgt_vocab,
            "d_model": d_model,
            "nhead": nhead,
            "num_encoder_layers": num_encoder_layers,
            "num_decoder_layers": num_decoder_layers,
            "dim_feedforward": dim_feedforward,
            "dropout": dropout,
            "max_len": max_len,
            "positions": positions,
            "encoder_mask": encoder_mask,
            "tie_embeddings": tie_embeddings,
            "pad_id": pad_id,
            "num_kv_heads": num_kv_heads,
            "sinks": sinks,
            "qk_norm": qk_norm,
            "output_gate": output_gate,
            "backend": backend,
        }
        options = AttentionOptions(sinks=sinks, qk_norm=qk_norm, output_gate=output_gate)
        if check_int("pad_id", pad_id, least=0) >= min(src_vocab, tgt_vocab):
            raise ValueError(
                f"pad_id {pad_id} is not a token of both vocabularies "
                f"(src_vocab {src_vocab}, tgt_vocab {tgt_vocab}): no position would be padding"
            )
        self.pad_id, self.max_len, self.nhead = pad_id, max_len, nhead
        self.src_embed = _Embedding(src_vocab, d_model, max_len, positions, dropout)
        self.tgt_embed = _Embedding(tgt_vocab, d_model, max_len, positions, dropout)
        self.encoder = nn.ModuleList(
            TransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                num_kv_heads=num_kv_heads,
                mask=encoder_mask,
                positions=positions,
                backend=backend,
                **options,
            )
            for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            TransformerDecoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                num_kv_heads=num_kv_heads,
                positions=positions,
                backend=backend,
                **options,
            )
            for _ in range(num_decoder_layers)
        )
        self.enc_norm, self.dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, tgt_vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.tgt_embed.tokens.weight
            if src_vocab == tgt_vocab:
                self.src_embed.tokens.weight = self.tgt_embed.tokens.weight

    def encode(
        self, src: Tensor, *, group: dist.ProcessGroup | None = None
    ) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, E) and its padding mask (B, S), True = padding.

        ``group``: the same src on every rank of it, split along the sequence over them
        (``attnkit.nn.sharded_encoding``); each rank gets its shard of the memory, (B, n, E)
        and (B, n) at positions rank·n .., n = ⌈S / P⌉, places past S marked as padding.
        """
        if group is not None:
            return sharded_encode(self, src, group)
        padding = src == self.pad_id
        x = self.src_embed(src)
        for layer in self.encoder:
            x, _ = layer(x, key_padding_mask=padding)
        return self.enc_norm(x), padding

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_padding: Tensor,
        *,
        start: int = 0,
        caches: Sequence[tuple[KVCache, KVCache | None]] | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """tgt (B, T) at positions start.. -> logits (B, T, V), cross weights per layer.

        ``caches``: per layer (self-attention's, cross-attention's or None: the memory's keys
        and values projected at this call).
        """
        x = self.tgt_embed(tgt, start)
        weights = []
        for n, layer in enumerate(self.decoder):
            self_cache, cross_cache = caches[n] if caches is not None else (None, None)
            x, w = layer(
                x,
                memory,
                memory_key_padding_mask=memory_padding,
                self_cache=self_cache,
                cross_cache=cross_cache,
                need_weights=need_weights,
            )
            if w is not None:
                weights.append(w)
        return self.head(self.dec_norm(x)), weights

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), tgt (B, T) -> logits (B, T, V)."""
        memory, padding = self.encode(src)
        return self.decode(tgt, memory, padding)[0]

    def new_caches(
        self, batch: int, src_len: int, max_new: int, *, group: dist.ProcessGroup | None = None
    ) -> list[tuple[KVCache, KVCache]]:
        """One (self, cross) KVCache pair per decoder layer.

        ``group``: the memory is split over its ranks (``encode(src, group=)``), ``src_len``
        this rank's shard; the cross caches are ``ShardedKVCache`` runs from rank·src_len.
        """
        caches: list[tuple[KVCache, KVCache]] = []
        for layer in self.decoder:
            assert isinstance(layer, TransformerDecoderLayer)
            sa, ca = layer.self_attn, layer.cross_attn
            if group is None:
                cross = ca.new_cache(batch, src_len)
            else:
                start = dist.get_rank(group) * src_len
                cross = ca.new_sharded_cache(batch, src_len, kv_start=start, group=group)
            caches.append((sa.new_cache(batch, max_new), cross))
        return caches

    def _decoding(
        self,
        src: Tensor,
        bos_id: int,
        max_len: int,
        copies: int,
        group: dist.ProcessGroup | None = None,
    ) -> Decoding:
        """Decoding of ``copies`` rows per source (B·copies), fed ``bos_id``, for max_len tokens.

        With ``group``, over a source split across its ranks (``attnkit.nn.sharded_encoding``).
        """
        if group is not None:
            check_ranks_agree(
                group, "generation over a process group", src.device,
                src=src, bos_id=bos_id, max_len=max_len, num_beams=copies,
            )  # fmt: skip
        memory, padding = self.encode(src, group=group)
        B = memory.shape[0]
        caches = self.new_caches(B, memory.shape[1], max_len, group=group)

        def step(token: Tensor, t: int) -> Tensor:  # token t in (bos as t = -1), logits out
            logits, _ = self.decode(token[:, None], memory, padding, start=t + 1, caches=caches)
            # the last rank's: ranks could otherwise part on a near tie
            return logits[:, -1] if group is None else last_ranks(logits[:, -1], group)

        def reorder(index: Tensor) -> None:  # cross caches hold the same keys for every beam
            for self_cache, _ in caches:
                self_cache.reorder(index)

        bos = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
        logits = step(bos, -1)  # projects each source's cross keys and values once
        if copies > 1:  # every beam of a source starts from copies of its caches
            rows = torch.arange(B, device=src.device).repeat_interleave(copies)
            logits = logits[rows]
            shared = beam_kv_cache.SHARE_PROMPTS
            if not shared:
                memory, padding = memory[rows], padding[rows]
            for n, (self_cache, cross_cache) in enumerate(caches):
                self_cache.reorder(rows)
                if shared:  # the beams read their source's keys and values, not copies
                    caches[n] = (self_cache, BeamKVCache(cross_cache, copies, 0))
                else:
                    cross_cache.reorder(rows)
        return Decoding(logits, step, reorder)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        *,
        bos_id: int,
        eos_id: int,
        max_len: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        group: dist.ProcessGroup | None = None,
    ) -> Tensor:
        """Decode token by token with KV caches (cross-attention keys/values computed once).

        ``num_beams`` > 1: the best of ``beam_search`` (which does not sample: temperature 0).

        ``group`` (a process group, e.g. ``dist.group.WORLD``): sequence parallelism over the
        source. Every rank of it passes the same src and arguments and gets the same tokens;
        each encodes about 1/P of the source (ring attention) and holds that part of the
        memory and of the cross-attention keys and values, merged over the ranks at every
        step (``attnkit.nn.sharded_encoding``). Tokens are sampled on the last rank.

        Returns:
            (B, ≤ max_len) target ids after ``bos_id``; finished rows are padded with pad_id.
            Stops when every row has produced ``eos_id`` (kept) or at ``max_len``.
        """
        _check_sampling(temperature, top_k, "max_len", max_len, 1)
        _check_beams(num_beams, temperature, top_k, generator)
        _check_ranks_stop_alike(group, src.device, eos_id=eos_id, sampled=int(temperature != 0))
        if num_beams > 1:
            found = self.beam_search(
                src,
                bos_id=bos_id,
                eos_id=eos_id,
                num_beams=num_beams,
                max_len=max_len,
                length_penalty=length_penalty,
                group=group,
            )
            return found.tokens[:, 0]
        logits, step, _ = self._decoding(src, bos_id, max_len, 1, group)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        out = []
        for t in range(max_len):
            nxt = _sample(logits, temperature, top_k, generator, group)
            nxt = nxt.masked_fill(done, self.pad_id)
            out.append(nxt)
            done |= nxt == eos_id
            if bool(done.all()) or t + 1 == max_len:
                break
            logits = step(nxt, t)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def beam_search(
        self,
        src: Tensor,
        *,
        bos_id: int,
        eos_id: int,
        num_beams: int,
        max_len: int = 64,
        length_penalty: float = 1.0,
        group: dist.ProcessGroup | None = None,
    ) -> Beams:
        """The ``num_beams`` best translations of each source, best first, with their scores.

        Beam search (``attnkit.nn.beam_search``) over KV caches: ``tokens`` (B, num_beams,
        ≤ max_len) after ``bos_id``, each ended by ``eos_id`` and padded with pad_id after it
        (or cut at max_len); ``scores`` (B, num_beams): log-probability / length **
        ``length_penalty``. ``group`` as ``generate`` takes it.
        """
        check_int("max_len", max_len)
        check_search(num_beams, max_len, length_penalty)
        _check_ranks_stop_alike(
            group, src.device, eos_id=eos_id, length_penalty=float(length_penalty)
        )
        return beam_search(
            self._decoding(src, bos_id, max_len, num_beams, group),
            num_beams=num_beams,
            max_new_tokens=max_len,
            end_id=eos_id,
            fill_id=self.pad_id,
            length_penalty=length_penalty,
        )


class CausalLM(nn.Module):
    """Decoder-only language model.

    ``mask`` (default causal) may be any causal pattern, e.g. ``masks.sliding_window(64)``
    for sliding-window attention; one that lets a query see a later key is refused
    (``check_causal``).

    Args: vocab, d_model, nhead, num_layers, dim_feedforward, dropout, max_len, positions,
        num_kv_heads, mask, backend (as ``Transformer``); sinks, qk_norm, output_gate: learned
        attention-sink logits (gpt-oss), RMS-normalised queries and keys (Qwen3, OLMo 2) and
        sigmoid-gated head outputs (Qwen3-Next) in every layer (``MultiHeadAttention``);
        latent: multi-head latent attention in every layer, its sizes as
        ``TransformerEncoderLayer`` takes them (decoding caches then hold the latents);
        differential: differential attention (DIFF Transformer) in every layer, λ_init by depth.
        Output embedding tied to the input.
    """

    def __init__(
        self,
        vocab: int,
        *,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 4,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        max_len: int = 512,
        positions: Positions = "learned",
        num_kv_heads: int | None = None,
        mask: Mask | None = None,
        sinks: bool = False,
        qk_norm: bool = False,
        output_gate: bool = False,
        latent: LatentSizes | None = None,
        differential: bool = False,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__()
        #: the constructor's arguments, so checkpoints can rebuild the model
        self.config: dict[str, Any] = {
            "vocab": vocab,
            "d_model": d_model,
            "nhead": nhead,
            "num_layers": num_layers,
            "dim_feedforward": dim_feedforward,
            "dropout": dropout,
            "max_len": max_len,
            "positions": positions,
            "num_kv_heads": num_kv_heads,
            "mask": mask,
            "sinks": sinks,
            "qk_norm": qk_norm,
            "output_gate": output_gate,
            "latent": latent,
            "differential": differential,
            "backend": backend,
        }
        self.max_len = max_len
        self.embed = _Embedding(vocab, d_model, max_len, positions, dropout)
        causal_mask = check_causal(mask or masks.causal(), max_len)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                num_kv_heads=num_kv_heads,
                mask=causal_mask,
                positions=positions,
                sinks=sinks,
                qk_norm=qk_norm,
                output_gate=output_gate,
                latent=latent,
                differential=differential,
                depth=depth,
                backend=backend,
            )
            for depth in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.tokens.weight

    def forward(
        self,
        ids: Tensor,
        *,
        start: int = 0,
        caches: list[KVCache] | None = None,
        need_weights: bool = False,
        padding: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """ids (B, L) at positions start.. -> logits (B, L, V), weights per layer if asked.

        ``padding`` (B, start + L) bool, True = a padding token, for every position so far:
        batches of texts of different lengths, each left-padded (its pads before its
        tokens). No query attends to a pad, and learned positions count from each row's
        first token, so every row computes what it would alone.
        """
        pads, key_padding = None, None
        if padding is not None:
            B, L = ids.shape
            if padding.dtype != torch.bool or tuple(padding.shape) != (B, start + L):
                raise ValueError(
                    f"padding must be bool (B, start + L) = ({B}, {start + L}) over every "
                    f"position so far, got {padding.dtype} {tuple(padding.shape)}"
                )
            pads = padding.sum(1)
            # a cache takes the positions it holds from the whole row (see MultiHeadAttention)
            key_padding = padding if caches is not None else padding[:, start:]
        x = self.embed(ids, start, pads)
        weights = []
        for n, layer in enumerate(self.layers):
            x, w = layer(
                x,
                key_padding_mask=key_padding,
                cache=None if caches is None else caches[n],
                need_weights=need_weights,
            )
            if w is not None:
                weights.append(w)
        return self.head(self.norm(x)), weights

    def new_caches(self, batch: int, max_len: int, *, window: int | None = None) -> list[KVCache]:
        """One KVCache per layer of ``max_len`` positions (see ``KVCache`` for ``window``)."""
        caches = []
        for layer in self.layers:
            assert isinstance(layer, TransformerEncoderLayer)
            caches.append(layer.self_attn.new_cache(batch, max_len, window))
        return caches

    def new_sharded_caches(
        self,
        batch: int,
        max_len: int,
        *,
        kv_start: int,
        group: dist.ProcessGroup | None = None,
    ) -> list[ShardedKVCache]:
        """One ShardedKVCache per layer: this rank's run of a cache sharded over ``group``.

        ``max_len``: the positions this rank may hold (its prompt chunk, and on the last rank
        every new token); ``kv_start``: its chunk's first position (rank r of chunks of n:
        r·n). Needs MultiHeadAttention layers (see ``attnkit.nn.sharded_kv_cache``).
        """
        caches = []
        for layer in self.layers:
            assert isinstance(layer, TransformerEncoderLayer)
            attn = layer.self_attn
            if not isinstance(attn, MultiHeadAttention):
                raise ValueError(
                    f"sharded caches need MultiHeadAttention layers, not {type(attn).__name__}"
                )
            caches.append(attn.new_sharded_cache(batch, max_len, kv_start=kv_start, group=group))
        return caches

    def _generation_caches(self, batch: int, total: int) -> tuple[list[KVCache], int]:
        """Caches for ``total`` positions, and how many prompt positions to feed at a time.

        Under a mask that looks back w positions (``masks.lookback``), the caches keep the
        last w, in 2·w slots, and the prompt goes in w at a time: memory and time per token
        stop growing with the text.
        """
        layer = self.layers[0]
        assert isinstance(layer, TransformerEncoderLayer)
        mask = layer.self_attn.mask
        reach = None if mask is None else masks.lookback(mask)
        if reach is None or reach == math.inf or total <= 2 * max(int(reach), 1):
            return self.new_caches(batch, total), total
        chunk = max(int(reach), 1)
        return self.new_caches(batch, 2 * chunk, window=int(reach)), chunk

    def _decoding(
        self,
        prompt: Tensor,
        prompt_padding: Tensor | None,
        max_new_tokens: int,
        copies: int,
        group: dist.ProcessGroup | None = None,
    ) -> Decoding:
        """Decoding of ``copies`` rows per prompt (B·copies), the prompt already fed.

        With ``group``, over caches sharded across its ranks (``sharded_decoding``).
        """
        B, P = prompt.shape
        if P < 1:
            raise ValueError(
                f"prompt must hold at least one token, got shape {tuple(prompt.shape)}"
            )
        padding = _generation_padding(prompt_padding, B, P, max_new_tokens)
        total = P + max_new_tokens
        if self.embed.positions is not None and total > self.max_len:
            raise ValueError(
                f"prompt {P} + {max_new_tokens} new tokens exceed max_len {self.max_len} "
                "(learned positions)"
            )
        if group is not None:
            decoding = sharded_decoding(self, prompt, padding, max_new_tokens, group, copies)
        else:
            decoding = self._fed(prompt, padding, total, copies)
        if decoding.logits.shape[0] == B * copies:  # one beam, or beams sharing the prompt's
            return decoding
        # beams of a prompt start from copies of its caches: the prompt is fed once
        rows = torch.arange(B, device=prompt.device).repeat_interleave(copies)
        decoding.reorder(rows)
        return decoding._replace(logits=decoding.logits[rows])

    def _fed(self, prompt: Tensor, padding: Tensor | None, total: int, beams: int) -> Decoding:
        """Decoding of prompt (B, P)'s rows, fed into caches for ``total`` positions.

        ``padding`` (B, total): True = pad, over the whole text, or None. With ``beams`` > 1,
        where every layer can (``MultiHeadAttention.shares_prompts``, caches keeping every
        position), the decoding of B·beams rows, whose beams share the prompt's caches
        (``BeamKVCache``); else of the B rows.
        """
        B, P = prompt.shape
        caches, chunk = self._generation_caches(B, total)
        fed: list[KVCache] = caches

        def feed(ids: Tensor, start: int, pads: Tensor | None) -> Tensor:
            logits: Tensor = self(ids, start=start, caches=fed, padding=pads)[0]
            return logits[:, -1]

        for start in range(0, P, chunk):
            ids = prompt[:, start : start + chunk]
            logits = feed(ids, start, padding_upto(padding, start + ids.shape[1]))
        windowed = any(cache.window is not None for cache in caches)
        if beams > 1 and self._beams_share_prompts(windowed):  # (feed reads fed when called)
            fed, padding, logits = beams_sharing(caches, beams, total - P, padding, logits)
        return over_caches(feed, fed, padding, P, logits)

    def _beams_share_prompts(self, windowed: bool) -> bool:
        """Whether every layer's beams can share its prompt's cache (``BeamKVCache``).

        Not over ``windowed`` caches: they drop prompt positions.
        """
        if not beam_kv_cache.SHARE_PROMPTS or windowed:
            return False
        layers = [layer.self_attn for layer in self.layers]
        return all(
            isinstance(attn, MultiHeadAttention) and attn.shares_prompts() for attn in layers
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        prompt_padding: Tensor | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        group: dist.ProcessGroup | None = None,
    ) -> Tensor:
        """Continue prompt (B, P) by up to ``max_new_tokens`` tokens with a KV cache.

        With learned positions the text must fit in ``max_len``; with rotary or ALiBi
        positions it may run past it. Under a sliding-window mask the caches keep only the
        window, so memory and time per token stay flat however long the text grows.

        ``prompt_padding`` (B, P) bool, True = pad: prompts of different lengths in one
        batch, left-padded (pads first, whatever token ids they hold); each row continues as
        it would alone.

        With ``eos_id``, a row that has produced it continues with ``eos_id`` only, and
        generation stops once every row has.

        ``num_beams`` > 1: the best of ``beam_search`` (which does not sample: pass
        temperature=0).

        ``group`` (a process group, e.g. ``dist.group.WORLD``): context parallelism. Every
        rank of it passes the same prompt and arguments and gets the same tokens; the KV
        cache is split along the sequence over the ranks, each holding about 1/P of the
        prompt's keys and values, the last rank also the new tokens'
        (``attnkit.nn.sharded_decoding``). Needs MultiHeadAttention layers with ``Mask``
        masks. Tokens are sampled on the last rank.
        """
        _check_sampling(temperature, top_k, "max_new_tokens", max_new_tokens, 0)
        _check_beams(num_beams, temperature, top_k, generator)
        _check_ranks_stop_alike(group, prompt.device, eos_id=eos_id, sampled=int(temperature != 0))
        if num_beams > 1:
            found = self.beam_search(
                prompt,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                eos_id=eos_id,
                prompt_padding=prompt_padding,
                length_penalty=length_penalty,
                group=group,
            )
            return torch.cat([prompt, found.tokens[:, 0]], dim=1)
        logits, step, _ = self._decoding(prompt, prompt_padding, max_new_tokens, 1, group)
        out = [prompt]
        done = torch.zeros(prompt.shape[0], 1, dtype=torch.bool, device=prompt.device)
        for t in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, generator, group)[:, None]
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)  # finished rows stay finished
                done |= nxt == eos_id
            out.append(nxt)
            if bool(done.all()):
                break
            if t + 1 < max_new_tokens:
                logits = step(nxt[:, 0], t)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def beam_search(
        self,
        prompt: Tensor,
        *,
        num_beams: int,
        max_new_tokens: int,
        eos_id: int | None = None,
        prompt_padding: Tensor | None = None,
        length_penalty: float = 1.0,
        group: dist.ProcessGroup | None = None,
    ) -> Beams:
        """The ``num_beams`` best continuations of each prompt, best first, with their scores.

        Beam search (``attnkit.nn.beam_search``) over KV caches (windowed under a
        sliding-window mask, as ``generate``'s): ``tokens`` (B, num_beams, ≤ max_new_tokens),
        the continuations without the prompt, each ended by ``eos_id`` and holding it after
        (or cut at max_new_tokens); ``scores`` (B, num_beams): log-probability / length **
        ``length_penalty``. ``prompt_padding`` and ``group`` as ``generate`` takes them.
        """
        check_search(num_beams, max_new_tokens, length_penalty)
        _check_ranks_stop_alike(
            group, prompt.device, eos_id=eos_id, length_penalty=float(length_penalty)
        )
        return beam_search(
            self._decoding(prompt, prompt_padding, max_new_tokens, num_beams, group),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            end_id=eos_id,
            fill_id=0 if eos_id is None else eos_id,
            length_penalty=length_penalty,
        )
