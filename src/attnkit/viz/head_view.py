"""Interactive head, model and neuron views (in the spirit of bertviz) as one HTML file.

The head view draws one layer's heads as lines from each query token to the tokens it attends
to; below it the model view shows every (layer, head) as a small Lq × Lk map, and clicking one
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
from importlib import resources
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from attnkit._validation import check_attention_map

#: The page's HTML, styles and script (``pages/head_view.html``); head_view_html fills in its
#: __PLACEHOLDERS__.
_PAGE = (resources.files("attnkit.viz") / "pages" / "head_view.html").read_text(encoding="utf-8")


#: One run's attention: an (H, Lq, Lk) tensor of probabilities per layer.
Run = Sequence[Tensor]
T = TypeVar("T")


def _stacked(attentions: Run) -> Tensor:
    """Per-layer maps as one float32 CPU tensor (layers, ...) (maps on a GPU too)."""
    return torch.stack([a.detach().float().cpu() for a in attentions])


def quantize(attentions: Run) -> Tensor:
    """Per-layer weights in [0, 1], e.g. (H, L, L) each, as (layers, ...) uint8 0-255 bytes."""
    return (_stacked(attentions).clamp(0, 1) * 255).round().to(torch.uint8)


def head_view_html(
    tokens: Sequence[str],
    attentions: Run | Mapping[str, Run],
    *,
    title: str = "attnkit head view",
    threshold: float | None = None,
    sinks: bool = False,
    vectors: Mapping[str, Tensor] | Mapping[str, Mapping[str, Tensor]] | None = None,
    query: int | None = None,
    head: int = 0,
    layer: int | None = None,
    query_tokens: Sequence[str] | None = None,
    signed: bool = False,
    rollout: Tensor | Mapping[str, Tensor] | None = None,
    roles: Sequence[Sequence[str]] | Mapping[str, Sequence[Sequence[str]]] | None = None,
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
        vectors: a run's queries, keys and values, {"q": (layers, H, Lq, d), "k":
            (layers, H, Lk, d), "v": (layers, H, Lk, dv)} (kv heads repeated for GQA), and
            optionally "mask": bool (Lq, Lk), True = attend (a causal LM's): the page then
            has a neuron view of how one query scores every key, softmax(q·kᵀ/√d) over the
            keys the mask leaves. Refused unless that gives the run's weights (another
            scale, score mods or sinks would be drawn wrong). A few MB past 100 tokens. One
            such dict is the first run's; several runs' are a dict of them by run name.
        query: the neuron view's first query token (default: the last).
        head: the neuron view's first head.
        layer: the layer shown first (default: the last).
        query_tokens: the Lq query tokens of cross-attention (a decoder's, over an encoder's
            ``tokens``); None: self-attention, the queries are ``tokens``.
        signed: the maps are differential attention's A1 − λ·A2, in [-1, 1]; negative
            weights are drawn as 0.
        rollout: each run's attention rollout (``attnkit.explain.rollout``), (layers, L, L)
            with rows summing to 1, drawn as one more column of the model view; one tensor
            for a single run, else one per run by name.
        roles: a few words per head of each layer, [layer][head] (e.g. ``head_roles``'
            "previous token 1.00"), shown when the pointer rests on its model-view cell or
            its head's toggle; one list for a single run, else one per run by name.
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
            check_attention_map(f"{arg}[{n}]", weights, len(queries), len(tokens), signed)
            if weights.shape != run[0].shape:
                seen = f"{tuple(run[0].shape)}, then {tuple(weights.shape)} at {n}"
                raise ValueError(f"{arg}'s layers differ in (H, Lq, Lk): {seen}")
    quantized = [quantize(run) for run in runs.values()]
    shapes = {name: tuple(q.shape) for name, q in zip(runs, quantized, strict=True)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"runs differ in (layers, heads, Lq, Lk): {shapes}")
    n_layers, H, Lq, Lk = quantized[0].shape
    L = max(Lq, Lk)  # the longer side sets the defaults below
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the maps have layers 0..{n_layers - 1}")
    q = torch.stack(quantized)  # (runs, layers, H, Lq, Lk)
    neuron = _neuron_view(vectors, runs, query, head)
    rolled = _rollout(rollout, runs, (n_layers, Lq, Lk))
    described = _roles(roles, runs, (n_layers, H))
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
        "rollout": rolled,
        "roles": described,
        **neuron,
    }
    if sinks:  # (runs, layers, H, Lq): each row's weight on no token, bytes as the weights
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


def _every_run(given: T | Mapping[str, T], runs: Mapping[str, Run], what: str) -> Mapping[str, T]:
    """``given`` by run name: one value is the single run's; a mapping must name every run."""
    per_run: Mapping[str, T] = given if isinstance(given, Mapping) else {next(iter(runs)): given}
    if set(per_run) != set(runs):
        raise ValueError(f"{what} must be given for every run, {list(runs)}; got {list(per_run)}")
    return per_run


