"""Subspaces: patch only the part of an activation that lies in span(U).

A subspace patch writes ``x_base + U^T U (x_src - x_base)`` for orthonormal rows ``U`` (k x d):
the base run's activation with its coordinates along U replaced by the source run's, the rest
kept. It applies to any site whose last axis is a vector: the residual kinds (``embed``,
``resid_pre`` / ``mid`` / ``post``, ``resid_final``, ``mlp_in``), ``attn_out``, ``mlp_out``, the
per-head ``z`` / ``q`` / ``k`` / ``v`` (d = d_head) and ``mlp_post`` (d = d_mlp).

A :class:`Subspace` holds one basis shared by every layer, or one per layer (a sweep over layers
with a direction found at each). Bases that are not orthonormal are orthonormalised (and the
result says so); rank-deficient ones are refused.

Example:
    >>> import torch
    >>> from actpatch.subspace import Subspace
    >>> s = Subspace.of(torch.tensor([[3.0, 4.0, 0.0]]))
    >>> s.basis_for(0)
    tensor([[0.6000, 0.8000, 0.0000]])
    >>> s.apply(torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]), layer=0)  # moves along U only
    tensor([0.8400, 1.1200, 0.0000])
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Union

import torch

from .errors import SubspaceError
from .findings import Finding, Level
from .sites import Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["along", "Subspace", "SubspaceCheck", "SubspaceVerdict", "SubspaceLike", "as_subspace", "SUBSPACE_KINDS", "width"]

SUBSPACE_KINDS = frozenset(SiteKind) - {SiteKind.PATTERN}
"""Kinds whose last axis is a vector a basis can live in."""

_ORTHO_TOL = 1e-5


def width(model: "Model", kind: SiteKind) -> int:
    """The size of the last axis of ``kind``'s activation (what a basis row must have)."""
    last = kind.layout[-1]
    return {"d_model": model.d_model, "d_head": model.d_head, "d_mlp": model.d_mlp}[last]


