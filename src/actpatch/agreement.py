"""How far an estimate (AtP, EAP, EAP-IG) can be trusted: its values next to exact ones on the
same cells, read for what matters in practice, the ranking at the top.

An estimate's spot check is only as good as the cells it checks. Checking the estimate's own
top-k and a few random cells cannot see a *false negative*: a component the estimate ranks low
whose exact effect is large. :func:`choose_cells` therefore adds, besides the top-k, a sample
stratified over the estimate's whole ranking (so its low ranks are always visited) and the grid
neighbours of the top cells (a component next to an important one, e.g. the same head one layer
down, is where a cancelled or saturated effect hides). Callers patch everything instead when the
exact sweep is affordable.

:class:`Agreement` then reports, on the checked cells: the rank correlation, the recall of the
exact top-k within the estimate's top-2k, the largest errors in the metric's raw units, and the
components the estimate misranks (named, as a warning finding).

Example:
    >>> import torch
    >>> est = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2, 0.0])    # effects (0 = no effect)
    >>> exact = torch.tensor([0.6, 0.5, 0.3, 0.2, 0.1, 0.8])  # the estimate ranks the largest last
    >>> a = Agreement.of(list("abcdef"), est, exact, est_rank=torch.arange(6), n_cells=6, k=1, scale=2.0,
    ...                  exhaustive=True, what="AtP")
    >>> [str(m) for m in a.misranked], a.top_k_recall
    (['f (effect +0.800 exactly, +0.000 estimated; ranked 1 exactly, 6 by the estimate)'], 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .findings import Finding, Level
from .stats import spearman

if TYPE_CHECKING:  # pragma: no cover
    from .results import PatchResult

__all__ = ["Agreement", "AgreementReading", "Misranked", "compare_estimate", "estimate_mismatch", "choose_cells", "cell_label", "exact_is_affordable",
           "far_below"]


def cell_label(dims: Sequence[str], coords: dict[str, list[Any]], flat: int, shape: tuple[int, ...]) -> str:
    """A short name of a result's cell: ``L20H0``, ``L3 pos 5``, ``L2N17``."""
    idx = np.unravel_index(flat, shape) if shape else ()
    prefix = {"layer": "L", "head": "H", "kv_head": "KV", "neuron": "N", "index": "i"}
    parts, glued = [], ""
    for d, i in zip(dims, idx):
        v = coords[d][int(i)]
        if d in prefix:
            glued += f"{prefix[d]}{v}"
        else:
            parts.append(f"{d} {v}")
    return " ".join(([glued] if glued else []) + parts) or "the patch"


def choose_cells(order: torch.Tensor, shape: tuple[int, ...], *, k: int, n_random: int, seed: int,
                 neighbours: bool = True) -> dict[int, str]:
    """The cells (flat indices) to check exactly and why: ``order`` is the estimate's ranking
    (largest first). The estimate's top ``k``; ``n_random`` cells drawn evenly from strata of the
    rest of the ranking, so that low ranks are checked as often as middle ones; and (``neighbours``)
    the cells one step away along each grid axis from the top ``k``."""
    chosen: dict[int, str] = {int(i): "top" for i in order[:k].tolist()}
    if neighbours and shape:
        for i in order[:k].tolist():
            at = np.unravel_index(int(i), shape)
            for axis in range(len(shape)):
                for step in (-1, 1):
                    nb = list(at)
                    nb[axis] += step
                    if 0 <= nb[axis] < shape[axis]:
                        chosen.setdefault(int(np.ravel_multi_index(nb, shape)), "neighbour")
    rest = [int(i) for i in order[k:].tolist() if int(i) not in chosen]
    if n_random > 0 and rest:
        gen = torch.Generator().manual_seed(seed)
        strata = np.array_split(np.arange(len(rest)), min(n_random, len(rest)))
        for band in strata:  # one per stratum of the ranking, the lowest stratum included
            pick = band[int(torch.randint(len(band), (1,), generator=gen))]
            chosen.setdefault(rest[int(pick)], "stratified")
    return chosen


def far_below(rank: int, reference: int) -> bool:
    """Whether a 0-based ``rank`` is far below ``reference``: at least twice as far down the list
    (1-based, so #2 against #9 is, #10 against #20 is) and at least three places lower (so the
    top three may swap among themselves)."""
    return rank + 1 >= 2 * (reference + 1) and rank >= reference + 3


def exact_is_affordable(n_cells: int, seconds_per_cell: float, budget_s: float) -> bool:
    """Whether patching every cell exactly fits the time budget."""
    return n_cells * seconds_per_cell <= budget_s


@dataclass(frozen=True)
class Misranked:
    """A component the estimate ranks far from where exact patching puts it."""

    label: str
    estimate: float
    exact: float
    estimate_rank: int
    """0-based, among all cells of the estimate."""
    exact_rank: int
    """0-based, among the checked cells."""
    kind: str
    """``missed`` (exact puts it in the top k, the estimate at least twice as far down: a false
    negative, see :func:`far_below`) or ``overrated`` (the reverse)."""

    def __str__(self) -> str:
        return (f"{self.label} (effect {self.exact:+.3f} exactly, {self.estimate:+.3f} estimated; ranked "
                f"{self.exact_rank + 1} exactly, {self.estimate_rank + 1} by the estimate)")


