"""Both directions compared: sufficiency (denoising) against necessity (noising).

Following Heimersheim & Nanda (2024), each component gets two "importance" readings:

* ``sufficiency`` = the denoising effect, normalised (1: patching the clean activation into the
  corrupted run restores the behaviour);
* ``necessity`` = 1 - the noising value, normalised (1: patching the corrupted activation into
  the clean run destroys the behaviour; 0: no damage).

and a class by explicit thresholds:

=============================  ====================  =====================================
class                          reading               typical cause
=============================  ====================  =====================================
sufficient_and_necessary       both high             a bottleneck on the path
sufficient_not_necessary       denoise only (OR)     redundant / backup components, OR gates
necessary_not_sufficient       noise only (AND)      one input of an AND, needs its partners
negative                       both clearly < 0      pushes against the answer (negative heads)
neither                        otherwise             not involved in the clean/corrupted difference
uncertain                      an interval straddles  the prompts do not decide between roles
                               a threshold
=============================  ====================  =====================================

With several prompts a reading counts as above (below) a threshold only when its whole
bootstrap confidence interval is: a cell whose interval is [0.26, 0.77] is not "sufficient" at
0.5, and two layers whose estimates differ by 0.01 do not get opposite roles on that difference.
The thresholds and the level are stated in the :class:`Comparison`; with one prompt there is no
interval and roles follow the point values (``Comparison.intervals`` is False).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import ResultError
from .types import Direction, Estimate, Method

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import plotly.graph_objects as go

    from .results import PatchResult

__all__ = ["Role", "Comparison", "compare", "comparable", "mark_compared"]


class Role(str, enum.Enum):
    """How a component behaves across the two directions."""

    SUFFICIENT_AND_NECESSARY = "sufficient_and_necessary"
    """Restores the behaviour alone and its corruption breaks it."""
    SUFFICIENT_NOT_NECESSARY = "sufficient_not_necessary"
    """Restores the behaviour alone, but the model copes without it: OR-like, redundant, backup."""
    NECESSARY_NOT_SUFFICIENT = "necessary_not_sufficient"
    """Its corruption breaks the behaviour, but it cannot restore it alone: AND-like."""
    NEGATIVE = "negative"
    """Both readings are clearly negative: restoring it hurts, corrupting it helps. A component
    that pushes against the answer (e.g. IOI's negative name movers)."""
    NEITHER = "neither"
    """Neither reading crosses its threshold."""
    UNCERTAIN = "uncertain"
    """A reading's confidence interval straddles a threshold that decides the role: the prompts
    do not tell the roles apart (read the intervals; more prompts narrow them)."""


@dataclass(frozen=True)
class Comparison:
    """Per-cell sufficiency, necessity and :class:`Role` of a denoise / noise result pair."""

    dims: tuple[str, ...]
    coords: dict[str, list]
    sufficiency: torch.Tensor
    necessity: torch.Tensor
    roles: list[Role]  # flattened in C order over the grid
    sufficient_threshold: float
    necessary_threshold: float
    metric: str
    negative_threshold: float = 0.1
    """Both readings at or below minus this count as negative."""
    sufficiency_low: torch.Tensor | None = None
    """Lower end of sufficiency's bootstrap interval (grid-shaped); None with one prompt."""
    sufficiency_high: torch.Tensor | None = None
    necessity_low: torch.Tensor | None = None
    necessity_high: torch.Tensor | None = None
    level: float = 0.95
    """The intervals' confidence level."""

    @property
    def intervals(self) -> bool:
        """Whether roles were decided on confidence intervals (several prompts) or point values."""
        return self.sufficiency_low is not None

    @property
    def thresholds(self) -> str:
        """The rule in words, for tables and reports."""
        rule = (f"sufficient: sufficiency >= {self.sufficient_threshold:g}; necessary: necessity >= "
                f"{self.necessary_threshold:g}; negative: both <= {-self.negative_threshold:g}")
        return rule + (f"; decided on {self.level:.0%} bootstrap intervals, 'uncertain' where one straddles"
                       if self.intervals else "; decided on point values (one prompt: no interval)")

    def __repr__(self) -> str:
        """A summary: metric, grid, role counts and how roles were decided; never the tensors."""
        grid = " x ".join(f"{d} {len(self.coords[d])}" for d in self.dims) or "one cell"
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items())
        how = f"{self.level:.0%} intervals" if self.intervals else "point values"
        return f"Comparison({self.metric}, {grid}: {counts}; decided on {how})"

    def role_at(self, *index: int) -> Role:
        """The role of one cell, by grid index."""
        flat = 0
        for d, i in zip(self.dims, index):
            flat = flat * len(self.coords[d]) + i
        return self.roles[flat]

    def to_pandas(self) -> "pd.DataFrame":
        """One row per component: coordinates, sufficiency, necessity, their interval ends
        (``sufficiency_low`` … ``necessity_high``, when there are intervals), role."""
        import itertools

        import pandas as pd

        rows = []
        cells = itertools.product(*(range(len(self.coords[d])) for d in self.dims))
        ends = {name: getattr(self, name) for name in ("sufficiency_low", "sufficiency_high", "necessity_low",
                                                      "necessity_high")} if self.intervals else {}
        for k, cell in enumerate(cells):
            row: dict[str, Any] = {d: self.coords[d][i] for d, i in zip(self.dims, cell)}
            row.update(sufficiency=float(self.sufficiency.flatten()[k]), necessity=float(self.necessity.flatten()[k]))
            row.update({name: float(t.flatten()[k]) for name, t in ends.items()})
            row["role"] = self.roles[k].value
            rows.append(row)
        return pd.DataFrame(rows)

    def strongest(self, k: int = 10) -> "pd.DataFrame":
        """The ``k`` rows of :meth:`to_pandas` with the largest |sufficiency| or |necessity|,
        strongest first; the index is the cell's flat position in the grid."""
        df = self.to_pandas()
        score = df[["sufficiency", "necessity"]].abs().max(axis=1)
        return df.loc[score.sort_values(ascending=False, kind="stable").index[:k]]

    def scatter_data(self) -> dict[str, list]:
        """Data for a scatter plot: x = sufficiency (denoising), y = necessity (noising damage)."""
        df = self.to_pandas()
        labels = [" ".join(f"{d}={r[d]}" for d in self.dims) for _, r in df.iterrows()]
        return {"x": df.sufficiency.tolist(), "y": df.necessity.tolist(), "label": labels, "role": df.role.tolist()}

    def plot(self, title: str | None = None) -> "go.Figure":
        """Sufficiency against necessity, one point per component coloured by role (plotly)."""
        from .report.figures import comparison_figure

        return comparison_figure(self, title)

    def _repr_html_(self) -> str:
        from .report.summary import comparison_html

        return comparison_html(self)

    def counts(self) -> dict[str, int]:
        """How many components have each role (roles with none left out)."""
        out = {r.value: sum(1 for x in self.roles if x is r) for r in Role}
        return {k: v for k, v in out.items() if v}