def _orthonormal(U: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """Orthonormal rows spanning U's rows, and whether they had to be orthonormalised."""
    if U.dim() == 1:
        U = U[None]
    if U.dim() != 2 or U.shape[0] == 0:
        raise SubspaceError(f"{what}: a basis is a (k, d) tensor with k >= 1 rows, got shape {tuple(U.shape)}.")
    if not torch.isfinite(U).all():
        raise SubspaceError(f"{what}: the basis has NaN or infinite entries.")
    U = U.detach().to(torch.float32).cpu()
    k, d = U.shape
    if k > d:
        raise SubspaceError(f"{what}: {k} directions in a {d}-dimensional space cannot be independent; a basis "
                            f"is (k, d), one direction per row: if you have a ({k}, {d}) matrix of {d} column "
                            f"directions, transpose it (basis.T).")
    gram = U @ U.T
    if torch.allclose(gram, torch.eye(k), atol=_ORTHO_TOL):
        return U, False
    q, r = torch.linalg.qr(U.T)  # U^T = Q R: Q's columns span U's rows
    diag = r.diagonal().abs()
    if diag.min() <= 1e-6 * max(float(diag.max()), 1e-30):
        raise SubspaceError(
            f"{what}: the {k} rows are linearly dependent (rank {int((diag > 1e-6 * diag.max()).sum())}); "
            f"drop the redundant directions or ask for fewer (k)."
        )
    return (q * torch.sign(r.diagonal())).T.contiguous(), True


def along(x: torch.Tensor, src: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """``x + (src - x) P``, in ``x``'s dtype: ``x`` with its coordinates along the basis of the
    projector ``P = U^T U`` taken from ``src``. The one subspace patch every engine and DAS apply."""
    return x + (src.to(x.dtype) - x) @ projector.to(x.dtype)


@dataclass(frozen=True)
class Subspace:
    """Orthonormal bases (k x d), shared (``shared``) or per layer (``per_layer``), with where
    they came from (``provenance``) and what was done to them (``findings``)."""

    shared: torch.Tensor | None = None
    per_layer: Mapping[int, torch.Tensor] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()

    def __repr__(self) -> str:
        """A summary: k, d, shared or which layers, where it came from; never the bases."""
        where = "shared" if self.shared is not None else f"layers {sorted(self.per_layer)}"
        found = self.provenance.get("method")
        return (f"Subspace(k={self.k}, d={self.d}, {where}" + (f", {found}" if found else "")
                + (f", {len(self.findings)} findings" if self.findings else "") + ")")

    @classmethod
    def of(cls, basis: "torch.Tensor | Mapping[int, torch.Tensor]", **provenance: Any) -> "Subspace":
        """A subspace from a (k, d) tensor (or a (d,) direction), or a ``{layer: tensor}`` dict."""
        fixed: list[str] = []
        if isinstance(basis, Mapping):
            if not basis:
                raise SubspaceError("An empty {layer: basis} dict; give at least one layer's basis.")
            per = {}
            for layer, U in basis.items():
                per[int(layer)], changed = _orthonormal(torch.as_tensor(U), f"layer {layer}'s basis")
                if changed:
                    fixed.append(f"layer {layer}")
            if len({U.shape[1] for U in per.values()}) != 1:
                raise SubspaceError("The per-layer bases have different widths; they must all fit one site kind.")
            sub = cls(per_layer=per, provenance=dict(provenance))
        else:
            U, changed = _orthonormal(torch.as_tensor(basis), "the basis")
            fixed = ["the basis"] if changed else []
            sub = cls(shared=U, provenance=dict(provenance))
        if fixed:
            sub = cls(sub.shared, sub.per_layer, sub.provenance, (Finding(
                Level.INFO, "subspace_orthonormalised",
                f"The rows of {', '.join(fixed)} were not orthonormal; actpatch patched along an orthonormal basis "
                f"of their span instead (QR), which spans the same subspace.",
                "Pass orthonormal rows to patch along exactly the directions given."),))
        return sub

    @property
    def d(self) -> int:
        """The width of the space the bases live in."""
        U = self.shared if self.shared is not None else next(iter(self.per_layer.values()))
        return int(U.shape[1])

    @property
    def k(self) -> int:
        """Directions per basis (the largest, for per-layer bases of several sizes)."""
        if self.shared is not None:
            return int(self.shared.shape[0])
        return max(int(U.shape[0]) for U in self.per_layer.values())

    def basis_for(self, layer: int | None) -> torch.Tensor:
        """The (k, d) basis used at ``layer``."""
        if self.shared is not None:
            return self.shared
        if layer is None or layer not in self.per_layer:
            have = sorted(self.per_layer)
            raise SubspaceError(f"No basis for layer {layer}; this subspace has bases for layers {have}. "
                                f"Restrict the sweep to those layers or give a shared basis.")
        return self.per_layer[layer]

    def projector(self, layer: int | None, like: torch.Tensor) -> torch.Tensor:
        """``U^T U`` (d, d) for ``layer``, in ``like``'s dtype and device."""
        U = self.basis_for(layer).to(device=like.device, dtype=like.dtype)
        return U.T @ U

    def apply(self, x: torch.Tensor, src: torch.Tensor, layer: int | None) -> torch.Tensor:
        """``x + (src - x) U^T U``: ``x`` with its coordinates along U taken from ``src``."""
        return along(x, src, self.projector(layer, x))

    def check(self, model: "Model", site: Site) -> None:
        """Raise :class:`SubspaceError` when this subspace cannot patch ``site`` of ``model``."""
        if site.kind not in SUBSPACE_KINDS:
            raise SubspaceError(f"{site}: a pattern's last axis is key positions, not a vector space; subspace "
                                f"patching applies to {', '.join(sorted(k.value for k in SUBSPACE_KINDS))}.")
        if site.index is not None:
            raise SubspaceError(f"{site}: a single index has no subspace; drop index= (patch the whole vector).")
        n = width(model, site.kind)
        if self.d != n:
            hint = (f" It looks transposed: a ({n}, {self.d}) matrix of column directions becomes a basis as "
                    f"basis.T." if self.k == n else "")
            raise SubspaceError(f"{site}: the basis has width {self.d} but {site.kind.value} vectors have "
                                f"{site.kind.layout[-1]} = {n}; give a (k, {n}) basis.{hint}")
        self.basis_for(site.layer)

    def describe(self) -> dict[str, Any]:
        """What a result records: k, d, the layers, where the basis came from, and a digest."""
        bases = [self.shared] if self.shared is not None else [self.per_layer[l] for l in sorted(self.per_layer)]
        digest = hashlib.sha256(b"".join(U.numpy().tobytes() for U in bases)).hexdigest()[:16]
        return {"k": self.k, "d": self.d, "layers": "shared" if self.shared is not None else sorted(self.per_layer),
                "digest": digest, **{k: v for k, v in self.provenance.items() if isinstance(v, (str, int, float, bool))}}


SubspaceLike = Union[Subspace, torch.Tensor, Mapping[int, torch.Tensor]]
"""What entry points accept as ``subspace=``: a :class:`Subspace`, a (k, d) tensor or a
``{layer: (k, d)}`` dict."""


def as_subspace(value: SubspaceLike | None) -> Subspace | None:
    if value is None or isinstance(value, Subspace):
        return value
    return Subspace.of(value)


class SubspaceVerdict(str, enum.Enum):
    """What the interpretability-illusion check concluded about one subspace patch. Only
    ``faithful`` says the subspace carries the component's effect through what the model reads;
    the others name what stands in the way."""

    ILLUSION = "illusion"
    """The effect comes from writing a direction the model does not vary (the patch does more
    than the whole component, or the read part alone does not carry it): do not interpret it."""
    DORMANT_PATHWAY_RISK = "dormant_pathway_risk"
    """Most of what the patch moves lies in the null space of the reading weights (the illusion's
    precondition), no illusion shows here, and the read part alone does not reproduce the effect
    (or there is none): a basis fitted to these activations can turn it into an illusion."""
    EXCEEDS_COMPONENT = "exceeds_component"
    """The subspace moves the metric clearly more than its whole component (over 1.25x, short of
    the illusion's 4x): the rest of the component pushes the other way, or the patch writes a
    signal the model does not carry. Not evidence that the subspace is the mechanism."""
    PARTIAL = "partial"
    """The subspace carries less than half of the whole component's effect: the component does
    more than this subspace explains."""
    NO_EFFECT = "no_effect"
    """Neither the subspace nor the whole component moves the metric (by ``min_effect``)."""
    UNSPLIT = "unsplit"
    """No single set of weights reads the site (residual stream, q / k / v): the read and unread
    parts cannot be separated, so the illusion cannot be ruled out; the effect share is reported."""
    FAITHFUL = "faithful"
    """The subspace carries between half and 1.25x of the component's effect, and most of what
    it moves is read by the weights downstream (or its read part alone reproduces the effect)."""


@dataclass(frozen=True)
class SubspaceCheck:
    """The numbers behind the interpretability-illusion check of one subspace patch
    (:func:`actpatch.subspaces.subspace_check`), its :class:`SubspaceVerdict` and its findings.

    ``effect_share``: the subspace patch's effect as a share of the whole component's (1: it
    carries all of it; None when the component has no effect to share). ``null_share``: the
    share (squared norm) of what the patch moves, the clean - corrupted difference projected on
    the basis, that lies in the null space of the reading weights (None without a single
    reader). ``values``: the subspace, its parts and the whole component patched, on the
    result's scale (normalised: 1 = clean, 0 = corrupted; no effect is 0 when denoising, 1 when
    noising).

    ``row_share``: the share of the basis in the reader's row space (1: everything it patches
    is read; None without a single reader). ``variation``: mean norm, over prompts and patched
    positions, of the clean - corrupted difference projected on the whole basis (``subspace``),
    its row-space part (``row``) and its null-space part (``null``). ``effects``: changes from
    the base run (units of the clean - corrupted gap) of patching along the basis, along each
    part alone, and the whole component (``component``)."""

    site: Site
    direction: str
    reader: str | None
    row_share: float | None
    variation: dict[str, float]
    effects: dict[str, float | None]
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    verdict: SubspaceVerdict | None = None
    """None only for checks saved before verdicts existed (actpatch < 0.3)."""
    effect_share: float | None = None
    null_share: float | None = None
    min_effect: float = 0.1
    """Effects smaller than this (units of the gap) count as none."""

    @property
    def values(self) -> dict[str, float | None]:
        """``effects`` on the result's scale: what ``res.values`` would read for each patch."""
        base = 1.0 if self.direction == "noise" else 0.0
        return {k: None if v is None else v + base for k, v in self.effects.items()}

    @property
    def flagged(self) -> bool:
        return any(f.code in ("subspace_illusion", "subspace_exceeds_component") for f in self.findings)

    def summary(self) -> str:
        """One line: the verdict and the numbers it rests on, on the result's scale."""
        v = self.values
        pct = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
        return (f"{self.site}: {self.verdict.value if self.verdict else 'no verdict (saved before verdicts)'}; "
                f"the subspace carries {pct(self.effect_share)} of the component's effect (value "
                f"{_num(v.get('subspace'))} vs {_num(v.get('component'))} for the whole component"
                + (f", {_num(v['row'])} for its read part alone" if v.get("row") is not None else "") + "); "
                f"{pct(self.null_share)} of what it moves lies in the null space of the "
                f"{self.reader or 'reader (none: not split)'}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        from ._codec import encode

        return encode(self)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
