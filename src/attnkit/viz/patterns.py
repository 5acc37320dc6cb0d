"""Draw masks as a grid of images."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attnkit.masks import Mask


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("drawing needs matplotlib: pip install 'attnkit[viz]'") from exc
    return plt


def save_pattern_grid(patterns: Mapping[str, Mask], length: int, path: str | Path) -> Path:
    """Save one panel per mask (Lq = Lk = ``length``), titled with its name and density."""
    plt = _pyplot()
    n = len(patterns)
    cols = min(5, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, mask) in zip(axes.flat, patterns.items(), strict=False):
        ax.imshow(
            mask.dense(length, length)[0, 0].numpy(),
            cmap="Blues",
            vmin=0,
            vmax=1.3,
            interpolation="nearest",
        )
        ax.set_title(f"{name}\ndensity {mask.density(length, length):.2f}", fontsize=9)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
