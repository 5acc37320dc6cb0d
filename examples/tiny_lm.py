"""A tiny character-level language model on attnkit: full vs sliding-window attention.

    python examples/tiny_lm.py [--minutes 2] [--window 32] [--sinks] [--latent] [--gate]
        [--differential] [--out …]
    python examples/tiny_lm.py --load out/tiny_lm/window.pt \
        --prompt "The skilled surgeon operated on the patient with a"
    attnkit explain --checkpoint out/tiny_lm/window.pt --html out/tiny_lm/heads.html

Trains the same model twice on the Book of Genesis (King James Version, public domain,
examples/data/genesis_kjv.txt), once with full causal attention and once with a causal
sliding window (``--sinks``: again with a learned attention-sink logit per head, as in
gpt-oss; ``--latent``: again with multi-head latent attention, as DeepSeek; ``--gate``: again
with sigmoid-gated head outputs, as Qwen3-Next; ``--differential``: again with differential
attention, as the DIFF Transformer), under the same time budget; saves the loss curves in
one PNG; generates text with the KV cache; and for a prompt prints the continuation and which
earlier words the last layer attended to.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit import masks
from attnkit.nn import CausalLM, LatentSizes, load_checkpoint, save_checkpoint

TEXT = Path(__file__).resolve().parent / "data" / "genesis_kjv.txt"
SEQ = 128


class Chars:
    """Character vocabulary of the corpus; unknown characters map to a space."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        space = self.index[" "]
        return torch.tensor([self.index.get(c, space) for c in text])

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


#: the variants of the sliding-window model, each a flag of the same name
VARIANTS = ("sinks", "latent", "gate", "differential")

#: latent attention at this width: 80 cached numbers per token per layer instead of 256
LATENT: LatentSizes = {"kv_rank": 64, "nope_dim": 16, "rope_dim": 16, "v_dim": 32}


def make_model(vocab: int, window: int | None, variant: str = "") -> CausalLM:
    """``variant``: "" (multi-head attention), "sinks", "latent", "gate" or "differential"."""
    mask = masks.sliding_window(window) if window else masks.causal()
    return CausalLM(
        vocab,
        d_model=128,
        nhead=4,
        num_layers=4,
        dim_feedforward=384,
        max_len=512,
        positions="rope",
        mask=mask,
        sinks=variant == "sinks",
        latent=LATENT if variant == "latent" else None,
        output_gate=variant == "gate",
        differential=variant == "differential",
    )


def batches(data: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    starts = torch.randint(0, len(data) - SEQ - 1, (size,), generator=gen)
    x = torch.stack([data[s : s + SEQ] for s in starts])
    y = torch.stack([data[s + 1 : s + SEQ + 1] for s in starts])
    return x, y


@torch.no_grad()
def val_loss(model: CausalLM, data: torch.Tensor) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(123)
    x, y = batches(data, 64, gen)
    logits, _ = model(x)
    model.train()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def train(
    model: CausalLM, train_data: torch.Tensor, val_data: torch.Tensor, minutes: float, label: str
) -> tuple[list[tuple[float, float]], float]:
    """Train for ``minutes``; returns [(seconds, validation loss), ...] and the final loss."""
    from rich.progress import Progress, TimeElapsedColumn

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    curve = [(0.0, val_loss(model, val_data))]
    start = time.monotonic()
    budget = 60 * minutes
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn()) as bar:
        task = bar.add_task(label, total=budget)
        step = 0
        while (elapsed := time.monotonic() - start) < budget:
            lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - elapsed / budget))
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = batches(train_data, 32, gen)
            logits, _ = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                curve.append((time.monotonic() - start, val_loss(model, val_data)))
                bar.update(
                    task,
                    completed=min(budget, time.monotonic() - start),
                    description=f"{label}: step {step}, val loss {curve[-1][1]:.3f}",
                )
    curve.append((time.monotonic() - start, val_loss(model, val_data)))
    model.eval()
    return curve, curve[-1][1]


