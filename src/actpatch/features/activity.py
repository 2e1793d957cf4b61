"""Where features are active: the most active features on a prompt set, and for one feature
the prompts and tokens where it is most active (the first thing to read about a feature).

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> from actpatch.features import Dictionary, top_features, top_activations
    >>> m = tiny_model("llama")
    >>> d = Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=32, seed=0)
    >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
    >>> len(top_features(m, d, ps, 3))
    3
    >>> ex = top_activations(m, d, ps, top_features(m, d, ps, 1)[0], n=2)
    >>> [e.side for e in ex] in (["clean", "clean"], ["clean", "corrupted"], ["corrupted", "clean"], ["corrupted", "corrupted"])
    True
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager, Iterator

import torch

from ..errors import DictionaryError
from ..hooks import capture
from .attach import attach

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from ..prompts.promptset import PromptSet
    from .dictionary import Dictionary

__all__ = ["FeatureExample", "feature_activations", "top_features", "top_activations"]


@dataclass(frozen=True)
class FeatureExample:
    """One place where a feature is active: prompt, side, token position, its activation."""

    prompt: int
    side: str
    pos: int
    token: str
    activation: float
    context: str
    """The prompt's text up to and including the token (the token in [brackets])."""


def _attached(model: "Model", d: "Dictionary") -> ContextManager[None]:
    """``d`` attached for the duration (already attached: nothing to do)."""
    if model.dictionaries.get(d.site) is d:
        return nullcontext()
    if d.site in model.dictionaries:
        raise DictionaryError(f"Another dictionary is attached at {d.site}; detach it to read {d.label}.")
    return attach(model, d)


def feature_activations(model: "Model", d: "Dictionary", prompts: "PromptSet",
                        sides: tuple[str, ...] = ("clean", "corrupted")) -> Iterator[tuple[int, str, torch.Tensor]]:
    """``(prompt index, side, (T, n_features) activations)`` for every prompt of ``prompts``."""
    site = d.feature_site
    with _attached(model, d), capture(model, [site]) as acts:
        for group in prompts.groups():
            for side in sides:
                model.logits(getattr(group, side), last_only=True)
                for row, i in enumerate(group.indices.tolist()):
                    yield i, side, acts[site][row].float()


def top_features(model: "Model", d: "Dictionary", prompts: "PromptSet", k: int) -> list[int]:
    """The ``k`` features with the largest activation anywhere on the prompts (both sides),
    most active first (features never active are not returned, so fewer may come back)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DictionaryError(f"features={k!r}: give how many of the most active features to patch (k >= 1).")
    best = torch.zeros(d.n_features)
    for _, _, a in feature_activations(model, d, prompts):
        best = torch.maximum(best, a.max(dim=0).values.cpu())
    order = best.argsort(descending=True, stable=True)[:k]
    return [int(i) for i in order if best[i] > 0]


def top_activations(model: "Model", d: "Dictionary", prompts: "PromptSet", feature: int,
                    n: int = 5) -> list[FeatureExample]:
    """The ``n`` (prompt, side, token) places where ``feature`` is most active."""
    d.feature(feature)  # range check
    found: list[tuple[float, int, str, int]] = []
    for i, side, a in feature_activations(model, d, prompts):
        col = a[:, feature]
        for pos in col.nonzero().flatten().tolist():
            found.append((float(col[pos]), i, side, pos))
    found.sort(key=lambda t: -t[0])
    out = []
    for act, i, side, pos in found[:n]:
        ids = (prompts.clean if side == "clean" else prompts.corrupted)[i].tolist()
        toks = [model.token_str(t) for t in ids[: pos + 1]]
        context = "".join(toks[:-1]) + f"[{toks[-1]}]"
        out.append(FeatureExample(i, side, pos, toks[-1], act, context))
    return out
