"""Learned edge masks: circuits found by optimisation instead of by scoring edges one by one
(edge pruning, Bhaskar et al. 2024; the mask-learning family that MIB's circuit track compares
against EAP and EAP-IG).

Every edge ``u -> v`` of the graph (:mod:`actpatch.techniques.graph`, MIB's layout by default)
gets a mask ``z`` in [0, 1], and the circuit run of :mod:`actpatch.techniques.circuit` mixes
each edge as ``z * clean + (1 - z) * corrupted`` (a boolean circuit is the special case z in
{0, 1}). ``z`` is a hard-concrete variable (Louizos, Welling & Kingma 2018) with a learned
logit ``alpha``: a stretched, clipped logistic sample, so it is exactly 0 or 1 with positive
probability and differentiable in ``alpha``. Training minimises

    mean over prompts of ((m(z) - m(full)) / |m(full) - m(empty)|) ** 2
    + lambda * n_edges * (density - target)

where ``m`` is the experiment's metric (the quantity MIB's CPR / CMD measure; edge pruning
itself matches the output distribution by KL), ``density`` the expected share of edges with
``z > 0``, and ``lambda >= 0`` a Lagrange multiplier for the constraint "density <= target",
raised by the gap after every step (dual ascent; it falls back to 0 once the mask is sparse
enough, so faithfulness pulls needed edges back), with a target that falls linearly from 1 to
``density`` over the first half of the steps. The ``n_edges`` factor lets every edge's logit
feel the multiplier whatever the graph's size.

The result is an :class:`~actpatch.techniques.eap.EdgeScores` whose score is each edge's
probability of being kept, ``P(z > 0)`` (float64, so nearly certain edges keep their order):
:func:`~actpatch.circuits.circuit_scores` then takes MIB's fractions from one training run
by ranking the edges, as MIB does for its mask-learning methods. Scores are probabilities, not
metric units, and have the denoising sign (positive = the edge carries the clean behaviour).

Training is seeded (the hard-concrete noise) and resumable: with ``checkpoint=`` the logits,
the multiplier, the optimiser's state and the random state are saved every ``save_every``
steps (safetensors and JSON, nothing pickled), and a later call with the same settings goes on
from there, bit for bit as if uninterrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..corruption import Corruption
from ..errors import MethodError, ResultError
from ..metrics import MetricSpec
from ..prompts.promptset import PromptSet
from ..types import Direction
from .circuit import _Circuits
from .eap import EdgeScores
from .graph import GraphLayout

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["learn_edge_mask", "HARD_CONCRETE"]

HARD_CONCRETE = (2 / 3, -0.1, 1.1)
"""Temperature, lower and upper stretch of the hard-concrete mask (Louizos et al. 2018, as in edge pruning)."""

_INIT = 3.0  # initial logit: every edge kept with probability ~0.99
_LAMBDA_LR = 1.0  # the multiplier's rise per step and unit of density above the target


def learn_edge_mask(
    model: "Model",
    prompts: PromptSet,
    *,
    density: float = 0.05,
    steps: int = 200,
    lr: float = 0.1,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    layout: str | GraphLayout = GraphLayout.MIB,
    checkpoint: str | Path | None = None,
    save_every: int = 10,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> EdgeScores:
    """Learn a hard-concrete mask over the graph's edges that keeps the metric of the full model
    with about ``density`` of the edges (see the module docstring), by ``steps`` steps of Adam
    (learning rate ``lr``) over every prompt at once. Returns the edges' keep probabilities as
    :class:`~actpatch.techniques.eap.EdgeScores` (method ``mask``), ready for
    :func:`~actpatch.circuits.circuit_scores` and ``compare_methods(..., ["mask", ...])``.

    ``checkpoint``: a file (``.safetensors``; a ``.json`` beside it) to save progress to every
    ``save_every`` steps and to resume from; settings that differ from the saved ones are an
    error. ``callback(step, stats)`` sees each step's loss, faithfulness term, density, target
    and multiplier (for a progress bar or a loss curve).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import random_pairs, tiny_model
        >>> m, ps = tiny_model("llama", n_layers=2), random_pairs(n=2)
        >>> mask = ap.circuits.learn_edge_mask(m, ps, density=0.2, steps=5)
        >>> mask.method, mask.direction.value, len(mask.extra["history"])
        ('mask', 'denoise', 5)
    """
    _check(density, steps, lr, save_every)
    runner = _Circuits(model, prompts, corruption, metric, seed, layout=layout, differentiable=True)  # type: ignore[arg-type]
    graph, reachable = runner.graph, ~runner.unreachable
    full, empty = runner.run_many([torch.ones_like(reachable), torch.zeros_like(reachable)])
    scale = float((full - empty).mean().abs())
    if not scale > 1e-6:
        raise MethodError(f"The clean and corrupted runs give the same metric on average ({float(full.mean()):.4g}): "
                          "there is no behaviour for a mask to keep. Choose a corruption that changes the answer.")
    config = {"density": density, "steps": steps, "lr": lr, "seed": seed, "metric": runner.metric.value,
              "corruption": repr(runner.exp.corruption.describe()), "layout": graph.layout.value,
              "model": type(model.hf).__name__, "edges": int(reachable.sum()), "prompts": _fingerprint(prompts)}
    state = _State.fresh(int(reachable.sum()), lr, seed)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        state.load(path, config)
    while state.step < steps:
        stats = _step(runner, state, reachable, full, scale, density, steps)
        state.step += 1
        if path is not None and (state.step % save_every == 0 or state.step == steps):
            state.save(path, config)
        if callback is not None:
            callback(state.step, stats)
    beta, low, high = HARD_CONCRETE
    keep_p = torch.sigmoid(state.alpha.detach().to(torch.float64) - beta * math.log(-low / high))
    scores = torch.full(reachable.shape, float("nan"), dtype=torch.float64)
    scores[reachable] = keep_p
    return EdgeScores(graph=graph, scores=scores, per_prompt=scores[None], method="mask", direction=Direction.DENOISE,
                      metric=runner.metric.value, corruption=runner.exp.corruption.describe(), seed=seed,
                      provenance=runner.exp.provenance(),
                      extra={"mask": {k: v for k, v in config.items() if k != "prompts"},
                             "expected_density": float(keep_p.mean()), "history": state.history,
                             "warnings": _calibration(density, float(keep_p.mean()), state.history)})


def _calibration(density: float, reached: float, history: list[dict[str, float]]) -> list[str]:
    """What makes a trained mask's ranking untrustworthy, in words (empty when nothing does): an
    expected density off its target by more than 2x, or a faithfulness term that stayed large
    (the sampled circuits' metric off the full model's by ~70 % of the clean-corrupted gap or
    more, on average)."""
    out = []
    if not density / 2 <= reached <= density * 2:
        out.append(f"expected density {reached:.4f} is off the target {density} by more than 2x: the training did "
                   f"not reach it (more steps) or overshot it (masks stuck at 0 get no gradient); its fractions "
                   f"rank edges the training did not tell apart.")
    last = history[-1]["faithfulness_term"] if history else float("nan")
    if not last < 0.5:
        out.append(f"the final faithfulness term is {last:.3f} (0 = the full model's metric, 1 = off by the whole "
                   f"clean-corrupted gap): the learned circuit does not keep the behaviour.")
    return out


def _check(density: float, steps: int, lr: float, save_every: int) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MethodError(f"density={density!r}: the share of edges to keep must be in (0, 1], e.g. 0.05.")
    for name, v in (("steps", steps), ("save_every", save_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MethodError(f"{name}={v!r}: must be a positive integer.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise MethodError(f"lr={lr!r}: the learning rate must be a positive number, e.g. 0.1.")


def _fingerprint(prompts: PromptSet) -> str:
    """A digest of the prompt set's tokens and answers: a checkpoint belongs to one set."""
    h = hashlib.sha256()
    for field in (prompts.clean, prompts.corrupted, prompts.answers, prompts.alternatives):
        for t in field:
            h.update(repr(t.tolist() if isinstance(t, torch.Tensor) else t).encode())
    return h.hexdigest()[:16]