@dataclass(frozen=True)
class Agreement:
    """An estimate against exact values on the checked cells. ``estimate`` and ``exact`` are
    effects (0 = no effect) in normalised units; ``scale`` converts them to the metric's raw
    units (|clean - corrupted|; 1 when they are raw already)."""

    labels: tuple[str, ...]
    estimate: torch.Tensor
    exact: torch.Tensor
    est_rank: torch.Tensor
    n_cells: int
    k: int
    scale: float
    exhaustive: bool
    what: str = "the estimate"
    reasons: tuple[str, ...] = ()
    rank_correlation: float = float("nan")
    top_k_recall: float = float("nan")
    misranked: tuple[Misranked, ...] = ()
    findings: tuple[Finding, ...] = field(default=())

    @classmethod
    def of(cls, labels: Sequence[str], estimate: torch.Tensor, exact: torch.Tensor, *, est_rank: torch.Tensor,
           n_cells: int, k: int, scale: float, exhaustive: bool, what: str, reasons: Sequence[str] = (),
           code: str = "attribution") -> "Agreement":
        """Read the checked cells: correlation, top-k recall, misranked components, findings
        (``code``: prefix of the finding codes, ``attribution`` or ``edge``)."""
        e, x = estimate.double().flatten(), exact.double().flatten()
        n = len(e)
        rho = spearman(e, x) if n > 2 else float("nan")
        kk = min(k, n)
        exact_order = x.abs().argsort(descending=True, stable=True)
        exact_rank = torch.empty(n, dtype=torch.long)
        exact_rank[exact_order] = torch.arange(n)
        top_exact = exact_order[:kk]
        recall = float((est_rank[top_exact] < 2 * k).double().mean()) if kk else float("nan")
        wrong = []
        for i in range(n):
            er, xr = int(est_rank[i]), int(exact_rank[i])
            if xr < kk and float(x[i].abs()) > 1e-12 and far_below(er, xr):
                wrong.append(Misranked(labels[i], float(e[i]), float(x[i]), int(est_rank[i]), int(exact_rank[i]), "missed"))
            elif exhaustive and er < kk and far_below(xr, er):
                wrong.append(Misranked(labels[i], float(e[i]), float(x[i]), int(est_rank[i]), int(exact_rank[i]),
                                       "overrated"))
        wrong.sort(key=lambda m: m.exact_rank)
        made = cls(labels=tuple(labels), estimate=e, exact=x, est_rank=est_rank, n_cells=n_cells, k=k, scale=scale,
                   exhaustive=exhaustive, what=what, reasons=tuple(reasons), rank_correlation=rho, top_k_recall=recall,
                   misranked=tuple(wrong))
        return cls(**{**made.__dict__, "findings": tuple(made._findings(code))})

    @property
    def errors_raw(self) -> torch.Tensor:
        """|estimate - exact| per checked cell, in the metric's raw units."""
        return (self.estimate - self.exact).abs() * self.scale

    @property
    def largest_effect_raw(self) -> float:
        """The largest exact effect among the checked cells, raw units: the scale errors are read on."""
        return float(self.exact.abs().max()) * self.scale if len(self.exact) else 0.0

    def worst(self, n: int = 5) -> list[tuple[str, float, float]]:
        """The ``n`` cells where estimate and exact differ most: (label, estimate, exact)."""
        order = self.errors_raw.argsort(descending=True)[:n]
        return [(self.labels[i], float(self.estimate[i]), float(self.exact[i])) for i in order.tolist()]

    def _coverage(self) -> str:
        if self.exhaustive:
            return f"all {self.n_cells} cells patched exactly"
        counts = {r: self.reasons.count(r) for r in dict.fromkeys(self.reasons)}
        how = ", ".join(f"{c} {r}" for r, c in counts.items())
        return f"{len(self.labels)} of {self.n_cells} cells patched exactly ({how})"

    def _findings(self, code: str) -> list[Finding]:
        err = float(self.errors_raw.max()) if len(self.labels) else 0.0
        worst = self.worst(1)
        good = self.rank_correlation >= 0.7 and not any(m.kind == "missed" for m in self.misranked)
        out = [Finding(
            Level.INFO if good else Level.WARNING, f"{code}_agreement",
            f"{self.what} vs exact patching, {self._coverage()}: rank correlation {self.rank_correlation:.3f}; "
            f"{self.top_k_recall:.0%} of the exact top {min(self.k, len(self.labels))} are in the estimate's top "
            f"{2 * self.k}; largest error {err:.3g} in raw metric units"
            + (f" ({worst[0][0]}), against a largest effect of {self.largest_effect_raw:.3g}" if worst else "") + ".",
            "Below ~0.7, or with misranked components, trust exact patching and read the estimates only as a screen.")]
        missed = [m for m in self.misranked if m.kind == "missed"]
        if missed:
            names = "; ".join(str(m) for m in missed[:8]) + (f"; and {len(missed) - 8} more" if len(missed) > 8 else "")
            out.append(Finding(
                Level.WARNING, f"{code}_misranked",
                f"{self.what} ranks components of exact patching's top {self.k} at least twice as far down "
                f"(effects normalised, 0 = none): {names}.",
                "Patch these components exactly before concluding they do not matter; saturated attention "
                "(qk_fix=True), cancelling paths and large non-linear changes break first-order estimates."))
        over = [m for m in self.misranked if m.kind == "overrated"]
        if over:
            out.append(Finding(
                Level.INFO, f"{code}_overrated",
                f"{self.what} ranks in its top {self.k} components exact patching puts at least twice as far down: "
                + "; ".join(str(m) for m in over[:8]) + ".",
                "Read the exact values for these."))
        return out

    def plot(self, title: str | None = None) -> Any:
        """Estimate against exact (plotly scatter, raw units, labelled points, the diagonal,
        misranked components in red)."""
        from .report.figures import agreement_figure

        return agreement_figure(self, title)

