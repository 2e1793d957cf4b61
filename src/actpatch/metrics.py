"""Metrics on last-position logits, per prompt and vectorised, and their normalisation.

Conventions (GLOSSARY, "Metrics"): r = correct answer, r' = alternative.

=============  ========================================  ==========================
name           raw value per prompt                      notes
=============  ========================================  ==========================
logit_diff     logit(r) - logit(r')                      recommended; ~linear
logprob        log P(r)                                  saturates once r is top
prob           P(r)                                      floor at 0: hides negatives
kl             -KL(P_clean || P)                         clean = 0; tracks everything
rank           rank of r (0 = top)                       discrete; lower is better
accuracy       1 if r is the top token else 0            discrete
top5_accuracy  1 if r is among the top 5 else 0          discrete
=============  ========================================  ==========================

Normalised: ``(M_patched - M_corrupted) / (M_clean - M_corrupted)``: 1 = clean, 0 = corrupted.
"""

from __future__ import annotations

import enum
from typing import Callable, Protocol, Sequence

import torch

from .errors import MetricError

__all__ = ["Metric", "DIFFERENTIABLE", "parse_metrics", "compute_metrics", "normalise", "UNDEFINED_GAP", "Measurer"]


class Metric(str, enum.Enum):
    """A metric of the model's last-position output."""

    LOGIT_DIFF = "logit_diff"
    """logit(answer) - logit(alternative). Recommended (Z&N): continuous, linear in the residual."""
    LOGPROB = "logprob"
    """log P(answer). Saturates once the answer is the top guess."""
    PROB = "prob"
    """P(answer). Non-linear; cannot go below 0, so it hides negative components."""
    KL = "kl"
    """-KL(P_clean || P_patched): 0 at the clean run, tracks all changes of the distribution."""
    RANK = "rank"
    """Rank of the answer among all tokens (0 = top). Discrete; lower is better."""
    ACCURACY = "accuracy"
    """1 when the answer is the top token. Discrete."""
    TOP5_ACCURACY = "top5_accuracy"
    """1 when the answer is among the five top tokens. Discrete."""



DIFFERENTIABLE = (Metric.LOGIT_DIFF, Metric.LOGPROB, Metric.PROB, Metric.KL)
"""Metrics with a gradient (attribution patching needs one); rank, accuracy and top5 are discrete."""


_NAMES = ", ".join(m.value for m in Metric)


def parse_metrics(metric: str | Metric | Sequence[str | Metric]) -> list[Metric]:
    """One metric or several, validated; duplicates removed, order kept."""
    items = [metric] if isinstance(metric, (str, Metric)) else list(metric)
    if not items:
        raise MetricError(f"No metric given; use one or more of: {_NAMES}.")
    out: list[Metric] = []
    for m in items:
        try:
            mm = Metric(m)
        except ValueError:
            raise MetricError(f"Unknown metric {m!r}; use one of: {_NAMES}.") from None
        if mm not in out:
            out.append(mm)
    return out


