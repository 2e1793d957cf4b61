"""Position-aware edge attribution (PEAP, 2025): every edge scored at each token position.

EAP sums an edge's score over positions; the same head -> head edge can matter at the subject
position and not at the end. :func:`positional_edge_attribution` keeps the position axis: the
score of edge u -> v at position t is ``delta_write_u[t] . d m / d input_v[t]``, and the scores
over positions add up to EAP's. Positions are every index of a one-length prompt set, or named
positions (``["IO", "S1", "S2", "end"]``, see :mod:`actpatch.techniques.positions`) so that prompts
of different layouts line up by role.

Position-aware circuits keep an edge at some positions and cut it at others: a (U, V, T) mask
for :func:`actpatch.run_circuit` on a one-length set; :func:`positional_faithfulness` runs the
top-n (edge, position) circuits.

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
    >>> pe = ap.circuits.positional_edge_attribution(tiny_model("llama", n_layers=2), ps)
    >>> pe.positions, tuple(pe.scores.shape)[0]
    (('0', '1', '2', '3'), 4)
    >>> float(pe.scores[0].nan_to_num().abs().max())  # nothing differs at position 0 yet
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..corruption import Corruption, CorruptionSpec
from ..errors import MethodError, PromptError
from ..metrics import normalise, MetricSpec
from ..prompts.promptset import PromptSet
from ..types import DEFAULT_DIRECTION, Direction
from .circuit import Faithfulness, _Circuits
from .eap import EdgeScores, edge_scores_per_position
from .graph import Graph, GraphLayout
from .positions import named_positions

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["PositionalEdgeScores", "positional_edge_attribution", "top_positional_edges", "positional_faithfulness"]


@dataclass(frozen=True)
class PositionalEdgeScores:
    """Edge scores per position: ``scores[p, u, v]`` (mean over prompts; NaN where u cannot
    reach v), ``positions`` their labels (indices as text, or role names when ``named``)."""

    graph: Graph
    positions: tuple[str, ...]
    scores: torch.Tensor  # (P, U, V)
    per_prompt: torch.Tensor  # (N, P, U, V)
    method: str
    direction: Direction
    metric: str
    corruption: CorruptionSpec
    seed: int
    named: bool = False
    ig_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def at(self, position: str | int) -> EdgeScores:
        """The scores at one position as ordinary :class:`~actpatch.EdgeScores`."""
        p = self.positions.index(str(position))
        return EdgeScores(graph=self.graph, scores=self.scores[p], per_prompt=self.per_prompt[:, p],
                          method=f"{self.method}@{self.positions[p]}", direction=self.direction, metric=self.metric,
                          corruption=self.corruption, seed=self.seed, ig_steps=self.ig_steps)

    def summed(self) -> EdgeScores:
        """Summed over positions: EAP's scores (for an index axis over every position)."""
        return EdgeScores(graph=self.graph, scores=self.scores.sum(0), per_prompt=self.per_prompt.sum(1),
                          method=self.method, direction=self.direction, metric=self.metric,
                          corruption=self.corruption, seed=self.seed, ig_steps=self.ig_steps)

    def top(self, n: int) -> list[tuple[str, str, str, float]]:
        """The ``n`` (position, upstream, downstream, score) with the largest |score|."""
        flat = self.scores.nan_to_num(0.0).abs().flatten()
        U, V = self.scores.shape[1:]
        out = []
        for k in flat.argsort(descending=True)[:n].tolist():
            p, rest = divmod(k, U * V)
            e = self.graph.edge(rest // V, rest % V)
            out.append((self.positions[p], str(e.upstream), str(e.downstream), float(self.scores.flatten()[k])))
        return out

    def by_position(self) -> dict[str, float]:
        """Total |score| of the edges at each position: where the graph does its work."""
        return {p: float(self.scores[i].nan_to_num(0.0).abs().sum()) for i, p in enumerate(self.positions)}


def positional_edge_attribution(
    model: "Model",
    prompts: PromptSet,
    *,
    positions: Sequence[str] | None = None,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    ig_steps: int = 0,
    seed: int = 0,
    layout: str | GraphLayout = GraphLayout.MIB,
    memory_budget: "int | str | None" = None,
) -> PositionalEdgeScores:
    """Score every edge at every position (see the module docstring): all positions of a
    one-length prompt set, or the named ``positions`` of each prompt (any layouts). ``layout``:
    the graph's key / value inputs per query head (MIB's, the default) or per KV head, as in
    :func:`~actpatch.edge_attribution`, as is ``memory_budget`` (only the positions asked for
    are kept: a few named positions of a long prompt cost little)."""
    if positions is None:
        lengths = {int(n) for n in prompts.lengths.tolist()}
        if len(lengths) != 1:
            raise PromptError(f"Prompts have {len(lengths)} token lengths {sorted(lengths)}; give named positions "
                              f"(e.g. positions=['S2', 'end']) to line them up by role.")
        labels = tuple(str(t) for t in range(lengths.pop()))
        pick = None
    else:
        labels = tuple(str(p) for p in positions)
        if not labels or len(set(labels)) != len(labels):
            raise PromptError(f"positions={list(positions)}: give distinct position names.")
        for i in range(len(prompts)):
            missing = [p for p in labels if p not in named_positions(prompts, i)]
            if missing:
                raise PromptError(f"Prompt {i} has no position named {missing[0]!r}; it has "
                                  f"{sorted(named_positions(prompts, i))}.")

        def pick(i: int) -> list[int]:
            at = named_positions(prompts, i)
            return [at[p] for p in labels]

    exp, graph, per_prompt = edge_scores_per_position(model, prompts, direction=direction, corruption=corruption,
                                                      metric=metric, ig_steps=ig_steps, seed=seed, positions=pick,
                                                      layout=layout, memory_budget=memory_budget)
    per_prompt[:, :, ~graph.reachable] = float("nan")
    return PositionalEdgeScores(graph=graph, positions=labels, scores=per_prompt.mean(0), per_prompt=per_prompt,
                                method="peap-ig" if ig_steps else "peap", direction=exp.direction,
                                metric=exp.metrics[0].value, corruption=exp.corruption.describe(), seed=exp.seed,
                                named=positions is not None, ig_steps=ig_steps)


def top_positional_edges(scores: PositionalEdgeScores, n: int) -> torch.Tensor:
    """(U, V, T) mask of the ``n`` (edge, position) pairs with the largest |score| (an index
    position axis over every position, so that the mask fits :func:`actpatch.run_circuit`)."""
    if scores.named:
        raise MethodError("Position-aware circuits need an index position axis over every position; these scores "
                          "are at named positions. Score a one-length prompt set without positions=.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MethodError(f"A circuit size must be a number of (edge, position) pairs >= 0, got {n!r}.")
    s = scores.scores.abs().permute(1, 2, 0).contiguous()  # (U, V, T)
    s = s.nan_to_num(nan=-1.0)
    ok = int((~torch.isnan(scores.scores)).sum())
    mask = torch.zeros(s.shape, dtype=torch.bool)
    mask.view(-1)[s.flatten().argsort(descending=True)[: min(n, ok)]] = True
    return mask


def positional_faithfulness(model: "Model", prompts: PromptSet, scores: PositionalEdgeScores, sizes: Sequence[int], *,
                            corruption: str | Corruption = "str", metric: str | None = None,
                            seed: int = 0) -> Faithfulness:
    """Faithfulness of the top-n (edge, position) circuits: the clean run with every edge cut
    (taken from the corrupted run) at the positions where it is not kept."""
    runner = _Circuits(model, prompts, corruption, metric or scores.metric, seed, layout=scores.graph.layout)
    shape = scores.scores.shape[1:] + scores.scores.shape[:1]
    keeps = [top_positional_edges(scores, n) for n in sizes]
    *raw, empty_row, full_row = runner.run_many(keeps + [torch.zeros(shape, dtype=torch.bool),
                                                       torch.ones(shape, dtype=torch.bool)])
    raws = torch.stack(raw) if raw else torch.empty(0, len(prompts))
    empty, full = float(empty_row.mean()), float(full_row.mean())
    return Faithfulness(sizes=list(sizes), values=normalise(raws.mean(1), full, empty), raw=raws, clean=full,
                        corrupted=empty)