class AgreementReading:
    """What a validation reads through its :class:`Agreement` (``self.agreement``): the checked
    cells' effects, their rank correlation and the misranked components."""

    agreement: Agreement

    @property
    def estimate(self) -> torch.Tensor:
        """The checked cells' estimated effects (0 = no effect)."""
        return self.agreement.estimate

    @property
    def exact(self) -> torch.Tensor:
        """Their exact effects (0 = no effect)."""
        return self.agreement.exact

    @property
    def rank_correlation(self) -> float:
        return self.agreement.rank_correlation

    @property
    def misranked(self) -> tuple[Misranked, ...]:
        """Components the estimate misses (or overrates), named."""
        return self.agreement.misranked


def estimate_mismatch(estimate: Any, exact: Any) -> str | None:
    """Why :func:`compare_estimate` cannot read ``estimate`` beside ``exact`` (None when it can):
    an ``ap.attribute`` result and an ``ap.sweep`` result of the same direction, target and grid."""
    from .results import PatchResult
    from .types import Method

    if not isinstance(estimate, PatchResult) or not isinstance(exact, PatchResult):
        return "compare_estimate(estimate, exact) takes two PatchResults (ap.attribute and ap.sweep)."
    if estimate.info.method is not Method.ATP or exact.info.method is not Method.EXACT:
        return (f"compare_estimate(estimate, exact) got methods ({estimate.info.method.value!r}, "
                f"{exact.info.method.value!r}); pass an ap.attribute result first, then an ap.sweep one.")
    if estimate.info.direction is not exact.info.direction:
        return (f"The estimate is {estimate.info.direction.value} and the exact result "
                f"{exact.info.direction.value}; compare results of the same direction.")
    if estimate.dims != exact.dims or estimate.coords != exact.coords or estimate.info.target != exact.info.target:
        return (f"The results cover different grids ({estimate.info.target} {estimate.dims} vs "
                f"{exact.info.target} {exact.dims}); run both with the same target and axes.")
    return None


def compare_estimate(estimate: "PatchResult", exact: "PatchResult", *, k: int = 10,
                     metric: str | None = None) -> Agreement:
    """An estimate (``ap.attribute``) beside an exact result (``ap.sweep``) of the same grid,
    direction and metric: rank correlation, top-k recall, the largest raw-unit errors, the
    misranked components (named), and a scatter (:meth:`Agreement.plot`).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import random_pairs, tiny_model
        >>> m, ps = tiny_model("gpt2"), random_pairs(n=2)
        >>> a = ap.compare_estimate(ap.attribute(m, ps, "z"), ap.sweep(m, ps, "z", progress=False), k=3)
        >>> a.exhaustive, len(a.labels), a.labels[0]
        (True, 8, 'L0H0')
    """
    from .errors import ResultError
    from .types import Estimate

    problem = estimate_mismatch(estimate, exact)
    if problem:
        raise ResultError(problem)
    m = metric or estimate.metric
    if m not in estimate.raw or m not in exact.raw:
        raise ResultError(f"Metric {m!r} is not in both results (estimate: {estimate.metrics}, exact: "
                          f"{exact.metrics}); pass metric= one they share.")
    ref = estimate.info.direction.no_effect
    e, x = estimate.normalised(m).flatten().double() - ref, exact.normalised(m).flatten().double() - ref
    if estimate.info.estimate is Estimate.MAGNITUDE:
        e, x = e.abs(), x.abs()
    order = e.abs().argsort(descending=True, stable=True)
    rank = torch.empty(len(e), dtype=torch.long)
    rank[order] = torch.arange(len(e))
    b = exact.baselines[m]
    labels = [cell_label(exact.dims, exact.coords, i, exact.shape) for i in range(len(e))]
    what = "AtP*" if estimate.info.qk_fix or estimate.info.grad_drop else "AtP"
    return Agreement.of(labels, e, x, est_rank=rank, n_cells=len(e), k=k, scale=abs(b["clean"] - b["corrupted"]),
                        exhaustive=True, what=what, reasons=["all"] * len(e))
