"""Interactive head, model and neuron views (in the spirit of bertviz) as one HTML file.

The head view draws one layer's heads as lines from each query token to the tokens it attends
to; below it the model view shows every (layer, head) as a small L × L map, and clicking one
shows it in the head view; given the queries, keys and values, the neuron view then walks one
head through q × k, q · k, ÷ √d, softmax and Σ weight · value for one query token.

No CDN and no network: the script and styles are inline, the weights are embedded as base64
bytes (one byte per weight, 0-255), so texts of a few hundred tokens stay a few MB. Several
runs of one text (full attention and a sparse pattern, say) share a page: a selector switches
between them at the same layer and heads. A model with attention sinks gets one more key,
"(sink)", whose lines carry the weight each row gave no token.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from attnkit._validation import check_attention_map

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
#controls { margin-bottom: 10px; display: flex; flex-wrap: wrap; gap: 10px; align-items: center; }
.head-toggle-label { padding: 2px 6px; border-radius: 4px; color: white; cursor: pointer; }
svg text { font: 13px system-ui, sans-serif; cursor: default; }
svg text.active { font-weight: bold; }
line.attn-line.hidden { display: none; }
#note { color: #666; margin-top: 6px; }
#model-view { display: grid; gap: 3px; margin-top: 8px; width: max-content; }
#model-view .axis { font-size: 12px; color: #666; text-align: center; align-self: center;
  padding: 0 4px; }
canvas.thumb { width: 56px; height: 56px; background: white; border: 1px solid #ddd;
  image-rendering: pixelated; cursor: pointer; }
canvas.thumb.shown { border-color: #222; outline: 1px solid #222; }
#neuron { border-collapse: collapse; margin-top: 8px; font-size: 13px; }
#neuron td, #neuron th { padding: 1px 6px; text-align: right; white-space: nowrap; }
#neuron th { font-weight: normal; color: #666; }
#neuron td.tok { text-align: right; font-weight: bold; }
#neuron canvas.vec { height: 12px; image-rendering: pixelated; vertical-align: middle; }
#neuron div.wbar { display: inline-block; height: 10px; background: #333; vertical-align: middle; }
#neuron tr.summary td { border-top: 1px solid #ccc; }
</style></head>
<body>
<h3>__TITLE__</h3>
<div id="controls">
  <label id="run-box">Attention <select id="run"></select></label>
  <label>Layer <select id="layer"></select></label>
  <span id="heads"></span>
  <label>hide weights below <input id="threshold" type="range" min="0" max="0.5" step="0.01">
    <span id="threshold-value"></span></label>
</div>
<svg id="view" xmlns="__SVGNS__"></svg>
<div id="note">Left: the token that attends (query). Right: the tokens it attends to (keys).
Line opacity is the attention weight. Hover a token to see only its lines; click a head to
toggle it.<span id="sink-note"> The key "(sink)" takes what each row gave no token (attention
sinks).</span></div>
<h4>Model view</h4>
<div id="model-note">Every layer (rows) and head (columns) of this run: pixel (i, j) of a cell
is how much token i attends to token j, darker is more. Click a cell to show that layer and
head above.</div>
<div id="model-view"></div>
<div id="neuron-box">
<h4>Neuron view</h4>
<div>How the query of <select id="nq"></select> at the layer above, head <select id="nh"></select>,
scores every key: q · k is the sum of the elementwise products q × k; divided by √d and put
through softmax it gives the weights, and the output is Σ weight · value. Each vector is a row
of cells, blue positive and orange negative. Click a query token in the head view to pick
it.</div>
<table id="neuron"></table>
</div>
<div id="neuron-missing">The neuron view shows the first run ("<span id="neuron-run"></span>"),
whose queries, keys and values the page holds.</div>
<script>
const DATA = __DATA__;
const SVGNS = "__SVGNS__";
const raw = Uint8Array.from(atob(DATA.weights), c => c.charCodeAt(0));
// queries (left) and keys (right): the same tokens, or a decoder's over an encoder's
const QT = DATA.query_tokens || DATA.tokens, KT = DATA.tokens;
const Lq = QT.length, Lk = KT.length, H = DATA.heads;
const enabled = new Array(H).fill(true);
if (DATA.initial_heads) { enabled.fill(false); DATA.initial_heads.forEach(h => enabled[h] = true); }
const color = h => `hsl(${Math.round(360 * h / H)}, 70%, 45%)`;
const weight = (run, layer, h, i, j) =>
  raw[(((run * DATA.layers + layer) * H + h) * Lq + i) * Lk + j] / 255;
const sinkRaw = DATA.sink ? Uint8Array.from(atob(DATA.sink), c => c.charCodeAt(0)) : null;
const sink = (run, layer, h, i) => sinkRaw[((run * DATA.layers + layer) * H + h) * Lq + i] / 255;
if (!sinkRaw) document.getElementById("sink-note").style.display = "none";
const runSel = document.getElementById("run");
DATA.runs.forEach((name, r) => {
  const o = document.createElement("option");
  o.value = r; o.textContent = name; runSel.appendChild(o);
});
if (DATA.runs.length < 2) document.getElementById("run-box").style.display = "none";
const layerSel = document.getElementById("layer");
const thr = document.getElementById("threshold");
thr.value = DATA.threshold;
for (let l = 0; l < DATA.layers; l++) {
  const o = document.createElement("option");
  o.value = l; o.textContent = l; layerSel.appendChild(o);
}
layerSel.value = DATA.initial_layer;
const headsBox = document.getElementById("heads");
for (let h = 0; h < H; h++) {
  const lab = document.createElement("label");
  lab.className = "head-toggle-label"; lab.style.background = color(h);
  const cb = document.createElement("input");
  cb.type = "checkbox"; cb.className = "head-toggle"; cb.dataset.head = h; cb.checked = enabled[h];
  cb.addEventListener("change", () => { enabled[h] = cb.checked; draw(); });
  lab.appendChild(cb); lab.appendChild(document.createTextNode(" " + h));
  headsBox.appendChild(lab);
}
function el(name, attrs, text) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function focus(side, idx) {
  document.querySelectorAll("line.attn-line").forEach(ln => {
    const hit = idx === null || ln.dataset[side] === String(idx);
    ln.classList.toggle("hidden", !hit);
  });
  document.querySelectorAll("text.tok").forEach(t => t.classList.toggle("active",
    idx !== null && t.dataset.side === side && t.dataset.index === String(idx)));
}
function draw() {
  const svg = document.getElementById("view");
  svg.innerHTML = "";
  const rowH = 20, width = 520, left = 150, right = width - 150;
  const keys = sinkRaw ? Lk + 1 : Lk;  // the sink is one more key, below the tokens
  svg.setAttribute("width", width); svg.setAttribute("height", Math.max(Lq, keys) * rowH + 20);
  const run = Number(runSel.value), layer = Number(layerSel.value), t = Number(thr.value);
  document.getElementById("threshold-value").textContent = t.toFixed(2);
  const lines = el("g", {id: "lines"});
  for (let h = 0; h < H; h++) {
    if (!enabled[h]) continue;
    for (let i = 0; i < Lq; i++) for (let j = 0; j < keys; j++) {
      const w = j < Lk ? weight(run, layer, h, i, j) : sink(run, layer, h, i);
      if (w <= t) continue;
      lines.appendChild(el("line", {class: j < Lk ? "attn-line" : "attn-line sink-line",
        x1: left + 5, y1: 14 + i * rowH, x2: right - 5, y2: 14 + j * rowH, stroke: color(h),
        "stroke-width": 2, "stroke-opacity": Math.min(1, w).toFixed(3), "data-head": h,
        "data-i": i, "data-j": j < Lk ? j : "sink"}));
    }
  }
  svg.appendChild(lines);
  for (const [side, tokens, x, anchor] of [["i", QT, left, "end"], ["j", KT, right, "start"]]) {
    tokens.forEach((tok, i) => {
      const e = el("text", {x: x, y: 18 + i * rowH, "text-anchor": anchor, class: "tok",
        "data-side": side, "data-index": i}, tok);
      e.addEventListener("mouseenter", () => focus(side, i));
      if (side === "i") e.addEventListener("click", () => { nq.value = i; drawNeurons(); });
      e.addEventListener("mouseleave", () => focus(side, null));
      svg.appendChild(e);
    });
  }
  if (sinkRaw) {
    const e = el("text", {x: right, y: 18 + Lk * rowH, "text-anchor": "start", class: "tok",
      "data-side": "j", "data-index": "sink", "font-style": "italic"}, "(sink)");
    e.addEventListener("mouseenter", () => focus("j", "sink"));
    e.addEventListener("mouseleave", () => focus("j", null));
    svg.appendChild(e);
  }
  markShown();
  drawNeurons();
}
// the model view: one Lq x Lk cell per (layer, head), each pixel's alpha the embedded byte
function tag(name, cls, text) {
  const e = document.createElement(name);
  e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const grid = document.getElementById("model-view");
grid.style.gridTemplateColumns = `auto repeat(${H}, max-content)`;
grid.appendChild(tag("span", "axis"));
for (let h = 0; h < H; h++) grid.appendChild(tag("span", "axis", "head " + h));
const cells = [];
for (let l = 0; l < DATA.layers; l++) {
  grid.appendChild(tag("span", "axis", "layer " + l));
  for (let h = 0; h < H; h++) {
    const c = tag("canvas", "thumb");
    c.width = Lk; c.height = Lq; c.dataset.layer = l; c.dataset.head = h;
    c.style.height = Math.round(56 * Math.min(2, Lq / Lk)) + "px";
    c.title = `layer ${l}, head ${h}`;
    c.addEventListener("click", () => show(l, h));
    grid.appendChild(c); cells.push(c);
  }
}
function rgb(h) {  // the head's color as bytes
  const probe = document.createElement("canvas").getContext("2d");
  probe.fillStyle = color(h); probe.fillRect(0, 0, 1, 1);
  return probe.getImageData(0, 0, 1, 1).data;
}
function drawCells() {
  const run = Number(runSel.value);
  for (const c of cells) {
    const l = Number(c.dataset.layer), h = Number(c.dataset.head), [r, g, b] = rgb(h);
    const ctx = c.getContext("2d"), img = ctx.createImageData(Lk, Lq);
    const first = ((run * DATA.layers + l) * H + h) * Lq * Lk;
    for (let p = 0, d = img.data; p < Lq * Lk; p++) {
      d[4 * p] = r; d[4 * p + 1] = g; d[4 * p + 2] = b; d[4 * p + 3] = raw[first + p];
    }
    ctx.putImageData(img, 0, 0);
  }
}
function markShown() {  // outline the cells the head view draws
  const layer = Number(layerSel.value);
  for (const c of cells) {
    c.classList.toggle("shown", Number(c.dataset.layer) === layer && enabled[c.dataset.head]);
  }
}
function show(layer, head) {  // a cell clicked: its layer, its head alone
  layerSel.value = layer;
  enabled.fill(false); enabled[head] = true;
  document.querySelectorAll("input.head-toggle").forEach(cb => {
    cb.checked = enabled[cb.dataset.head];
  });
  draw();
  document.getElementById("view").scrollIntoView();
}
// the neuron view: one head's queries, keys and values (first run only), scored here
const VEC = DATA.vectors;
const vectors = VEC ? Object.fromEntries(["q", "k", "v"].map(n => [n,
  new Float32Array(Uint8Array.from(atob(VEC[n]), c => c.charCodeAt(0)).buffer)])) : null;
const nq = document.getElementById("nq"), nh = document.getElementById("nh");
QT.forEach((tok, i) => nq.appendChild(Object.assign(
  document.createElement("option"), {value: i, textContent: `${i}: ${tok}`})));
for (let h = 0; h < H; h++) {
  nh.appendChild(Object.assign(document.createElement("option"), {value: h, textContent: h}));
}
if (VEC) { nq.value = VEC.query; nh.value = VEC.head; }
document.getElementById("neuron-run").textContent = DATA.runs[0];
nq.addEventListener("change", drawNeurons);
nh.addEventListener("change", drawNeurons);
function vector(name, layer, h, i) {  // a row of the (layers, H, Lq or Lk, d) tensor
  const n = name === "q" ? Lq : Lk, d = name === "v" ? VEC.dv : VEC.d;
  const at = ((layer * H + h) * n + i) * d;
  return Array.from(vectors[name].subarray(at, at + d));
}
function cellsOf(values, scale) {  // a vector as a row of cells, one pixel each, drawn wide
  const c = document.createElement("canvas");
  c.className = "vec"; c.width = values.length; c.height = 1;
  c.style.width = 4 * values.length + "px";
  const ctx = c.getContext("2d"), img = ctx.createImageData(values.length, 1);
  values.forEach((x, n) => {
    img.data.set(x >= 0 ? [40, 90, 200] : [230, 120, 20], 4 * n);
    img.data[4 * n + 3] = Math.round(255 * Math.min(1, Math.abs(x) / scale));
  });
  ctx.putImageData(img, 0, 0);
  return c;
}
function drawNeurons() {
  const shown = vectors !== null && Number(runSel.value) === 0;
  document.getElementById("neuron-box").style.display = shown ? "" : "none";
  document.getElementById("neuron-missing").style.display = vectors && !shown ? "" : "none";
  if (!shown) return;
  const layer = Number(layerSel.value), h = Number(nh.value), i = Number(nq.value);
  const q = vector("q", layer, h, i);
  const keys = KT.map((_, j) => vector("k", layer, h, j));
  const values = KT.map((_, j) => vector("v", layer, h, j));
  const products = keys.map(k => k.map((x, c) => x * q[c]));
  const dots = products.map(p => p.reduce((a, b) => a + b, 0));
  const scaled = dots.map(x => x * VEC.scale);
  const top = Math.max(...scaled), exps = scaled.map(x => Math.exp(x - top));
  const total = exps.reduce((a, b) => a + b, 0), w = exps.map(x => x / total);
  const out = values[0].map((_, c) => values.reduce((a, v, j) => a + w[j] * v[c], 0));
  const most = rows => Math.max(1e-12, ...rows.flat().map(Math.abs));
  const kScale = most([q, ...keys]), pScale = most(products), vScale = most([...values, out]);
  const table = document.getElementById("neuron");
  table.innerHTML = "<tr><th>key</th><th>key k</th><th>q × k</th><th>q · k</th><th>÷ √d</th>" +
    "<th>weight</th><th>value v</th></tr>";
  const row = (cells, cls) => {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    for (const x of cells) {
      const td = document.createElement("td");
      if (x instanceof Node) td.appendChild(x); else td.textContent = x;
      tr.appendChild(td);
    }
    table.appendChild(tr);
    return tr;
  };
  const head = row([`query: ${QT[i]}`, cellsOf(q, kScale), "", "", "", "", ""]);
  head.firstChild.className = "tok";
  KT.forEach((tok, j) => {
    const bar = Object.assign(document.createElement("div"), {className: "wbar"});
    bar.style.width = Math.round(60 * w[j]) + "px";
    const weight = document.createElement("span");
    weight.append(w[j].toFixed(3) + " ", bar);
    const tr = row([tok, cellsOf(keys[j], kScale), cellsOf(products[j], pScale),
      dots[j].toFixed(2), scaled[j].toFixed(2), weight, cellsOf(values[j], vScale)]);
    tr.className = "key"; tr.dataset.key = j;
    tr.dataset.dot = dots[j]; tr.dataset.weight = w[j];
  });
  const sum = row(["output", "", "", "", "", "Σ weight · value", cellsOf(out, vScale)], "summary");
  sum.dataset.out = JSON.stringify(out);
}
runSel.addEventListener("change", () => { drawCells(); draw(); });
layerSel.addEventListener("change", draw);
thr.addEventListener("input", draw);
drawCells();
draw();
</script>
</body></html>
"""


