"""Sparse feature circuits (Marks et al. 2024): circuits whose nodes are dictionary features
and error terms at positions, with their faithfulness and completeness.

On prompt pairs of one token length, with dictionaries attached (``model.attach(...)``):

1. **Nodes.** Every feature and the error term of every attached dictionary at every position
   is scored by attribution patching in the noising direction: the first-order change of the
   metric when that node alone takes its value from the corrupted run,
   ``(f_corr - f_clean) * dm/df`` (:func:`actpatch.attribute` with the dictionary as target:
   2 forward passes and 1 backward pass per dictionary). Scores are in raw metric units,
   mean over prompts; the circuit of size ``n`` is the ``n`` nodes of largest ``|score|``.
2. **Faithfulness** of a circuit ``C``: run the clean prompts with every node *outside* ``C``
   (features and error terms, at every attached site and position) set to its corrupted value,
   and normalise, ``(m(C) - m(empty)) / (m(all) - m(empty))``; **completeness**: the same
   with the nodes *of* ``C`` set to corrupted values (the model without the circuit: near 0
   when the circuit is complete). ``all`` is the clean run, ``empty`` every node corrupted.
   Each curve's summary is its mean over the log-spaced sizes (trapezoids on log n).
3. **Edges** between the circuit's nodes at consecutive attached sites (in layer order), by the
   linear attribution of Marks et al.: ``edge(u -> d) = dm/dd * dd/du * (u_corr - u_clean)``,
   one backward pass per downstream node; nodes of the last site connect to the metric with
   their node score.

Findings: an error term among the top nodes (what the dictionary does not explain carries the
effect), and a reconstruction that changes the metric (the error terms zeroed but at position
0, whose "massive activation" dictionaries are usually not trained on: the dictionaries do not
reproduce the behaviour, so feature conclusions are about another model).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..corruption import Corruption
from ..errors import MethodError, PromptError
from ..experiment.core import Experiment, GroupRuns
from ..findings import Finding, Level
from ..hooks import gradient_taps, intervene
from ..metrics import MetricSpec, normalise
from ..prompts.promptset import PromptSet
from ..types import Direction

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from ..models.handle import Model
    from .dictionary import Dictionary

__all__ = ["FeatureNode", "FeatureEdge", "FeatureCircuit", "feature_circuit", "DEFAULT_SIZES"]

DEFAULT_SIZES: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
"""Node counts of the faithfulness and completeness curves."""


@dataclass(frozen=True)
class FeatureNode:
    """One node: a feature (or the error term, ``feature == "error"``) of the dictionary at
    ``site``, at token position ``pos``; ``score`` is its AtP noising effect (raw units)."""

    site: str
    pos: int
    feature: int | str
    score: float
    token: str = ""

    @property
    def label(self) -> str:
        what = "error" if self.feature == "error" else f"f{self.feature}"
        return f"{self.site} {what} @{self.pos}" + (f" {self.token!r}" if self.token else "")


@dataclass(frozen=True)
class FeatureEdge:
    """``nodes[up] -> nodes[down]`` of a :class:`FeatureCircuit`, its linear attribution (raw
    units, mean over prompts); ``down == -1`` is the metric."""

    up: int
    down: int
    score: float


@dataclass(frozen=True)
class FeatureCircuit:
    """Ranked nodes, their faithfulness / completeness curves, edges among the chosen circuit."""

    nodes: list[FeatureNode]
    """Every node with a non-zero score, by decreasing ``|score|``."""
    n_candidates: int
    """Nodes considered (features + error terms, at every attached site and position)."""
    sizes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    faithfulness_raw: list[float]
    """The metric (raw, mean over prompts) of each circuit: what ``faithfulness`` normalises."""
    completeness_raw: list[float]
    clean: float
    corrupted: float
    """The metric (raw, mean) with every node clean (the clean run) and every node corrupted."""
    reconstruction: float
    """The clean metric with every error term zeroed (the dictionaries' reconstructions)."""
    circuit_size: int
    """The size whose edges are listed (``edges``)."""
    edges: list[FeatureEdge] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    metric: str = "logit_diff"
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per dictionary site, the node scores checked against exact feature patching
    (:func:`actpatch.validate_attribution`): rank correlation, top-k recall, cells checked."""

    @property
    def faithfulness_area(self) -> float:
        return _log_mean(self.sizes, self.faithfulness)

    @property
    def completeness_area(self) -> float:
        return _log_mean(self.sizes, self.completeness)

    def circuit(self, n: int | None = None) -> list[FeatureNode]:
        """The ``n`` top nodes (default: :attr:`circuit_size`)."""
        return self.nodes[: self.circuit_size if n is None else n]

    def table(self, n: int = 15) -> str:
        """The top nodes as text, one per line."""
        return "\n".join(f"{i:3d}  {node.label:48s} {node.score:+.4f}" for i, node in enumerate(self.nodes[:n]))

    def top_edges(self, n: int = 15) -> list[tuple[str, str, float]]:
        """The ``n`` edges of largest ``|score|``: (upstream label, downstream label, score)."""
        ranked = sorted(self.edges, key=lambda e: -abs(e.score))[:n]
        return [(self.nodes[e.up].label, "metric" if e.down < 0 else self.nodes[e.down].label, e.score) for e in ranked]

    def plot(self, title: str | None = None) -> "go.Figure":
        """Faithfulness and completeness against the node count (log axis), plotly."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Scatter(x=self.sizes, y=self.faithfulness, mode="lines+markers", name="faithfulness (circuit)"))
        fig.add_trace(go.Scatter(x=self.sizes, y=self.completeness, mode="lines+markers",
                                 name="completeness (model without it)"))
        fig.add_hline(y=1.0, line_dash="dot", annotation_text="clean")
        fig.add_hline(y=0.0, line_dash="dot", annotation_text="corrupted")
        fig.update_layout(title=title or "Feature circuit", xaxis_title="nodes kept (features + error terms)",
                          yaxis_title=f"normalised {self.metric}", xaxis_type="log", template="plotly_white")
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [vars(n) for n in self.nodes], "n_candidates": self.n_candidates, "sizes": self.sizes,
                "faithfulness": self.faithfulness, "completeness": self.completeness,
                "faithfulness_raw": self.faithfulness_raw, "completeness_raw": self.completeness_raw, "clean": self.clean,
                "corrupted": self.corrupted, "reconstruction": self.reconstruction,
                "circuit_size": self.circuit_size, "edges": [vars(e) for e in self.edges], "metric": self.metric,
                "validation": self.validation,
                "findings": [f.to_dict() for f in self.findings]}


