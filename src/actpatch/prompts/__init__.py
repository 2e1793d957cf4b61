"""Prompt sets and builders: ``ioi``, ``factual``, ``greater_than``, ``induction``; long prompts:
``long_context`` (any set behind filler), ``needle`` (retrieval over filler), ``with_prefix``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .factual import factual
from .greater_than import greater_than
from .induction import induction
from .ioi import ioi
from .long import long_context, needle, with_prefix
from .promptset import LengthGroup, PromptSet

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["PromptSet", "LengthGroup", "ioi", "factual", "greater_than", "induction", "correct_mask", "keep_correct",
           "with_prefix", "long_context", "needle"]


def correct_mask(model: "Model", prompts: PromptSet) -> torch.Tensor:
    """Per prompt, whether the model prefers the answer over the alternative on the clean prompt
    (for answers of several tokens: a higher teacher-forced log-probability)."""
    from ..metrics import Metric, compute_metrics

    ok = torch.zeros(len(prompts), dtype=torch.bool)
    for g in prompts.groups():
        logits = model.readout(g.clean, g.continuation)
        ld = compute_metrics([Metric.LOGIT_DIFF], logits, g.answers, g.alternatives, None, g.continuation)
        ok[g.indices] = (ld[Metric.LOGIT_DIFF] > 0).cpu()
    return ok


def keep_correct(model: "Model", prompts: PromptSet) -> tuple[PromptSet, float]:
    """Drop the prompts the model gets wrong; returns the kept set and the share it got right.

    Example:
        >>> import actpatch as ap
        >>> m = ap.load_model()
        >>> kept, share = ap.prompts.keep_correct(m, ap.prompts.ioi(m, n=8))
        >>> len(kept), share
        (8, 1.0)
    """
    ok = correct_mask(model, prompts)
    share = float(ok.float().mean())
    if not ok.any():
        from ..errors import PromptError

        raise PromptError("The model gets none of these prompts right; nothing left to patch.")
    return prompts.subset(ok.nonzero().flatten()), share

from .._arguments import checked_namespace  # noqa: E402

checked_namespace(globals(), __all__)  # wrong kinds of arguments: one clear error, before any work