#: One run's attention: an (H, L, L) tensor of probabilities per layer.
Run = Sequence[Tensor]


def quantize(attentions: Run) -> Tensor:
    """Per-layer weights in [0, 1], e.g. (H, L, L) each, as (layers, ...) uint8 0-255 bytes."""
    stacked = torch.stack([a.float() for a in attentions])
    return (stacked.clamp(0, 1) * 255).round().to(torch.uint8)


def head_view_html(
    tokens: Sequence[str],
    attentions: Run | Mapping[str, Run],
    *,
    title: str = "attnkit head view",
    threshold: float | None = None,
    sinks: bool = False,
    vectors: Mapping[str, Tensor] | None = None,
    query: int | None = None,
    head: int = 0,
    layer: int | None = None,
    query_tokens: Sequence[str] | None = None,
) -> str:
    """The page as a string.

    Args:
        tokens: the Lk tokens attended to (keys), and the queries unless ``query_tokens``.
        attentions: one (H, Lq, Lk) tensor of probabilities per layer; or several such runs
            of the same text by name (e.g. {"full attention": ..., "sliding_window(2, 2)":
            ...}), the first shown first.
        title: page title.
        threshold: lines below this weight are hidden (default: 0.02, or 0.1 past 100 tokens).
        sinks: the model has attention sinks, so rows sum to less than 1: the rest is drawn as
            lines to one more key, "(sink)".
        vectors: the first run's queries, keys and values, {"q": (layers, H, Lq, d), "k":
            (layers, H, Lk, d), "v": (layers, H, Lk, dv)}, scored with the scale 1/√d: the
            page then has a neuron view of how one query scores every key. A few MB past
            100 tokens.
        query: the neuron view's first query token (default: the last).
        head: the neuron view's first head.
        layer: the layer shown first (default: the last).
        query_tokens: the Lq query tokens of cross-attention (a decoder's, over an encoder's
            ``tokens``); None: self-attention, the queries are ``tokens``.
    """
    runs = dict(attentions) if isinstance(attentions, Mapping) else {"attention": attentions}
    queries = tokens if query_tokens is None else query_tokens
    if not runs:
        raise ValueError("head_view_html needs at least one run of attention maps")
    for name, run in runs.items():
        arg = f"attentions[{name!r}]" if isinstance(attentions, Mapping) else "attentions"
        if len(run) == 0:
            raise ValueError(f"{arg} has no layers: one (H, Lq, Lk) map per layer expected")
        for n, weights in enumerate(run):
            check_attention_map(f"{arg}[{n}]", weights, len(queries), len(tokens))
            if weights.shape != run[0].shape:
                seen = f"{tuple(run[0].shape)}, then {tuple(weights.shape)} at {n}"
                raise ValueError(f"{arg}'s layers differ in (H, Lq, Lk): {seen}")
    quantized = [quantize(run) for run in runs.values()]
    shapes = {name: tuple(q.shape) for name, q in zip(runs, quantized, strict=True)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"runs differ in (layers, heads, Lq, Lk): {shapes}")
    n_layers, H, Lq, Lk = quantized[0].shape
    L = max(Lq, Lk)
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the maps have layers 0..{n_layers - 1}")
    q = torch.stack(quantized)  # (runs, layers, H, L, L)
    data = {
        "tokens": list(tokens),
        "query_tokens": None if query_tokens is None else list(query_tokens),
        "runs": list(runs),
        "layers": n_layers,
        "heads": H,
        "threshold": threshold if threshold is not None else (0.02 if L <= 100 else 0.1),
        "initial_heads": None if L <= 100 else [0],
        "initial_layer": n_layers - 1 if layer is None else layer,
        "weights": base64.b64encode(q.numpy().tobytes()).decode("ascii"),
        "sink": None,
        "vectors": None
        if vectors is None
        else _vectors(vectors, (n_layers, H, Lq, Lk), query, head),
    }
    if sinks:  # (runs, layers, H, L): each row's weight on no token, bytes as the weights
        shares = torch.stack(
            [quantize([1 - a.float().sum(-1) for a in run]) for run in runs.values()]
        )
        data["sink"] = base64.b64encode(shares.numpy().tobytes()).decode("ascii")
    # the JSON sits inside <script>: escape "</" so a token cannot close the element
    payload = json.dumps(data).replace("</", "<\\/")
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__SVGNS__", "http://www.w3.org/2000/svg")  # an XML namespace, never fetched
        .replace("__DATA__", payload)
    )


