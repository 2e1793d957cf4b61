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

**Your own metric.** Wherever a metric name goes (``metric=`` of every entry point), a function
``fn(logits, answers, alternatives) -> (B,)`` on the last-position logits (float32, (B, vocab))
and the prompts' answer and alternative ids may go instead, named by its ``__name__``, or a
:class:`CustomMetric` (``custom_metric(fn, name=..., differentiable=False)`` for discrete
ones, which attribution refuses). Results record its name; within the process the name
resolves back to the function (resuming a run, validating an estimate).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, Union

import torch

from .errors import MetricError

__all__ = ["Metric", "CustomMetric", "MetricLike", "MetricSpec", "custom_metric", "is_differentiable", "metric_named",
           "DIFFERENTIABLE", "parse_metrics", "compute_metrics", "normalise", "UNDEFINED_GAP", "Measurer"]


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



DIFFERENTIABLE: tuple[Metric, ...] = (Metric.LOGIT_DIFF, Metric.LOGPROB, Metric.PROB, Metric.KL)
"""Metrics with a gradient (attribution patching needs one); rank, accuracy and top5 are discrete."""


_NAMES = ", ".join(m.value for m in Metric)


@dataclass(frozen=True, eq=False)
class CustomMetric:
    """A metric you write: ``fn(logits (B, vocab) float32, answers (B,), alternatives (B,))``
    returning one value per prompt, ``(B,)``. ``differentiable``: whether gradients flow
    through it (attribution patching needs them)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    differentiable: bool = True

    @property
    def value(self) -> str:
        """Its name, as a built-in :class:`Metric`'s ``value``."""
        return self.name

    def __repr__(self) -> str:
        return f"CustomMetric({self.name!r})"


MetricLike = Union[Metric, CustomMetric]
MetricSpec = Union[str, Metric, CustomMetric, Callable[..., torch.Tensor],
                   Sequence[Union[str, Metric, CustomMetric, Callable[..., torch.Tensor]]]]
"""What ``metric=`` takes everywhere: a name, a :class:`Metric`, a function, or a list of them."""
_CUSTOM: dict[str, CustomMetric] = {}
"""Custom metrics by name: a result's metric name resolves back to its function in this process."""


def custom_metric(fn: Callable[..., torch.Tensor], name: str | None = None, *, differentiable: bool = True) -> CustomMetric:
    """A named custom metric (see the module docstring); refused when the name is a built-in's or
    another function's already, or when ``fn`` is not callable."""
    if not callable(fn):
        raise MetricError(f"custom_metric() takes a function, not {type(fn).__name__}.")
    name = name or getattr(fn, "__name__", "")
    if not name or not name.isidentifier():
        raise MetricError(f"A custom metric needs a name results can record ({name!r} is not one); pass "
                          f"custom_metric(fn, name='my_metric').")
    if name in {m.value for m in Metric}:
        raise MetricError(f"{name!r} is a built-in metric; give your function another name.")
    known = _CUSTOM.get(name)
    if known is not None and known.fn is not fn:
        raise MetricError(f"Another function is already the metric {name!r} in this process; name this one "
                          f"differently (custom_metric(fn, name=...)).")
    made = known if known is not None and known.differentiable == differentiable else CustomMetric(name, fn, differentiable)
    _CUSTOM[name] = made
    return made


def metric_named(name: str) -> MetricLike:
    """The built-in or custom metric a result records by ``name``."""
    try:
        return Metric(name)
    except ValueError:
        pass
    if name in _CUSTOM:
        return _CUSTOM[name]
    raise MetricError(f"Unknown metric {name!r}; use one of: {_NAMES}, or a function of "
                      f"(logits, answers, alternatives) (a custom metric is known only in the process that defined it).")


def is_differentiable(m: MetricLike) -> bool:
    """Whether gradients flow through ``m`` (attribution patching needs them)."""
    return m in DIFFERENTIABLE if isinstance(m, Metric) else m.differentiable


def _one(m: Any) -> MetricLike:
    if isinstance(m, (Metric, CustomMetric)):
        return m
    if isinstance(m, str):
        return metric_named(m)
    if callable(m):
        return custom_metric(m)
    raise MetricError(f"metric={m!r} is neither a metric name ({_NAMES}) nor a function of (logits, answers, "
                      f"alternatives).")


def parse_metrics(metric: Any) -> list[MetricLike]:
    """One metric or several (names, :class:`Metric` s, functions or :class:`CustomMetric` s),
    validated; duplicates removed, order kept."""
    single = isinstance(metric, (str, Metric, CustomMetric)) or (callable(metric) and not isinstance(metric, type))
    if single:
        items = [metric]
    else:
        try:
            items = list(metric)
        except TypeError:
            raise MetricError(f"metric={metric!r} is neither a metric name ({_NAMES}), a function, nor a list of "
                              f"them.") from None
    if not items:
        raise MetricError(f"No metric given; use one or more of: {_NAMES}.")
    out: list[MetricLike] = []
    for m in items:
        mm = _one(m)
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
    metrics: Sequence[MetricLike],
    logits: torch.Tensor,  # (B, vocab), last position
    answers: torch.Tensor,  # (B,)
    alternatives: torch.Tensor,  # (B,)
    clean_logprobs: torch.Tensor | None = None,  # (B, vocab), for KL
) -> dict[MetricLike, torch.Tensor]:
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
        elif isinstance(m, CustomMetric):
            out[m] = _custom(m, logits, answers, alternatives)
        else:
            out[m] = _FNS[m](logits, logprobs, answers, alternatives)
    return out


def _custom(m: CustomMetric, logits: torch.Tensor, answers: torch.Tensor, alternatives: torch.Tensor) -> torch.Tensor:
    """A custom metric's values, checked: a float tensor of one value per prompt."""
    try:
        v = m.fn(logits, answers, alternatives)
    except Exception as e:  # the user's code: say whose it is
        raise MetricError(f"Your metric {m.name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(v, torch.Tensor) or v.shape != (logits.shape[0],):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise MetricError(f"Your metric {m.name!r} must return a tensor of one value per prompt, shape "
                          f"({logits.shape[0]},); it returned {got}.")
    return v.float()


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
