"""Induction prompts: a random token sequence repeated; the model predicts the next token of the
repeat by finding its earlier occurrence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import PromptError
from .promptset import PromptSet

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["induction"]


def induction(
    model: "Model", n: int = 16, *, seq_len: int = 10, seed: int = 0, vocab_range: tuple[int, int] | None = None
) -> PromptSet:
    """Pairs ``[r_1..r_L, r_1..r_{L-1}]`` -> ``r_L`` (clean) and ``[s_1..s_L, r_1..r_{L-1}]``
    (corrupted: the first copy re-drawn). Answer ``r_L``; alternative ``s_L``, what induction
    would predict on the corrupted prompt. Tokens are drawn (seeded) from ``vocab_range``
    (default: ids 1000-10000, or the whole vocabulary of small models), all distinct within a
    prompt.
    """
    if seq_len < 2:
        raise PromptError(f"seq_len={seq_len}: need at least 2 tokens to repeat.")
    vocab = model.vocab_size
    lo, hi = vocab_range or ((1000, min(10000, vocab)) if vocab > 10000 else (2, vocab))
    if hi - lo < 2 * seq_len:
        raise PromptError(f"vocab_range ({lo}, {hi}) is too small for {2 * seq_len} distinct tokens.")
    g = torch.Generator().manual_seed(seed)
    clean, corrupted, ans, alt = [], [], [], []
    for _ in range(n):
        toks = lo + torch.randperm(hi - lo, generator=g)[: 2 * seq_len]
        r, s = toks[:seq_len], toks[seq_len:]
        clean.append(torch.cat([r, r[:-1]]))
        corrupted.append(torch.cat([s, r[:-1]]))
        ans.append(int(r[-1]))
        alt.append(int(s[-1]))
    return PromptSet.from_ids(clean, corrupted, ans, alt, name="induction",
                              meta={"builder": "induction", "seed": seed, "seq_len": seq_len})
