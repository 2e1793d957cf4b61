"""Statistics over prompts: seeded, vectorised bootstrap confidence intervals and splits by
prompt attribute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ResultError
from .metrics import normalise

if TYPE_CHECKING:  # pragma: no cover
    from .results import PatchResult

__all__ = ["Interval", "Cell", "top_cells", "bootstrap_ci", "split_by", "spearman"]


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval per cell: ``mean``, ``low``, ``high`` (grid-shaped)."""

    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    level: float
    n_boot: int

    @property
    def contains_zero(self) -> torch.Tensor:
        """True where the interval includes 0: the effect is not distinguishable from none."""
        return (self.low <= 0) & (self.high >= 0)


def bootstrap_ci(
    res: "PatchResult", metric: str | None = None, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap over prompts of the normalised effect. Prompts are resampled with
    replacement together with their baselines, so the interval includes the uncertainty of the
    normalisation. Vectorised: one gather of ``(n_boot, n_prompts)`` indices.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5], [2, 6, 4, 5]], [[2, 9, 4, 5], [2, 8, 4, 5]], [7, 7], [8, 8])
        >>> res = ap.sweep(tiny_model("gpt2"), ps, "resid_pre", progress=False)
        >>> ci = res.ci(n_boot=200)
        >>> bool(ci.low[0, 1] <= ci.mean[0, 1] <= ci.high[0, 1])
        True
    """
    if not 0 < level < 1:
        raise ResultError(f"level={level}: a confidence level is between 0 and 1 (e.g. 0.95).")
    if n_boot < 10:
        raise ResultError(f"n_boot={n_boot}: use at least 10 resamples (1000 is typical).")
    m = res._check_metric(metric)
    raw, clean, corr = res.raw[m], res.clean[m], res.corrupted[m]
    n = raw.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    means = raw[idx].double().mean(1)  # (n_boot, *grid)
    shape = (n_boot,) + (1,) * (raw.dim() - 1)
    c = clean[idx].double().mean(1).reshape(shape)
    k = corr[idx].double().mean(1).reshape(shape)
    boots = normalise(means, c, k)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=boots.dtype)
    lo_hi = torch.nanquantile(boots.double(), q.double(), dim=0)
    return Interval(mean=res.normalised(m), low=lo_hi[0].float(), high=lo_hi[1].float(), level=level, n_boot=n_boot)


def split_by(res: "PatchResult", attribute: str) -> dict[Any, "PatchResult"]:
    """One result per value of a prompt attribute (e.g. ``"template"`` or ``"order"`` for IOI)."""
    attrs = res.info.prompt_attributes
    if not attrs or not any(attribute in a for a in attrs):
        known = sorted({k for a in attrs for k in a})
        raise ResultError(f"No prompt attribute {attribute!r} in this result; known: {known or 'none'}.")
    groups: dict[Any, list[int]] = {}
    for i, a in enumerate(attrs):
        groups.setdefault(a.get(attribute), []).append(i)
    out = {}
    for value, ix in groups.items():
        part = res.subset(ix)
        out[value] = part.replace(info=part.info.replace(split={attribute: value}))
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties correction needed for floats)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@dataclass(frozen=True)
class Cell:
    """One cell of a result: its coordinates by dim, normalised value and 95% interval."""

    where: dict[str, Any]
    value: float
    low: float | None
    high: float | None

    @property
    def label(self) -> str:
        return " ".join(f"{d}={v}" for d, v in self.where.items()) or "the patch"


def _reference(res: "PatchResult") -> float:
    """The value of a cell that does nothing: 1 for noising (no damage), 0 for denoising."""
    return res.info.direction.no_effect


def top_cells(res: "PatchResult", k: int = 10, metric: str | None = None, ci: bool = True) -> list[Cell]:
    """The ``k`` cells that move the metric most (|value - reference|), with bootstrap intervals
    when there are several prompts."""
    v = res.normalised(metric)
    flat = v.flatten()
    order = (flat - _reference(res)).abs().nan_to_num(-1.0).argsort(descending=True)[:k].tolist()
    lo = hi = None
    if ci and res.n_prompts > 1:
        interval = res.ci(metric, n_boot=500)
        lo, hi = interval.low.flatten(), interval.high.flatten()
    out = []
    for i in order:
        cell = np.unravel_index(i, res.shape) if res.dims else ()
        where = {d: res.coords[d][int(c)] for d, c in zip(res.dims, cell)}
        out.append(Cell(where, float(flat[i]), float(lo[i]) if lo is not None else None,
                        float(hi[i]) if hi is not None else None))
    return out
