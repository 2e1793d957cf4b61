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
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, Union

import torch

from .errors import MetricError

if TYPE_CHECKING:  # pragma: no cover
    from .prompts.continuation import Continuation

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
    """Rank of ``answers`` (...) in ``logits`` (..., vocab): how many tokens score higher."""
    own = logits.gather(-1, answers[..., None])
    return (logits > own).sum(-1).to(logits.dtype)


def _steps(values: torch.Tensor, readouts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``values[b, readouts[j], tokens[b, j]]`` for every row b and step j: (B, steps), without
    copying the vocabulary axis."""
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[rows, readouts.to(values.device)[None, :], tokens.to(values.device)]


def compute_metrics(
    metrics: Sequence[MetricLike],
    logits: torch.Tensor,  # (B, vocab) last position, or (B, readouts, vocab) teacher-forced
    answers: torch.Tensor,  # (B,) first answer tokens
    alternatives: torch.Tensor,  # (B,)
    clean_logprobs: torch.Tensor | None = None,  # the clean run's log-probabilities, same shape as logits (KL)
    continuation: "Continuation | None" = None,  # the answers' tokens when they are several
) -> dict[MetricLike, torch.Tensor]:
    """Raw metric values per prompt, ``{metric: (B,)}``, all from the same logits (float32, or
    float64 for a float64 model).

    Teacher-forced over the answers' tokens (``continuation``, laid out as in
    :mod:`actpatch.prompts.continuation`; single tokens when ``None``), with a_j the answer's
    tokens, b_j the alternative's, and lp the log-probabilities at each token's readout:

    * ``logprob`` = sum_j lp(a_j | prompt, a_<j); ``prob`` = exp(logprob);
    * ``logit_diff`` = logprob(answer) - logprob(alternative), computed as
      logit(a_0) - logit(b_0) + sum_{j>=1} lp(a_j) - sum_{j>=1} lp(b_j) (the first step's
      normaliser cancels: for single tokens it is exactly the logit difference);
    * ``kl`` = -mean_j KL(P_clean || P) over the answer's readouts;
    * ``rank`` = the largest rank of a_j along the answer (0 when greedy decoding produces the
      answer); ``accuracy`` / ``top5_accuracy``: every a_j at rank 0 / below 5.
    """
    from .prompts.continuation import Continuation

    logits = logits if logits.dtype == torch.float64 else logits.float()
    if logits.ndim == 2:
        logits = logits[:, None]
    cont = continuation if continuation is not None else Continuation.single(answers, alternatives)
    cont = cont.to(logits.device)
    if clean_logprobs is not None:
        clean_logprobs = clean_logprobs.to(logits.device)
        if clean_logprobs.ndim == 2:
            clean_logprobs = clean_logprobs[:, None]
    if logits.shape[1] != cont.n_readouts:
        raise MetricError(f"{logits.shape[1]} readouts of logits for answers needing {cont.n_readouts} "
                          f"(internal mismatch).")
    multi = not cont.is_single
    ra, rb = cont.answer_readouts(), cont.alternative_readouts()
    # log P(token) = logit - logsumexp, read where needed (the full log-softmax only for KL)
    needs_lse = multi or any(m in (Metric.LOGPROB, Metric.PROB) for m in metrics)
    lse = torch.logsumexp(logits, dim=-1) if needs_lse else None  # (B, readouts)

    def logprob_steps(readouts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # (B, steps)
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
        r = readouts.to(logits.device)[None, :]
        return _steps(logits, readouts, tokens) - lse[rows, r]  # type: ignore[index]

    mask_a = cont.answer_mask().to(logits.dtype)
    mask_b = cont.alternative_mask().to(logits.dtype)
    out: dict[MetricLike, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}

    def lp_sum(which: str) -> torch.Tensor:
        if which not in cache:
            if which == "a":
                cache[which] = (logprob_steps(ra, cont.answer) * mask_a).sum(1)
            else:
                cache[which] = (logprob_steps(rb, cont.alternative) * mask_b).sum(1)
        return cache[which]

    def ranks() -> torch.Tensor:  # (B,) the largest rank along the answer
        if "rank" not in cache:
            cache["rank"] = (_rank(logits[:, ra], cont.answer) * mask_a).max(1).values
        return cache["rank"]

    for m in metrics:
        if m is Metric.KL:
            if clean_logprobs is None:
                raise MetricError("The kl metric needs the clean run's distribution (internal call without it).")
            logprobs = torch.log_softmax(logits[:, ra.to(logits.device)], dim=-1)  # (B, A, vocab)
            kl = (clean_logprobs[:, ra].exp() * (clean_logprobs[:, ra] - logprobs)).sum(-1)  # (B, A)
            out[m] = -(kl * mask_a).sum(1) / mask_a.sum(1)
        elif isinstance(m, CustomMetric):
            out[m] = _custom_on(m, logits, cont)
        elif m is Metric.LOGIT_DIFF:
            first = logits[:, 0].gather(1, cont.answer[:, :1])[:, 0] - logits[:, 0].gather(1, cont.alternative[:, :1])[:, 0]
            if multi:
                rest_a = (logprob_steps(ra[1:], cont.answer[:, 1:]) * mask_a[:, 1:]).sum(1)
                rest_b = (logprob_steps(rb[1:], cont.alternative[:, 1:]) * mask_b[:, 1:]).sum(1)
                first = first + rest_a - rest_b
            out[m] = first
        elif m is Metric.LOGPROB:
            out[m] = lp_sum("a")
        elif m is Metric.PROB:
            out[m] = lp_sum("a").exp()
        elif m is Metric.RANK:
            out[m] = ranks()
        elif m is Metric.ACCURACY:
            out[m] = (ranks() < 1).to(logits.dtype)
        else:  # TOP5_ACCURACY, the last Metric
            out[m] = (ranks() < 5).to(logits.dtype)
    return out


def _custom_on(m: CustomMetric, logits: torch.Tensor, cont: "Continuation") -> torch.Tensor:
    """A custom metric on single tokens: ``fn(logits (B, vocab), answers (B,), alternatives
    (B,))``; on answers of several tokens: ``fn(readout logits (B, readouts, vocab), answers
    (B, A), alternatives (B, B'))``, the tokens padded with -1 (the readout layout of
    :mod:`actpatch.prompts.continuation`)."""
    if cont.is_single:
        return _custom(m, logits[:, 0], cont.answer[:, 0], cont.alternative[:, 0])
    pad_a = cont.answer.masked_fill(~cont.answer_mask(), -1)
    pad_b = cont.alternative.masked_fill(~cont.alternative_mask(), -1)
    return _custom(m, logits, pad_a, pad_b)


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
    """What the engines call to score patched runs: (readout logits (N, readouts, vocab) or
    last-position logits (N, vocab), base-row index of each row (N,)) -> {metric: (N,)}; with
    ``compact=True`` the logits are only those of the measurer's ``tokens``. :class:`Measurer`
    is the implementation."""

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, compact: bool = False) -> dict[Metric, torch.Tensor]: ...


class Measurer:
    """Metrics of a batch of runs whose row ``i`` belongs to base-run row ``rows[i]``.

    ``continuation`` holds the answers' tokens when they are several (teacher-forced; see
    :func:`compute_metrics`). When only the logit difference of single tokens is asked for,
    ``tokens`` lists the answer and alternative ids: an engine may then compute just those
    logits (``compact=True``), skipping the full unembedding.
    """

    def __init__(self, metrics: Sequence[Metric], answers: torch.Tensor, alternatives: torch.Tensor,
                 clean_logprobs: torch.Tensor | None, continuation: "Continuation | None" = None) -> None:
        self.metrics = list(metrics)
        self.answers, self.alternatives, self.clean_logprobs = answers, alternatives, clean_logprobs
        self.continuation = None if continuation is None or continuation.is_single else continuation
        only_ld = set(self.metrics) <= {Metric.LOGIT_DIFF}
        firsts = torch.unique(torch.cat([answers, alternatives])) if only_ld else None
        self.tokens = firsts if self.continuation is None else None
        self.first_tokens = firsts if self.continuation is not None else None
        """Answers of several tokens, logit difference alone: readout 0 is read at these ids only
        (the first step's normaliser cancels), so an engine may unembed just them there and fill
        the rest of readout 0 with -inf (never read)."""

    @property
    def n_readouts(self) -> int:
        """Readout positions per row (1 for single-token answers)."""
        return 1 if self.continuation is None else self.continuation.n_readouts

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, compact: bool = False) -> dict[Metric, torch.Tensor]:
        rows = rows.to(self.answers.device)
        a, b = self.answers[rows], self.alternatives[rows]
        if compact:
            if self.tokens is None:
                raise MetricError("compact logits need Measurer.tokens (only logit_diff allows them).")
            a, b = torch.searchsorted(self.tokens, a), torch.searchsorted(self.tokens, b)
        lp = self.clean_logprobs[rows] if self.clean_logprobs is not None else None
        cont = self.continuation.select(rows) if self.continuation is not None else None
        return compute_metrics(self.metrics, logits, a, b, lp, cont)


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
