"""Attention step by step on four tokens: Q, K, V -> scores -> ÷√d -> softmax -> weighted sum.

Run: python examples/walkthrough.py   (what `make demo` runs until `attnkit explain` lands)
"""

from __future__ import annotations

import math

import torch

import attnkit
from attnkit import masks

torch.manual_seed(0)
tokens = ["The", "surgeon", "operated", "carefully"]
L, E, D = len(tokens), 8, 4
torch.set_printoptions(precision=2, sci_mode=False)

x = torch.randn(L, E)  # one embedding per token
W_q, W_k, W_v = (torch.randn(E, D) / math.sqrt(E) for _ in range(3))
Q, K, V = x @ W_q, x @ W_k, x @ W_v
print("tokens:", tokens)
print("1. each token asks a question (query), offers a key and carries a value:")
print("Q =\n", Q, "\nK =\n", K, "\nV =\n", V)

scores = Q @ K.T
print("\n2. scores[i, j] = Q[i]·K[j]: how well token j's key answers token i's query\n", scores)
scaled = scores / math.sqrt(D)
print(f"\n3. divide by √d = {math.sqrt(D):.1f} so softmax does not saturate as d grows\n", scaled)
causal = masks.causal().dense(L, L)[0, 0]
scaled = scaled.masked_fill(~causal, float("-inf"))
print("\n4. causal mask: token i may not look at later tokens (-inf)\n", scaled)
weights = scaled.softmax(dim=-1)
print("\n5. softmax turns each row into attention weights that sum to 1\n", weights)
out = weights @ V
print("\n6. output = weighted sum of values\n", out)

for i, tok in enumerate(tokens):
    top = weights[i].argmax().item()
    print(f"   {tok!r:12} attends most to {tokens[top]!r} ({weights[i, top]:.0%})")

same = attnkit.attention(Q[None, None], K[None, None], V[None, None], mask=masks.causal())
print("\nattnkit.attention gives the same output:", torch.allclose(same[0, 0], out, atol=1e-6))
print("\nThe causal mask's tiles for 1,000 tokens in 128x128 tiles:")
print(masks.causal().blocks(1000, 1000, 128, 128))
