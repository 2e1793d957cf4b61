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
=============================  ====================  =====================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import ResultError
from .types import Direction, Estimate

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

    def role_at(self, *index: int) -> Role:
        """The role of one cell, by grid index."""
        flat = 0
        for d, i in zip(self.dims, index):
            flat = flat * len(self.coords[d]) + i
        return self.roles[flat]

    def to_pandas(self) -> "pd.DataFrame":
        """One row per component: coordinates, sufficiency, necessity, role."""
        import itertools

        import pandas as pd

        rows = []
        cells = itertools.product(*(range(len(self.coords[d])) for d in self.dims))
        for k, cell in enumerate(cells):
            row: dict[str, Any] = {d: self.coords[d][i] for d, i in zip(self.dims, cell)}
            row.update(sufficiency=float(self.sufficiency.flatten()[k]), necessity=float(self.necessity.flatten()[k]),
                       role=self.roles[k].value)
            rows.append(row)
        return pd.DataFrame(rows)

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
) -> Comparison:
    """Classify every component from a denoising and a noising result over the same grid.
    Neither input is changed (:func:`mark_compared` records that they were read together).

    Args:
        sufficient: sufficiency at or above this counts as sufficient (default 0.5).
        necessary: necessity (1 - noised value) at or above this counts as necessary (0.5).
        negative: both readings at or below minus this count as negative (0.1).

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
    m = metric or denoise.metric
    suff = denoise.normalised(m)
    nec = 1.0 - noise.normalised(m)
    roles = []
    for s, n in zip(suff.flatten().tolist(), nec.flatten().tolist()):
        is_s, is_n = s >= sufficient, n >= necessary
        roles.append(
            Role.SUFFICIENT_AND_NECESSARY if is_s and is_n
            else Role.SUFFICIENT_NOT_NECESSARY if is_s
            else Role.NECESSARY_NOT_SUFFICIENT if is_n
            else Role.NEGATIVE if s <= -negative and n <= -negative
            else Role.NEITHER
        )
    return Comparison(dims=denoise.dims, coords=denoise.coords, sufficiency=suff, necessity=nec, roles=roles,
                      sufficient_threshold=sufficient, necessary_threshold=necessary, metric=m)
