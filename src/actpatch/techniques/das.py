"""DAS, distributed alignment search (Geiger, Wu, Potts, Icard & Goodman 2024): learn the
k-dimensional subspace at a site through which the clean run's information flows.

Interchange-intervention training: for each training pair, run the corrupted prompt with the
site's coordinates along ``U`` taken from the clean run (a subspace patch, denoising) and push
the output towards the clean answer (cross-entropy of the answer: minus its log-probability,
teacher-forced over all its tokens when it has several). ``U`` (k x d) stays
orthonormal: it is the transposed Q of a QR decomposition of the trained matrix. Pairs are split
into train and test sets (seeded); training stops early when the test loss has not improved for
``patience`` evaluations. The learned subspace is then scored on the test pairs: interchange
accuracy (greedy decoding gives the answer after the intervention) and the normalised effect of its
subspace patch, with the interpretability-illusion check's findings.

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import planted_direction_model
    >>> model, prompts, site, planted = planted_direction_model()
    >>> found = ap.subspaces.das(model, prompts, site, k=1, steps=150, seed=0, progress=False)
    >>> abs(float(found.subspace.basis_for(site.layer) @ planted)) > 0.95  # |cosine| to the planted direction
    True
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._codec import decode, encode
from ..errors import PromptError, SubspaceError
from ..experiment.executor import progress_bar
from ..findings import Finding
from ..experiment.core import Experiment
from ..hooks import intervene, recompute_blocks
from ..memory import MemoryPlan, activation_bytes, backward_bytes, plan, sequence
from ..metrics import Measurer, Metric
from ..prompts.promptset import PromptSet
from ..sites import Site
from ..subspace import Subspace, SubspaceLike, along, as_subspace, width
from ..types import Direction, Provenance
from .patching import patch

if TYPE_CHECKING:  # pragma: no cover
    from ..corruption import Run
    from ..models.handle import Model

__all__ = ["DASResult", "DASRecord", "das"]


@dataclass(frozen=True)
class DASRecord:
    """What a DAS run reports, without its basis (configs save it as JSON next to the basis's
    safetensors; the report reads it): see :class:`DASResult` for the fields."""

    site: Site
    k: int
    test_accuracy: float
    test_effect: float
    steps: int
    seconds: float
    curve: tuple[tuple[int, float, float], ...] = ()
    train: tuple[int, ...] = ()
    test: tuple[int, ...] = ()
    findings: tuple[Finding, ...] = ()
    provenance: Provenance | None = None
    """The model and prompts it was trained on (None in records saved by 0.2.0)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (:mod:`actpatch._codec`)."""
        return encode(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DASRecord":
        """Inverse of :meth:`to_dict` (also reads records saved by 0.2.0, which had the same keys)."""
        return decode(cls, d)


@dataclass(frozen=True)
class DASResult:
    """A learned subspace and how it was found.

    ``curve``: (step, train loss, test loss) at every evaluation. ``test_accuracy``: share of
    test pairs whose intervened run puts the clean answer on top. ``test_effect``: normalised
    effect (1 = clean, 0 = corrupted) of denoising the test pairs along the subspace.
    """

    subspace: Subspace
    site: Site
    k: int
    curve: tuple[tuple[int, float, float], ...]
    test_accuracy: float
    test_effect: float
    steps: int
    seconds: float
    train: tuple[int, ...]
    test: tuple[int, ...]
    findings: tuple[Finding, ...] = ()
    provenance: Provenance | None = None
    """The model (name, family, weight hash) and prompts it was trained on, and the versions."""

    def record(self) -> DASRecord:
        """The numbers of this run, without the basis."""
        return DASRecord(site=self.site, k=self.k, test_accuracy=self.test_accuracy, test_effect=self.test_effect,
                         steps=self.steps, seconds=self.seconds, curve=self.curve, train=self.train, test=self.test,
                         findings=self.findings, provenance=self.provenance)

    def plot(self) -> Any:
        """The training curve (plotly figure)."""
        import plotly.graph_objects as go

        steps = [c[0] for c in self.curve]
        fig = go.Figure([go.Scatter(x=steps, y=[c[1] for c in self.curve], name="train loss"),
                         go.Scatter(x=steps, y=[c[2] for c in self.curve], name="test loss")])
        fig.update_layout(title=f"DAS at {self.site} (k = {self.k}): test accuracy {self.test_accuracy:.2f}",
                          xaxis_title="step", yaxis_title="interchange cross-entropy")
        return fig


def _orthonormal_rows(W: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(W)  # W (d, k) -> Q (d, k)
    return (q * torch.sign(torch.diagonal(r)).detach()).T


def _initial_basis(init: SubspaceLike | None, site: Site, d: int, k: int, seed: int) -> torch.Tensor:
    """The (d, k) starting basis: ``init``'s, or random from ``seed``."""
    start = as_subspace(init)
    W0 = (start.basis_for(site.layer).T.clone() if start is not None
          else torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    if W0.shape != (d, k):
        raise SubspaceError(f"init has {W0.shape[1]} directions of width {W0.shape[0]}; DAS was asked for k={k}, "
                            f"width {d}.")
    return W0


def _sources(model: "Model", prompts: PromptSet, site: Site,
             rows: int | None = None) -> list[tuple[Run, torch.Tensor, Measurer]]:
    """Per length group (in chunks of ``rows`` prompts): the corrupted run (the base of every
    intervention, with the answers' continuation), the clean run's activations at the site (the
    source, captured once), and what scores the answers (teacher-forced log-probability and
    greedy accuracy)."""
    return [(runs.corrupted, clean[site.selector()], runs.measurer([Metric.LOGPROB, Metric.ACCURACY], None))
            for runs, clean, _ in _paired(model, prompts).paired_activations(site, rows)]


def das_memory_plan(model: "Model", prompts: PromptSet, site: Site, memory_budget: "int | str | None") -> MemoryPlan:
    """How DAS trains under ``memory_budget``: its kept sources (the clean run's activation at
    the site, per prompt) and, per prompt row, one forward and backward pass through the
    intervened run (:func:`actpatch.memory.plan`)."""
    T, readouts = sequence(prompts)
    kept = activation_bytes(model, site.full(), T)
    return plan("DAS", model, memory_budget, total_rows=len(prompts),
                per_row=backward_bytes(model, T, readouts) + 2 * kept,
                per_row_recomputed=backward_bytes(model, T, readouts, recompute=True) + 2 * kept, passes=3)


def _paired(model: "Model", prompts: PromptSet) -> Experiment:
    """DAS's runs: each pair's clean prompt is the source, its corrupted prompt the base."""
    return Experiment.setup(model, prompts, direction=Direction.DENOISE, corruption="str", metric="logit_diff",
                            seed=0, technique="DAS", continuations=True)


def _score(model: "Model", site: Site, batches: list, basis: torch.Tensor, grad_of: torch.Tensor | None,
           recompute: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A split's summed answer cross-entropy (teacher-forced) with the basis' interchange at
    ``site``; with ``grad_of`` (the raw basis W, orthonormalised per chunk) its gradient in W,
    taken one chunk of prompts at a time (else None); and its greedy hits."""
    total, grad, hits = torch.zeros((), device=model.device), None, 0
    for base, src, measure in batches:
        U = _orthonormal_rows(basis) if grad_of is not None else basis
        P = U.T @ U

        def write(x: torch.Tensor, src: torch.Tensor = src, P: torch.Tensor = P) -> torch.Tensor:
            return along(x, src, P)

        with base.context(model), intervene(model, {site: write}), \
                recompute_blocks(model) if recompute and grad_of is not None else nullcontext():
            logits = base.readout(model, grad=torch.is_grad_enabled())
            scored = measure(logits, torch.arange(logits.shape[0]))
            loss = -scored[Metric.LOGPROB].sum()
            if grad_of is not None:  # inside the context: recomputed blocks see the same hooks
                (g,) = torch.autograd.grad(loss, [grad_of])
                grad = g if grad is None else grad + g
        total = total + loss.detach()
        hits += int(scored[Metric.ACCURACY].sum())
    return total, grad, hits


def das(
    model: "Model",
    prompts: PromptSet,
    site: Site,
    k: int = 1,
    *,
    steps: int = 200,
    lr: float = 0.05,
    test_fraction: float = 0.25,
    seed: int = 0,
    patience: int = 10,
    eval_every: int = 5,
    init: SubspaceLike | None = None,
    progress: bool = True,
    memory_budget: "int | str | None" = None,
) -> DASResult:
    """Learn a k-dimensional subspace at ``site`` by interchange-intervention training (see the
    module docstring). ``site`` is a vector site (``resid_pre``, ``mlp_post``, ``z`` of one head...),
    at one position (``pos=``) or all. ``init`` starts from a given basis (e.g. a
    difference-of-means direction) instead of a random one. ``memory_budget`` (bytes or
    ``"2GiB"``): prompts train a few at a time (gradients summed over the chunks), or with every
    block recomputed, with the same steps (:mod:`actpatch.memory`)."""
    t0 = time.perf_counter()
    provenance = _paired(model, prompts).provenance()  # checks the prompts before any training
    n = len(prompts)
    if n < 2:
        raise PromptError(f"DAS needs at least 2 prompt pairs (train and test), got {n}.")
    if not 0 < test_fraction < 1:
        raise SubspaceError(f"test_fraction={test_fraction}: give a share strictly between 0 and 1.")
    d = width(model, site.kind)
    if not 1 <= k <= d:
        raise SubspaceError(f"k={k}: ask for 1..{d} directions at {site}.")
    Subspace.of(torch.eye(d)[:k]).check(model, site)  # the site takes a subspace at all
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(n * test_fraction))
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    W = _initial_basis(init, site, d, k, seed).to(device=model.device, dtype=torch.float32).requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    budget = das_memory_plan(model, prompts, site, memory_budget)
    batches = {"train": _sources(model, prompts.subset(train), site, budget.rows),
               "test": _sources(model, prompts.subset(test), site, budget.rows)}

    def run(name: str, basis: torch.Tensor, grad_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        return _score(model, site, batches[name], basis, grad_of, budget.recompute)

    curve: list[tuple[int, float, float]] = []
    best, best_W, stale, step = math.inf, W.detach().clone(), 0, 0
    with progress_bar(progress, steps, f"DAS at {site} (k={k})") as advance:
        for step in range(1, steps + 1):
            opt.zero_grad()
            with torch.enable_grad():
                loss, grad, _ = run("train", W, grad_of=W)
            W.grad = grad / len(train)  # type: ignore[operator]
            opt.step()
            if advance is not None:
                advance(1)
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    test_loss, _, _ = run("test", _orthonormal_rows(W))
                curve.append((step, float(loss) / len(train), float(test_loss) / len(test)))
                if curve[-1][2] < best - 1e-6:
                    best, best_W, stale = curve[-1][2], W.detach().clone(), 0
                else:
                    stale += 1
                    if stale >= patience:
                        break
    U = _orthonormal_rows(best_W).detach().float().cpu()
    with torch.no_grad():
        _, _, hits = run("test", U.to(model.device))
    scored = patch(model, prompts.subset(test), [site], direction="denoise", subspace=U)
    learned = Subspace.of(U, method="das", site=str(site), k=k, steps=step, seed=seed, test_accuracy=hits / len(test))
    return DASResult(subspace=learned, site=site, k=k, curve=tuple(curve), test_accuracy=hits / len(test),
                     test_effect=float(scored.values), steps=step, seconds=time.perf_counter() - t0,
                     train=tuple(train), test=tuple(test), findings=tuple(scored.findings),
                     provenance=provenance)
