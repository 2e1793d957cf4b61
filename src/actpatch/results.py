"""PatchResult: labelled patching results with baselines, per-prompt values and typed metadata.

Saved as a directory holding ``tensors.safetensors`` and ``meta.json`` (no pickle). Format 3
stores :class:`ResultInfo` as JSON through one generic codec (:mod:`actpatch._codec`); results
saved by actpatch 0.2 (format 2) and 0.1.0 (format 1) still load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence, Union

import torch

from .errors import ResultError
from .findings import Finding, technique_findings
from .metrics import normalise
from ._codec import decode, encode
from .corruption import CorruptionSpec
from .subspace import SubspaceCheck
from .types import Diagnostics, Direction, Engine, Estimate, Method, Provenance

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import plotly.graph_objects as go

    from .stats import Cell, Interval

__all__ = ["PatchResult", "ResultInfo", "ExactInfo", "AtpInfo", "PathInfo", "TechniqueInfo", "FORMAT_VERSION"]

FORMAT_VERSION = 3
"""Format of saved results: 3 since actpatch 0.3 (common fields plus a typed part per
technique, one codec); 2 (0.2, one flat info) and 1 (0.1.0, a free-form dict) are still read."""


@dataclass(frozen=True)
class ExactInfo:
    """Exact activation patching (:func:`actpatch.sweep`, :func:`actpatch.patch`)."""

    KIND: ClassVar[str] = "exact"
    engine: Engine | None = None
    """The engine that ran (batched or reference)."""
    sites: tuple[str, ...] = ()
    """:func:`actpatch.patch`: the sites written together."""
    subspace: dict[str, Any] | None = None
    """Subspace patching: :meth:`actpatch.subspace.Subspace.describe` of the basis patched along."""
    subspace_check: SubspaceCheck | None = None
    """Subspace patching: the interpretability-illusion check's numbers (:func:`actpatch.patch`)."""
    dictionary: dict[str, Any] | None = None
    """A feature sweep: the dictionary's description (label, site, features, architecture)."""


@dataclass(frozen=True)
class AtpInfo:
    """Attribution patching (:func:`actpatch.attribute`): AtP, AtP* and RelP."""

    KIND: ClassVar[str] = "atp"
    estimate: Estimate = Estimate.SIGNED
    """Signed estimates, or GradDrop's magnitudes."""
    qk_fix: bool = False
    grad_drop: bool = False
    relp: bool = False
    """LRP propagation coefficients in place of gradients (RelP, :mod:`actpatch.models.relevance`)."""
    dictionary: dict[str, Any] | None = None
    """Attribution over a dictionary's features: its description (as :class:`ExactInfo`'s)."""


@dataclass(frozen=True)
class PathInfo:
    """Path patching (:func:`actpatch.path_patch`, :func:`actpatch.path_sweep`)."""

    KIND: ClassVar[str] = "path"
    senders: tuple[str, ...] = ()
    receivers: tuple[str, ...] = ()


TechniqueInfo = Union[ExactInfo, AtpInfo, PathInfo]
"""The per-technique part of a :class:`ResultInfo`."""

_METHODS = {ExactInfo: Method.EXACT, AtpInfo: Method.ATP, PathInfo: Method.PATH}


