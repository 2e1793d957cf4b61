"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The graph: upstream nodes write into the residual stream (the embeddings, every attention
head, every MLP); downstream nodes read it (every head's query input, every KV head's key and
value inputs, every MLP, the logits). An edge u -> v is scored

    score(u -> v) = sum over positions of  delta_write_u . d m / d input_v

where ``delta_write_u = write_u(source run) - write_u(base run)`` (a head's write is its slice
of the output projection, without bias) and the gradient is taken on the base run through v's
input only. EAP-IG averages that gradient over ``ig_steps`` points whose input embeddings move
from the source run's to the base run's.

The gradient through one head's query (or key, value) input is a vector-Jacobian product of
the gradient at that head's q (k, v) with the block's own map residual -> q, recomputed from the
base run's residual stream, so the code stays free of family-specific internals. Because the
residual stream is the sum of all upstream writes, the scores of the edges into a node add up
to the first-order effect of changing that node's whole input.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..corruption import Corruption, CorruptionSpec
from ..errors import MethodError
from ..experiment.core import Experiment, GroupRuns
from ..hooks import capture, gradient_taps, intervene, recompute_blocks, stop_after
from ..memory import MemoryPlan, backward_bytes, plan, sequence
from ..metrics import Measurer, MetricSpec
from ..models.relevance import DEFAULT_RULES, check_rules, relevance_rules
from ..prompts.promptset import PromptSet
from ..sites import Site
from ..types import DEFAULT_DIRECTION, Direction, Provenance
from .graph import Edge, Graph, GraphLayout, Port, PortKind

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..models.handle import Model

__all__ = ["EdgeScores", "EdgeMethod", "edge_attribution"]


class EdgeMethod(str, enum.Enum):
    """How edge scores are computed; the names configs, files and MIB evaluations use."""

    EAP = "eap"
    """Edge attribution patching: one gradient at the base run (Syed et al. 2023)."""
    EAP_IG = "eap-ig"
    """Integrated gradients along the input embeddings (Hanna et al. 2024)."""
    EAP_IG_ACT = "eap-ig-act"
    """Integrated gradients along every node's output."""
    RELP = "relp"
    """One pass of LRP's propagation coefficients in place of the gradient (RelP, Jafari et al.
    2025; :mod:`actpatch.models.relevance`)."""

    @property
    def ig_target(self) -> str:
        """What ``edge_attribution(ig_target=...)`` interpolates for this method."""
        return "activations" if self is EdgeMethod.EAP_IG_ACT else "inputs"

    def steps(self, ig_steps: int) -> int:
        """The interpolation steps this method takes out of ``ig_steps`` (EAP and RelP take none)."""
        return 0 if self in (EdgeMethod.EAP, EdgeMethod.RELP) else ig_steps

    @classmethod
    def of(cls, ig_steps: int, ig_target: str) -> "EdgeMethod":
        """The method that ``edge_attribution(ig_steps=, ig_target=)`` runs."""
        if not ig_steps:
            return cls.EAP
        return cls.EAP_IG_ACT if ig_target == "activations" else cls.EAP_IG


