"""Circuits from edge scores, and their faithfulness.

A circuit is a set of edges of the head / MLP graph of :mod:`actpatch.eap`. Running a circuit
means running the clean prompt while every edge *outside* it carries the corrupted run instead:
each node's input is rebuilt as

    input_v = residual stream - sum over edges u -> v not in the circuit of (write_u(now) - write_u(corrupted))

so that v reads circuit edges from the running (patched) model and all others from the
corrupted run. The empty circuit reproduces the corrupted run, the full graph the clean run.
Faithfulness is the normalised metric of that run: (M_circuit - M_corrupted) / (M_clean - M_corrupted).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Sequence

import torch

from .._io import read_named, write_named
from ..agreement import Agreement, AgreementReading, choose_cells, exact_is_affordable
from ..corruption import Corruption, from_description
from ..errors import MemoryBudgetError, MethodError
from ..experiment.core import Experiment, GroupRuns
from ..findings import Finding
from ..hooks import capture, intervene, stop_after
from ..memory import format_bytes, parse_budget, sequence
from ..metrics import normalise, MetricSpec
from ..prompts.promptset import PromptSet
from ..sites import Site
from ..types import Direction
from .eap import EdgeScores, node_writes
from .graph import Graph, GraphLayout, Node, NodeKind, Port, PortKind

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from ..models.handle import Model
    from ..prompts.continuation import Continuation

__all__ = ["top_edges", "greedy_edges", "run_circuit", "faithfulness", "Faithfulness", "save_curves", "load_curves", "validate_edges",
           "EdgeValidation"]


def top_edges(edges: EdgeScores, n: int, *, absolute: bool = True) -> torch.Tensor:
    """Boolean (U, V) mask of the ``n`` reachable edges with the largest |score| (``absolute``)
    or the largest signed score (``absolute=False``: edges that push the metric towards clean
    first, as MIB's CPR selects)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MethodError(f"A circuit size must be a number of edges >= 0, got {n!r}.")
    reachable = ~torch.isnan(edges.scores)
    scores = edges.scores.abs() if absolute else edges.scores.clone()
    scores[~reachable] = -torch.inf
    mask = torch.zeros_like(scores, dtype=torch.bool)
    idx = scores.flatten().argsort(descending=True, stable=True)[: min(n, int(reachable.sum()))]
    mask.view(-1)[idx] = True
    return mask


def greedy_edges(edges: EdgeScores, n: int, *, absolute: bool = True) -> torch.Tensor:
    """Boolean (U, V) mask of ``n`` edges grown greedily from the logits: start with the edges
    into the logits as candidates, repeatedly keep the best-scoring candidate (by |score|, or
    signed score with ``absolute=False``), and when its upstream node joins the circuit, make
    the edges into that node's inputs candidates. Every kept edge is then connected to the
    logits through kept edges (top-n selection does not guarantee that)."""
    import heapq

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MethodError(f"A circuit size must be a number of edges >= 0, got {n!r}.")
    g = edges.graph
    inputs = {i: [g.port_index[p] for p in g.inputs(node)] for i, node in enumerate(g.nodes)}
    raw = edges.scores
    key = raw.abs() if absolute else raw
    mask = torch.zeros_like(raw, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    opened: set[int] = set()

    def open_port(j: int) -> None:
        if j in opened:
            return
        opened.add(j)
        for i in (~torch.isnan(raw[:, j])).nonzero().flatten().tolist():
            heapq.heappush(heap, (-float(key[i, j]), i, j))

    open_port(g.port_index[Port(PortKind.LOGITS)])
    joined: set[int] = set()
    kept = 0
    while heap and kept < n:
        _, i, j = heapq.heappop(heap)
        if mask[i, j]:
            continue
        mask[i, j] = True
        kept += 1
        if i not in joined:
            joined.add(i)
            for port in inputs[i]:
                open_port(port)
    return mask


def _recomputed_inputs(model: "Model", l: int, fixed: list[tuple[Port, torch.Tensor]], h: torch.Tensor,
                       pos: torch.Tensor, pe: Any, detach: bool = True) -> dict[Site, torch.Tensor]:
    """The q / k / v writes of layer ``l`` for ports read from corrected inputs ``h - fix``: one
    batch over the distinct corrections (ports sharing a correction object share a row block),
    stopped after v. A per-query-head key / value port (MIB's layout) is computed through its KV
    head and written to that query head's ungrouped copy."""
    if not fixed:
        return {}
    group, rows = model.n_heads // model.n_kv_heads, h.shape[0]
    block: dict[int, int] = {}
    distinct = []
    for _, fix in fixed:
        if id(fix) not in block:
            block[id(fix)] = len(distinct)
            distinct.append(fix)
    with capture(model, [Site(k, l) for k in ("q", "k", "v")], detach=detach) as a, stop_after(model, Site("v", l)):
        model.adapter.run_block(l, torch.cat([h - fix for fix in distinct]), pos, pe)
    writes: dict[Site, torch.Tensor] = {}
    for port, fix in fixed:
        j, kind, i = block[id(fix)], port.kind.value, int(port.head)  # type: ignore[arg-type]
        site, read = (Site(f"{kind}_ungrouped", l, head=i), i // group) if port.per_query_head and group > 1 else \
            (Site(kind, l, head=i), i)
        writes[site] = a[Site(kind, l)][j * rows:(j + 1) * rows, :, read]
    return writes


@dataclass(frozen=True)
class CleanRun:
    """The clean run of one length group: the residual stream entering every block and the final
    one, and every node's write; a circuit run whose cut edges all enter layer ``l`` or later
    starts there from it (below ``l`` the circuit run *is* the clean run)."""

    resid: dict[Site, torch.Tensor]
    writes: list[torch.Tensor]

    def start(self, graph: Graph, keep: torch.Tensor, n_layers: int) -> int:
        """The first layer with a port that reads a cut edge in any of ``keep``'s circuits (the
        number of layers when only the logits do, or nothing is cut)."""
        cut = (_cut(keep) != 0).any(0).any(0)  # (V,) or (V, T)
        cut = cut.any(-1) if cut.dim() == 2 else cut
        layers = [n_layers if p.layer is None else int(p.layer) for p, c in zip(graph.ports, cut.tolist()) if c]
        return min(layers, default=n_layers)


def _cut(keep: torch.Tensor) -> torch.Tensor:
    """How much of each edge a circuit takes from the corrupted run: ``~keep`` for a boolean
    circuit, ``1 - keep`` for a soft one (``keep`` in [0, 1], e.g. a learned mask)."""
    return ~keep if keep.dtype == torch.bool else 1 - keep


class _Diffs:
    """Every node's write now minus its corrupted write ((C, B, T, d) per node) and the sums over
    them that rebuild a port's input. Boolean circuits fill one buffer in place; a soft circuit
    that gradients flow through (a mask being learned) keeps each group of nodes as its own
    tensor, never written after autograd has saved it."""

    def __init__(self, n_nodes: int, like: torch.Tensor, shape: tuple[int, ...], soft: bool) -> None:
        self.buffer = None if soft else like.new_zeros(n_nodes, *shape)
        self.blocks: list[tuple[int, torch.Tensor]] = []
        self.like, self.shape, self.soft = like, shape, soft

    def put(self, first: int, d: torch.Tensor) -> None:
        """Nodes ``first .. first + len(d) - 1`` wrote ``d`` (n, C, B, T, d) minus their corrupted writes."""
        if self.buffer is not None:
            self.buffer[first:first + len(d)] = d
        else:
            self.blocks.append((first, d))

    def contract(self, m: torch.Tensor, upto: int) -> torch.Tensor:
        """(P, C, B, T, d): per port p, sum over upstream nodes u < ``upto`` of m[c, u, p(, t)] * diff[u]."""
        eq = "cup,ucbtd->pcbtd" if m.dim() == 3 else "cupt,ucbtd->pcbtd"
        if self.buffer is not None:
            return torch.einsum(eq, m, self.buffer[:upto])
        parts = [d for s, d in self.blocks if s < upto]  # (one copy, then one product: faster than a sum of products)
        n = sum(len(d) for d in parts)  # (a parallel block's heads are not written when its MLP reads: no edges)
        return torch.einsum(eq, m[:, :n], parts[0] if len(parts) == 1 else torch.cat(parts))

    def corrections(self, cut: torch.Tensor) -> list[torch.Tensor | None]:
        """Per port of ``cut`` ((C, upto, P) or (C, upto, P, T): how much of each edge u -> port
        comes from the corrupted run, u < upto), the sum over those edges of (write now - write
        corrupted), (C * B, T, d): one contraction for all the ports; None for a port no circuit
        cuts. Ports whose cut edges are the same (in small circuits, most ports have every edge
        cut) share one tensor object: their inputs are recomputed once (not for a soft mask:
        there each port's mask gets its own gradient, also where it keeps the edge whole)."""
        C, B, T = self.shape[:3]
        P = cut.shape[2]
        columns = cut.transpose(0, 2).reshape(P, -1)  # per port, what its circuits cut
        used = [True] * P if self.soft else (columns != 0).any(1).tolist()
        if not any(used):
            return [None] * P
        which = [j for j, u in enumerate(used) if u]
        if self.soft:
            first, same = which, list(range(len(which)))
        else:
            distinct, inverse = torch.unique(columns[which].to(torch.float32), dim=0, return_inverse=True)
            first = [which[int((inverse == k).nonzero()[0])] for k in range(len(distinct))]
            same = inverse.tolist()
        m = cut[:, :, first].to(self.like.device, self.like.dtype)
        shared = list(self.contract(m, cut.shape[1]).reshape(m.shape[2], C * B, T, -1))
        it = iter(same)
        return [shared[next(it)] if u else None for u in used]


def _entry(model: "Model", graph: Graph, keep: torch.Tensor, ids: torch.Tensor, rows: "Continuation | None",
           skip: CleanRun | None) -> tuple[int, torch.Tensor]:
    """Where a circuit run starts and its residual stream there: layer 0 from the embeddings (of
    the prompt and, teacher-forced, the continuation tree), or with ``skip`` the first layer that
    reads a cut edge, from the clean run, repeated per circuit (not for a mask being learned:
    its gradient reaches every edge)."""
    L, C = model.n_layers, keep.shape[0]
    start = 0 if skip is None or rows is not None or keep.requires_grad else skip.start(graph, keep, L)
    if start > 0:
        return start, skip.resid[Site("resid_pre", start) if start < L else Site("resid_final")].repeat(C, 1, 1)  # type: ignore[union-attr]
    with capture(model, [Site("resid_pre", 0)], whole=True) as emb, stop_after(model, Site("resid_pre", 0)):
        model.readout(ids, rows)  # the embeddings alone (positions restart per branch of the tree)
    h = emb[Site("resid_pre", 0)]
    return 0, h.clone() if keep.requires_grad else h  # (readout runs in inference mode; autograd needs a normal tensor)


def _circuit_forward(model: "Model", graph: Graph, clean: torch.Tensor, corr_w: list[torch.Tensor],
                     keep: torch.Tensor, cont: "Continuation | None" = None, skip: CleanRun | None = None) -> torch.Tensor:
    """Readout logits of the clean run under each of ``C`` circuits at once: ``keep`` is
    (C, U, V), or (C, U, V, T) deciding per position (position-aware circuits); in circuit ``c``
    every edge outside ``keep[c]`` carries the corrupted writes ``corr_w`` (per upstream node,
    (B, T, d)). Row ``c * B + b`` is prompt ``b`` under circuit ``c``: (C * B, vocab) at the
    last position, or (C * B, readouts, vocab) teacher-forced when ``cont`` holds answers of
    several tokens.

    Edges live at prompt positions: the continuation tokens (after the prompt) are computed by
    the whole model from the circuit's prompt-position keys and values, as every technique
    computes them after its patches. So the empty circuit reproduces the corrupted run's
    continuation and the full graph the clean run's. With ``skip`` (single-token answers) the
    run starts at the first layer that reads a cut edge, from the clean run."""
    adapter = model.adapter
    L = model.n_layers
    node_at, port_at = graph.node_index, graph.port_index
    head_ports: dict[int, list[Port]] = {l: [] for l in range(L)}
    for p in graph.ports:
        if p.kind in (PortKind.Q, PortKind.K, PortKind.V):
            head_ports[int(p.layer)].append(p)  # type: ignore[arg-type]
    C, (B, T) = keep.shape[0], clean.shape
    soft, cut_all = keep.requires_grad, _cut(keep)
    ids = clean.repeat(C, 1)
    rows = cont.select(torch.arange(B).repeat(C)) if cont is not None and not cont.is_single else None
    n_cont = 0 if rows is None else rows.n_tokens
    start, h = _entry(model, graph, keep, ids, rows, skip)
    positions, branches = (torch.arange(T), None) if rows is None else rows.tree(T)
    pos = positions.to(h.device)[None]
    tree: ContextManager[None] = nullcontext() if rows is None else model.teacher_forced(positions, branches, n_cont)
    diffs = _Diffs(len(graph.nodes), h, (C, B, T, h.shape[-1]), soft)  # node writes now minus corrupted ones

    def wrote(i: int, ws: "Sequence[torch.Tensor] | torch.Tensor") -> None:
        diffs.put(i, torch.stack([w[:, :T].reshape(C, B, T, -1) - corr_w[i + j][None] for j, w in enumerate(ws)]))

    def whole(fix: torch.Tensor) -> torch.Tensor:
        """A prompt-position correction (rows, T, d) over the whole sequence (zero after it)."""
        return fix if not n_cont else torch.cat([fix, fix.new_zeros(fix.shape[0], n_cont, fix.shape[2])], 1)

    wrote(0, [h if start == 0 else skip.writes[0][None].expand(C, B, T, -1).reshape(C * B, T, -1)])  # type: ignore[union-attr]
    below = 0 if start == 0 else node_at[Node(NodeKind.HEAD, start, 0)] if start < L else len(graph.nodes)
    if below > 1:  # below the start: the clean run
        diffs.put(1, torch.stack([skip.writes[i] - corr_w[i] for i in range(1, below)])[:, None].expand(  # type: ignore[union-attr]
            -1, C, -1, -1, -1))

    def corrections(ports: list[Port], upto: int) -> list[torch.Tensor | None]:
        return diffs.corrections(cut_all[:, :upto, [port_at[p] for p in ports]])

    with tree:
        for l in range(start, L):
            n_up = node_at[Node(NodeKind.HEAD, l, 0)]  # upstream nodes before this layer's heads
            pe = adapter.position_embeddings(h, pos)
            # every q / k / v port that reads a cut edge, from its own input: one batch, stopped after v
            ports = head_ports[l]
            fixed = [(p, fix) for p, fix in zip(ports, corrections(ports, n_up)) if fix is not None]
            full = {id(fix): whole(fix.to(h.device)) for _, fix in fixed}  # (one object per distinct correction)
            writes = _recomputed_inputs(model, l, [(p, full[id(fix)]) for p, fix in fixed], h, pos, pe, detach=not soft)
            mlp_node = node_at[Node(NodeKind.MLP, l)]
            heads_in: list[bool] = []

            def mlp_in(x: torch.Tensor, l: int = l, mlp_node: int = mlp_node, n_up: int = n_up,
                       heads_in: list[bool] = heads_in) -> torch.Tensor:
                if not graph.parallel:  # this layer's heads feed its MLP: their writes exist by now
                    wrote(n_up, adapter.head_writes(l, layer[Site("z", l)]))
                    heads_in.append(True)
                fix = corrections([Port(PortKind.MLP, l)], mlp_node)[0]
                return x if fix is None else x - fix.to(x.device)  # (the corrections live on the embedding's device)

            with capture(model, [Site("z", l), Site("mlp_out", l)], detach=not soft) as layer, \
                    intervene(model, {**writes, Site("mlp_in", l): mlp_in}):
                h = adapter.run_block(l, h, pos, pe)
            if not heads_in:
                wrote(n_up, adapter.head_writes(l, layer[Site("z", l)]))
            wrote(mlp_node, [adapter.residual_write(layer[Site("mlp_out", l)])])
    fix = corrections([Port(PortKind.LOGITS)], len(graph.nodes))[0]
    last = h[:, T - 1] if fix is None else h[:, T - 1] - fix[:, T - 1].to(h.device)
    if not n_cont:
        return adapter.unembed(last)
    return adapter.unembed(torch.cat([last[:, None], h[:, T:]], 1))  # readout 0, then each continuation token


CIRCUIT_ROWS = 256
"""Rows (circuits x prompts of a length group) per circuit forward pass by default on an
accelerator. On a CPU the default is one circuit per pass: ``benchmarks/circuit_speed.py``
measured batching circuits slower there (0.90x at 64 rows on 2 cores: the work is already
compute-bound), while a GPU needs the rows to fill it."""


@dataclass(frozen=True)
class CircuitBudget:
    """How circuit runs fit a memory budget: whether every prompt's corrupted writes and clean
    captures are ``kept`` for all circuits (else they are computed again per chunk of ``rows``
    prompts in every batch of circuits: two more forward passes per chunk and batch), and
    ``forward_rows``, the circuit x prompt rows one forward pass may hold."""

    budget: int
    kept: bool
    rows: int
    forward_rows: int
    per_row: int
    """Bytes a prompt needs: its kept data and one forward row."""

    def __str__(self) -> str:
        how = "kept for every circuit" if self.kept else f"computed again per chunk of {self.rows} prompts"
        return (f"Circuit runs: each prompt's corrupted and clean captures {how}; up to {self.forward_rows} circuit x "
                f"prompt rows per forward pass ({format_bytes(self.budget)} budget)")


def circuit_memory_plan(model: "Model", prompts: PromptSet, graph: Graph, memory_budget: "int | str | None") -> CircuitBudget:
    """:class:`CircuitBudget` for circuit runs on ``prompts`` under ``memory_budget`` (default:
    :func:`actpatch.memory.parse_budget`'s): per prompt, the corrupted run's node writes and the
    clean run's captures and writes; per forward row, the node writes' buffer, one layer's
    recomputed inputs and the attention pattern."""
    limit = parse_budget(memory_budget, model.device)
    T, _ = sequence(prompts)
    U, L = len(graph.nodes), model.n_layers
    heads = max(sum(1 for p in graph.ports if p.layer == l and p.kind not in (PortKind.MLP, PortKind.LOGITS))
                for l in range(L))
    unit = T * model.d_model * 4
    stored = (2 * U + 4 * L + 2) * unit
    forward = (U + 4 * heads + 4 * L) * unit + 2 * model.n_heads * T * T * 4
    n = len(prompts)
    if n * stored + forward <= limit:
        return CircuitBudget(limit, True, n, max(1, (limit - n * stored) // forward), stored + forward)
    rows = limit // (stored + forward)
    if rows < 1:
        raise MemoryBudgetError(f"Circuit runs: one prompt needs about {format_bytes(stored + forward)}; "
                                f"memory_budget={format_bytes(limit)} does not fit it. Give memory_budget="
                                f"'{math.ceil((stored + forward) / 2**20)}MiB' or more, or shorten the prompts.")
    return CircuitBudget(limit, False, int(min(rows, n)), int(min(rows, n)), stored + forward)


class _Circuits:
    """Runs circuits over one prompt set: the corrupted writes and the clean log-probs of each
    length group are computed once and reused for every circuit; several circuits run as one
    batch (``rows`` circuits x prompts per forward pass)."""

    def __init__(self, model: "Model", prompts: PromptSet, corruption: str | Corruption, metric: str, seed: int,
                 rows: int | None = None, layout: str | GraphLayout = GraphLayout.MIB, differentiable: bool = False,
                 memory_budget: "int | str | None" = None) -> None:
        exp = Experiment.setup(model, prompts, direction=Direction.NOISE, corruption=corruption, metric=metric,
                               seed=seed, technique="Circuit runs", needs_corrupted_run=True, continuations=True)
        if exp.corruption.draws != 1:
            raise MethodError("Circuit runs need one corrupted run per prompt: corruption 'str' or 'resample'.")
        if rows is None:
            rows = 1 if model.device.type == "cpu" else CIRCUIT_ROWS
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise MethodError(f"rows={rows!r}: the rows per circuit batch must be a positive integer.")
        self.model, self.n, self.metric, self.rows, self.exp = model, len(prompts), exp.metrics[0], rows, exp
        self.graph = Graph.of(model, layout)
        self.unreachable = ~self.graph.reachable
        self.lengths = sorted({g.seq_len for g in prompts.groups()})
        self.differentiable = differentiable
        self.budget = circuit_memory_plan(model, prompts, self.graph, memory_budget)
        # within the budget the corrupted writes and clean captures of every prompt are kept for
        # every circuit; beyond it they are recomputed per chunk of prompts in each batch of circuits
        self.chunks = list(exp.groups(None if self.budget.kept else self.budget.rows))
        self.kept = [self._prepare(runs) for runs in self.chunks] if self.budget.kept else None

    def _prepare(self, runs: "GroupRuns") -> tuple:
        """The corrupted run's node writes, the metric's measurer and the clean run's captures
        (the shortcut of single-token answers) of one chunk of prompts."""
        model = self.model
        sites = [Site("resid_pre", 0)] + [Site(k, l) for l in range(model.n_layers) for k in ("z", "mlp_out")]
        resid = [Site("resid_pre", l) for l in range(1, model.n_layers)] + [Site("resid_final")]
        with torch.inference_mode(not self.differentiable), torch.no_grad():  # (no inference tensors when a mask learns)
            with runs.corrupted.context(model), capture(model, sites) as a:
                runs.corrupted.readout(model)  # (the writes at prompt positions: the edges)
            corr_w = node_writes(model, self.graph, a)
            with runs.clean.context(model), capture(model, sites + resid) as c:
                measure = runs.measurer(self.exp.metrics, runs.clean.readout(model))
            single = runs.continuation is None or runs.continuation.is_single
            skip = CleanRun(dict(c), node_writes(model, self.graph, c)) if single else None
        return corr_w, measure, skip

    @property
    def groups(self) -> Iterator[tuple]:
        """Per chunk of prompts (a length group, or part of one under a memory budget): its runs,
        corrupted writes, measurer and clean captures (kept, or computed again now)."""
        for i, runs in enumerate(self.chunks):
            yield (runs, *(self.kept[i] if self.kept is not None else self._prepare(runs)))

    def _checked(self, keep: torch.Tensor) -> torch.Tensor:
        shape = (len(self.graph.nodes), len(self.graph.ports))
        ok = isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and tuple(keep.shape[:2]) == shape
        if not ok or keep.dim() not in (2, 3) or (keep.dim() == 3 and len(self.lengths) != 1):
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise MethodError(f"keep is {got}; expected a boolean tensor of shape {shape} (upstream x downstream in "
                              f"the graph's {self.graph.layout.value!r} layout: give the layout the edges were scored in), "
                              f"or {shape + (self.lengths[0] if len(self.lengths) == 1 else 'T',)} per position for "
                              f"prompts of one length.")
        if keep.dim() == 3 and keep.shape[2] != self.lengths[0]:
            raise MethodError(f"keep has {keep.shape[2]} positions; the prompts have {self.lengths[0]} tokens.")
        unreachable = self.unreachable if keep.dim() == 2 else self.unreachable[:, :, None]
        return keep | unreachable  # unreachable pairs are not edges

    def run(self, keep: torch.Tensor) -> torch.Tensor:
        """Per-prompt metric with every edge outside ``keep`` taken from the corrupted run."""
        return self.run_many([keep])[0]

    def run_many(self, keeps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(circuits, prompts): :meth:`run` of each of ``keeps`` (all (U, V) or all (U, V, T)),
        batched ``rows`` circuit x prompt rows at a time."""
        checked = [self._checked(k) for k in keeps]
        if len({k.dim() for k in checked}) > 1:
            raise MethodError("run_many() takes circuits of one kind: all (U, V) or all (U, V, T) masks.")
        out = torch.empty(len(checked), self.n, dtype=torch.promote_types(self.model.dtype, torch.float32))
        with torch.inference_mode(), self.model.attention_fn():
            for runs, corr_w, measure, skip in self.groups:
                per = max(1, min(self.rows, self.budget.forward_rows) // runs.rows)
                for c0 in range(0, len(checked), per):
                    keep = torch.stack(checked[c0:c0 + per])
                    logits = _circuit_forward(self.model, self.graph, runs.clean.ids, corr_w, keep, runs.continuation,
                                              skip)
                    rows = torch.arange(runs.rows).repeat(len(keep))
                    values = measure(logits, rows)[self.metric].cpu().view(len(keep), runs.rows)
                    out[c0:c0 + len(keep), runs.group.indices] = values
        return out

    def soft_run(self, keep: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per length group, (prompt indices, per-prompt metric) of the clean run with each edge
        (u, v) mixed as ``keep[u, v] * now + (1 - keep[u, v]) * corrupted``: ``keep`` a float
        (U, V) tensor in [0, 1] that gradients flow back to (a mask being learned; build the
        runner with ``differentiable=True``). Unreachable pairs are not edges: kept whole."""
        keep = torch.where(self.unreachable, torch.ones_like(keep), keep)[None]
        with self.model.attention_fn():
            for runs, corr_w, measure, skip in self.groups:
                logits = _circuit_forward(self.model, self.graph, runs.clean.ids, corr_w, keep, runs.continuation, skip)
                yield runs.group.indices, measure(logits, torch.arange(runs.rows))[self.metric]

    def cut_each(self, flat: Sequence[int]) -> torch.Tensor:
        """(len(flat),) the exact effect of cutting each edge alone (flat index into (U, V)):
        the mean metric of the clean run with that edge from the corrupted run, minus the clean run's."""
        full = torch.ones(len(self.graph.nodes), len(self.graph.ports), dtype=torch.bool)
        keeps = [full]
        for i in flat:
            keeps.append(full.clone())
            keeps[-1].view(-1)[i] = False
        means = self.run_many(keeps).mean(1)
        return means[1:] - means[0]


def run_circuit(
    model: "Model", prompts: PromptSet, keep: torch.Tensor, *, corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff", seed: int = 0, layout: str | GraphLayout = GraphLayout.MIB,
    memory_budget: "int | str | None" = None,
) -> torch.Tensor:
    """Per-prompt metric of the clean run with every edge outside ``keep`` (a (U, V) mask over
    the nodes and ports of :func:`actpatch.edge_attribution`'s graph in ``layout``) taken from
    the corrupted run. ``memory_budget``: as in :func:`faithfulness`."""
    return _Circuits(model, prompts, corruption, metric, seed, layout=layout, memory_budget=memory_budget).run(keep)


@dataclass(frozen=True)
class Faithfulness:
    """Normalised metric of circuits of growing size: ``values[i]`` for the top ``sizes[i]`` edges."""

    sizes: list[int]
    values: torch.Tensor
    raw: torch.Tensor  # (len(sizes), n_prompts)
    clean: float
    corrupted: float

    def plot_data(self) -> dict[str, list]:
        return {"x": list(self.sizes), "y": self.values.tolist()}

    def plot(self, name: str = "circuit", title: str | None = None) -> "go.Figure":
        """Faithfulness against circuit size (log axis), plotly; the report's figure."""
        from ..report.figures import faithfulness_figure

        return faithfulness_figure({name: self}, title or "Circuit faithfulness")

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "values": self.values.tolist(), "raw": self.raw.tolist(),
                "clean": self.clean, "corrupted": self.corrupted}

    @classmethod
    def from_dict(cls, d: dict) -> "Faithfulness":
        return cls(sizes=list(d["sizes"]), values=torch.tensor(d["values"]), raw=torch.tensor(d["raw"]),
                   clean=float(d["clean"]), corrupted=float(d["corrupted"]))


def save_curves(curves: dict[str, Faithfulness], path: str | Path) -> None:
    """Write faithfulness curves (by method) as JSON."""
    write_named(curves, path)


def load_curves(path: str | Path) -> dict[str, Faithfulness]:
    """Read curves written by :func:`save_curves` ({} when the file does not exist)."""
    return read_named(path, Faithfulness.from_dict, "faithfulness curves written by save_curves")


def faithfulness(
    model: "Model", prompts: PromptSet, edges: EdgeScores, sizes: Sequence[int], *, corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff", seed: int = 0, memory_budget: "int | str | None" = None,
) -> Faithfulness:
    """The faithfulness curve: for each size n, run the circuit of the top-n edges by |score|
    with everything else from the corrupted run, normalised (1 = clean, 0 = corrupted).

    ``memory_budget`` (bytes or ``"2GiB"``; default a share of the free memory): the corrupted
    and clean runs' captures are kept for every circuit when they fit, else computed again per
    chunk of prompts (:class:`CircuitBudget`); the values do not change.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama", n_layers=2)
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> curve = ap.circuits.faithfulness(m, ps, ap.edge_attribution(m, ps), sizes=[0, 10, 10_000])
        >>> [round(v, 3) + 0.0 for v in curve.values.tolist()][::2]  # no edges: corrupted; all: clean
        [0.0, 1.0]
    """
    circuits = _Circuits(model, prompts, corruption, metric, seed, layout=edges.graph.layout, memory_budget=memory_budget)
    none, every = torch.zeros_like(edges.scores, dtype=torch.bool), torch.ones_like(edges.scores, dtype=torch.bool)
    *raw, empty, full = circuits.run_many([top_edges(edges, n) for n in sizes] + [none, every])
    raws = torch.stack(raw) if raw else torch.empty(0, len(prompts))
    c, k = float(full.mean()), float(empty.mean())
    return Faithfulness(sizes=list(sizes), values=normalise(raws.mean(1), c, k), raw=raws, clean=c, corrupted=k)


@dataclass(frozen=True)
class EdgeValidation(AgreementReading):
    """Edge scores next to the exact effect of cutting each edge alone (raw metric units, mean
    over prompts: the clean run with that one edge taken from the corrupted run, minus the clean
    run), read as an :class:`~actpatch.agreement.Agreement`."""

    edges: list[tuple[str, str]]
    agreement: Agreement

    @property
    def findings(self) -> list[Finding]:
        return list(self.agreement.findings)

    def disagreements(self, k: int = 5) -> list[tuple[tuple[str, str], float, float]]:
        """The ``k`` edges where score and exact effect differ most: (edge, score, exact)."""
        order = (self.estimate - self.exact).abs().argsort(descending=True)[:k]
        return [(self.edges[i], float(self.estimate[i]), float(self.exact[i])) for i in order.tolist()]

    def plot(self) -> Any:
        return self.agreement.plot()


def validate_edges(
    model: "Model", prompts: PromptSet, edges: EdgeScores, *, k: int = 10, n_random: int = 10, seed: int = 0,
    exhaustive: bool | None = None, budget_s: float = 60.0,
) -> EdgeValidation:
    """Cut edges exactly, one at a time, and compare with the EAP / EAP-IG scores, looking for
    what the scores miss: every reachable edge when that fits ``budget_s`` seconds (estimated
    from one timed forward pass; ``exhaustive`` forces the choice), else the ``k`` largest, their
    neighbours in the (upstream, downstream) grid and ``n_random`` edges drawn from strata over
    the rest of the ranking. Reports rank correlation, top-k recall, the largest error and the
    misranked edges (:class:`~actpatch.agreement.Agreement`). Needs noising scores
    (``direction="noise"``, the default): cutting an edge from the clean run is what they estimate.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama", n_layers=2)
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> check = ap.circuits.validate_edges(m, ps, ap.edge_attribution(m, ps), k=3, n_random=2, exhaustive=False)
        >>> check.agreement.reasons[:3]
        ('top', 'top', 'top')
    """
    if edges.direction is not Direction.NOISE:
        raise MethodError("validate_edges() checks noising scores (edges cut from the clean run); "
                            "score the edges with direction='noise'.")
    circuits = _Circuits(model, prompts, from_description(edges.corruption), edges.metric, edges.seed,
                         layout=edges.graph.layout)
    flat = edges.scores.flatten()
    ok = (~torch.isnan(flat)).nonzero().flatten()
    order = ok[flat[ok].abs().argsort(descending=True, stable=True)]
    if exhaustive is None:
        exhaustive = exact_is_affordable(len(order), _seconds_per_run(model, prompts), budget_s)
    if exhaustive:
        why = {int(i): "all" for i in order.tolist()}
    else:
        reachable = set(order.tolist())
        why = {i: r for i, r in choose_cells(order, tuple(edges.scores.shape), k=k, n_random=n_random,
                                            seed=seed).items() if i in reachable}
    chosen = list(why)
    rank = torch.full((len(flat),), len(flat), dtype=torch.long)
    rank[order] = torch.arange(len(order))
    V = len(edges.downstream)
    names = [(edges.upstream[i // V], edges.downstream[i % V]) for i in chosen]
    agreement = Agreement.of([f"{u} -> {v}" for u, v in names], flat[chosen], circuits.cut_each(chosen),
                             est_rank=rank[chosen], n_cells=len(order), k=k, scale=1.0, exhaustive=exhaustive,
                             what=edges.method.upper(), reasons=[why[i] for i in chosen], code="edge")
    return EdgeValidation(edges=names, agreement=agreement)


def _seconds_per_run(model: "Model", prompts: PromptSet) -> float:
    """One timed forward pass over every prompt: roughly what cutting one edge costs."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for g in prompts.groups():
            model.logits(g.clean, last_only=True)
    return time.perf_counter() - t0
