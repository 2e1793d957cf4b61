"""Corruptions: how the corrupted run (or the corrupted activations) are made.

Input-level corruptions produce a corrupted :class:`Run` (token ids, optionally noise added to
the token embeddings); activation-level ones (mean, zero) replace the activations at the
patched sites and only make sense for noising.

===========  =========================================================  ==================
name         corrupted run / activation                                  GLOSSARY
===========  =========================================================  ==================
str          the pair's corrupted prompt (symmetric token replacement)    recommended (Z&N)
resample     another prompt's clean run (seeded derangement per length)   resample ablation
gaussian     clean ids + N(0, (3 sigma)^2) on the subject embeddings,     ROME causal tracing
             averaged over ``n_draws`` seeded draws
mean         mean clean activation over the prompts (noising only)        mean ablation
zero         zeros (noising only)                                         zero ablation
===========  =========================================================  ==================
"""

from __future__ import annotations

import dataclasses
import enum
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

import torch

from .errors import CorruptionError
from .hooks import intervene
from .sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model
    from .prompts.continuation import Continuation
    from .prompts.promptset import LengthGroup, PromptSet

__all__ = [
    "CorruptionKind", "Run", "Corruption", "SymmetricReplacement", "Resample", "GaussianNoise", "MeanAblation", "ZeroAblation",
    "CorruptionSpec", "parse_corruption", "from_description", "CORRUPTIONS",
]


class CorruptionKind(str, enum.Enum):
    """The kinds of corruption (the ``name`` of each :class:`Corruption`)."""

    STR = "str"
    """Symmetric token replacement: the pairs' corrupted prompts."""
    RESAMPLE = "resample"
    """Another prompt's clean run (seeded derangement within each length)."""
    GAUSSIAN = "gaussian"
    """ROME noise on the subject token embeddings."""
    MEAN = "mean"
    """Mean clean activation over the prompts (noising only)."""
    ZERO = "zero"
    """Zeros (noising only)."""


@dataclass(frozen=True)
class Run:
    """One batched forward pass: token ids ``(B, T)``, optional noise ``(B, T, d_model)``
    added to the token embeddings, and the answers' :class:`Continuation` (teacher-forced
    after the prompt; ``None``: the last position alone is read)."""

    ids: torch.Tensor
    embed_noise: torch.Tensor | None = None
    continuation: "Continuation | None" = None

    def readout(self, model: "Model", *, grad: bool = False) -> torch.Tensor:
        """The logits the metrics read, ``(B, readouts, vocab)`` (:meth:`Model.readout`); run
        inside :meth:`context` when the run has embedding noise."""
        return model.readout(self.ids, self.continuation, grad=grad)

    def select(self, rows: torch.Tensor) -> "Run":
        """The rows ``rows`` of this run (ids, noise and continuation alike): a chunk of a batch
        that a memory budget splits, computing exactly what those rows compute in the whole."""
        noise = None if self.embed_noise is None else self.embed_noise[rows.to(self.embed_noise.device)]
        cont = None if self.continuation is None else self.continuation.select(rows)
        return Run(self.ids[rows.to(self.ids.device)], noise, cont)

    def with_continuation(self, continuation: "Continuation | None") -> "Run":
        """This run with the answers' continuation attached (the rows must match)."""
        return dataclasses.replace(self, continuation=continuation)

    def context(self, model: "Model") -> ContextManager[None]:
        """Hooks this run needs (the embedding noise), as a context manager."""
        if self.embed_noise is None:
            return nullcontext()
        noise = self.embed_noise
        return intervene(model, {Site("embed"): lambda x: x + noise.to(device=x.device, dtype=x.dtype)})

def first_difference(a: Run, b: Run) -> int:
    """First position where two runs' inputs (ids or embedding noise) differ in any row; the
    sequence length if they never do. Before it, causal models compute identical activations."""
    if a.ids.shape != b.ids.shape:  # pairs of different lengths: no shared prefix is assumed
        return 0
    diff = (a.ids != b.ids).any(0)
    for noise in (a.embed_noise, b.embed_noise):
        if noise is not None:
            diff = diff | (noise != 0).any(-1).any(0)
    where = diff.nonzero()
    return int(where[0]) if len(where) else int(a.ids.shape[1])


