"""Decoding steps over caches held as tensors, which torch.export can take.

A ``KVCache`` is Python state, which an exported graph cannot hold. These modules take every
layer's cached keys and values as inputs and return them with the new positions appended, so
one exported graph, with the new tokens T and the cached positions P both dynamic, serves the
prompt and every decoding step (AOTInductor compiles it too): ``DecodingStep`` for a
``CausalLM``, ``TranslationStep`` for a ``Transformer``'s decoder.

Each call copies the P cached positions once, into tensors T longer that the layers' caches
append to and that it hands back (as a concatenation would).
Positions count from P, so a sliding-window model's caches are kept whole (its mask still
limits what each query sees).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from attnkit.nn.kv_cache import KVCache
from attnkit.nn.transformer import CausalLM, Transformer, TransformerDecoderLayer

if TYPE_CHECKING:
    from torch.export import ExportedProgram


def _empty(cache: KVCache, layers: int) -> tuple[Tensor, Tensor]:
    """Every layer's keys (layers, B, Hkv, 0, D) and values (..., Dv), alike ``cache``'s."""
    keys, values = (
        t[None, :, :, :0].repeat(layers, 1, 1, 1, 1) for t in (cache.keys, cache.values)
    )
    return keys, values


def _new_tokens(ids: Tensor, keys: Tensor) -> tuple[int, int, int]:
    """B and T of ids (B, T >= 1), and P: the positions ``keys`` holds (checked later)."""
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError(f"ids must be (B, T) with T >= 1, got {tuple(ids.shape)}")
    return ids.shape[0], ids.shape[1], keys.shape[3] if keys.dim() == 5 else 0


def _check_stacked(
    ids: Tensor, keys: Tensor, values: Tensor, like: KVCache, layers: int, prefix: str = ""
) -> None:
    """ValueError unless keys (layers, B, Hkv, ·, D) and values (..., Dv) match ``like``.

    Their B, Hkv and head dims, dtype and device must be those of the cache ``like``.
    """
    length = "S" if prefix else "P"
    for name, t, held in (("keys", keys, like.keys), ("values", values, like.values)):
        want = (layers, held.shape[0], held.shape[1], held.shape[3])  # (layers, B, Hkv, ·)
        if t.dim() != 5 or (*t.shape[:3], t.shape[4]) != want:
            raise ValueError(
                f"{prefix}{name} must be (layers, B, Hkv, {length}, "
                f"{'D' if name == 'keys' else 'Dv'}) = ({', '.join(map(str, want[:3]))}, "
                f"{length}, {want[3]}) for ids {tuple(ids.shape)}, got {tuple(t.shape)}"
            )
        if (t.dtype, t.device) != (held.dtype, held.device):
            raise ValueError(
                f"{prefix}{name} must be {held.dtype} on {held.device} as the model's caches, "
                f"got {t.dtype} on {t.device}"
            )


def _grown(
    ids: Tensor, keys: Tensor, values: Tensor, like: KVCache, layers: int
) -> tuple[Tensor, Tensor, list[KVCache]]:
    """keys (layers, B, Hkv, P, D) and values (..., Dv) copied into tensors T longer.

    Returns them and, per layer, a cache over its slice of them holding the P positions,
    whose appends fill the T new ones. ValueError unless keys and values fit caches alike
    ``like``.
    """
    _check_stacked(ids, keys, values, like, layers)
    P, T = keys.shape[3], ids.shape[1]
    if values.shape[3] != P:
        raise ValueError(
            f"keys and values must hold as many positions, got {P} and {values.shape[3]}"
        )
    grown = []
    for t in (keys, values):
        room = t.new_empty(*t.shape[:3], P + T, t.shape[4])
        room[:, :, :, :P] = t  # the one copy of the cached positions a step makes
        grown.append(room)
    caches = [KVCache.holding(grown[0][n], grown[1][n], length=P) for n in range(layers)]
    return grown[0], grown[1], caches


def _handed_back(keys: Tensor, values: Tensor, caches: list[KVCache]) -> tuple[Tensor, Tensor]:
    """Every layer's keys and values after the step.

    ``_grown``'s tensors, which the caches wrote into, unless autograd made the caches write
    into copies (``KVCache.append``).
    """
    if torch.is_grad_enabled():
        return torch.stack([c.keys for c in caches]), torch.stack([c.values for c in caches])
    return keys, values


class DecodingStep(nn.Module):
    """A ``CausalLM`` over every layer's keys and values, passed in and handed back as tensors.

        step = DecodingStep(lm)
        keys, values = step.empty_caches(batch=1)
        logits, keys, values = step(prompt, keys, values)  # P = 0: the prompt
        logits, keys, values = step(next_token, keys, values)  # P = the prompt's length

    Prompts of different lengths share a batch left-padded, as ``CausalLM.generate`` takes
    them: ``pads`` says how many pads each row starts with.
    """

    def __init__(self, lm: CausalLM) -> None:
        if not isinstance(lm, CausalLM):
            raise TypeError(f"DecodingStep takes a CausalLM, got {type(lm).__name__}")
        super().__init__()
        self.lm = lm

    def empty_caches(self, batch: int) -> tuple[Tensor, Tensor]:
        """Keys (layers, B, Hkv, 0, D) and values (layers, B, Hkv, 0, Dv) before a prompt.

        In the dtype and on the device of the model's caches (Dv = 0 for latent attention,
        whose values are part of its keys); every layer's are alike.
        """
        return _empty(self.lm.new_caches(batch, 1)[0], len(self.lm.layers))

    def forward(
        self, ids: Tensor, keys: Tensor, values: Tensor, pads: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B, T) at positions P .. P + T - 1 over P cached ones.

        Args:
            ids: (B, T) token ids, T >= 1.
            keys: (layers, B, Hkv, P, D), every layer's cached keys (``empty_caches``: P = 0).
            values: (layers, B, Hkv, P, Dv).
            pads: (B,) integers: how many padding tokens each row's prompt starts with (the
                same at every step); none attends to them, and learned positions count from
                each row's first token. None: no padding.

        Returns:
            logits (B, T, V), keys (layers, B, Hkv, P + T, D), values (layers, B, Hkv,
            P + T, Dv).
        """
        B, T, P = _new_tokens(ids, keys)
        like = self.lm.new_caches(B, 1)[0]
        keys, values, caches = _grown(ids, keys, values, like, len(self.lm.layers))
        padding = None
        if pads is not None:
            if pads.shape != (B,) or pads.is_floating_point() or pads.dtype == torch.bool:
                raise ValueError(
                    f"pads must be (B,) = ({B},) integers, got {pads.dtype} {tuple(pads.shape)}"
                )
            padding = torch.arange(P + T, device=ids.device)[None, :] < pads[:, None]
        logits, _ = self.lm(ids, start=P, caches=caches, padding=padding)
        return (logits, *_handed_back(keys, values, caches))

    def export(
        self, batch: int = 1, max_len: int | None = None, *, padded: bool = False
    ) -> ExportedProgram:
        """``torch.export`` of this step for ``batch`` rows (taking ``pads`` if ``padded``).

        One graph for T in 1 .. max_len new tokens over P in 0 .. max_len - 1 cached ones
        (``max_len``: the model's by default).
        """
        most = self.lm.max_len if max_len is None else max_len
        new, cached = _dims(most)
        keys, values = self.empty_caches(batch)
        sample = torch.zeros(batch, 2, dtype=torch.long, device=keys.device)
        with torch.no_grad():  # caches of three positions: no size 0 or 1 to specialise on
            _, keys, values = self(torch.zeros_like(sample[:, :1]).repeat(1, 3), keys, values)
            inputs: tuple[Tensor, ...] = (sample, keys, values)
            dims: dict[str, object] = {"ids": {1: new}, "keys": {3: cached}, "values": {3: cached}}
            if padded:
                inputs += (torch.zeros(batch, dtype=torch.long, device=keys.device),)
                dims["pads"] = None
            return torch.export.export(self, inputs, dynamic_shapes=dims)