def _log_mean(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Trapezoid mean of ``values`` over ``log(sizes)``."""
    xs = [math.log(s) for s in sizes]
    if len(xs) < 2 or xs[-1] <= xs[0]:
        return float(values[0]) if values else float("nan")
    area = sum((b - a) * (y1 + y2) / 2 for a, b, y1, y2 in zip(xs, xs[1:], values, values[1:]))
    return area / (xs[-1] - xs[0])


def feature_circuit(
    model: "Model", prompts: PromptSet, dictionaries: Sequence["Dictionary"] | None = None, *,
    sizes: Sequence[int] = DEFAULT_SIZES, corruption: str | Corruption = "str", metric: MetricSpec = "logit_diff",
    seed: int = 0, edges_at: int | None = None, max_edge_nodes: int = 64, target: float = 0.8,
    validate: int = 0,
) -> FeatureCircuit:
    """A sparse feature circuit over the attached ``dictionaries`` (default: all attached), see
    the module docstring. ``edges_at``: the circuit size whose edges are computed (default:
    the smallest size of ``sizes`` reaching faithfulness ``target``, else the largest),
    at most ``max_edge_nodes`` (one backward pass per downstream node). ``validate=k``
    checks each dictionary's node scores against exact feature patching on the ``k`` largest,
    their neighbours and ``k`` cells drawn from the rest (:func:`actpatch.validate_attribution`).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama", n_layers=2)
        >>> d = ap.features.Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=16)
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> with ap.features.attach(m, d):
        ...     fc = ap.features.feature_circuit(m, ps, sizes=[1, 10, 100])
        >>> fc.sizes[-1] <= fc.n_candidates == 17 * 4
        True
    """
    ds = _dictionaries(model, dictionaries)
    metric_name = _check_inputs(prompts, sizes, metric)
    exp = Experiment.setup(model, prompts, direction=Direction.NOISE, corruption=corruption, metric=metric_name,
                           seed=seed, technique="A feature circuit", differentiable=True)
    nodes, T, results = _node_scores(model, prompts, ds, corruption=corruption, metric=metric_name, seed=seed)
    ranked = sorted(range(len(nodes)), key=lambda i: -abs(nodes[i].score))
    ranked = [i for i in ranked if nodes[i].score != 0.0]
    ordered = [nodes[i] for i in ranked]
    sizes = sorted({min(int(s), len(ordered)) for s in sizes if s >= 1} or {len(ordered)})
    runs = _Runs(exp, ds, T)
    full, empty = runs.value(keep=False), runs.value(keep=True)
    faith_raw = [runs.value(ordered[:n]) for n in sizes]
    compl_raw = [runs.value(ordered[:n], keep=False) for n in sizes]
    faith = normalise(torch.tensor(faith_raw, dtype=torch.float64), full, empty).tolist()
    compl = normalise(torch.tensor(compl_raw, dtype=torch.float64), full, empty).tolist()
    recon = runs.value(reconstruction=True)
    if edges_at is None:
        edges_at = next((n for n, f in zip(sizes, faith) if f >= target), sizes[-1] if sizes else 0)
    edges_at = min(edges_at, max_edge_nodes, len(ordered))
    edges = runs.edges(ordered[:edges_at])
    found = _findings(ordered, edges_at, full, empty, recon, ds)
    checked = {}
    if validate:
        from ..techniques.attribution import validate_attribution

        for d, res in zip(ds, results):
            v = validate_attribution(model, prompts, res, k=validate, n_random=validate, seed=seed, exhaustive=False)
            checked[str(d.site)] = {"rank_correlation": v.rank_correlation, "top_k_recall": v.agreement.top_k_recall,
                                    "cells": len(v.cells)}
            found += [f for f in v.findings if f.level is not Level.INFO]
    return FeatureCircuit(nodes=ordered, n_candidates=len(nodes), sizes=sizes, faithfulness=faith, completeness=compl,
                          faithfulness_raw=faith_raw, completeness_raw=compl_raw,
                          clean=full, corrupted=empty, reconstruction=recon, circuit_size=edges_at, edges=edges,
                          findings=found, metric=metric_name, validation=checked)


def _dictionaries(model: "Model", dictionaries: Sequence["Dictionary"] | None) -> list["Dictionary"]:
    ds = list(model.dictionaries.values()) if dictionaries is None else list(dictionaries)
    if not ds:
        raise MethodError("A feature circuit needs attached dictionaries: model.attach(d1, d2, ...) or "
                          "ap.features.attach(model, ...), e.g. with ap.features.bundled(model).")
    for d in ds:
        if model.dictionaries.get(d.site) is not d:
            raise MethodError(f"{d.label} is not attached; attach it first (model.attach(d)).")
        if d.is_transcoder:
            raise MethodError(f"{d.label} is a transcoder; feature circuits here take SAEs (their error term is "
                              f"the rest of the site's activation).")
    return sorted(ds, key=lambda d: (d.site.layer, d.site.kind.value))


def _check_inputs(prompts: PromptSet, sizes: Sequence[int], metric: MetricSpec) -> str:
    if not isinstance(prompts, PromptSet):
        raise PromptError(f"feature_circuit() takes a PromptSet, got {type(prompts).__name__}.")
    if prompts.seq_len is None or not prompts.aligned:
        raise PromptError("A feature circuit's nodes sit at token positions, so it needs prompt pairs of one "
                          "token length; choose one template (e.g. ap.prompts.ioi(model, templates=[0])) or "
                          "keep one length group (prompts.subset(prompts.groups()[0].indices)).")
    if prompts.multi_token:
        raise PromptError("Feature circuits score single-token answers; give the first token of each answer.")
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise MethodError(f"sizes must be node counts >= 1, got {list(sizes)!r}.")
    if not isinstance(metric, str):
        raise MethodError("A feature circuit takes one named metric (e.g. 'logit_diff').")
    return metric


def _node_scores(model: "Model", prompts: PromptSet, ds: list["Dictionary"],
                 **run: Any) -> tuple[list[FeatureNode], int, list[Any]]:
    """AtP noising scores of every feature and error term, at every position, of each
    dictionary (and each dictionary's attribution result)."""
    from ..techniques.attribution import attribute

    tokens = prompts.position_labels(model)
    out: list[FeatureNode] = []
    T = int(prompts.seq_len)  # type: ignore[arg-type]
    results = []
    for d in ds:
        res = attribute(model, prompts, d, direction="noise", per_position=True, **run)
        results.append(res)
        m = res.metric
        score = (res.raw[m] - res.clean[m][:, None, None]).mean(0)  # (F + 1, T)
        for fi, f in enumerate(res.coords["feature"]):
            for p in range(T):
                out.append(FeatureNode(site=str(d.site), pos=p, feature=f, score=float(score[fi, p]), token=tokens[p]))
    return out, T, results


class _Runs:
    """Clean runs with chosen nodes corrupted, and the edges' backward passes, per length group."""

    def __init__(self, exp: Experiment, ds: list["Dictionary"], T: int) -> None:
        self.exp, self.ds, self.T = exp, ds, T
        self.sites = [s for d in ds for s in (d.feature(0).full(), d.error_site().full())]
        self.by_site = {str(d.site): d for d in ds}
        self.groups, self.clean_logits = [], []
        with torch.no_grad():
            for runs in exp.groups():
                source, _ = exp.source_activations(runs, self.sites)
                self.groups.append((runs, source))
                with runs.clean.context(exp.model):
                    self.clean_logits.append(runs.clean.readout(exp.model))

    def _masks(self, listed: Sequence[FeatureNode], keep: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site, (T, F) and (T,) masks of the nodes kept clean: the ``listed`` nodes when
        ``keep``, every other node when not."""
        masks = {}
        for name, d in self.by_site.items():
            masks[name] = (torch.full((self.T, d.n_features), not keep), torch.full((self.T,), not keep))
        for n in listed:
            f_mask, e_mask = masks[n.site]
            if n.feature == "error":
                e_mask[n.pos] = keep
            else:
                f_mask[n.pos, int(n.feature)] = keep
        return masks

    def value(self, listed: Sequence[FeatureNode] = (), *, keep: bool = True, reconstruction: bool = False) -> float:
        """Mean metric of the clean run with the nodes not kept clean (everything but
        ``listed`` when ``keep``, ``listed`` when not) set to their corrupted values;
        ``reconstruction``: every error term zeroed instead (but at position 0, whose
        activation dictionaries are not trained on), every feature clean."""
        masks = self._masks(listed, keep)
        metric = self.exp.metrics[0]
        total = 0.0
        for (runs, source), clean_logits in zip(self.groups, self.clean_logits):
            hooks: dict = {}
            for d in self.ds:
                f_keep, e_keep = masks[str(d.site)]
                f_src, e_src = source[d.feature(0).full()], source[d.error_site().full()]
                if reconstruction:
                    hooks[d.error_site().full()] = _zero_after_first
                    continue
                hooks[d.feature(0).full()] = _where(f_keep.to(f_src.device), f_src)
                hooks[d.error_site().full()] = _where(e_keep[:, None].to(e_src.device), e_src)
            with torch.no_grad(), runs.base.context(self.exp.model), intervene(self.exp.model, hooks):
                logits = runs.base.readout(self.exp.model)
            vals = runs.measurer([metric], clean_logits)(logits, torch.arange(runs.rows))[metric]
            total += float(vals.float().sum())
        return total / self.exp.n

    def edges(self, circuit: Sequence[FeatureNode]) -> list[FeatureEdge]:
        """Linear edge attributions between the circuit's nodes at consecutive sites."""
        order = [str(d.site) for d in self.ds]
        index = {(n.site, n.pos, n.feature): i for i, n in enumerate(circuit)}
        out: dict[tuple[int, int], float] = {}
        for runs, source in self.groups:
            for (i, j), v in _group_edges(self.exp, runs, source, self.ds, circuit, order, index).items():
                out[(i, j)] = out.get((i, j), 0.0) + v
        return [FeatureEdge(up=i, down=j, score=v / self.exp.n) for (i, j), v in sorted(out.items())]


def _live_taps(sites: Sequence) -> tuple[dict, dict, dict]:
    """:func:`actpatch.hooks.gradient_taps`, also keeping each site's tapped output with its
    graph (``live``): a downstream node's value, to differentiate against upstream taps."""
    taps, zeros = gradient_taps(sites)
    live: dict = {}

    def keep(site: Any, tap: Any) -> Any:
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = tap(x)
            live[site] = out
            return out

        return fn

    return {s: keep(s, t) for s, t in taps.items()}, zeros, live


def _zero_after_first(e: torch.Tensor) -> torch.Tensor:
    kept = torch.zeros_like(e)
    kept[:, 0] = e[:, 0]
    return kept


def _where(keep: torch.Tensor, corrupted: torch.Tensor) -> Any:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x, corrupted.to(x.dtype))

    return fn


def _group_edges(exp: Experiment, runs: GroupRuns, source: dict, ds: list["Dictionary"],
                 circuit: Sequence[FeatureNode], order: list[str], index: dict) -> dict[tuple[int, int], float]:
    """One group's summed edge scores: a forward pass with taps at every attached site, one
    backward pass for the metric, then one per downstream node of the circuit."""
    model, metric = exp.model, exp.metrics[0]
    sites = [s for d in ds for s in (d.feature(0).full(), d.error_site().full())]
    taps, zeros, live = _live_taps(sites)
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(runs.base.context(model))
        stack.enter_context(intervene(model, taps))
        logits = runs.base.readout(model, grad=True)
        m = runs.measurer([metric], logits.detach())(logits, torch.arange(runs.rows))[metric].sum()
    leaves = [zeros[s][0] for s in sites]
    grads = dict(zip(sites, torch.autograd.grad(m, leaves, retain_graph=True, allow_unused=True)))
    delta = {s: source[s] - zeros[s][1] for s in sites}
    by_site = {str(d.site): d for d in ds}
    out: dict[tuple[int, int], float] = {}
    for j, node in enumerate(circuit):
        site_i = order.index(node.site)
        if site_i == len(order) - 1:
            out[(j, -1)] = node.score * runs.rows
        if site_i == 0:
            continue
        d, up = by_site[node.site], by_site[order[site_i - 1]]
        s = d.error_site().full() if node.feature == "error" else d.feature(0).full()
        g, value = grads[s], live[s]
        if g is None:
            continue
        sel = (slice(None), node.pos) if node.feature == "error" else (slice(None), node.pos, int(node.feature))
        target = (g[sel].detach() * value[sel]).sum()
        up_sites = [up.feature(0).full(), up.error_site().full()]
        ug = torch.autograd.grad(target, [zeros[u][0] for u in up_sites], retain_graph=True, allow_unused=True)
        f_eff = (ug[0] * delta[up_sites[0]]).sum(0) if ug[0] is not None else None  # (T, F)
        e_eff = (ug[1] * delta[up_sites[1]]).sum((0, 2)) if ug[1] is not None else None  # (T,)
        for (site, pos, feat), i in index.items():
            if site != str(up.site):
                continue
            eff = e_eff[pos] if feat == "error" and e_eff is not None else (
                f_eff[pos, int(feat)] if feat != "error" and f_eff is not None else None)
            if eff is not None:
                out[(i, j)] = out.get((i, j), 0.0) + float(eff)
    return out


def _findings(ordered: list[FeatureNode], n: int, clean: float, corrupted: float, recon: float,
              ds: list["Dictionary"]) -> list[Finding]:
    out: list[Finding] = []
    top = ordered[: max(n, 1)]
    total = sum(abs(x.score) for x in top) or 1.0
    errors = [x for x in top if x.feature == "error"]
    share = sum(abs(x.score) for x in errors) / total
    if errors and (share > 0.3 or ordered[0].feature == "error"):
        where = ", ".join(x.label for x in errors[:3])
        out.append(Finding(Level.WARNING, "feature_error_large",
                           f"Error terms carry {share:.0%} of the top {len(top)} nodes' attribution ({where}): "
                           f"much of the effect is in what the dictionaries do not explain.",
                           "Read the features there as a partial account; a larger or better-fitting dictionary "
                           "at that site would split the error node."))
    gap = abs(clean - corrupted) or 1.0
    if abs(recon - clean) > 0.1 * gap:
        out.append(Finding(Level.WARNING, "feature_reconstruction_changes_metric",
                           f"With the dictionaries' reconstructions in place of the activations (error terms "
                           f"zeroed) the clean metric is {recon:.3f} instead of {clean:.3f} (clean - corrupted = "
                           f"{clean - corrupted:.3f}): the features alone do not reproduce the behaviour.",
                           "Keep the error nodes in the circuit (as here), and treat feature-only explanations "
                           "with caution at those sites."))
    return out
