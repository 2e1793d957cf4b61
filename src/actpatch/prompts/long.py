"""Long prompts: any prompt set behind a distractor prefix of a chosen token length, and a
needle-style retrieval set (a fact stated once at the start, asked for after the filler).

The filler is neutral prose (sentences about a town, its weather and its routines, drawn in a
seeded order, with no names the builders use), so the task's own tokens stay where the
behaviour lives; named positions (``S1``, ``S2``, ``IO``, ``end`` ...) move with the prefix,
so sweeps over named positions read the same roles at 1,024 tokens as at 15.

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> m = tiny_model("llama")
    >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
    >>> long = ap.prompts.with_prefix(ps, [11, 12, 13])
    >>> long.clean[0].tolist(), long.corrupted[0].tolist()
    ([11, 12, 13, 2, 3, 4, 5], [11, 12, 13, 2, 9, 4, 5])
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PromptError
from .promptset import PromptSet

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["with_prefix", "long_context", "needle"]

FILLER = (
    "The town sits at the bend of a slow river.",
    "Most mornings begin with fog that lifts by nine.",
    "The bakery on the corner opens before sunrise.",
    "A narrow bridge links the market to the old mill.",
    "In autumn the hills turn a dull shade of copper.",
    "The library keeps its windows open in the summer.",
    "Buses leave the square every twenty minutes.",
    "Rain in the spring often lasts for several days.",
    "The council meets on the first evening of each month.",
    "Gardens behind the houses grow beans and squash.",
    "A clock tower rings the hour from the hill.",
    "Fishing boats return to the harbour in the afternoon.",
    "The school yard is quiet during the long holidays.",
    "Snow rarely stays on the streets for more than a day.",
    "The post office closes early on weekends.",
    "Children fly kites in the field beside the station.",
)


def _filler_ids(model: "Model", n_tokens: int, seed: int) -> list[int]:
    """Exactly ``n_tokens`` token ids of filler prose (sentences in a seeded order, cut at the end)."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        order = list(FILLER)
        rng.shuffle(order)
        for sentence in order:
            ids += model.to_tokens(" " + sentence)
    return ids[:n_tokens]


def with_prefix(prompts: PromptSet, prefix: Sequence[int] | torch.Tensor, *, after: int = 0,
                text: str | None = None) -> PromptSet:
    """``prompts`` with the token ids ``prefix`` inserted at index ``after`` (0: in front; 1:
    after a beginning-of-sequence token) of every clean and corrupted prompt; named positions
    at or after it move along. ``text``: the prefix as text, prepended to the recorded texts."""
    ids = torch.as_tensor(list(prefix) if not isinstance(prefix, torch.Tensor) else prefix, dtype=torch.long).flatten()
    if not isinstance(after, int) or after < 0:
        raise PromptError(f"with_prefix: after={after!r} must be an index >= 0.")
    n = ids.numel()
    attrs: list[dict[str, Any]] = []
    for i, a in enumerate(prompts.attributes):
        shortest = min(prompts.clean[i].numel(), prompts.corrupted[i].numel())
        if after >= shortest:
            raise PromptError(f"with_prefix: after={after} is past the start of prompt {i} ({shortest} tokens).")
        a = dict(a)
        for key in ("positions", "corrupted_positions"):
            if a.get(key):
                a[key] = {k: int(v) + n if int(v) >= after else int(v) for k, v in a[key].items()}
        attrs.append(a)

    def insert(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:after], ids.to(t.dtype), t[after:]])

    texts = prompts.texts
    if text is not None and texts:
        texts = tuple((text + c, text + k, *rest) for c, k, *rest in texts)
    meta = {**prompts.meta, "prefix_tokens": int(prompts.meta.get("prefix_tokens", 0)) + n}
    return dataclasses.replace(prompts, clean=tuple(insert(c) for c in prompts.clean),
                               corrupted=tuple(insert(k) for k in prompts.corrupted), attributes=tuple(attrs),
                               texts=texts, meta=meta)


def _bos_offset(model: "Model", prompts: PromptSet) -> int:
    """1 when every prompt starts with the tokenizer's beginning-of-sequence token, else 0."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    return int(bos is not None and all(int(c[0]) == bos and int(k[0]) == bos
                                        for c, k in zip(prompts.clean, prompts.corrupted)))


def long_context(model: "Model", prompts: PromptSet, n_tokens: int, *, seed: int = 0) -> PromptSet:
    """``prompts`` behind ``n_tokens`` tokens of neutral filler prose (after a leading
    beginning-of-sequence token, if the prompts have one): the sentences cut to length, then a
    paragraph break. E.g. IOI at 1,024 tokens: ``long_context(model, ap.prompts.ioi(model), 1010)``
    (IOI prompts have 14 tokens). Checks the model's context window."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise PromptError(f"long_context: n_tokens={n_tokens!r} must be a positive int (tokens of filler).")
    longest = int(torch.maximum(prompts.lengths, prompts.corrupted_lengths).max()) + n_tokens
    if model.context_length is not None and longest > model.context_length:
        raise PromptError(f"long_context: prompts of up to {longest} tokens exceed {model.name}'s context of "
                          f"{model.context_length}; use n_tokens <= {model.context_length - longest + n_tokens}.")
    brk = model.to_tokens("\n\n")
    ids = (_filler_ids(model, n_tokens - len(brk), seed) + brk)[-n_tokens:]
    return with_prefix(prompts, ids, after=_bos_offset(model, prompts))


COLOURS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink", "purple", "orange", "gray", "silver")


def needle(model: "Model", n: int = 8, n_tokens: int = 1024, *, seed: int = 0) -> PromptSet:
    """A retrieval set: "The secret colour is red." then filler, then "The secret colour is",
    answer " red"; the corrupted prompt's needle names another colour (the alternative). Exactly
    ``n_tokens`` tokens per prompt; named positions ``needle`` (the colour) and ``end``. The model
    must carry one token over the whole filler: attention over long distances."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PromptError(f"needle: n={n!r} must be a positive int.")
    rng = random.Random(seed)
    single = {c: model.to_tokens(" " + c) for c in COLOURS}
    colours = [c for c, ids in single.items() if len(ids) == 1]
    if len(colours) < 2:
        raise PromptError(f"needle: {model.name}'s tokenizer has fewer than two of {COLOURS} as single tokens.")
    head, dot = model.to_tokens("The secret colour is"), model.to_tokens(".")
    question = model.to_tokens(" The secret colour is")
    fill = n_tokens - len(head) - 1 - len(dot) - len(question)
    if fill < 1:
        raise PromptError(f"needle: n_tokens={n_tokens} leaves no room for filler; use n_tokens >= "
                          f"{n_tokens - fill + 1}.")
    clean, corrupted, answers, alternatives = [], [], [], []
    for i in range(n):
        a, b = rng.sample(colours, 2)
        filler = _filler_ids(model, fill, seed * 1000 + i)
        clean.append(head + single[a] + dot + filler + question)
        corrupted.append(head + single[b] + dot + filler + question)
        answers.append(single[a][0])
        alternatives.append(single[b][0])
    return PromptSet.from_ids(clean, corrupted, answers, alternatives, name="needle",
                              meta={"n_tokens": n_tokens, "seed": seed},
                              attributes=[{"positions": {"needle": len(head)}} for _ in range(n)])
