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
from pathlib import Path

import numpy as np

from attnkit._validation import check_int
from attnkit.masks import Mask

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
#cards { display: flex; flex-wrap: wrap; gap: 18px; }
.card { width: 260px; }
.card h4 { margin: 0 0 2px 0; font-size: 14px; }
.card .spec, .card .stats { font-size: 12px; color: #555; margin: 2px 0; }
canvas.pattern { width: 256px; height: 256px; border: 1px solid #bbb; image-rendering: pixelated;
  cursor: crosshair; }
#legend span { display: inline-block; width: 12px; height: 12px; vertical-align: middle;
  margin: 0 4px 0 10px; border: 1px solid #bbb; }
#info { height: 1.4em; margin: 8px 0; font-weight: bold; }
</style></head>
<body>
<h3>__TITLE__</h3>
<div>Each grid is one pattern at __LENGTH__ tokens: row i is query i, column j key j, dark
cells are the pairs that attend. <label><input type="checkbox" id="tiles" checked> color the
__BLOCK__ × __BLOCK__ tiles a flash kernel works in</label>:
<span id="legend"><span style="background: rgb(40, 140, 80)"></span>full (computed without
a mask)<span style="background: rgb(30, 80, 160)"></span><span style="background:
rgba(235, 170, 30, 0.4)"></span>partial (masked pair by pair)<span style="background:
white"></span>empty (skipped)</span></div>
<div id="info">Hover a grid to see a pair.</div>
<div id="cards"></div>
<script>
const DATA = __DATA__;
const L = DATA.length, B = DATA.block, nT = Math.ceil(L / B);
const KIND = {0: "empty", 1: "partial", 2: "full"};
const ATTENDS = [30, 80, 160, 255], ATTENDS_FULL = [40, 140, 80, 255];
const MASKED_PARTIAL = [235, 170, 30, 102];
const tilesBox = document.getElementById("tiles"), info = document.getElementById("info");
const cards = document.getElementById("cards");
const patterns = DATA.patterns.map(p => ({...p,
  bits: Uint8Array.from(atob(p.bits), c => c.charCodeAt(0))}));
const attends = (p, i, j) => (p.bits[(i * L + j) >> 3] >> (7 - ((i * L + j) & 7))) & 1;
const kindAt = (p, i, j) => p.kinds[Math.floor(i / B) * nT + Math.floor(j / B)];
function tag(name, cls, text) {
  const e = document.createElement(name);
  e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
patterns.forEach((p, n) => {
  const card = tag("div", "card");
  card.dataset.name = p.name;
  card.append(tag("h4", "name", p.name), tag("div", "spec", p.spec));
  const counts = [0, 0, 0];
  p.kinds.forEach(k => counts[k]++);
  card.append(tag("div", "stats", `density ${p.density.toFixed(3)} · tiles: ${counts[2]} full, ` +
    `${counts[1]} partial, ${counts[0]} empty (skipped: ` +
    `${Math.round(100 * counts[0] / p.kinds.length)} %)`));
  const c = tag("canvas", "pattern");
  c.width = L; c.height = L; c.dataset.index = n;
  c.addEventListener("mousemove", ev => {
    const i = Math.min(L - 1, Math.floor(ev.offsetY / c.clientHeight * L));
    const j = Math.min(L - 1, Math.floor(ev.offsetX / c.clientWidth * L));
    info.textContent = `${p.name}: query ${i}, key ${j} ` +
      (attends(p, i, j) ? "attends" : "is masked") +
      ` (tile ${Math.floor(i / B)}, ${Math.floor(j / B)}: ${KIND[kindAt(p, i, j)]})`;
  });
  card.appendChild(c);
  cards.appendChild(card);
});
function draw() {
  for (const c of document.querySelectorAll("canvas.pattern")) {
    const p = patterns[Number(c.dataset.index)], ctx = c.getContext("2d");
    const img = ctx.createImageData(L, L), d = img.data;
    for (let i = 0; i < L; i++) for (let j = 0; j < L; j++) {
      const kind = tilesBox.checked ? kindAt(p, i, j) : 1;
      const rgba = attends(p, i, j) ? (kind === 2 ? ATTENDS_FULL : ATTENDS)
        : kind === 1 && tilesBox.checked ? MASKED_PARTIAL : null;
      if (rgba) d.set(rgba, 4 * (i * L + j));
    }
    ctx.putImageData(img, 0, 0);
  }
}
tilesBox.addEventListener("change", draw);
draw();
</script>
</body></html>
"""


def pattern_view_html(
    patterns: Mapping[str, Mask], length: int, *, block: int = 16, title: str = ""
) -> str:
    """The page as a string.

    Args:
        patterns: masks by name, each drawn at Lq = Lk = ``length``.
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