def _rank(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    own = logits.gather(1, answers[:, None])
    return (logits > own).sum(1).to(logits.dtype)


_FNS: dict[Metric, Callable[..., torch.Tensor]] = {
    Metric.LOGIT_DIFF: lambda lg, lp, a, b: lg.gather(1, a[:, None])[:, 0] - lg.gather(1, b[:, None])[:, 0],
    Metric.LOGPROB: lambda lg, lp, a, b: lp.gather(1, a[:, None])[:, 0],
    Metric.PROB: lambda lg, lp, a, b: lp.gather(1, a[:, None])[:, 0].exp(),
    Metric.RANK: lambda lg, lp, a, b: _rank(lg, a),
    Metric.ACCURACY: lambda lg, lp, a, b: (_rank(lg, a) < 1).to(lg.dtype),
    Metric.TOP5_ACCURACY: lambda lg, lp, a, b: (_rank(lg, a) < 5).to(lg.dtype),
}


def compute_metrics(
    metrics: Sequence[Metric],
    logits: torch.Tensor,  # (B, vocab), last position
    answers: torch.Tensor,  # (B,)
    alternatives: torch.Tensor,  # (B,)
    clean_logprobs: torch.Tensor | None = None,  # (B, vocab), for KL
) -> dict[Metric, torch.Tensor]:
    """Raw metric values per prompt, ``{metric: (B,)}``, all from the same logits (float32)."""
    logits = logits.float()
    answers, alternatives = answers.to(logits.device), alternatives.to(logits.device)
    if clean_logprobs is not None:
        clean_logprobs = clean_logprobs.to(logits.device)
    needs_lp = any(m in (Metric.LOGPROB, Metric.PROB, Metric.KL) for m in metrics)
    logprobs = torch.log_softmax(logits, dim=-1) if needs_lp else logits  # unused when not needed
    out: dict[Metric, torch.Tensor] = {}
    for m in metrics:
        if m is Metric.KL:
            if clean_logprobs is None:
                raise MetricError("The kl metric needs the clean run's distribution (internal call without it).")
            out[m] = -(clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)
        else:
            out[m] = _FNS[m](logits, logprobs, answers, alternatives)
    return out


class Measure(Protocol):
    """What the engines call to score patched runs: (last-position logits (N, vocab), base-row
    index of each row (N,)) -> {metric: (N,)}; with ``compact=True`` the logits are only those
    of the measurer's ``tokens``. :class:`Measurer` is the implementation."""

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, compact: bool = False) -> dict[Metric, torch.Tensor]: ...


class Measurer:
    """Metrics of a batch of runs whose row ``i`` belongs to base-run row ``rows[i]``.

    When only the logit difference is asked for, ``tokens`` lists the answer and alternative
    ids: an engine may then compute just those logits (``compact=True``), skipping the full
    unembedding.
    """

    def __init__(self, metrics: Sequence[Metric], answers: torch.Tensor, alternatives: torch.Tensor,
                 clean_logprobs: torch.Tensor | None) -> None:
        self.metrics = list(metrics)
        self.answers, self.alternatives, self.clean_logprobs = answers, alternatives, clean_logprobs
        only_ld = set(self.metrics) <= {Metric.LOGIT_DIFF}
        self.tokens = torch.unique(torch.cat([answers, alternatives])) if only_ld else None

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, compact: bool = False) -> dict[Metric, torch.Tensor]:
        rows = rows.to(self.answers.device)
        a, b = self.answers[rows], self.alternatives[rows]
        if compact:
            if self.tokens is None:
                raise MetricError("compact logits need Measurer.tokens (only logit_diff allows them).")
            a, b = torch.searchsorted(self.tokens, a), torch.searchsorted(self.tokens, b)
        lp = self.clean_logprobs[rows] if self.clean_logprobs is not None else None
        return compute_metrics(self.metrics, logits, a, b, lp)


UNDEFINED_GAP = 1e-6
"""|M_clean - M_corrupted| at or below this makes the normalised metric undefined (NaN)."""


def normalise(value: torch.Tensor, clean: float | torch.Tensor, corrupted: float | torch.Tensor) -> torch.Tensor:
    """``(value - corrupted) / (clean - corrupted)``; NaN where the gap is at most
    :data:`UNDEFINED_GAP` (never a silent huge number). float32 unless ``value`` is float64
    (attribution estimates, whose small effects near 1 would round away in float32)."""
    clean_t = torch.as_tensor(clean, dtype=torch.float64)
    corr_t = torch.as_tensor(corrupted, dtype=torch.float64)
    gap = clean_t - corr_t
    safe = torch.where(gap.abs() > UNDEFINED_GAP, gap, torch.full_like(gap, float("nan")))
    out = (value.double() - corr_t) / safe
    return out if value.dtype == torch.float64 else out.float()  # estimates (float64) keep their precision