def comparable(denoise: "PatchResult", noise: "PatchResult") -> bool:
    """Whether :func:`compare` accepts the pair: same grid, signed effects (not GradDrop's magnitudes)."""
    return (denoise.dims == noise.dims and denoise.coords == noise.coords
            and Estimate.MAGNITUDE not in (denoise.info.estimate, noise.info.estimate))


def mark_compared(res: "PatchResult") -> "PatchResult":
    """A copy of ``res`` recorded as read together with the other direction: ``info.compared``
    set and the ``single_direction`` finding dropped. The input is not changed."""
    return res.replace(info=res.info.replace(compared=True),
                       findings=[f for f in res.findings if f.code != "single_direction"])


def compare(
    denoise: "PatchResult",
    noise: "PatchResult",
    *,
    metric: str | None = None,
    sufficient: float = 0.5,
    necessary: float = 0.5,
    negative: float = 0.1,
    level: float = 0.95,
    n_boot: int = 1000,
) -> Comparison:
    """Classify every component from a denoising and a noising result over the same grid.
    Neither input is changed (:func:`mark_compared` records that they were read together).
    With several prompts, a role is given only where the bootstrap intervals clear the
    thresholds that decide it; elsewhere the role is :attr:`Role.UNCERTAIN`.

    Args:
        sufficient: sufficiency at or above this counts as sufficient (default 0.5).
        necessary: necessity (1 - noised value) at or above this counts as necessary (0.5).
        negative: both readings at or below minus this count as negative (0.1).
        level, n_boot: the bootstrap intervals' confidence level and resamples (seeded).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import micro_model
        >>> model, prompts = micro_model("and")
        >>> kw = dict(target="mlp_post", layers=[0], neurons=[0, 1], progress=False)
        >>> cmp = ap.compare(ap.sweep(model, prompts, direction="denoise", **kw),
        ...                  ap.sweep(model, prompts, direction="noise", **kw))
        >>> [r.value for r in cmp.roles]
        ['necessary_not_sufficient', 'necessary_not_sufficient']
    """
    from .results import PatchResult

    if not isinstance(denoise, PatchResult) or not isinstance(noise, PatchResult):
        raise ResultError("compare(denoise, noise) takes two PatchResults (e.g. from ap.sweep).")
    d_dir, n_dir = denoise.info.direction, noise.info.direction
    methods = {denoise.info.method, noise.info.method}
    if d_dir is n_dir and Method.ATP in methods and len(methods) == 2:
        raise ResultError(
            "compare(denoise, noise) reads the two directions of one component; to read an attribution estimate "
            "beside exact patching of the same direction, use ap.compare_estimate(estimate, exact)."
        )
    if d_dir is not Direction.DENOISE or n_dir is not Direction.NOISE:
        raise ResultError(
            f"compare(denoise, noise) got directions ({d_dir.value!r}, {n_dir.value!r}); pass the denoising result first."
        )
    if Estimate.MAGNITUDE in (denoise.info.estimate, noise.info.estimate):
        raise ResultError(
            "compare() needs signed effects, and a GradDrop result (grad_drop=True) holds magnitudes; "
            "compare exact sweeps, or plain AtP results."
        )
    if denoise.dims != noise.dims or denoise.coords != noise.coords or denoise.info.target != noise.info.target:
        raise ResultError(
            f"The results cover different grids ({denoise.info.target} {denoise.dims} vs "
            f"{noise.info.target} {noise.dims}); run both sweeps with the same target and axes."
        )
    if not 0 < level < 1:
        raise ResultError(f"level={level} is not a confidence level; pass one in (0, 1), e.g. 0.95.")
    m = metric or denoise.metric
    suff = denoise.normalised(m)
    nec = 1.0 - noise.normalised(m)
    ends: dict[str, torch.Tensor] = {}
    if denoise.n_prompts > 1 and noise.n_prompts > 1:
        ci_d, ci_n = denoise.ci(m, n_boot=n_boot, level=level), noise.ci(m, n_boot=n_boot, level=level)
        ends = dict(sufficiency_low=ci_d.low, sufficiency_high=ci_d.high,
                    necessity_low=1.0 - ci_n.high, necessity_high=1.0 - ci_n.low)
    flat = lambda t: t.flatten().tolist()  # noqa: E731
    s_lo, s_hi = (flat(ends["sufficiency_low"]), flat(ends["sufficiency_high"])) if ends else (flat(suff),) * 2
    n_lo, n_hi = (flat(ends["necessity_low"]), flat(ends["necessity_high"])) if ends else (flat(nec),) * 2
    roles = [_role(_side(sl, sh, sufficient), _side(nl, nh, necessary),
                   _side(sl, sh, -negative, at_or_below=True), _side(nl, nh, -negative, at_or_below=True))
             for sl, sh, nl, nh in zip(s_lo, s_hi, n_lo, n_hi)]
    return Comparison(dims=denoise.dims, coords=denoise.coords, sufficiency=suff, necessity=nec, roles=roles,
                      sufficient_threshold=sufficient, necessary_threshold=necessary, metric=m,
                      negative_threshold=negative, level=level, **ends)


def _side(low: float, high: float, threshold: float, at_or_below: bool = False) -> bool | None:
    """Whether an interval [low, high] is at or above ``threshold`` (or, ``at_or_below``, at or
    below it): True / False when the whole interval is on one side, None when it straddles.
    NaN (a cell whose effect is undefined, e.g. equal baselines) straddles: nothing is known."""
    if low != low or high != high:
        return None
    if at_or_below:
        return True if high <= threshold else False if low > threshold else None
    return True if low >= threshold else False if high < threshold else None


def _role(is_s: bool | None, is_n: bool | None, s_neg: bool | None, n_neg: bool | None) -> Role:
    if is_s is None or is_n is None:
        return Role.UNCERTAIN
    if is_s and is_n:
        return Role.SUFFICIENT_AND_NECESSARY
    if is_s:
        return Role.SUFFICIENT_NOT_NECESSARY
    if is_n:
        return Role.NECESSARY_NOT_SUFFICIENT
    if s_neg and n_neg:
        return Role.NEGATIVE
    if s_neg is False or n_neg is False:
        return Role.NEITHER  # one reading is clearly not negative: the cell is not a negative component
    return Role.UNCERTAIN
