"""Translate human-written dates into ISO dates with an encoder–decoder transformer on attnkit.

    python examples/translate_dates.py [--minutes 5] [--out out/dates]
    python examples/translate_dates.py --load out/dates/dates.pt "march 3rd 1998" "4/7/76"
    python examples/translate_dates.py --load out/dates/dates.pt --beams 3 "4/7/76"

"Tuesday, 3 March 1998", "03/03/98", "march 3rd 1998", "3.3.1998" ... -> "1998-03-03".
Characters in, characters out. The decoder's cross-attention reads the encoder's keys and
values: the saved picture (and HTML page) shows which source characters each output digit
attends to.
Dates are split into train and test sets, so every test date is unseen in any format.
Conventions: slashes are month/day (US), dots and dashes day.month; two-digit years are
1950-2049.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.explain import decoder_cross_attention
from attnkit.nn import Transformer, load_checkpoint, save_checkpoint

MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
FIRST, LAST = dt.date(1950, 1, 1), dt.date(2049, 12, 31)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _formats(d: dt.date) -> list[str]:
    month, mon = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    day, dy = DAYS[d.weekday()], DAYS[d.weekday()][:3]
    yy = f"{d.year % 100:02d}"
    return [
        f"{day.title()}, {d.day} {month.title()} {d.year}",  # Tuesday, 3 March 1998
        f"{d.month:02d}/{d.day:02d}/{yy}",  # 03/03/98
        f"{month} {ordinal(d.day)} {d.year}",  # march 3rd 1998
        f"{d.day} {mon.title()} {d.year}",  # 3 Mar 1998
        f"{month.title()} {d.day}, {d.year}",  # March 3, 1998
        f"{d.day}.{d.month}.{d.year}",  # 3.3.1998
        f"{mon.title()} {d.day} {yy}",  # Mar 3 98
        f"{d.month}/{d.day}/{d.year}",  # 3/3/1998
        f"the {ordinal(d.day)} of {month.title()}, {d.year}",  # the 3rd of March, 1998
        f"{day.upper()} {month.upper()} {d.day} {d.year}",  # TUESDAY MARCH 3 1998
        f"{d.year}/{d.month:02d}/{d.day:02d}",  # 1998/03/03
        f"{d.day}-{mon.title()}-{d.year}",  # 3-Mar-1998
        f"{dy.title()} {d.day} {mon.title()} {d.year}",  # Tue 3 Mar 1998
        f"{d.day:02d}.{d.month:02d}.{yy}",  # 03.03.98
        f"{month} {d.day} {d.year}",  # march 3 1998
        f"{ordinal(d.day)} {month} {yy}",  # 3rd march 98
        f"{d.year}-{d.month}-{d.day}",  # 1998-3-3
    ]


N_FORMATS = len(_formats(FIRST))
CHARS = sorted(
    set("".join(f for d in (FIRST, dt.date(1999, 9, 29)) for f in _formats(d)))
    | set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,./-")
)
PAD, BOS, EOS = 0, 1, 2
STOI = {c: i + 3 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
VOCAB = len(STOI) + 3
SRC_LEN, TGT_LEN = 40, 11  # "yyyy-mm-dd" + EOS


def encode(text: str, length: int) -> list[int]:
    ids = [STOI[c] for c in text][:length]
    return ids + [PAD] * (length - len(ids))


def decode(ids: list[int]) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        out.append(ITOS.get(i, "?"))
    return "".join(out)


def split_dates(seed: int = 0, test_fraction: float = 0.1) -> tuple[list[dt.date], list[dt.date]]:
    """Every date of 1950-2049, shuffled and split: test dates never appear in training."""
    days = [FIRST + dt.timedelta(n) for n in range((LAST - FIRST).days + 1)]
    random.Random(seed).shuffle(days)
    cut = int(len(days) * test_fraction)
    return days[cut:], days[:cut]


def batch(dates: list[dt.date], rng: random.Random, size: int) -> tuple[torch.Tensor, ...]:
    """(src (B, SRC_LEN), decoder input (B, TGT_LEN), target (B, TGT_LEN)) with random formats."""
    src, tgt = [], []
    for d in rng.choices(dates, k=size):
        src.append(encode(rng.choice(_formats(d)), SRC_LEN))
        tgt.append([STOI[c] for c in d.isoformat()] + [EOS])
    target = torch.tensor(tgt)
    dec_in = torch.cat([torch.full((size, 1), BOS), target[:, :-1]], dim=1)
    return torch.tensor(src), dec_in, target


def make_model() -> Transformer:
    return Transformer(
        VOCAB,
        VOCAB,
        d_model=128,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=256,
        max_len=64,
        pad_id=PAD,
    )


def train(
    model: Transformer,
    dates: list[dt.date],
    *,
    steps: int,
    minutes: float,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
) -> list[float]:
    """AdamW with warm-up and cosine decay; stops at ``steps`` or the time budget."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    losses: list[float] = []
    deadline = time.monotonic() + 60 * minutes
    model.train()
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task("training", total=steps)
    try:
        for _ in range(steps):
            src, dec_in, target = batch(dates, rng, batch_size)
            logits = model(src, dec_in)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(task, advance=1, description=f"training, loss {loss.item():.4f}")
            if time.monotonic() > deadline:
                break
    finally:
        if bar is not None:
            bar.stop()
    model.eval()
    return losses


def evaluate(model: Transformer, dates: list[dt.date]) -> tuple[float, dict[int, float]]:
    """Exact-match accuracy over every (test date, format) pair, overall and per format."""
    per_format = {}
    correct = total = 0
    for f in range(N_FORMATS):
        src = torch.tensor([encode(_formats(d)[f], SRC_LEN) for d in dates])
        preds = model.generate(src, bos_id=BOS, eos_id=EOS, max_len=TGT_LEN)
        ok = sum(decode(p) == d.isoformat() for p, d in zip(preds.tolist(), dates, strict=True))
        per_format[f] = ok / len(dates)
        correct, total = correct + ok, total + len(dates)
    return correct / total, per_format