def _sample(alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One hard-concrete draw per edge: exactly 0 or 1 with positive probability."""
    beta, low, high = HARD_CONCRETE
    u = torch.rand(alpha.shape, generator=gen, dtype=alpha.dtype).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + alpha) / beta)
    return (s * (high - low) + low).clamp(0.0, 1.0)


def _step(runner: _Circuits, state: "_State", reachable: torch.Tensor, full: torch.Tensor, scale: float,
          density: float, steps: int) -> dict[str, float]:
    """One optimisation step over every prompt (gradients accumulated per length group)."""
    beta, low, high = HARD_CONCRETE
    target = density + (1 - density) * max(0.0, 1 - state.step / max(1, steps // 2))
    z = _sample(state.alpha, state.gen)
    keep = torch.ones(reachable.shape).masked_scatter(reachable, z)
    grad_alpha = torch.zeros_like(state.alpha)
    faith = 0.0
    for idx, values in runner.soft_run(keep):
        term = ((values.float().cpu() - full[idx]) / scale).pow(2).sum() / runner.n
        grad_alpha += torch.autograd.grad(term, state.alpha, retain_graph=False)[0]
        faith += float(term.detach())
    dens = torch.sigmoid(state.alpha - beta * math.log(-low / high)).mean()
    gap = dens - target
    # in edge units: each edge's logit feels the multiplier whatever the graph's size
    penalty = state.lam * gap * len(state.alpha)
    (g_alpha,) = torch.autograd.grad(penalty, [state.alpha])
    state.alpha.grad = grad_alpha + g_alpha
    state.opt.step()
    state.lam = (state.lam + _LAMBDA_LR * gap.detach() / target).clamp(min=0.0)  # relative: as quick below as above
    stats = {"loss": faith + float(penalty.detach()), "faithfulness_term": faith, "density": float(dens.detach()),
             "target": target,
             "lambda": float(state.lam)}
    state.history.append(stats)
    return stats


class _State:
    """What a training run needs to go on: logits, multiplier, optimiser, random state, step."""

    def __init__(self, alpha: torch.Tensor, lam: torch.Tensor, lr: float, gen: torch.Generator) -> None:
        self.alpha, self.lam, self.gen, self.step = alpha, lam, gen, 0
        self.opt = torch.optim.Adam([alpha], lr=lr)
        self.history: list[dict[str, float]] = []

    @classmethod
    def fresh(cls, n_edges: int, lr: float, seed: int) -> "_State":
        return cls(torch.full((n_edges,), _INIT, requires_grad=True), torch.zeros(()), lr,
                   torch.Generator().manual_seed(seed))

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"alpha": self.alpha.detach(), "lambda": self.lam.detach(), "rng": self.gen.get_state()}
        for k, v in self.opt.state_dict()["state"].get(0, {}).items():
            out[f"adam.{k}"] = torch.as_tensor(v)
        return out

    def save(self, path: Path, config: dict[str, Any]) -> None:
        """Write the state atomically (a run killed mid-write keeps the previous checkpoint)."""
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self._tensors().items()}, str(tmp))
        meta = path.with_suffix(".json")
        meta_tmp = meta.with_name(meta.name + ".tmp")
        meta_tmp.write_text(json.dumps({"config": config, "step": self.step, "history": self.history}, indent=1))
        os.replace(tmp, path)
        os.replace(meta_tmp, meta)

    def load(self, path: Path, config: dict[str, Any]) -> None:
        """Go on from a checkpoint written with the same settings."""
        from safetensors.torch import load_file

        meta = path.with_suffix(".json")
        try:
            saved = json.loads(meta.read_text())
            tensors = load_file(str(path))
        except (OSError, ValueError) as e:
            raise ResultError(f"{path}: not a mask checkpoint ({type(e).__name__}: {e}); delete it (and "
                              f"{meta.name}) to start over.") from None
        differ = sorted(k for k in set(config) | set(saved.get("config", {})) if saved["config"].get(k) != config.get(k))
        if differ:
            raise MethodError(f"{path} was written with other settings ({', '.join(differ)} differ: saved "
                              f"{ {k: saved['config'].get(k) for k in differ} }); use the same settings to resume, or "
                              f"another checkpoint path to start a new run.")
        with torch.no_grad():
            self.alpha.copy_(tensors["alpha"])
        self.gen.set_state(tensors["rng"])
        self.lam = tensors["lambda"].clone()
        st = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("adam.")}
        if st:
            self.opt.state[self.alpha] = st
        self.step, self.history = int(saved["step"]), list(saved["history"])
