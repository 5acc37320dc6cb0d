"""Attention heatmaps: one panel per head, tokens on both axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from attnkit._validation import check_attention_map
from attnkit.viz.patterns import _pyplot


def save_head_grid(
    attention: Tensor,
    tokens: Sequence[str],
    path: str | Path,
    title: str = "",
    signed: bool = False,
    query_tokens: Sequence[str] | None = None,
    panel_titles: Sequence[str] | None = None,
) -> Path:
    """Save a grid of heatmaps.

    Args:
        attention: (H, Lq, Lk) probabilities of one layer (row i: where query i looks).
        tokens: the Lk key token labels, and the queries' unless ``query_tokens``.
        path: PNG file to write.
        title: figure title.
        signed: differential attention's maps A1 − λ·A2, in [-1, 1]: drawn on [-1, 1].
        query_tokens: the Lq query labels of cross-attention (a decoder's tokens over an
            encoder's ``tokens``).
        panel_titles: a title per map (default "head h").
    """
    queries = tokens if query_tokens is None else query_tokens
    check_attention_map("attention", attention, len(queries), len(tokens), signed)
    titles = [f"head {h}" for h in range(attention.shape[0])]
    if panel_titles is not None:
        if len(panel_titles) != len(titles):
            raise ValueError(f"panel_titles has {len(panel_titles)} titles for {len(titles)} maps")
        titles = list(panel_titles)
    plt = _pyplot()
    H, Lq, L = attention.shape
    cols = min(4, H)
    rows = -(-H // cols)
    size = 2.2 + 0.16 * min(max(L, Lq), 60)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    labels = max(L, Lq) <= 60
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(
            attention[h].detach().float().cpu().numpy(),
            cmap="RdBu_r" if signed else "viridis",
            vmin=-1 if signed else 0,
            vmax=1,
        )
        ax.set_title(titles[h], fontsize=9)
        if labels:
            ax.set_xticks(range(L), tokens, rotation=90, fontsize=7)
            ax.set_yticks(range(Lq), queries, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or "attention per head (rows: query token, columns: key token)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