class TranslationStep(nn.Module):
    """A ``Transformer``'s decoder over its caches, passed in as tensors.

    ``encode`` gives every decoder layer's cross-attention keys and values, projected once
    from the encoder's memory; each step reads them and hands back its self-attention caches
    one step longer. ``export()`` gives both as graphs that translate as ``generate`` does: the
    encoder (source length dynamic) and the decoding step (new tokens, cached positions and
    source length dynamic):

        step = TranslationStep(model)
        encode, decode = (program.module() for program in step.export())
        cross_keys, cross_values, padding = encode(src)
        keys, values = step.empty_caches(batch)
        logits, keys, values = decode(start_tokens, keys, values, cross_keys, cross_values,
                                      padding)  # and on, with the tokens it chose
    """

    def __init__(self, model: Transformer) -> None:
        if not isinstance(model, Transformer):
            raise TypeError(f"TranslationStep takes a Transformer, got {type(model).__name__}")
        super().__init__()
        self.model = model

    def _layers(self) -> list[TransformerDecoderLayer]:
        layers = list(self.model.decoder)
        assert all(isinstance(layer, TransformerDecoderLayer) for layer in layers)
        return layers  # type: ignore[return-value]

    def empty_caches(self, batch: int) -> tuple[Tensor, Tensor]:
        """The decoder's self-attention keys (layers, B, Hkv, 0, D) and values, empty."""
        layers = self._layers()
        return _empty(layers[0].self_attn.new_cache(batch, 1), len(layers))

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Source ids (B, S) -> every decoder layer's cross-attention keys and values.

        Returns:
            cross_keys (layers, B, Hkv, S, D), cross_values (layers, B, Hkv, S, D) and the
            padding (B, S) bool, True = a padded source token.
        """
        memory, padding = self.model.encode(src)
        heads = [layer.cross_attn.key_value_heads(memory) for layer in self._layers()]
        return torch.stack([k for k, _ in heads]), torch.stack([v for _, v in heads]), padding

    def forward(
        self,
        ids: Tensor,
        keys: Tensor,
        values: Tensor,
        cross_keys: Tensor,
        cross_values: Tensor,
        memory_padding: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Target ids (B, T) at positions P .. P + T - 1 over P cached ones, and the source.

        Args:
            ids: (B, T) target ids (the first call's start with the start token).
            keys: (layers, B, Hkv, P, D), the decoder's cached self-attention keys
                (``empty_caches``: P = 0).
            values: (layers, B, Hkv, P, Dv).
            cross_keys: (layers, B, Hkv, S, D), the source's keys in each layer (``encode``).
            cross_values: (layers, B, Hkv, S, D).
            memory_padding: (B, S) bool, True = a padded source token.

        Returns:
            logits (B, T, V), keys and values (layers, B, Hkv, P + T, ·).
        """
        B, _, P = _new_tokens(ids, keys)
        layers = self._layers()
        like = layers[0].self_attn.new_cache(B, 1)
        keys, values, caches = _grown(ids, keys, values, like, len(layers))
        S = cross_keys.shape[3] if cross_keys.dim() == 5 else 0
        like = layers[0].cross_attn.new_cache(B, 1)
        _check_stacked(ids, cross_keys, cross_values, like, len(layers), "cross_")
        if cross_values.shape[3] != S or memory_padding.shape != (B, S):
            raise ValueError(
                f"cross_values must hold as many positions as cross_keys ({S}) and "
                f"memory_padding be (B, S) = ({B}, {S}), got {tuple(cross_values.shape)} and "
                f"{tuple(memory_padding.shape)}"
            )
        cross = [KVCache.holding(k, v) for k, v in zip(cross_keys, cross_values, strict=True)]
        # filled cross caches are read instead of the memory, which only its shape stands for
        memory = cross_keys.new_empty(B, S, 0)
        logits, _ = self.model.decode(
            ids, memory, memory_padding, start=P, caches=list(zip(caches, cross, strict=True))
        )
        return (logits, *_handed_back(keys, values, caches))

    def export(
        self, batch: int = 1, max_len: int | None = None
    ) -> tuple[ExportedProgram, ExportedProgram]:
        """``torch.export`` of ``encode`` and of this step, for ``batch`` rows.

        Sources of 1 .. max_len tokens; T in 1 .. max_len new target tokens over P in 0 ..
        max_len - 1 cached ones (``max_len``: the model's by default).
        """
        most = int(self.model.config["max_len"]) if max_len is None else max_len
        new, cached = _dims(most)
        source = torch.export.Dim("S", min=1, max=most)
        keys, values = self.empty_caches(batch)
        src = torch.ones(batch, 3, dtype=torch.long, device=keys.device)
        sample = torch.zeros(batch, 2, dtype=torch.long, device=keys.device)
        with torch.no_grad():
            encoder = torch.export.export(
                _Encoder(self), (src,), dynamic_shapes={"src": {1: source}}
            )
            cross = self.encode(src)
            _, keys, values = self(sample[:, :1].repeat(1, 3), keys, values, *cross)
            dims = {
                "ids": {1: new},
                "keys": {3: cached},
                "values": {3: cached},
                "cross_keys": {3: source},
                "cross_values": {3: source},
                "memory_padding": {1: source},
            }
            step = torch.export.export(self, (sample, keys, values, *cross), dynamic_shapes=dims)
        return encoder, step


class _Encoder(nn.Module):
    """``TranslationStep.encode`` as a module's forward, for torch.export."""

    def __init__(self, step: TranslationStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.step.encode(src)


def _dims(most: int) -> tuple[torch.export.Dim, torch.export.Dim]:
    """The new tokens' dim T in 1 .. most and the cached positions' P in 0 .. most - 1."""
    from torch.export import Dim

    return Dim("T", min=1, max=most), Dim("P", min=0, max=most - 1)
