"""Sparse attention patterns, and the tiles a flash kernel visits, as one HTML file.

Each pattern is drawn as its (query, key) grid at one length, over the tiles of its
BlockMask: empty tiles (never touched), partial ones (masked pair by pair) and full ones
(computed without a mask). Hovering a cell names the pair and its tile. No CDN and no
network: the masks are embedded as packed bits, one per pair.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np

from attnkit._validation import check_int
from attnkit.masks import Mask

#: The page's HTML, styles and script (``pages/pattern_view.html``); pattern_view_html fills in its
#: __PLACEHOLDERS__.
_PAGE = (resources.files("attnkit.viz") / "pages" / "pattern_view.html").read_text(encoding="utf-8")


def pattern_view_html(
    patterns: Mapping[str, Mask], length: int, *, block: int = 16, title: str = ""
) -> str:
    """The page as a string.

    Args:
        patterns: masks by name, each drawn at Lq = Lk = ``length`` (one that differs by
            batch or head, such as a padding mask, for its first batch row and head).
        length: tokens (at most 4096: each pattern is embedded as length² bits).
        block: tile side, as a BlockMask's block_q = block_k.
        title: page title (default: "attnkit sparse patterns at N tokens").
    """
    check_int("length", length)
    check_int("block", block)
    if length > MAX_LENGTH:
        raise ValueError(f"length must be at most {MAX_LENGTH} (length² bits each), got {length}")
    if not patterns:
        raise ValueError("pattern_view_html needs at least one pattern")
    for name, mask in patterns.items():
        if not isinstance(mask, Mask):
            raise TypeError(
                f"patterns[{name!r}] must be an attnkit Mask, got {type(mask).__name__}"
            )
    data = {
        "length": length,
        "block": block,
        "patterns": [_pattern(name, mask, length, block) for name, mask in patterns.items()],
    }
    title = title or f"attnkit sparse patterns at {length} tokens"
    # the JSON sits inside <script>: escape "</" so a name cannot close the element
    payload = json.dumps(data).replace("</", "<\\/")
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__LENGTH__", str(length))
        .replace("__BLOCK__", str(block))
        .replace("__DATA__", payload)
    )


#: Longest length drawn: 2 MB of bits per pattern.
MAX_LENGTH = 4096


def _pattern(name: str, mask: Mask, length: int, block: int) -> dict[str, object]:
    """One pattern's embedded data: its bits (row-major, packed), tile kinds and density."""
    dense = mask.dense(length, length)[0, 0]
    kinds = mask.blocks(length, length, block, block).kinds[0, 0]
    bits = np.packbits(dense.numpy().reshape(-1))  # first pair in the high bit
    return {
        "name": name,
        "spec": repr(mask),
        "density": float(dense.float().mean()),
        "bits": base64.b64encode(bits.tobytes()).decode("ascii"),
        "kinds": kinds.reshape(-1).tolist(),
    }


def save_pattern_view(
    patterns: Mapping[str, Mask], length: int, path: str | Path, **kwargs: object
) -> Path:
    """Write ``pattern_view_html(...)`` to ``path``."""
    out = Path(path)
    out.write_text(pattern_view_html(patterns, length, **kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return out