@dataclass(frozen=True)
class CorruptionSpec:
    """What a result records about its corruption: a frozen value, enough to rebuild it
    (:meth:`build`). ``positions`` None means "where clean and corrupted differ"; ``sigma`` is
    the measured embedding scale of Gaussian noise (None for the other kinds).

    Example:
        >>> GaussianNoise(scale=2.0).describe().build()
        GaussianNoise(scale=2.0, n_draws=10, positions=None, sigma=None)
    """

    name: CorruptionKind = CorruptionKind.STR
    scale: float | None = None
    n_draws: int | None = None
    sigma: float | None = None
    positions: tuple[int, ...] | None = None

    @property
    def kind(self) -> CorruptionKind:
        return self.name

    def build(self) -> "Corruption":
        """The corruption this spec describes (Gaussian noise keeps no sigma: it is measured
        again on the prompts it runs on)."""
        if self.name is CorruptionKind.GAUSSIAN:
            return GaussianNoise(scale=3.0 if self.scale is None else self.scale,
                                 n_draws=10 if self.n_draws is None else self.n_draws, positions=self.positions)
        return CORRUPTIONS[self.name]()

    def to_json(self) -> dict[str, Any]:
        """The JSON shape results have always saved (``positions: "diff"`` for the default)."""
        if self.name is not CorruptionKind.GAUSSIAN:
            return {"name": self.name.value}
        return {"name": self.name.value, "scale": self.scale, "n_draws": self.n_draws, "sigma": self.sigma,
                "positions": list(self.positions) if self.positions is not None else "diff"}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "CorruptionSpec":
        """Read :meth:`to_json`'s shape (and every saved format's); ``str`` when absent."""
        d = dict(data or {})
        try:
            kind = CorruptionKind(d.get("name", "str"))
        except ValueError:
            raise CorruptionError(f"Unknown corruption {d.get('name')!r} in a saved result; this actpatch knows "
                                  f"{', '.join(k.value for k in CorruptionKind)}.") from None
        pos = d.get("positions")
        return cls(name=kind, scale=d.get("scale"), n_draws=d.get("n_draws"), sigma=d.get("sigma"),
                   positions=None if pos in (None, "diff") else tuple(int(p) for p in pos))


