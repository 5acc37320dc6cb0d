"""A CausalLM's decoding step over caches held as tensors: what torch.export can take."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from attnkit.nn.transformer import CausalLM

if TYPE_CHECKING:
    from torch.export import ExportedProgram


class DecodingStep(nn.Module):
    """``lm`` over every layer's keys and values, passed in and handed back as tensors.

    A ``KVCache`` is Python state, which an exported graph cannot hold. This module takes the
    cached keys and values as inputs and returns them with the new positions appended, so one
    exported graph, with the new tokens T and the cached positions P both dynamic, serves the
    prompt and every decoding step (``export``; AOTInductor compiles it too):

        step = DecodingStep(lm)
        keys, values = step.empty_caches(batch=1)
        logits, keys, values = step(prompt, keys, values)  # P = 0: the prompt
        logits, keys, values = step(next_token, keys, values)  # P = the prompt's length

    Each call copies the P cached positions into caches T longer (as a concatenation would).
    Positions count from P, so a sliding-window model's caches are kept whole (its mask still
    limits what each query sees). Prompts of different lengths share a batch left-padded, as
    ``CausalLM.generate`` takes them: ``pads`` says how many pads each row starts with.
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
        cache = self.lm.new_caches(batch, 1)[0]
        layers = len(self.lm.layers)
        keys, values = (
            t[None, :, :, :0].repeat(layers, 1, 1, 1, 1) for t in (cache.keys, cache.values)
        )
        return keys, values

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
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must be (B, T) with T >= 1, got {tuple(ids.shape)}")
        B, T = ids.shape
        for name, t, empty in zip(
            ("keys", "values"), (keys, values), self.empty_caches(B), strict=True
        ):
            if t.dim() != 5 or (*t.shape[:3], t.shape[4]) != (*empty.shape[:3], empty.shape[4]):
                size = ", ".join(map(str, empty.shape[:3])) + f", P, {empty.shape[4]}"
                raise ValueError(
                    f"{name} must be (layers, B, Hkv, P, {'D' if name == 'keys' else 'Dv'}) = "
                    f"({size}) for ids {tuple(ids.shape)}, got {tuple(t.shape)}"
                )
        P = keys.shape[3]
        if values.shape[3] != P:
            raise ValueError(
                f"keys and values must hold as many positions, got {P} and {values.shape[3]}"
            )
        padding = None
        if pads is not None:
            if pads.shape != (B,) or pads.is_floating_point() or pads.dtype == torch.bool:
                raise ValueError(
                    f"pads must be (B,) = ({B},) integers, got {pads.dtype} {tuple(pads.shape)}"
                )
            padding = torch.arange(P + T, device=ids.device)[None, :] < pads[:, None]
        caches = self.lm.new_caches(B, P + T)
        for n, cache in enumerate(caches):
            cache.append(keys[n], values[n])
        logits, _ = self.lm(ids, start=P, caches=caches, padding=padding)
        return (
            logits,
            torch.stack([cache.keys for cache in caches]),
            torch.stack([cache.values for cache in caches]),
        )

    def export(
        self, batch: int = 1, max_len: int | None = None, *, padded: bool = False
    ) -> ExportedProgram:
        """``torch.export`` of this step for ``batch`` rows (taking ``pads`` if ``padded``).

        One graph for T in 1 .. max_len new tokens over P in 0 .. max_len - 1 cached ones
        (``max_len``: the model's by default).
        """
        from torch.export import Dim

        most = self.lm.max_len if max_len is None else max_len
        new, cached = Dim("T", min=1, max=most), Dim("P", min=0, max=most - 1)
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
