"""Checkpoints: a model's constructor arguments, its weights and its vocabulary in one file.

>>> import tempfile, torch
>>> from attnkit import masks
>>> from attnkit.nn import CausalLM, load_checkpoint, save_checkpoint
>>> lm = CausalLM(3, d_model=16, nhead=2, num_layers=1, mask=masks.sliding_window(4))
>>> path = tempfile.mkdtemp() + "/lm.pt"
>>> _ = save_checkpoint(path, lm, vocab=["a", "b", " "])
>>> ckpt = load_checkpoint(path)
>>> ckpt.vocab, ckpt.model.config["mask"]
(['a', 'b', ' '], sliding_window(left=4, right=0))

The file is a plain dict that ``torch.load(weights_only=True)`` reads: ``format``, ``class``,
``config`` (masks by their ``spec``: built-in masks and their combinations, tensor arguments
included), ``state_dict``, ``vocab`` and ``meta``. ``custom`` masks have no spec: save the
model with ``config["mask"] = None`` and pass the mask again to ``load_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.masks import Mask, from_spec
from attnkit.nn.transformer import CausalLM, Transformer

FORMAT = 1
_CLASSES: dict[str, type[nn.Module]] = {"CausalLM": CausalLM, "Transformer": Transformer}
_MASK_ARGS = ("mask", "encoder_mask")  # config entries holding a Mask


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the rebuilt model (eval mode), vocabulary and extras."""

    model: CausalLM | Transformer
    vocab: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    model: CausalLM | Transformer,
    *,
    vocab: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a ``CausalLM`` or ``Transformer``) with its vocabulary to ``path``.

    ``meta`` holds anything else worth keeping (plain Python values): training steps, scores.
    """
    name = type(model).__name__
    if name not in _CLASSES:
        raise TypeError(f"save_checkpoint takes a CausalLM or Transformer, got {name}")
    config = dict(model.config)
    for key in _MASK_ARGS:
        mask = config.get(key)
        if isinstance(mask, Mask):
            if mask.spec is None:
                raise ValueError(
                    f"{key}={mask!r} has no spec and cannot be stored; save without it and pass "
                    f"load_checkpoint(..., {key}=...) when loading"
                )
            config[key] = {"spec": list(mask.spec)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "class": name,
            "config": config,
            "state_dict": model.state_dict(),
            "vocab": None if vocab is None else list(vocab),
            "meta": dict(meta or {}),
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path, **overrides: Any) -> Checkpoint:
    """Rebuild the model saved at ``path``; ``overrides`` replace constructor arguments.

    Raises:
        ValueError: the file is not an attnkit checkpoint, or of a newer format.
    """
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("class") not in _CLASSES:
        raise ValueError(f"{path} is not an attnkit checkpoint (see attnkit.nn.save_checkpoint)")
    if data.get("format", 0) > FORMAT:
        raise ValueError(
            f"{path} has checkpoint format {data['format']}; this attnkit reads up to {FORMAT}"
        )
    config = dict(data["config"])
    for key in _MASK_ARGS:
        if isinstance(config.get(key), dict):
            config[key] = from_spec(config[key]["spec"])
    config.update(overrides)
    cls = _CLASSES[data["class"]]
    model = cls(**config)
    model.load_state_dict(data["state_dict"])
    model.eval()
    assert isinstance(model, CausalLM | Transformer)
    return Checkpoint(model, data.get("vocab"), data.get("meta") or {})