def _rollout(
    rollout: Tensor | Mapping[str, Tensor] | None,
    runs: Mapping[str, Run],
    sizes: tuple[int, int, int],
) -> str | None:
    """Every run's rollout maps (runs, layers, L, L) as base64 bytes, or None without."""
    if rollout is None:
        return None
    per_run = _every_run(rollout, runs, "rollout")
    for name, maps in per_run.items():
        if tuple(maps.shape) != sizes or sizes[1] != sizes[2]:
            raise ValueError(
                f"rollout[{name!r}] must be (layers, L, L) = {sizes} as the self-attention "
                f"maps, got {tuple(maps.shape)}"
            )
        rows = maps.detach().double().sum(-1)
        if bool((maps < 0).any()) or not torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
            raise ValueError(f"rollout[{name!r}] must hold weights ≥ 0 whose rows sum to 1")
    data = torch.stack([quantize(list(per_run[name])) for name in runs])
    return base64.b64encode(data.numpy().tobytes()).decode("ascii")


def _roles(
    roles: Sequence[Sequence[str]] | Mapping[str, Sequence[Sequence[str]]] | None,
    runs: Mapping[str, Run],
    sizes: tuple[int, int],
) -> list[list[list[str]]] | None:
    """Every run's words per (layer, head), or None without."""
    if roles is None:
        return None
    per_run = _every_run(roles, runs, "roles")
    for name, words in per_run.items():
        found = (len(words), *{len(layer) for layer in words})
        if found != sizes or not all(isinstance(w, str) for layer in words for w in layer):
            raise ValueError(
                f"roles[{name!r}] must hold (layers, heads) = {sizes} strings, got {found}"
            )
    return [[list(layer) for layer in per_run[name]] for name in runs]


def _neuron_view(
    vectors: Mapping[str, Tensor] | Mapping[str, Mapping[str, Tensor]] | None,
    runs: Mapping[str, Run],
    query: int | None,
    head: int,
) -> dict[str, object]:
    """The page's "vectors" (one entry per run, or None) and the neuron view's first choice."""
    per_run: Mapping[str, Mapping[str, Tensor]] = {}
    if vectors and all(isinstance(t, Tensor) for t in vectors.values()):
        per_run = {next(iter(runs)): vectors}  # type: ignore[dict-item]
    elif vectors:
        per_run = vectors  # type: ignore[assignment]
    if unknown := set(per_run) - set(runs):
        raise ValueError(f"vectors for runs {sorted(unknown)}, but the runs are {list(runs)}")
    H, Lq, _ = next(iter(runs.values()))[0].shape
    query = Lq - 1 if query is None else query
    if per_run and not (0 <= query < Lq and 0 <= head < H):
        raise ValueError(f"query {query} and head {head} must index the {Lq} queries, {H} heads")
    return {
        "vectors": [  # a run's maps stacked only where it has vectors (512 tokens: 75 MB)
            _vectors(per_run[name], _stacked(run), name) if name in per_run else None
            for name, run in runs.items()
        ],
        "neuron": {"query": query, "head": head},
    }


def _vectors(vectors: Mapping[str, Tensor], maps: Tensor, run: str) -> dict[str, object]:
    """One run's vectors as base64 float32 bytes, with their sizes, scale and mask.

    ``maps``: the run's weights (layers, H, Lq, Lk), which the vectors must give.
    """
    sizes = tuple(maps.shape)
    if not {"q", "k", "v"} <= set(vectors) <= {"q", "k", "v", "mask"}:
        raise ValueError(f"vectors must hold 'q', 'k', 'v' (and a 'mask'), got {sorted(vectors)}")
    mask = vectors.get("mask")
    vectors = {name: vectors[name] for name in "qkv"}
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
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != sizes[2:]):
        raise ValueError(
            f"vectors' mask must be bool (Lq, Lk) = {sizes[2:]}, True = attend; got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    q_, k_ = (vectors[n].detach().double().cpu() for n in "qk")
    scores = q_ @ k_.transpose(-1, -2) * q[3] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.cpu(), float("-inf"))
    scored = scores.softmax(-1).nan_to_num()  # a query with no key: no weight
    if (gap := float((scored - maps.double()).abs().max())) > 1e-3:
        raise ValueError(
            f"softmax(q·kᵀ/√d) over the vectors differs from the weights of run {run!r} by up "
            f"to {gap:.3g}: the neuron view draws attention scaled by 1/√d under the vectors' "
            "mask, if any (another mask, another scale, or vectors of another run?)"
        )

    def raw(t: Tensor) -> str:
        data = t.detach().float().cpu().contiguous().numpy().tobytes()
        return base64.b64encode(data).decode("ascii")

    return {
        **{name: raw(t) for name, t in vectors.items()},
        "mask": None if mask is None else mask.cpu().int().flatten().tolist(),
        "d": q[3],
        "dv": v[3],
        "scale": q[3] ** -0.5,
    }


def save_head_view(
    tokens: Sequence[str], attentions: Run | Mapping[str, Run], path: str | Path, **kwargs: object
) -> Path:
    """Write ``head_view_html(...)`` to ``path``."""
    out = Path(path)
    out.write_text(head_view_html(tokens, attentions, **kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return out