class Corruption:
    """Base class. ``draws`` runs per prompt; the batch is prompt-major (``g * draws + r``).

    Corruptions are values: :meth:`prepared` returns a copy with set-level statistics filled
    in and never changes the caller's object."""

    kind: CorruptionKind = CorruptionKind.STR
    activation_level: bool = False
    draws: int = 1

    @property
    def name(self) -> str:
        """The kind's value (``"str"``, ``"gaussian"``...)."""
        return self.kind.value

    def prepared(self, model: "Model", prompts: "PromptSet") -> "Corruption":
        """This corruption ready for ``prompts`` (set-level statistics, e.g. the embedding sigma,
        measured); ``self`` when there is nothing to measure. Called once per experiment."""
        return self

    def clean_run(self, group: "LengthGroup") -> Run:
        return Run(group.clean.repeat_interleave(self.draws, 0))

    def corrupted_run(self, model: "Model", group: "LengthGroup", prompts: "PromptSet", seed: int) -> Run:
        raise NotImplementedError

    def source(self, clean_acts: torch.Tensor) -> torch.Tensor:
        """Activation-level corruptions: the corrupted activation given clean ones ``(B, ...)``."""
        raise NotImplementedError

    pooled: bool = False
    """:meth:`source` pools over all prompts of a length group (mean ablation): a chunk of the
    group gets :meth:`pooled_source` of the whole group's sum instead."""

    def pooled_source(self, total: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
        """What :meth:`source` gives a chunk ``like`` of a length group from the group's sum of
        clean activations over its ``rows`` rows (``total``, ``(1, ...)``)."""
        raise NotImplementedError

    def describe(self) -> CorruptionSpec:
        """The frozen value a result records (:class:`CorruptionSpec`)."""
        return CorruptionSpec(self.kind)


class SymmetricReplacement(Corruption):
    """The corrupted prompts of the pairs (symmetric token replacement)."""

    kind = CorruptionKind.STR

    def corrupted_run(self, model: "Model", group: "LengthGroup", prompts: "PromptSet", seed: int) -> Run:
        return Run(group.corrupted)


def _derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point (n >= 2)."""
    while True:
        p = torch.randperm(n, generator=gen)
        if not (p == torch.arange(n)).any():
            return p


class Resample(Corruption):
    """Each prompt's corrupted run is another prompt's clean run (same token length), chosen by
    a seeded derangement, so answers keep their meaning while the context changes."""

    kind = CorruptionKind.RESAMPLE

    def corrupted_run(self, model: "Model", group: "LengthGroup", prompts: "PromptSet", seed: int) -> Run:
        if len(group.indices) < 2:
            raise CorruptionError(
                f"Resample needs at least two prompts of each token length; length {group.seq_len} has "
                f"{len(group.indices)}. Add prompts or use corruption='str'."
            )
        gen = torch.Generator().manual_seed(seed * 1000003 + group.seq_len)
        return Run(group.clean[_derangement(len(group.indices), gen)])


@dataclass(frozen=True)
class GaussianNoise(Corruption):
    """ROME-style noise: N(0, (scale * sigma)^2) added to the token embeddings at ``positions``
    (default: where each pair's clean and corrupted prompts differ, i.e. the subject tokens),
    sigma = std of the token embeddings at those positions over the whole set, averaged over
    ``n_draws`` seeded draws. Off-distribution: prefer symmetric token replacement."""

    scale: float = 3.0
    n_draws: int = 10
    positions: Sequence[int] | None = None
    sigma: float | None = field(default=None)
    keep_sigma: bool = field(default=False, repr=False)
    """Keep ``sigma`` when run on another prompt set (see :meth:`fixed`)."""
    kind = CorruptionKind.GAUSSIAN

    def __post_init__(self) -> None:
        if self.n_draws < 1:
            raise CorruptionError(f"n_draws={self.n_draws}: need at least one draw.")
        if self.scale < 0:
            raise CorruptionError(f"scale={self.scale}: the noise scale cannot be negative.")

    @property
    def draws(self) -> int:  # type: ignore[override]
        """Runs per prompt: one per noise draw."""
        return self.n_draws

    def _mask(self, prompts: "PromptSet", i: int) -> torch.Tensor:
        T = prompts.clean[i].numel()
        if self.positions is not None:
            m = torch.zeros(T, dtype=torch.bool)
            bad = [p for p in self.positions if not -T <= p < T]
            if bad:
                raise CorruptionError(f"Noise positions {bad} are out of range for a prompt of {T} tokens.")
            m[list(self.positions)] = True
            return m
        m = prompts.diff_mask(i)
        if not m.any():
            raise CorruptionError(
                f"Prompt {i}: clean and corrupted are identical, so there are no subject tokens to noise. "
                f"Pass GaussianNoise(positions=[...])."
            )
        return m

    def fixed(self, model: "Model", prompts: "PromptSet") -> "GaussianNoise":
        """A copy whose sigma is measured on ``prompts`` and kept when it runs on subsets of them."""
        return dataclasses.replace(self, sigma=self._sigma(model, prompts), keep_sigma=True)

    def prepared(self, model: "Model", prompts: "PromptSet") -> "GaussianNoise":
        """A copy with sigma measured on ``prompts`` (kept when :meth:`fixed` set it)."""
        if self.keep_sigma and self.sigma is not None:
            return self
        return dataclasses.replace(self, sigma=self._sigma(model, prompts))

    def _sigma(self, model: "Model", prompts: "PromptSet") -> float:
        with torch.inference_mode():
            emb = model.adapter.embed_module()
            rows = [emb(prompts.clean[i][self._mask(prompts, i)]) for i in range(len(prompts))]
        return float(torch.cat(rows).float().std())

    def corrupted_run(self, model: "Model", group: "LengthGroup", prompts: "PromptSet", seed: int) -> Run:
        if self.sigma is None:
            raise CorruptionError("GaussianNoise has no sigma yet; use corruption.prepared(model, prompts) first "
                                  "(every entry point does).")
        R, (G, T) = self.n_draws, group.clean.shape
        gen = torch.Generator().manual_seed(seed * 1000003 + T)
        noise = torch.randn(G * R, T, model.d_model, generator=gen) * (self.scale * float(self.sigma))  # type: ignore[arg-type]
        mask = torch.stack([self._mask(prompts, int(i)) for i in group.indices]).repeat_interleave(R, 0)
        return Run(group.clean.repeat_interleave(R, 0), noise * mask[..., None])

    def describe(self) -> CorruptionSpec:
        return CorruptionSpec(self.kind, scale=self.scale, n_draws=self.n_draws, sigma=self.sigma,
                              positions=tuple(self.positions) if self.positions is not None else None)


class MeanAblation(Corruption):
    """Replace activations by their mean over the prompts of the same length (clean runs).
    Noising only; the corrupted baseline (0) is the pairs' corrupted prompts."""

    kind = CorruptionKind.MEAN
    activation_level = True

    def corrupted_run(self, model: "Model", group: "LengthGroup", prompts: "PromptSet", seed: int) -> Run:
        return Run(group.corrupted)

    pooled = True

    def source(self, clean_acts: torch.Tensor) -> torch.Tensor:
        return clean_acts.mean(0, keepdim=True).expand_as(clean_acts)

    def pooled_source(self, total: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
        return (total / rows).to(like.dtype).expand_as(like)


class ZeroAblation(MeanAblation):
    """Replace activations by zeros (off-distribution; offered for comparison). Noising only."""

    kind = CorruptionKind.ZERO
    pooled = False

    def source(self, clean_acts: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(clean_acts)


CORRUPTIONS: dict[CorruptionKind, type[Corruption]] = {
    CorruptionKind.STR: SymmetricReplacement,
    CorruptionKind.RESAMPLE: Resample,
    CorruptionKind.GAUSSIAN: GaussianNoise,
    CorruptionKind.MEAN: MeanAblation,
    CorruptionKind.ZERO: ZeroAblation,
}


def parse_corruption(corruption: "str | CorruptionKind | Corruption") -> Corruption:
    """A :class:`Corruption` from its kind or name (``str``, ``resample``, ``gaussian``, ``mean``,
    ``zero``) or an instance (returned as is)."""
    if isinstance(corruption, Corruption):
        return corruption
    try:
        return CORRUPTIONS[CorruptionKind(corruption)]()
    except ValueError:
        raise CorruptionError(
            f"Unknown corruption {corruption!r}; use one of {', '.join(k.value for k in CorruptionKind)} or a "
            f"Corruption instance."
        ) from None


def from_description(description: "CorruptionSpec | dict[str, Any] | None") -> Corruption:
    """The corruption a result records (a :class:`CorruptionSpec`, or its JSON shape); ``str``
    when absent."""
    spec = description if isinstance(description, CorruptionSpec) else CorruptionSpec.from_json(description)
    return spec.build()