@dataclass(frozen=True)
class ResultInfo:
    """Everything a result records about how it was made: the fields every technique shares,
    and one typed part per technique (``technique``). Typed fields, not string keys.

    ``target`` is the swept site kind (``"resid_pre"``, ``"z"``...) or, for path patching,
    ``"path"`` (one sender set) / ``"path:z"`` / ``"path:mlp_out"`` (sweeps over senders).
    """

    target: str
    direction: Direction
    metrics: tuple[str, ...]
    corruption: CorruptionSpec
    """The corruption used (:meth:`actpatch.corruption.Corruption.describe`)."""
    seed: int
    provenance: Provenance
    technique: TechniqueInfo = ExactInfo()
    grid: dict[str, Any] = field(default_factory=dict)
    """The grid as asked for: per_position, layers, positions (indices or role names), heads,
    neurons, window."""
    diagnostics: Diagnostics = Diagnostics()
    prompt_texts: tuple[tuple[str, str], ...] = ()
    """(clean, corrupted) text per prompt, when the prompts were built from text."""
    prompt_attributes: tuple[dict[str, Any], ...] = ()
    role_groups: int | None = None
    """Named positions: how many groups of prompts shared role positions."""
    split: dict[str, Any] | None = None
    """:meth:`PatchResult.split_by`: the attribute value this part holds."""
    compared: bool = False
    """Both directions were run and read together (:func:`actpatch.compare`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The user's own notes (and the app's config digest); free-form JSON."""

    # -- read-only views of the technique's part ----------------------------------------
    @property
    def method(self) -> Method:
        """How the numbers were obtained, from the technique's part."""
        return _METHODS[type(self.technique)]

    def _part(self, kind: type, name: str, default: Any) -> Any:
        return getattr(self.technique, name) if isinstance(self.technique, kind) else default

    @property
    def engine(self) -> Engine | None:
        """The exact engine that ran; None for estimates and path patching."""
        return self._part(ExactInfo, "engine", None)

    @property
    def estimate(self) -> Estimate | None:
        return self._part(AtpInfo, "estimate", None)

    @property
    def qk_fix(self) -> bool:
        return self._part(AtpInfo, "qk_fix", False)

    @property
    def grad_drop(self) -> bool:
        return self._part(AtpInfo, "grad_drop", False)

    @property
    def relp(self) -> bool:
        return self._part(AtpInfo, "relp", False)

    @property
    def sites(self) -> tuple[str, ...]:
        return self._part(ExactInfo, "sites", ())

    @property
    def subspace(self) -> dict[str, Any] | None:
        return self._part(ExactInfo, "subspace", None)

    @property
    def subspace_check(self) -> SubspaceCheck | None:
        return self._part(ExactInfo, "subspace_check", None)

    @property
    def senders(self) -> tuple[str, ...]:
        return self._part(PathInfo, "senders", ())

    @property
    def receivers(self) -> tuple[str, ...]:
        return self._part(PathInfo, "receivers", ())

    @property
    def window(self) -> int:
        """Layers patched together per cell (1 unless a window was asked for)."""
        return int(self.grid.get("window") or 1)

    @property
    def label(self) -> str:
        """How the numbers were computed, in one word: ``batched``, ``reference``, ``atp``,
        ``atp+qk_fix``, ``atp+graddrop``, ``atp*``, ``relp`` or ``path``."""
        if self.method is Method.ATP:
            if self.relp:
                return "relp"
            return ("atp*" if self.qk_fix and self.grad_drop else "atp+qk_fix" if self.qk_fix
                    else "atp+graddrop" if self.grad_drop else "atp")
        if self.method is Method.PATH:
            return "path"
        return self.engine.value if self.engine is not None else "exact"

    def replace(self, **changes: Any) -> "ResultInfo":
        """A copy with ``changes`` applied (the info is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (:mod:`actpatch._codec`)."""
        return encode(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResultInfo":
        """Inverse of :meth:`to_dict`."""
        return decode(cls, d)

    @classmethod
    def from_format2(cls, d: dict[str, Any]) -> "ResultInfo":
        """The info of a result saved by actpatch 0.2 (format 2: one flat record of every
        technique's options, prompt texts and the subspace check in ``extra``)."""
        d = dict(d)
        method = Method(d.pop("method"))
        extra = dict(d.pop("extra", None) or {})
        texts = extra.pop("prompt_texts", None) or ()
        check = extra.pop("subspace_check", None)
        if method is Method.ATP:
            technique: TechniqueInfo = AtpInfo(estimate=Estimate(d.get("estimate") or "signed"),
                                               qk_fix=bool(d.get("qk_fix")), grad_drop=bool(d.get("grad_drop")))
        elif method is Method.PATH:
            technique = PathInfo(senders=tuple(d.get("senders", ())), receivers=tuple(d.get("receivers", ())))
        else:
            technique = ExactInfo(engine=Engine(d["engine"]) if d.get("engine") else None,
                                  sites=tuple(d.get("sites", ())), subspace=d.get("subspace"),
                                  subspace_check=decode(SubspaceCheck, check) if check else None)
        grid = {**dict(d.pop("axes", None) or {}), "window": int(d.pop("window", 1) or 1)}
        common = {k: v for k, v in d.items() if k in _COMMON}
        return decode(cls, {**common, "grid": grid, "extra": extra}).replace(
            technique=technique, prompt_texts=tuple(tuple(t) for t in texts))

    @classmethod
    def from_legacy(cls, meta: dict[str, Any], metrics: Sequence[str]) -> "ResultInfo":
        """The info of a result saved by actpatch 0.1.0, whose ``meta`` was a free-form dict."""
        meta = dict(meta)
        pop = meta.pop
        model = pop("model", {}) or {}
        method = pop("method", "exact")
        engine = pop("engine", None)
        plan = pop("plan", {}) or {}
        m = Method.PATH if method == "path_patching" else Method(method)
        technique: TechniqueInfo
        if m is Method.ATP:
            est = pop("estimate", None)
            technique = AtpInfo(estimate=Estimate(est) if est else Estimate.SIGNED,
                                qk_fix=engine in ("atp+qk_fix", "atp*"), grad_drop=engine in ("atp+graddrop", "atp*"))
        elif m is Method.PATH:
            technique = PathInfo(senders=tuple(pop("senders", ())), receivers=tuple(pop("receivers", ())))
        else:
            technique = ExactInfo(engine=Engine(engine) if engine in ("batched", "reference") else None,
                                  sites=tuple(pop("sites", ())))
        for consumed in ("estimate", "senders", "receivers", "sites"):  # the other techniques' options
            pop(consumed, None)
        known = cls(
            target=str(pop("target", "?")), direction=Direction(pop("direction")), technique=technique,
            metrics=tuple(pop("metrics", metrics)), corruption=CorruptionSpec.from_json(pop("corruption", None)),
            seed=int(pop("seed", 0)),
            provenance=Provenance(model=str(model.get("name", "?")), family=str(model.get("family", "?")),
                                  weight_hash=str(model.get("weight_hash", "?")), prompts=pop("prompts", {}) or {},
                                  versions=pop("versions", {}) or {}),
            grid={**dict(plan), "window": int(pop("window", 1) or 1)},
            diagnostics=Diagnostics(
                clean_correct=tuple(pop("clean_correct")) if meta.get("clean_correct") is not None else None,
                null_patch_max_abs=pop("null_patch_max_abs", None)),
            prompt_attributes=tuple(pop("prompt_attributes", ())), role_groups=pop("role_groups", None),
            split=pop("split", None), compared=bool(pop("compared", False)),
            prompt_texts=tuple(tuple(t) for t in pop("prompt_texts", None) or ()),
        )
        meta.pop("clean_correct", None)
        return known.replace(extra=meta)  # config_digest, kept_share, anything else


_COMMON = {f.name for f in dataclasses.fields(ResultInfo)} - {"technique", "grid", "extra", "prompt_texts"}


@dataclass
class PatchResult:
    """The outcome of a sweep.

    Attributes:
        dims: axis names of one cell grid, e.g. ``("layer", "pos")`` or ``("layer", "head")``.
        coords: labels per dim (token strings label positions).
        raw: per metric, the patched metric per prompt, shape ``(n_prompts, *grid)``, in the
            metric's own units (``per_prompt_raw``: the primary metric's; ``per_prompt_normalised``:
            the same normalised, 1 = clean, 0 = corrupted; ``values``: their mean over prompts).
        clean, corrupted: per metric, the baselines per prompt, shape ``(n_prompts,)``.
        info: :class:`ResultInfo`: target, direction, method, corruption, seed, engine,
            provenance (model and weight hash, prompt set, versions), diagnostics.
        findings: :class:`~actpatch.Finding` s about this result.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> model = tiny_model("gpt2")
        >>> prompts = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.sweep(model, prompts, "resid_pre", metric=["logit_diff", "prob"], progress=False)
        >>> res.values.shape, res.dims, res.metrics, res.info.direction.value
        (torch.Size([2, 4]), ('layer', 'pos'), ['logit_diff', 'prob'], 'noise')
        >>> len(res.to_pandas())  # a row per patch and metric
        16
    """

    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    READABLE_FORMATS: ClassVar[tuple[int, ...]] = (1, 2, FORMAT_VERSION)
    """Formats :meth:`load` reads: this version's and every earlier one."""

    dims: tuple[str, ...]
    coords: dict[str, list]
    raw: dict[str, torch.Tensor]
    clean: dict[str, torch.Tensor]
    corrupted: dict[str, torch.Tensor]
    info: ResultInfo
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

    def prompt_values(self, metric: str | None = None, *, normalised: bool = True) -> torch.Tensor:
        """Per-prompt values ``(n_prompts, *grid)`` of ``metric``: normalised with the set's mean
        baselines (so that their mean is :meth:`normalised`), or raw metric units."""
        m = self._check_metric(metric)
        if not normalised:
            return self.raw[m]
        b = self.baselines[m]
        return normalise(self.raw[m], b["clean"], b["corrupted"])

    @property
    def per_prompt_normalised(self) -> torch.Tensor:
        """The primary metric per prompt, normalised (1 = clean, 0 = corrupted, with the set's
        mean baselines), shape ``(n_prompts, *grid)``; its mean over prompts is :attr:`values`."""
        return self.prompt_values()

    @property
    def per_prompt_raw(self) -> torch.Tensor:
        """The primary metric per prompt in its own units (``raw[metric]``), shape ``(n_prompts, *grid)``."""
        return self.prompt_values(normalised=False)

    @property
    def per_prompt(self) -> torch.Tensor:
        """Deprecated name of :attr:`per_prompt_normalised` (it never was raw: see :attr:`per_prompt_raw`)."""
        import warnings

        warnings.warn("PatchResult.per_prompt is per_prompt_normalised; use that name (or per_prompt_raw).",
                      DeprecationWarning, stacklevel=2)
        return self.per_prompt_normalised

    def top(self, k: int = 10, metric: str | None = None, *, ci: bool = True) -> list["Cell"]:
        """The ``k`` cells that move ``metric`` most (|value - no effect|), labelled by their
        coordinates, with 95% bootstrap intervals when there are several prompts.

        Example:
            >>> import actpatch as ap
            >>> from actpatch.testing import tiny_model, random_pairs
            >>> res = ap.sweep(tiny_model("gpt2"), random_pairs(n=3), "z", progress=False)
            >>> cell = res.top(1)[0]
            >>> sorted(cell.where), cell.low is not None
            (['head', 'layer'], True)
        """
        from .stats import top_cells

        return top_cells(self, k, self._check_metric(metric), ci=ci)

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

    # -- showing itself ----------------------------------------------------------------------
    def plot(self, metric: str | None = None, title: str | None = None) -> "go.Figure":
        """A plotly heatmap of the normalised effect (the report's figure): token labels, a
        diverging scale whose white is the no-effect value (1 for noising, 0 for denoising),
        hover with coordinates, value and 95% CI. Works offline.

        Example:
            >>> import actpatch as ap
            >>> from actpatch.testing import tiny_model, random_pairs
            >>> fig = ap.sweep(tiny_model("gpt2"), random_pairs(n=2), "resid_pre", progress=False).plot()
            >>> fig.data[0].type
            'heatmap'
        """
        from .report.figures import result_figure

        return result_figure(self, title, self._check_metric(metric))

    def _repr_html_(self) -> str:
        from .report.summary import result_html

        return result_html(self)

    # -- new results from this one -----------------------------------------------------------
    def replace(self, **changes: Any) -> "PatchResult":
        """A copy with ``changes`` applied to its fields (tensors are shared, not copied)."""
        return dataclasses.replace(self, **changes)

    def subset(self, prompts: Sequence[int] | torch.Tensor) -> "PatchResult":
        """The result over the prompts at indices ``prompts`` (in that order), with per-prompt
        diagnostics and attributes to match and its findings recomputed.

        Example:
            >>> import actpatch as ap
            >>> from actpatch.testing import tiny_model, random_pairs
            >>> res = ap.sweep(tiny_model("gpt2"), random_pairs(n=3), "resid_pre", progress=False)
            >>> res.subset([2, 0]).n_prompts
            2
        """
        idx = torch.as_tensor(prompts, dtype=torch.long).flatten()
        bad = [int(i) for i in idx if not 0 <= int(i) < self.n_prompts]
        if bad:
            raise ResultError(f"Prompt indices {bad} are out of range for a result of {self.n_prompts} prompts.")
        pick = idx.tolist()
        diag = self.info.diagnostics
        cc = tuple(diag.clean_correct[i] for i in pick) if diag.clean_correct is not None else None
        attrs = tuple(self.info.prompt_attributes[i] for i in pick) if self.info.prompt_attributes else ()
        info = self.info.replace(diagnostics=dataclasses.replace(diag, clean_correct=cc), prompt_attributes=attrs)
        return self._with_prompts(info, {m: v[idx] for m, v in self.raw.items()},
                                  {m: v[idx] for m, v in self.clean.items()}, {m: v[idx] for m, v in self.corrupted.items()})

    @classmethod
    def concat(cls, parts: Sequence["PatchResult"]) -> "PatchResult":
        """One result over the prompts of ``parts`` (in order): same grid, metrics, target,
        direction and method; diagnostics merged, findings recomputed."""
        if not parts:
            raise ResultError("concat() needs at least one result.")
        first = parts[0]
        for p in parts[1:]:
            same = (p.dims == first.dims and p.coords == first.coords and p.metrics == first.metrics
                    and (p.info.target, p.info.direction, p.info.method) == (first.info.target, first.info.direction,
                                                                           first.info.method))
            if not same:
                raise ResultError(f"Cannot concatenate {first!r} and {p!r}: grids, metrics, target, direction and "
                                  f"method must match.")
        ccs = [p.info.diagnostics.clean_correct for p in parts]
        nulls = [p.info.diagnostics.null_patch_max_abs for p in parts if p.info.diagnostics.null_patch_max_abs is not None]
        diag = Diagnostics(clean_correct=tuple(c for cc in ccs for c in cc) if all(c is not None for c in ccs) else None,
                           null_patch_max_abs=max(nulls) if nulls else None)
        attrs = tuple(a for p in parts for a in p.info.prompt_attributes) if all(p.info.prompt_attributes for p in parts) else ()
        cat = lambda get: {m: torch.cat([get(p)[m] for p in parts]) for m in first.metrics}  # noqa: E731
        info = first.info.replace(diagnostics=diag, prompt_attributes=attrs)
        return first._rechecked(info, cat(lambda p: p.raw), cat(lambda p: p.clean), cat(lambda p: p.corrupted),
                                [f for p in parts for f in p.findings])

    def _with_prompts(self, info: ResultInfo, raw: dict, clean: dict, corrupted: dict) -> "PatchResult":
        return self._rechecked(info, raw, clean, corrupted, self.findings)

    def _rechecked(self, info: ResultInfo, raw: dict, clean: dict, corrupted: dict,
                   stated: Sequence[Finding]) -> "PatchResult":
        """A result of this grid over other prompts: the checks' findings recomputed, the
        technique findings among ``stated`` kept (each once)."""
        from .checks import check

        out = PatchResult(dims=self.dims, coords=self.coords, raw=raw, clean=clean, corrupted=corrupted, info=info)
        out.findings = check(out) + technique_findings(stated)
        return out

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
            "info": self.info.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "PatchResult":
        """Read a result written by :meth:`save` (this version's format, or 0.1.0's).

        Raises:
            ResultError: the directory is missing or incomplete, a file is truncated, hand-edited
                into an inconsistent state, or of a foreign format. Nothing is unpickled.
        """
        from ._io import read_result

        return read_result(cls, Path(path))

    @staticmethod
    def decode_info(meta: dict[str, Any], version: int, metrics: Sequence[str]) -> ResultInfo:
        """The :class:`ResultInfo` in a saved ``meta.json`` of format ``version``."""
        if version == 1:
            return ResultInfo.from_legacy(meta["meta"], metrics)
        return ResultInfo.from_format2(meta["info"]) if version == 2 else ResultInfo.from_dict(meta["info"])

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
            f"PatchResult({self.info.target}, {self.info.direction.value}, {self.info.label}, dims=({dims}), "
            f"metrics={self.metrics}, n_prompts={self.n_prompts}, findings={len(self.findings)})"
        )


def _cells(shape: tuple[int, ...]):  # noqa: ANN202 - generator of index tuples
    import itertools

    return itertools.product(*(range(n) for n in shape))