def translate(model: Transformer, text: str) -> str:
    """Greedy translation of one text."""
    src = torch.tensor([encode(text, SRC_LEN)])
    return decode(model.generate(src, bos_id=BOS, eos_id=EOS, max_len=TGT_LEN)[0].tolist())


def n_best(model: Transformer, text: str, beams: int) -> list[tuple[str, float]]:
    """The ``beams`` most probable translations of one text (beam search), with their
    probabilities (length_penalty 0: scores are log-probabilities)."""
    src = torch.tensor([encode(text, SRC_LEN)])
    found = model.beam_search(
        src, bos_id=BOS, eos_id=EOS, num_beams=beams, max_len=TGT_LEN, length_penalty=0.0
    )
    pairs = zip(found.tokens[0].tolist(), found.scores[0].tolist(), strict=True)
    return [(decode(tokens), math.exp(score)) for tokens, score in pairs]


def cross_attention(
    model: Transformer, text: str
) -> tuple[str, list[torch.Tensor], dict[str, torch.Tensor]]:
    """The translation of ``text``, each decoder layer's cross-attention while writing it,
    (H, output chars, source chars) per layer (the decoder reads <bos> then each char), and
    the queries, keys and values it attended with: {"q", "k", "v"}, (layers, H, chars, d).
    """
    src = torch.tensor([encode(text, SRC_LEN)])
    pred = model.generate(src, bos_id=BOS, eos_id=EOS, max_len=TGT_LEN)[0].tolist()
    answer = decode(pred)
    found = decoder_cross_attention(model, src, torch.tensor([[BOS, *pred[: len(answer)]]]))
    T, S = len(answer), len(text)  # (the source is padded to SRC_LEN)
    vectors = {"q": found.vectors["q"][:, :, :T]}
    vectors |= {name: found.vectors[name][:, :, :S] for name in "kv"}
    return answer, [w[:, :T, :S] for w in found.weights], vectors


def save_alignment(model: Transformer, text: str, path: Path) -> str:
    """Picture of the last decoder layer's cross-attention (mean over heads) for one input,
    and beside it (``path`` with .html) every layer and head's in the HTML head view."""
    from attnkit.viz import save_head_view
    from attnkit.viz.patterns import _pyplot

    answer, weights, vectors = cross_attention(model, text)
    save_head_view(
        list(text),
        weights,
        path.with_suffix(".html"),
        title=f"cross-attention: {text!r} -> {answer!r}",
        query_tokens=list(answer),
        vectors=vectors,  # the neuron view: how each output character's query scores the source
    )
    att = weights[-1].mean(0)  # (out chars, source chars)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.32 * len(text) + 2, 0.32 * len(answer) + 1.5))
    ax.imshow(att.numpy(), cmap="Blues")
    ax.set_xticks(range(len(text)), list(text))
    ax.set_yticks(range(len(answer)), list(answer))
    ax.set_title(f"cross-attention: {text!r} -> {answer!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # ~1,750 steps fit the 5-minute budget on a 2-core machine: the schedule anneals in time
    ap.add_argument("--steps", type=int, default=1700)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--out", default="out/dates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", help="a saved checkpoint: translate the given texts with it")
    ap.add_argument("texts", nargs="*", help="dates to translate with --load")
    ap.add_argument(
        "--beams", type=int, default=1, help="with --load: show the n best (beam search)"
    )
    args = ap.parse_args()
    if args.load:
        model = load_checkpoint(args.load).model
        assert isinstance(model, Transformer)
        for text in args.texts or ["Tuesday, 3 March 1998"]:
            if args.beams > 1:
                best = ", ".join(f"{t!r} {p:.3g}" for t, p in n_best(model, text, args.beams))
                print(f"{text!r} -> {best}")
            else:
                print(f"{text!r} -> {translate(model, text)!r}")
        return
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dates, test_dates = split_dates(args.seed)
    model = make_model()
    print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {N_FORMATS} formats, "
        f"{len(train_dates)} training dates, {len(test_dates)} unseen test dates"
    )
    start = time.monotonic()
    losses = train(model, train_dates, steps=args.steps, minutes=args.minutes, seed=args.seed)
    took = time.monotonic() - start
    acc, per_format = evaluate(model, test_dates[:500])
    print(f"trained {len(losses)} steps in {took:.0f} s, final loss {losses[-1]:.4f}")
    print(f"exact match on unseen dates, all {N_FORMATS} formats: {acc:.2%}")
    worst = min(per_format, key=lambda f: per_format[f])
    print(f"worst format: {_formats(test_dates[0])[worst]!r} style, {per_format[worst]:.2%}")
    for text in ("Tuesday, 3 March 1998", "03/03/98", "march 3rd 1998"):
        print(f"  {text!r} -> {translate(model, text)!r}")
    best = ", ".join(f"{t!r} {p:.3g}" for t, p in n_best(model, "4/7/76", 3))
    print(f"  the 3 most probable translations of '4/7/76' (beam search): {best}")
    picture = out / "cross_attention.png"
    save_alignment(model, "Tuesday, 3 March 1998", picture)
    checkpoint = out / "dates.pt"
    vocab = ["<pad>", "<bos>", "<eos>", *CHARS]  # id -> symbol
    save_checkpoint(checkpoint, model, vocab=vocab, meta={"exact_match": acc})
    print(f"wrote {picture}, {picture.with_suffix('.html')} and {checkpoint}")


if __name__ == "__main__":
    main()