def _vectors(
    vectors: Mapping[str, Tensor], sizes: tuple[int, int, int, int], query: int | None, head: int
) -> dict[str, object]:
    """The neuron view's data: q, k, v as base64 float32 bytes, its scale and first choice.

    ``sizes``: the maps' (layers, H, Lq, Lk).
    """
    if set(vectors) != {"q", "k", "v"}:
        raise ValueError(f"vectors must hold 'q', 'k' and 'v', got {sorted(vectors)}")
    shapes = {name: tuple(t.shape) for name, t in vectors.items()}
    q, k, v = shapes["q"], shapes["k"], shapes["v"]
    n_layers, H, Lq, Lk = sizes
    fits = len(q) == len(k) == len(v) == 4 and q[:3] == (n_layers, H, Lq)
    if not fits or k[:3] != (n_layers, H, Lk) or v[:3] != k[:3] or k[3] != q[3]:
        raise ValueError(
            "vectors must be q (layers, H, Lq, d), k (layers, H, Lk, d) and v (layers, H, Lk, "
            f"dv) with (layers, H, Lq, Lk) = {sizes} as the maps; got {shapes}"
        )
    if not all(bool(torch.isfinite(t).all()) for t in vectors.values()):
        raise ValueError("vectors hold NaN or inf")
    query = Lq - 1 if query is None else query
    if not (0 <= query < Lq and 0 <= head < H):
        raise ValueError(f"query {query} and head {head} must index the {Lq} queries, {H} heads")

    def raw(t: Tensor) -> str:
        return base64.b64encode(t.detach().float().contiguous().numpy().tobytes()).decode("ascii")

    return {
        **{name: raw(t) for name, t in vectors.items()},
        "d": q[3],
        "dv": v[3],
        "scale": q[3] ** -0.5,
        "query": query,
        "head": head,
    }


def save_head_view(
    tokens: Sequence[str], attentions: Run | Mapping[str, Run], path: str | Path, **kwargs: object
) -> Path:
    """Write ``head_view_html(...)`` to ``path``."""
    out = Path(path)
    out.write_text(head_view_html(tokens, attentions, **kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return out