@dataclass(frozen=True)
class EdgeScores:
    """Scores of every edge of a :class:`~actpatch.techniques.graph.Graph`, ``scores[u, v]``
    (mean over prompts; NaN where node u cannot reach port v).

    ``upstream`` / ``downstream`` name the nodes and ports (``embed``, ``L{l}.H{h}``,
    ``L{l}.MLP``; ``L{l}.H{h}.q``, ``L{l}.H{h}.k`` / ``.v`` per query head in MIB's layout or
    ``L{l}.KV{j}.k`` / ``.v`` per KV head in the KV layout, ``L{l}.MLP``, ``logits``)."""

    graph: Graph
    scores: torch.Tensor  # (U, V)
    per_prompt: torch.Tensor  # (n_prompts, U, V)
    method: str
    """``eap``, ``eap-ig``, ``eap-ig-act`` or ``relp`` (:class:`EdgeMethod`)."""
    direction: Direction
    metric: str
    corruption: CorruptionSpec
    seed: int
    ig_steps: int = 0
    provenance: Provenance | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def upstream(self) -> list[str]:
        return [str(n) for n in self.graph.nodes]

    @property
    def downstream(self) -> list[str]:
        return [str(p) for p in self.graph.ports]

    def __repr__(self) -> str:
        """A summary: method, direction, counts and the strongest edges, never the tensors."""
        reachable = int((~self.scores.isnan()).sum())
        top = ", ".join(f"{u} -> {v} {s:+.3g}" for u, v, s in self.top(3))
        return (f"EdgeScores({self.method}, {self.direction.value}, {self.metric}, {reachable} reachable edges of "
                f"{self.scores.numel()}, {self.per_prompt.shape[0]} prompts; strongest: {top})")

    def top(self, n: int) -> list[tuple[str, str, float]]:
        """The ``n`` edges with the largest |score|: (upstream, downstream, score)."""
        return [(str(e.upstream), str(e.downstream), s) for e, s in self.strongest(n)]

    def strongest(self, n: int) -> list[tuple[Edge, float]]:
        """The ``n`` reachable edges with the largest |score|, typed, strongest first (ties in
        graph order). :func:`actpatch.circuits.top_edges` gives the same edges as a mask."""
        flat = self.scores.abs().flatten()
        reachable = int((~flat.isnan()).sum())
        idx = flat.nan_to_num(-1.0).argsort(descending=True, stable=True)[: min(n, reachable)]
        V = len(self.graph.ports)
        return [(self.graph.edge(i // V, i % V), float(self.scores.flatten()[i])) for i in idx.tolist()]

    def into(self, port: str) -> torch.Tensor:
        """Scores of the edges into a downstream port (NaN for unreachable upstream nodes)."""
        return self.scores[:, self.downstream.index(port)]

    def to_pandas(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [(u, v, float(self.scores[i, j])) for i, u in enumerate(self.upstream)
                for j, v in enumerate(self.downstream) if not torch.isnan(self.scores[i, j])]
        return pd.DataFrame(rows, columns=["upstream", "downstream", "score"])


def _input_grads(model: "Model", graph: Graph, resid: dict[Site, torch.Tensor], grads: dict,
                 span: slice) -> Iterator[tuple[list[Port], torch.Tensor]]:
    """Per layer, its head input ports (q, k, v) of ``graph`` and their gradients
    ``(ports, B, positions, d)`` at the positions of ``span``: the vector-Jacobian products of
    the gradient at that input's q / k / v with the block's residual -> q / k / v map (a map of
    each position alone, so a span is computed from that span's residual stream). A
    per-query-head key / value port (MIB's layout) takes the gradient at its query head's
    ungrouped copy, through the KV head that the copy repeats (without grouped-query attention
    the copy is the key / value itself)."""
    adapter = model.adapter
    group = model.n_heads // model.n_kv_heads
    by_layer: dict[int, list[Port]] = {}
    for port in graph.ports:
        if port.kind in (PortKind.Q, PortKind.K, PortKind.V):
            by_layer.setdefault(int(port.layer), []).append(port)  # type: ignore[arg-type]
    for l, ports in by_layer.items():
        x = resid[Site("resid_pre", l)][:, span].detach().requires_grad_(True)
        pos = torch.arange(resid[Site("resid_pre", l)].shape[1], device=x.device)[span][None]
        with torch.enable_grad(), capture(model, [Site(k, l) for k in "qkv"], detach=False) as acts, \
                stop_after(model, Site("v", l)):
            adapter.run_block(l, x, pos, adapter.position_embeddings(x, pos))
        kinds = [k for k in "qkv" if any(p.kind.value == k for p in ports)]
        for i, kind in enumerate(kinds):
            # per kind, one backward pass for its ports, batched over their output gradients
            # (torch's vmap): entry p holds port p's gradient alone, so its input gradient is port
            # p's VJP; only this kind's projection is differentiated (the others' are zero here)
            mine = [p for p in ports if p.kind.value == kind]
            out = acts[Site(kind, l)]
            gout = out.new_zeros(len(mine), *out.shape)
            for p, port in enumerate(mine):
                h = int(port.head)  # type: ignore[arg-type]
                if port.per_query_head and group > 1:
                    gout[p, :, :, h // group] = grads[Site(f"{kind}_ungrouped", l)][:, span, h]
                else:
                    gout[p, :, :, h] = grads[Site(kind, l)][:, span, h]
            (gx,) = torch.autograd.grad(out, x, grad_outputs=gout, is_grads_batched=True,
                                        retain_graph=i < len(kinds) - 1)
            yield mine, gx


def node_writes(model: "Model", graph: Graph, acts: dict[Site, torch.Tensor]) -> list[torch.Tensor]:
    """Each node's write into the residual stream, (B, T, d) in graph order, from captured
    ``resid_pre`` of layer 0, every ``z`` and every ``mlp_out``."""
    writes = [acts[Site("resid_pre", 0)]]
    for l in range(model.n_layers):
        writes += list(model.adapter.head_writes(l, acts[Site("z", l)]))
        writes.append(model.adapter.residual_write(acts[Site("mlp_out", l)]))
    if len(writes) != len(graph.nodes):  # pragma: no cover - the graph and this loop list nodes alike
        raise MethodError("internal: node writes do not match the graph's nodes")
    return writes


def write_sites(model: "Model") -> list[Site]:
    """The captures the node writes are made of: ``resid_pre`` of layer 0 (the embeddings), and
    every layer's ``z`` and ``mlp_out``."""
    return [Site("resid_pre", 0)] + [Site(k, l) for l in range(model.n_layers) for k in ("z", "mlp_out")]


def write_changes(model: "Model", graph: Graph, changes: dict[Site, torch.Tensor],
                  span: slice = slice(None)) -> torch.Tensor:
    """(B, U, positions, d) in float32 (float64 for a float64 model): each node's write on the source run minus its write on the
    base run (graph order) at the positions of ``span``, filled layer by layer from the changes
    (source - base) at :func:`write_sites`: a head's write is linear in its ``z`` (the output
    projection without its bias), an MLP's in its output, so only the changes are projected."""
    first = changes[Site("resid_pre", 0)][:, span]
    B, T, d = first.shape
    out = torch.empty(B, len(graph.nodes), T, d, dtype=scores_dtype(model), device=first.device)
    out[:, 0] = first
    i = 1
    for l in range(model.n_layers):
        heads = model.adapter.head_writes(l, changes[Site("z", l)][:, span])  # (H, B, T, d)
        out[:, i:i + heads.shape[0]] = heads.transpose(0, 1)
        i += heads.shape[0]
        out[:, i] = model.adapter.residual_write(changes[Site("mlp_out", l)][:, span])
        i += 1
    if i != len(graph.nodes):  # pragma: no cover - the graph and this loop list nodes alike
        raise MethodError("internal: node writes do not match the graph's nodes")
    return out


def edge_attribution(
    model: "Model",
    prompts: PromptSet,
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    ig_steps: int = 0,
    seed: int = 0,
    ig_target: str = "inputs",
    layout: str | GraphLayout = GraphLayout.MIB,
    method: "str | EdgeMethod | None" = None,
    memory_budget: "int | str | None" = None,
) -> EdgeScores:
    """Score every edge of the head / MLP graph (EAP; EAP-IG with ``ig_steps > 0``, the
    gradient averaged along a line from the source to the base run: of the input embeddings
    (``ig_target="inputs"``, Hanna et al. 2024) or of every node's output (``"activations"``)).

    ``method``: ``"eap"``, ``"eap-ig"``, ``"eap-ig-act"`` (the same as the ``ig_steps`` /
    ``ig_target`` choices above) or ``"relp"``: EAP with LRP's propagation coefficients in
    place of the gradient (RelP, :mod:`actpatch.models.relevance`), at EAP's cost.

    ``layout``: the graph's key / value inputs per query head as MIB counts them (``"mib"``, the
    default, so that MIB's edge fractions mean the same edges) or per KV head (``"kv"``); the
    two differ under grouped-query attention only (:class:`~actpatch.techniques.graph.GraphLayout`).

    ``memory_budget``: bytes or a size such as ``"2GiB"`` for the activations and buffers (not
    the weights); prompts then run a few at a time, or one at a time with every block
    recomputed, with the same scores (:mod:`actpatch.memory`; default: a share of the free
    memory). ``edge_memory_plan(...)`` says what a budget will do before the run.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> edges = ap.edge_attribution(tiny_model("llama", n_layers=2), ps)
        >>> len(edges.upstream), len(edges.downstream)
        (11, 27)
    """
    how = _edge_method(method, ig_steps, ig_target)
    exp, graph, per_prompt = edge_scores_per_position(model, prompts, direction=direction, corruption=corruption,
                                                      metric=metric, ig_steps=ig_steps, seed=seed, summed=True,
                                                      ig_target=how.ig_target, layout=layout,
                                                      relp=how is EdgeMethod.RELP, memory_budget=memory_budget)
    per_prompt = per_prompt[:, 0]
    per_prompt[:, ~graph.reachable] = float("nan")
    return EdgeScores(graph=graph, scores=per_prompt.mean(0), per_prompt=per_prompt,
                      method=how.value,
                      direction=exp.direction, metric=exp.metrics[0].value, corruption=exp.corruption.describe(),
                      seed=exp.seed, ig_steps=ig_steps, provenance=exp.provenance())


def _edge_method(method: "str | EdgeMethod | None", ig_steps: int, ig_target: str) -> EdgeMethod:
    """The method ``edge_attribution`` runs: ``method`` when given (checked against
    ``ig_steps``), else the one ``ig_steps`` / ``ig_target`` choose."""
    if ig_target not in ("inputs", "activations"):
        raise MethodError(f"ig_target={ig_target!r}: use 'inputs' (embeddings) or 'activations' (every node's output).")
    if method is None:
        return EdgeMethod.of(ig_steps, ig_target)
    try:
        how = EdgeMethod(method)
    except ValueError:
        raise MethodError(f"method={method!r}: choose from {', '.join(m.value for m in EdgeMethod)}.") from None
    interpolates = how.steps(1) > 0
    if not interpolates and ig_steps:
        raise MethodError(f"method={how.value!r} takes no interpolation steps; got ig_steps={ig_steps}. Use "
                          f"ig_steps=0, or method='eap-ig'.")
    if interpolates and not ig_steps:
        raise MethodError(f"method={how.value!r} needs interpolation steps: give ig_steps (5-30).")
    return how


def edge_scores_per_position(
    model: "Model",
    prompts: PromptSet,
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    ig_steps: int = 0,
    seed: int = 0,
    positions: "Callable[[int], list[int]] | None" = None,
    summed: bool = False,
    ig_target: str = "inputs",
    layout: str | GraphLayout = GraphLayout.MIB,
    relp: bool = False,
    memory_budget: "int | str | None" = None,
) -> tuple[Experiment, Graph, torch.Tensor]:
    """The experiment, the graph and per-prompt scores ``(n_prompts, P, U, V)`` of every edge at
    each position: all positions of a one-length set (P = T), or the positions
    ``positions(i)`` of prompt ``i`` (same count for every prompt). ``summed``: one entry
    (P = 1), the sum over all positions, which is EAP's score (never materialising the rest).
    ``relp``: LRP's propagation coefficients in place of the gradients (no interpolation).
    ``memory_budget``: see :func:`edge_attribution`."""
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 0:
        raise MethodError(f"ig_steps={ig_steps!r}: use 0 (EAP) or a positive number of steps (EAP-IG, 5-30).")
    if ig_target not in ("inputs", "activations"):
        raise MethodError(f"ig_target={ig_target!r}: use 'inputs' (embeddings) or 'activations' (every node's output).")
    if relp:
        check_rules(model, DEFAULT_RULES)
        if ig_steps:
            raise MethodError(f"RelP takes no interpolation steps; got ig_steps={ig_steps}.")
    exp = Experiment.setup(model, prompts, direction=direction, corruption=corruption, metric=metric, seed=seed,
                           technique="Edge attribution" + (" (RelP)" if relp else ""), needs_corrupted_run=True, differentiable=True,
                           continuations=True)
    if len(exp.metrics) != 1:
        raise MethodError(f"Edge attribution scores one metric; got {[m.value for m in exp.metrics]}.")
    graph = Graph.of(model, layout)
    L = model.n_layers
    keep = [Site("z", l) for l in range(L)] + [Site("mlp_out", l) for l in range(L)]
    keep += [Site("resid_pre", 0), Site("embed")]
    P = 1 if summed else len(positions(0)) if positions is not None else prompts.seq_len
    steps = [1.0] if ig_steps == 0 else [(k + 1) / ig_steps for k in range(ig_steps)]
    budget = edge_memory_plan(model, prompts, graph, memory_budget, n_steps=len(steps), summed=summed,
                              per_position=P, draws=exp.corruption.draws, ig_target=ig_target)
    per_prompt = torch.zeros(len(prompts), P, len(graph.nodes), len(graph.ports), dtype=scores_dtype(model))
    with model.attention_fn():
        for runs in exp.groups(budget.rows):
            s_acts, src_logits = exp.source_activations(runs, keep)
            with runs.base.context(model), capture(model, keep) as b_acts:
                base_logits = runs.base.readout(model)
            measure = runs.measurer(exp.metrics, runs.clean_logits(base_logits, src_logits))
            T = b_acts[Site("embed")].shape[1]
            width = budget.positions if summed and budget.positions else T
            spans = [slice(t, min(t + width, T)) for t in range(0, T, width)]
            with torch.no_grad():  # upstream writes' changes: built once, or per span and step (spans)
                changes = _changes(s_acts, b_acts, write_sites(model))
                W = write_changes(model, graph, changes) if len(spans) == 1 else None
            for acts in (s_acts, b_acts):  # what the gradient passes still read: embeddings (IG: every output)
                for site in [k for k in acts if k.kind.value == "resid_pre" or ig_target == "inputs" and k.layer is not None]:
                    del acts[site]
            if W is not None:
                del changes
            # named positions: each row's own positions (B, P) of the writes and of the gradients
            pick = None if positions is None or summed else torch.tensor(
                [positions(i) for i in runs.group.indices.repeat_interleave(runs.draws).tolist()])
            scores = torch.zeros(runs.rows, P, len(graph.nodes), len(graph.ports), dtype=per_prompt.dtype)
            # scores are linear in the gradient: each block of ports is contracted as it comes,
            # and EAP-IG's mean over steps is the mean of the steps' scores
            with relevance_rules(model) if relp else nullcontext():
                for alpha in steps:
                    gs, resid = _tap_grads(model, graph, runs, b_acts, s_acts, alpha, measure, ig_target,
                                           budget.recompute)
                    for span in spans:
                        with torch.no_grad():
                            Ws = W if W is not None else write_changes(model, graph, changes, span)
                        _contract(scores, Ws, _port_blocks(model, graph, gs, resid, span), graph, summed, pick)
                        del Ws
                    del gs, resid
            scores /= len(steps)
            per_prompt[runs.group.indices.tolist()] = scores.reshape(-1, runs.draws, *scores.shape[1:]).mean(1)
    return exp, graph, per_prompt


def scores_dtype(model: "Model") -> torch.dtype:
    """What edge scores are summed in: float32, or float64 for a float64 model (so that sums
    over spans of positions and over prompts agree to its precision)."""
    return torch.promote_types(torch.float32, model.dtype)


def _changes(source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor], sites: list[Site]) -> dict:
    """Source minus base at ``sites`` (the embeddings' in the scores' precision, as their writes
    are kept)."""
    up = torch.promote_types(torch.float32, source[sites[0]].dtype)
    return {s: source[s].to(up) - base[s].to(up) if s.layer == 0 and s.kind.value == "resid_pre"
            else source[s] - base[s] for s in sites}


def _contract(scores: torch.Tensor, W: torch.Tensor, blocks: Iterator[tuple[list[Port], torch.Tensor]],
              graph: Graph, summed: bool, pick: torch.Tensor | None) -> None:
    """Add ``W . G`` for each block of port gradients ``G`` (n, B, positions, d) into ``scores``
    (B, P, U, V): summed over the positions of ``W`` (B, U, positions, d) into P = 1, or per
    position (every position, or each row's positions ``pick``, (B, P))."""
    column = {port: i for i, port in enumerate(graph.ports)}
    B, rows = W.shape[0], torch.arange(W.shape[0])[:, None]
    if summed:
        W = W.flatten(2)  # (B, U, positions * d)
    else:  # (B, P, U, d): the positions become a batch axis
        W = W.transpose(1, 2).contiguous() if pick is None else W[rows, :, pick]
    flat = scores[:, 0] if summed else scores  # (B, U, V) or (B, P, U, V), a view
    for ports, G in blocks:
        idx = torch.tensor([column[p] for p in ports])
        with torch.no_grad():
            if summed:
                part = torch.bmm(W, G.to(W.dtype).permute(1, 0, 2, 3).flatten(2).transpose(1, 2))
            else:
                G = G if pick is None else G[:, rows, pick]
                part = torch.matmul(W, G.to(W.dtype).permute(1, 2, 3, 0))  # (B, P, U, n)
            flat[..., idx] += part.cpu()


def edge_memory_plan(model: "Model", prompts: PromptSet, graph: Graph, memory_budget: "int | str | None", *,
                     n_steps: int = 1, summed: bool = True, per_position: int = 1, draws: int = 1,
                     ig_target: str = "inputs") -> MemoryPlan:
    """How edge attribution runs under ``memory_budget`` (:func:`actpatch.memory.plan`), from its
    bytes per prompt row at the longest prompt, the largest of three phases: building the node
    writes' changes (both runs' captures, the changes, the writes); a gradient pass (what is
    kept: the writes' changes or the changes they are built from per span, the embeddings, IG
    along activations both runs' outputs; the gradients at every tap, the residual stream read
    for the VJPs, the forward and backward pass); contracting (what is kept, the gradients and
    residual stream, and per span of positions: the writes' changes, one layer's port gradients
    with their batched VJPs). Summed scores (EAP, EAP-IG, RelP) can take the positions a span at
    a time when one recomputed prompt does not fit."""
    L, d, el = model.n_layers, model.d_model, 4
    T, readouts = sequence(prompts)
    U, V, H = len(graph.nodes), len(graph.ports), model.n_heads
    heads = max(sum(1 for p in graph.ports if p.layer == l and p.kind not in (PortKind.MLP, PortKind.LOGITS))
                for l in range(L))
    unit = T * d * el  # one (T, d) float32 tensor
    scores = U * V * el * (1 if summed else per_position)
    outputs = 4 * L * unit if ig_target == "activations" else 0  # both runs' outputs, for the interpolation
    taps = (4 * L + 1 + L) * unit  # the gradients at every tap; the residual stream for the VJPs

    def need(span: int | None, recompute: bool) -> int:
        changes = (2 * L + 1) * unit
        kept = 2 * unit + outputs + scores + (U * unit * (1 if summed else 2) if span is None else changes)
        building = 2 * (2 * L + 2) * unit + changes + (U + 3 * H) * unit * (span is None)
        passing = kept + taps + backward_bytes(model, T, readouts, recompute) + (6 * L * unit if outputs else 0)
        per_span = (U + 3 * H if span else 0) + 7 * heads + L + 1
        contracting = kept + taps + per_span * unit * (span or T) // T
        return max(building, passing, contracting)

    return plan("Edge attribution", model, memory_budget, total_rows=len(prompts) * draws,
                per_row=need(None, False), per_row_recomputed=need(None, True),
                passes=2 + 3 * n_steps, draws=draws,  # source and base runs; a forward + backward per step
                spanned=(lambda n: need(n, True)) if summed else None, positions=T)


def _tap_grads(model: "Model", graph: Graph, runs: GroupRuns, b_acts: dict, s_acts: dict, alpha: float,
               measure: Measurer, ig_target: str = "inputs", recompute: bool = False) -> tuple[dict, dict]:
    """One forward and backward pass: the gradients of the metric at every tap the ports read
    (each layer's q, k, v and MLP input, the final residual stream) and the residual stream
    before every block, on the base run, or (EAP-IG) on a run whose embeddings (``inputs``), or
    every node's output too (``activations``), sit ``alpha`` of the way from source to base.
    ``recompute``: the blocks are recomputed in the backward pass
    (:func:`~actpatch.hooks.recompute_blocks`)."""
    L = model.n_layers
    ungroup = graph.layout is GraphLayout.MIB and model.n_heads != model.n_kv_heads  # (else k is k_ungrouped)
    kv = ("k_ungrouped", "v_ungrouped") if ungroup else ("k", "v")
    taps = [Site(k, l) for l in range(L) for k in ("q",) + kv] + [Site("mlp_in", l) for l in range(L)]
    taps.append(Site("resid_final"))
    patches, taken = gradient_taps(taps, keep_values=False)
    if alpha != 1.0:
        e_base, e_src = b_acts[Site("embed")], s_acts[Site("embed")]
        patches[Site("embed")] = e_src + alpha * (e_base - e_src)
        if ig_target == "activations":  # every node's output on the line too; gradients flow through the live graph
            for site in [Site(k, l) for l in range(L) for k in ("z", "mlp_out")]:
                point = s_acts[site] + alpha * (b_acts[site] - s_acts[site])
                patches[site] = lambda x, point=point: x - x.detach() + point.to(x.dtype)
    with torch.enable_grad(), runs.base.context(model), intervene(model, patches), \
            capture(model, [Site("resid_pre", l) for l in range(L)]) as resid, \
            recompute_blocks(model) if recompute else nullcontext():
        logits = runs.base.readout(model, grad=True)
        value = measure(logits, torch.arange(runs.rows))[measure.metrics[0]].sum()
        gs = dict(zip(taps, torch.autograd.grad(value, [taken[k][0] for k in taps], allow_unused=True)))
    gs = {k: (v if v is not None else torch.zeros(taken[k][0].shape, dtype=taken[k][0].dtype,
                                                  device=taken[k][0].device)) for k, v in gs.items()}
    return gs, dict(resid)


def _port_blocks(model: "Model", graph: Graph, gs: dict, resid: dict,
                 span: slice) -> Iterator[tuple[list[Port], torch.Tensor]]:
    """Blocks ``(ports, (len(ports), B, positions, d))`` of gradients of the metric through each
    port's input at the positions of ``span`` (from :func:`_tap_grads`): the logits and MLP
    ports, then each layer's head inputs (one block at a time, so the gradients of all ports
    are never held together)."""
    simple = [p for p in graph.ports if p.kind in (PortKind.LOGITS, PortKind.MLP)]
    yield simple, torch.stack([(gs[Site("resid_final")] if p.kind is PortKind.LOGITS else gs[Site("mlp_in", p.layer)])[:, span]
                               for p in simple])
    yield from _input_grads(model, graph, resid, gs, span)
