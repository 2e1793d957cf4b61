"""PatchResult: labelled patching results with baselines, per-prompt values and provenance.

Saved as a directory holding ``tensors.safetensors`` and ``meta.json`` (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checks import Finding
from .errors import ResultError
from .metrics import normalise

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .stats import Interval

__all__ = ["PatchResult"]

FORMAT_VERSION = 1


@dataclass
class PatchResult:
    """The outcome of a sweep.

    Attributes:
        dims: axis names of one cell grid, e.g. ``("layer", "pos")`` or ``("layer", "head")``.
        coords: labels per dim (token strings label positions).
        raw: per metric, the patched metric per prompt, shape ``(n_prompts, *grid)``.
        clean, corrupted: per metric, the baselines per prompt, shape ``(n_prompts,)``.
        meta: provenance (model and weight hash, prompt set, target, direction, corruption,
            seed, engine, package versions).
        findings: :class:`~actpatch.checks.Finding` s about this result.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> prompts = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.sweep(model, prompts, "resid_pre", metric=["logit_diff", "prob"], progress=False)
        >>> res.values.shape, res.dims, res.metrics
        (torch.Size([2, 4]), ('layer', 'pos'), ['logit_diff', 'prob'])
        >>> len(res.to_pandas())  # a row per patch and metric
        16
    """

    dims: tuple[str, ...]
    coords: dict[str, list]
    raw: dict[str, torch.Tensor]
    clean: dict[str, torch.Tensor]
    corrupted: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    # -- views -------------------------------------------------------------------------------
    @property
    def metrics(self) -> list[str]:
        """Metric names, the primary one first."""
        return list(self.raw)

    @property
    def metric(self) -> str:
        """The primary metric (the first requested)."""
        return self.metrics[0]

    @property
    def n_prompts(self) -> int:
        return int(next(iter(self.clean.values())).shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        """Per metric, the clean and corrupted metric averaged over prompts."""
        return {m: {"clean": float(self.clean[m].mean()), "corrupted": float(self.corrupted[m].mean())} for m in self.raw}

    def normalised(self, metric: str | None = None) -> torch.Tensor:
        """Mean over prompts, normalised: 1 = clean, 0 = corrupted (NaN when undefined)."""
        m = self._check_metric(metric)
        b = self.baselines[m]
        return normalise(self.raw[m].mean(0), b["clean"], b["corrupted"])

    @property
    def values(self) -> torch.Tensor:
        """Normalised effect of the primary metric, shape ``self.shape``."""
        return self.normalised()

    def per_prompt_normalised(self, metric: str | None = None) -> torch.Tensor:
        """Per-prompt values ``(n_prompts, *grid)`` normalised with the set's mean baselines, so
        that their mean is :meth:`normalised`."""
        m = self._check_metric(metric)
        b = self.baselines[m]
        return normalise(self.raw[m], b["clean"], b["corrupted"])

    @property
    def per_prompt(self) -> torch.Tensor:
        """:meth:`per_prompt_normalised` of the primary metric, leading dim ``prompt``."""
        return self.per_prompt_normalised()

    def ci(self, metric: str | None = None, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> "Interval":
        """Bootstrap confidence interval of the normalised effect (see :func:`actpatch.stats.bootstrap_ci`)."""
        from .stats import bootstrap_ci

        return bootstrap_ci(self, metric, n_boot=n_boot, level=level, seed=seed)

    def split_by(self, attribute: str) -> dict[Any, "PatchResult"]:
        """One result per value of a prompt attribute (see :func:`actpatch.stats.split_by`)."""
        from .stats import split_by

        return split_by(self, attribute)

    def _check_metric(self, metric: str | None) -> str:
        m = metric or self.metric
        if m not in self.raw:
            raise ResultError(f"Metric {m!r} is not in this result; it has {self.metrics}.")
        return m

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path/tensors.safetensors`` and ``path/meta.json``; returns the directory."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for m in self.raw:
            tensors[f"raw/{m}"] = self.raw[m].contiguous()
            tensors[f"clean/{m}"] = self.clean[m].contiguous()
            tensors[f"corrupted/{m}"] = self.corrupted[m].contiguous()
        save_file(tensors, str(out / "tensors.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "dims": list(self.dims),
            "coords": self.coords,
            "metrics": self.metrics,
            "meta": self.meta,
            "findings": [f.to_dict() for f in self.findings],
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "PatchResult":
        """Read a result written by :meth:`save`."""
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / "meta.json").is_file() or not (p / "tensors.safetensors").is_file():
            raise ResultError(f"{p} is not a saved PatchResult (needs meta.json and tensors.safetensors).")
        meta = json.loads((p / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ResultError(
                f"{p}: format version {meta.get('format_version')!r}, this actpatch reads {FORMAT_VERSION}. "
                f"Re-run the sweep with this version."
            )
        t = load_file(str(p / "tensors.safetensors"))
        ms = meta["metrics"]
        return cls(
            dims=tuple(meta["dims"]),
            coords=meta["coords"],
            raw={m: t[f"raw/{m}"] for m in ms},
            clean={m: t[f"clean/{m}"] for m in ms},
            corrupted={m: t[f"corrupted/{m}"] for m in ms},
            meta=meta["meta"],
            findings=[Finding.from_dict(f) for f in meta["findings"]],
        )

    def to_pandas(self) -> "pd.DataFrame":
        """A long table: one row per patch and metric, with the coordinates, the normalised
        effect, the mean raw metric and both baselines."""
        import pandas as pd

        rows = []
        grids = {m: (self.normalised(m).flatten(), self.raw[m].mean(0).flatten()) for m in self.metrics}
        cells = list(_cells(self.shape))
        for m in self.metrics:
            norm, raw = grids[m]
            b = self.baselines[m]
            for i, cell in enumerate(cells):
                row: dict[str, Any] = {d: self.coords[d][c] for d, c in zip(self.dims, cell)}
                row.update(metric=m, normalised=float(norm[i]), raw=float(raw[i]),
                           clean=b["clean"], corrupted=b["corrupted"])
                rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={len(self.coords[d])}" for d in self.dims)
        return (
            f"PatchResult({self.meta.get('target')}, {self.meta.get('direction')}, dims=({dims}), "
            f"metrics={self.metrics}, n_prompts={self.n_prompts}, findings={len(self.findings)})"
        )


def _cells(shape: tuple[int, ...]):  # noqa: ANN202 - generator of index tuples
    import itertools

    return itertools.product(*(range(n) for n in shape))