def explain_prompt(model: CausalLM, chars: Chars, prompt: str, new_tokens: int) -> None:
    """Print a continuation and, per earlier word, the last layer's attention from the last
    prompt character (summed over the word's characters, averaged over heads)."""
    ids = chars.encode(prompt)[None]
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        temperature=0.7,
        top_k=10,
        generator=torch.Generator().manual_seed(0),
    )
    print(f"{prompt!r} -> {chars.decode(out[0, ids.shape[1] :].tolist())!r}")
    with torch.no_grad():
        _, weights = model(ids, need_weights=True)
    last = weights[-1][0, :, -1].mean(0)  # (L,) from the last prompt character
    words, scores, start = [], [], 0
    for piece in prompt.split(" "):  # a word's own characters; the spaces are shown apart
        words.append(piece)
        scores.append(float(last[start : start + len(piece)].sum()))
        start += len(piece) + 1
    words.append("(spaces)")
    scores.append(float(last.sum()) - sum(scores))
    if model.config.get("sinks"):  # the weight no key took
        words.append("(sink)")
        scores.append(1.0 - float(last.sum()))
    ranked = sorted(zip(words, scores, strict=True), key=lambda p: -p[1])
    # differential weights are A1 − λ·A2: a row sums to 1 − λ and may go below zero
    what = "differential attention" if model.config.get("differential") else "attention"
    print(
        f"last layer, from the final character, {what} per earlier word: "
        + ", ".join(f"{w} {s:.2f}" for w, s in ranked)
    )


def save_curves(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    from attnkit.viz.patterns import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([t for t, _ in curve], [v for _, v in curve], label=label)
    ax.set(
        xlabel="training seconds (2 CPU cores)",
        ylabel="validation loss (nats/char)",
        title="tiny LM on Genesis: full vs sliding-window attention",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="training budget per model")
    ap.add_argument("--window", type=int, default=32, help="sliding window (characters back)")
    ap.add_argument("--sinks", action="store_true", help="also train the window with sinks")
    ap.add_argument(
        "--latent", action="store_true", help="also train the window with latent attention"
    )
    ap.add_argument("--gate", action="store_true", help="also train the window with output gates")
    ap.add_argument(
        "--differential",
        action="store_true",
        help="also train the window with differential attention",
    )
    ap.add_argument("--out", default="out/tiny_lm")
    ap.add_argument("--load", help="a checkpoint to load instead of training")
    ap.add_argument("--prompt", default="The skilled surgeon operated on the patient with a")
    ap.add_argument("--new-tokens", type=int, default=120)
    args = ap.parse_args()
    torch.manual_seed(0)
    text = TEXT.read_text()
    chars = Chars(text)
    if args.load:
        ckpt = load_checkpoint(args.load)
        assert isinstance(ckpt.model, CausalLM)
        assert ckpt.vocab == chars.chars, "the checkpoint was trained on another text"
        explain_prompt(ckpt.model, chars, args.prompt, args.new_tokens)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = chars.encode(text)
    split = int(0.9 * len(data))
    curves, models = {}, {}
    runs = [("full causal", None, "", "full.pt")]
    runs.append((f"sliding window {args.window}", args.window, "", "window.pt"))
    for variant in VARIANTS:
        if getattr(args, variant):
            label = f"sliding window {args.window} + {variant}"
            runs.append((label, args.window, variant, f"{variant}.pt"))
    for label, window, variant, name in runs:
        torch.manual_seed(0)
        model = make_model(len(chars.chars), window, variant)
        curves[label], final = train(model, data[:split], data[split:], args.minutes, label)
        models[label] = (model, window)
        print(f"{label}: validation loss {final:.3f} nats/char after {args.minutes} min")
        save_checkpoint(
            out / name,
            model,
            vocab=chars.chars,
            meta={"validation_loss": final, "minutes": args.minutes},
        )
    save_curves(curves, out / "loss_curves.png")
    for label, (model, _) in models.items():
        print(f"--- {label}")
        explain_prompt(model, chars, args.prompt, args.new_tokens)
    print(f"wrote {out / 'loss_curves.png'} and", ", ".join(str(out / r[3]) for r in runs))


if __name__ == "__main__":
    main()
