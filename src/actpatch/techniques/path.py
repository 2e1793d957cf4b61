"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of senders on the
output *through* chosen receivers only.

For each sender set (noising; denoising swaps the runs):

1. Run the clean prompt with the senders' outputs taken from the corrupted run and every other
   head's output (z) frozen to its clean value; MLPs and norms recompute. Record what the
   receivers read: heads' q / k / v (k / v per KV head under grouped-query attention; the keys
   and values one query head reads are ``k_ungrouped`` / ``v_ungrouped``) or the final
   residual stream.
2. Run the clean prompt again, writing only the recorded receiver inputs. Measure.

Results are normalised like every other result (1 = clean, 0 = corrupted); Wang et al.'s
``(M_pt - M_clean) / (M_clean - M_corrupted)`` is ``value - 1`` for noising.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

import torch

from ..corruption import Corruption
from ..engine.batched import row_bytes, run_blocks
from ..errors import SiteError
from ..experiment.checkpoint import UnitStore
from ..experiment.core import Experiment, GroupRuns, Outcome
from ..experiment.executor import Executor
from ..experiment.units import Advance, Unit, UnitValues
from ..hooks import capture, intervene
from ..memory import MemoryPlan, block_bytes, capture_bytes, forward_plan, parse_budget, sequence
from ..metrics import Measurer, MetricSpec
from ..prompts.promptset import PromptSet
from ..results import PathInfo, PatchResult
from ..sites import Site, SiteKind, as_sites
from ..types import DEFAULT_DIRECTION, Direction, Engine

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["path_patch", "path_sweep", "receiver_sweep", "RECEIVER_KINDS", "SENDER_KINDS"]

RECEIVER_KINDS = (SiteKind.Q, SiteKind.K, SiteKind.V, SiteKind.K_UNGROUPED, SiteKind.V_UNGROUPED, SiteKind.RESID_FINAL)
SENDER_KINDS = (SiteKind.Z, SiteKind.MLP_OUT)


def _require(sites: Sequence[Site], kinds: tuple[SiteKind, ...], role: str, use: str, model: "Model") -> None:
    """Each of ``sites`` is a Site of one of ``kinds``, in range for ``model``; else a SiteError."""
    if not sites:
        raise SiteError(f"An empty {role.lower()} set; give at least one: {use}.")
    for s in sites:
        if not isinstance(s, Site) or s.kind not in kinds:
            raise SiteError(f"{role} {s if isinstance(s, Site) else repr(s)}: use {use}.")
        s.check(model)


def _check(senders: Sequence[Sequence[Site]], receivers: Sequence[Site], model: "Model") -> None:
    _require(receivers, RECEIVER_KINDS, "Receiver", "q, k, v, k_ungrouped or v_ungrouped sites of heads, or Site('resid_final')", model)
    for group in senders:
        _require(group, SENDER_KINDS, "Sender", "head outputs (z) or MLP outputs (mlp_out)", model)


@dataclass(frozen=True)
class PathState:
    """One length group's runs: the base run's head outputs (frozen in step 1) and, for the
    batched path, its residual stream entering every block and the final one; the senders'
    source activations and the metrics."""

    runs: GroupRuns
    frozen: dict[Site, torch.Tensor]
    source: dict[Site, torch.Tensor]
    measure: Measurer
    resid: dict[Site, torch.Tensor]

    @property
    def batched(self) -> bool:
        return bool(self.resid)


@dataclass(frozen=True)
class PathJob:
    """Path patching of each sender set into ``receivers``, unit by unit (a
    :class:`~actpatch.experiment.executor.UnitJob`)."""

    experiment: Experiment
    paths: tuple[tuple[tuple[Site, ...], tuple[Site, ...]], ...]
    """(sender set, receiver set) per cell."""
    engine: Engine = Engine.AUTO
    budget: int | None = None
    """Bytes a chunk of prompts may use (:func:`path_memory_plan`); None: the default budget."""
    held: int = 0
    """Bytes a prompt row holds while its chunk runs: the rest of ``budget`` is for sender sets."""

    def context(self) -> ContextManager[object]:
        return self.experiment.model.attention_fn()

    def prepare(self, runs: GroupRuns, outcome: Outcome | None = None) -> PathState:
        exp, model = self.experiment, self.experiment.model
        L = model.n_layers
        z_all = [Site("z", l) for l in range(L)]
        # multi-token answers: the continuation reads the changed keys / values; the reference path
        batched = self.engine != Engine.REFERENCE and (runs.base.continuation is None or runs.base.continuation.is_single)
        resid_sites = [Site("resid_pre", l) for l in range(L)] + [Site("resid_final")] if batched else []
        senders_full = sorted({s.full() for g, _ in self.paths for s in g}, key=str)
        rows = torch.arange(runs.rows)
        with runs.base.context(model), capture(model, z_all) as frozen, capture(model, resid_sites) as resid:
            base_logits = runs.base.readout(model)
        source, src_logits = exp.source_activations(runs, senders_full)
        # the clean run is the base or the source run: no third forward pass for KL's reference
        measure = runs.measurer(exp.metrics, runs.clean_logits(base_logits, src_logits))
        if outcome is not None:
            outcome.baselines(runs, measure(base_logits, rows), measure(src_logits, rows))
        return PathState(runs, frozen, source, measure, dict(resid))

    def run_unit(self, state: PathState, unit: Unit, advance: Advance | None = None) -> UnitValues:
        model, B = self.experiment.model, state.runs.rows
        rows = torch.arange(B)
        paths = self.paths[unit.start:unit.stop]
        out: list[dict] = []
        if state.batched:
            budget = parse_budget(self.budget, model.device) - self.held * B
            per_chunk = max(1, budget // max(1, 2 * row_bytes(model, 0, state.runs.base.ids.shape[1]) * B))
            for c in range(0, len(paths), per_chunk):
                chunk = paths[c:c + per_chunk]
                values = state.measure(_paths_batched(model, state, chunk), rows.repeat(len(chunk)))
                out.extend({m: v[k * B:(k + 1) * B] for m, v in values.items()} for k in range(len(chunk)))
                if advance is not None:
                    advance(len(chunk))
        else:
            for senders, receivers in paths:
                logits = _one_path(model, state.runs, senders, receivers, state.frozen, state.source)
                out.append(state.measure(logits, rows))
                if advance is not None:
                    advance(1)
        return {m: torch.stack([o[m] for o in out]) for m in self.experiment.metrics}


def _run(model: "Model", prompts: PromptSet, paths: Sequence[tuple[Sequence[Site], Sequence[Site]]], *,
         direction: str | Direction, corruption: str | Corruption, metric: MetricSpec, seed: int,
         target: str, dims: tuple[str, ...], coords: dict[str, list], executor: "str | Executor | None" = None,
         unit_size: int = 16, store: UnitStore | None = None, progress: bool = False, senders: tuple[str, ...] = (),
         receivers: tuple[str, ...] = (), grid: dict | None = None, engine: str | Engine = Engine.AUTO,
         memory_budget: "int | str | None" = None) -> PatchResult:
    engine = Engine(engine)
    exp = Experiment.setup(model, prompts, direction=direction, corruption=corruption, metric=metric, seed=seed,
                           technique="Path patching", needs_corrupted_run=True, continuations=True)
    for send, recv in dict.fromkeys((tuple(g), tuple(r)) for g, r in paths):
        _check([send], recv, model)
    cells = tuple((tuple(g), tuple(r)) for g, r in paths)
    plan = path_memory_plan(model, prompts, cells, engine, memory_budget, draws=exp.corruption.draws)
    job = PathJob(exp, cells, engine, plan.budget, plan.held)
    outcome = exp.run(job, len(paths), executor=executor, store=store, unit_size=unit_size, progress=progress,
                      description=f"path patching {target}", max_rows=plan.rows if plan.rows < plan.total_rows else None)
    technique = PathInfo(senders=senders, receivers=receivers)
    return exp.result(outcome, target=target, technique=technique, dims=dims, coords=coords, grid=grid)


def _batched(engine: Engine, prompts: PromptSet) -> bool:
    """Whether paths run batched (:meth:`PathJob.prepare`): multi-token answers take the
    reference path."""
    return engine is not Engine.REFERENCE and not prompts.multi_token


def _path_bytes(model: "Model", prompts: PromptSet, paths: Sequence[tuple[Sequence[Site], Sequence[Site]]],
                engine: Engine) -> tuple[int, int]:
    """``(held, work)``: bytes per prompt row a path job holds while a chunk of prompts runs
    (every head output of the base run, the senders' source activations, for the batched path
    the residual stream entering every block, both baselines' logits) and needs for one sender
    set (the batched path's two steps, or the reference path's copy of the head outputs and a
    forward pass)."""
    T, readouts = sequence(prompts)
    e = torch.finfo(model.dtype).bits // 8

    def size(s: Site) -> int:
        return capture_bytes(model, s, T)

    frozen = model.n_layers * size(Site("z", 0))
    senders = {s.full() for g, _ in paths for s in g}
    held = frozen + sum(map(size, senders)) + 2 * readouts * model.vocab_size * 4
    if _batched(engine, prompts):
        held += (model.n_layers + 1) * size(Site("resid_pre", 0))
        return held, 2 * row_bytes(model, 0, T)
    return held, frozen + block_bytes(model, T) + 2 * T * model.d_model * e


def path_memory_plan(model: "Model", prompts: PromptSet, paths: Sequence[tuple[Sequence[Site], Sequence[Site]]],
                     engine: Engine, memory_budget: "int | str | None", *, draws: int = 1) -> MemoryPlan:
    """Prompt rows a path patching job runs at once under ``memory_budget`` (steps 1-2 of
    :func:`actpatch.memory.plan`), as :func:`~actpatch.techniques.exact.sweep_memory_plan` does
    for sweeps: a given budget too small for one prompt is refused, naming the smallest; the
    default budget runs one prompt at a time."""
    held, work = _path_bytes(model, prompts, paths, engine)
    return forward_plan("Path patching", model, memory_budget, total_rows=len(prompts) * draws, held=held, work=work,
                        passes=2 + 2 * len(paths), draws=draws)


def _one_path(model: "Model", runs: GroupRuns, group: Sequence[Site], receivers: Sequence[Site],
              frozen: dict[Site, torch.Tensor], source: dict[Site, torch.Tensor]) -> torch.Tensor:
    """Readout logits of the base run (last position and, teacher-forced, each continuation
    token's) with only the receivers' inputs changed by ``group``."""
    # step 1: senders from the source run, every other head frozen to the base run
    writes: dict[Site, torch.Tensor] = {z: x.clone() for z, x in frozen.items()}
    for s in group:
        if s.kind == SiteKind.Z:
            writes[Site("z", s.layer)][s.selector()] = source[s.full()][s.selector()]
        else:
            writes[s] = source[s.full()][s.selector()]
    # (the receivers sit at prompt positions, which never read the continuation of several-token answers)
    with runs.base.context(model), intervene(model, writes), capture(model, list(receivers)) as recorded:
        model.logits(runs.base.ids, last_only=True)
    # step 2: only the receivers' inputs change; the answers' continuation runs after them
    with runs.base.context(model), intervene(model, {r: recorded[r] for r in receivers}):
        return runs.base.readout(model)


def _paths_batched(model: "Model", state: PathState, paths: Sequence[tuple[Sequence[Site], Sequence[Site]]]) -> torch.Tensor:
    """Readout logits ``(len(paths) * B, 1, vocab)`` of :func:`_one_path` for several (senders,
    receivers) cells at once, one row block of the batch per cell, without the layers that cannot
    change: step 1 starts at the earliest sender's block from the base run's residual stream and
    stops after the last receiver's block (once for all cells when they share their senders);
    step 2 starts at the earliest written receiver's block, and where only the final residual
    stream is written it is the unembedding alone."""
    B, K, L = state.runs.rows, len(paths), model.n_layers
    base_row = torch.arange(B).repeat(K)
    blocks = [slice(k * B, (k + 1) * B) for k in range(K)]
    heads = sorted({r.full() for _, rs in paths for r in rs if r.kind != SiteKind.RESID_FINAL}, key=str)
    final = any(r.kind == SiteKind.RESID_FINAL for _, rs in paths for r in rs)
    start = min(s.layer for g, _ in paths for s in g)  # type: ignore[type-var]
    stop = L if final else max(r.layer for r in heads) + 1  # type: ignore[type-var]
    shared = all(tuple(g) == tuple(paths[0][0]) for g, _ in paths)
    n1 = 1 if shared else K
    rows1 = torch.arange(B).repeat(n1)
    # step 1: each row block's senders from the source run, every other head frozen to the base run
    writes: dict[Site, torch.Tensor] = {Site("z", l): state.frozen[Site("z", l)][rows1] for l in range(start, stop)}
    mlp: dict[Site, list[tuple[slice, tuple, torch.Tensor]]] = {}
    for k in range(n1):
        for s in paths[k][0]:
            if s.layer >= stop:  # type: ignore[operator]
                continue  # after every receiver: it reaches none of them
            value = state.source[s.full()][s.selector()]
            if s.kind == SiteKind.Z:
                writes[Site("z", s.layer)][blocks[k]][s.selector()] = value
            else:
                mlp.setdefault(s.full(), []).append((blocks[k], s.selector(), value))
    hidden1 = None
    recorded: dict[Site, torch.Tensor] = {}
    if start < stop:
        with intervene(model, {**writes, **{site: _row_blocks(w) for site, w in mlp.items()}}), \
                capture(model, [r for r in heads if r.layer >= start]) as recorded:  # type: ignore[operator]
            hidden1 = run_blocks(model, state.resid[Site("resid_pre", start)][rows1], start, stop)
        if shared and K > 1:
            rep = torch.arange(B).repeat(K)
            hidden1, recorded = hidden1[rep], {r: v[rep] for r, v in recorded.items()}
    # step 2: only the receivers' inputs change (receivers below every sender read the base run)
    step2: dict[Site, list[tuple[slice, tuple, torch.Tensor]]] = {}
    for k, (_, rs) in enumerate(paths):
        for r in rs:
            if r.kind != SiteKind.RESID_FINAL and r.full() in recorded:
                step2.setdefault(r.full(), []).append((blocks[k], r.selector(), recorded[r.full()][blocks[k]][r.selector()]))
    if step2:
        first = min(r.layer for r in step2)  # type: ignore[type-var]
        with intervene(model, {site: _row_blocks(w) for site, w in step2.items()}):
            hidden = run_blocks(model, state.resid[Site("resid_pre", first)][base_row], first, L)
    else:
        hidden = state.resid[Site("resid_final")][base_row]
    if hidden1 is not None:  # a written final residual stream overrides whatever step 2 computed there
        for k, (_, rs) in enumerate(paths):
            for r in rs:
                if r.kind == SiteKind.RESID_FINAL:
                    hidden[blocks[k]][r.selector()] = hidden1[blocks[k]][r.selector()]
    return model.adapter.unembed(hidden[:, -1])[:, None]


def _row_blocks(writes: list[tuple[slice, tuple, torch.Tensor]]):  # noqa: ANN202 - a hook function
    """A hook value writing each (row block, selector, value) and leaving the other rows as computed."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for block, sel, value in writes:
            out[block][sel] = value.to(out.dtype)
        return out

    return fn


def path_patch(
    model: "Model",
    prompts: PromptSet,
    senders: Site | Sequence[Site],
    receivers: Site | Sequence[Site],
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    engine: str | Engine = Engine.AUTO,
    memory_budget: "int | str | None" = None,
) -> PatchResult:
    """The effect of one sender set on the output through ``receivers`` only (no dims).
    ``engine="reference"``: two full forward passes, as the module docstring says; the default
    skips the layers that cannot change (see :func:`path_sweep`). ``memory_budget``: as in
    :func:`path_sweep`.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.path_patch(m, ps, [ap.Site("z", 0, head=1)], [ap.Site("q", 1, head=2)])
        >>> res.values.shape
        torch.Size([])
    """
    senders, receivers = as_sites(senders, "senders", allow_empty=True), as_sites(receivers, "receivers", allow_empty=True)
    if any(s.relative for s in senders + receivers):  # names ("S2", "end") and negative indices, per prompt
        n = len(senders)
        return _per_layout(lambda ps, resolved, corr: path_patch(
            model, ps, resolved[:n], resolved[n:], direction=direction, corruption=corr, metric=metric, seed=seed,
            engine=engine, memory_budget=memory_budget), model, prompts, senders + receivers, corruption, direction)
    return _run(model, prompts, [(senders, receivers)], direction=direction, corruption=corruption,
                metric=metric, seed=seed, target="path", dims=(), coords={}, senders=tuple(str(s) for s in senders),
                receivers=tuple(str(r) for r in receivers), engine=engine, memory_budget=memory_budget)


def path_sweep(
    model: "Model",
    prompts: PromptSet,
    receivers: Site | Sequence[Site] | str,
    *,
    senders: Site | Sequence[Site] | None = None,
    sender: str | SiteKind = "z",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    pos: int | str | None = None,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    executor: "str | Executor | None" = None,
    unit_size: int = 16,
    store: UnitStore | None = None,
    progress: bool = True,
    engine: str | Engine = Engine.AUTO,
    memory_budget: "int | str | None" = None,
) -> PatchResult:
    """Path-patch every sender head (``sender="z"``, dims layer x head) or MLP
    (``sender="mlp_out"``, dims layer) into ``receivers``; or, with ``receivers`` a kind
    (``"q"``, ``"k"``, ``"v"``, ``"k_ungrouped"``, ``"v_ungrouped"``) and fixed ``senders``, the
    senders into every receiver head of that kind, one at a time (:func:`receiver_sweep`). Senders at or after the last
    receiver layer cannot reach it and are skipped only by the model's causality (they score
    the clean value). Sender sets run in units of ``unit_size`` on ``executor`` (``"local"``,
    ``"ray"`` or an executor object, as in :func:`actpatch.sweep`); with a ``store`` finished
    units are saved and reused. ``pos``: every sender at this one position only (an index, or
    a name such as ``"S2"`` resolved per prompt, as receivers' positions are).

    Cost: ``engine="reference"`` runs two full forward passes per sender (one for what the
    receivers read, one to measure). The default (``"auto"``, or ``"batched"``) runs many senders
    per forward pass and only the layers that can change: step 1 from the sender's layer to the
    last receiver's, step 2 from the first receiver's layer to the output, or for the final
    residual stream the unembedding alone. Multi-token answers take the reference path (their
    teacher-forced continuation reads the changed keys and values).

    Memory: every prompt holds the base run's head outputs (and, batched, its residual stream)
    at every layer and position while it runs; ``memory_budget`` (bytes or ``"4GiB"``; default
    a share of free memory) runs a chunk of prompts at a time when they do not all fit, with
    the same values, and refuses a budget too small for one prompt, naming the smallest."""
    from ..experiment.plan import Grid, pick_axis

    if isinstance(receivers, (str, SiteKind)):
        if senders is None:
            raise SiteError(f"receivers={receivers!r} sweeps every {receivers} head as the receiver of fixed senders: "
                            f"give senders=[...] (e.g. [ap.Site('z', 9, head=6)]).")
        return receiver_sweep(model, prompts, senders, receiver=receivers, layers=layers, heads=heads, pos=pos,
                              direction=direction, corruption=corruption, metric=metric, seed=seed, executor=executor,
                              unit_size=unit_size, progress=progress, engine=engine, memory_budget=memory_budget)
    if senders is not None:
        raise SiteError("senders=... goes with receivers given as a kind (e.g. 'q'), a sweep over receivers; "
                        "with fixed receivers the sweep is over sender='z' or 'mlp_out'.")
    receivers = as_sites(receivers, "receivers", allow_empty=True)  # an empty set: its own error below
    marker = [Site(SiteKind.Z, 0, pos=pos)] if pos is not None else []  # where the senders sit
    if any(s.relative for s in receivers + marker):
        if store is not None:
            raise SiteError("A path sweep over named or negative positions runs once per prompt layout and cannot "
                            "share one store= between them; give integer positions, or no store.")
        n = len(receivers)
        return _per_layout(lambda ps, resolved, corr: path_sweep(
            model, ps, resolved[:n], sender=sender, layers=layers, heads=heads,
            pos=resolved[n].pos if marker else None, direction=direction, corruption=corr, metric=metric,
            seed=seed, executor=executor, unit_size=unit_size, progress=progress, engine=engine,
            memory_budget=memory_budget),
            model, prompts, receivers + marker, corruption, direction)
    try:
        kind = SiteKind(sender)
    except ValueError:
        kind = None  # type: ignore[assignment]
    if kind not in SENDER_KINDS:
        raise SiteError(f"sender={sender!r}: use 'z' (heads) or 'mlp_out'.")
    grid = Grid(layers=layers, heads=heads)
    lays = pick_axis("layers", grid.layers, model.n_layers)
    if kind == SiteKind.Z:
        hs = pick_axis("heads", grid.heads, model.n_heads)
        sets = [[Site("z", l, head=h, pos=pos)] for l in lays for h in hs]
        dims, coords = ("layer", "head"), {"layer": lays, "head": hs}
    else:
        if grid.heads is not None:
            raise SiteError("heads=... applies to sender='z', not to MLP senders.")
        sets = [[Site("mlp_out", l, pos=pos)] for l in lays]
        dims, coords = ("layer",), {"layer": lays}
    return _run(model, prompts, [(g, receivers) for g in sets], direction=direction, corruption=corruption, metric=metric,
                seed=seed, target=f"path:{kind.value}", dims=dims, coords=coords, grid=grid.to_dict(),
                executor=executor, unit_size=unit_size, store=store, progress=progress, engine=engine,
                receivers=tuple(str(r) for r in receivers), memory_budget=memory_budget)


def receiver_sweep(
    model: "Model",
    prompts: PromptSet,
    senders: Site | Sequence[Site],
    *,
    receiver: str | SiteKind = "q",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    pos: int | str | None = None,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    executor: "str | Executor | None" = None,
    unit_size: int = 16,
    progress: bool = True,
    engine: str | Engine = Engine.AUTO,
    memory_budget: "int | str | None" = None,
) -> PatchResult:
    """Path-patch one sender set into every receiver of a kind, one at a time (``ap.path_sweep(model,
    prompts, "q", senders=[...])``): which heads' queries (``receiver="q"``), keys or values read the senders' effect (Wang et al.'s search
    for the heads an S-inhibition head talks to). Dims layer x head; for ``"k"`` / ``"v"`` the
    head axis is ``kv_head`` (under grouped-query attention one key / value serves a group of
    query heads; ``"k_ungrouped"`` / ``"v_ungrouped"`` give each query head's own). ``pos``:
    the receivers at one position (index or name), else at every position. Layers at or below
    the earliest sender score the base run (nothing reaches them); the senders' step runs once
    for all receivers.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama_gqa", n_layers=3)
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.path_sweep(m, ps, "k", senders=[ap.Site("z", 0, head=1)], progress=False)
        >>> res.dims, res.shape
        (('layer', 'kv_head'), (3, 2))
    """
    from ..experiment.plan import Grid, pick_axis

    senders = as_sites(senders, "senders", allow_empty=True)
    try:
        kind = SiteKind(receiver)
    except ValueError:
        kind = None  # type: ignore[assignment]
    if kind not in RECEIVER_KINDS or kind == SiteKind.RESID_FINAL:
        raise SiteError(f"receiver={receiver!r}: use one of q, k, v, k_ungrouped, v_ungrouped (a sweep over heads).")
    marker = [Site(SiteKind.Q, 0, pos=pos)] if pos is not None else []
    if any(s.relative for s in senders + marker):
        n = len(senders)
        return _per_layout(lambda ps, resolved, corr: receiver_sweep(
            model, ps, resolved[:n], receiver=receiver, layers=layers, heads=heads,
            pos=resolved[n].pos if marker else None, direction=direction, corruption=corr, metric=metric,
            seed=seed, executor=executor, unit_size=unit_size, progress=progress, engine=engine,
            memory_budget=memory_budget),
            model, prompts, senders + marker, corruption, direction)
    grid = Grid(layers=layers, heads=heads)
    lays = pick_axis("layers", grid.layers, model.n_layers)
    kv = kind in (SiteKind.K, SiteKind.V)
    hs = pick_axis("heads", grid.heads, model.n_kv_heads if kv else model.n_heads)
    head_dim = "kv_head" if kv else "head"
    cells = [(senders, [Site(kind, l, head=h, pos=pos)]) for l in lays for h in hs]
    return _run(model, prompts, cells, direction=direction, corruption=corruption, metric=metric, seed=seed,
                target=f"path_into:{kind.value}", dims=("layer", head_dim), coords={"layer": lays, head_dim: hs},
                grid=grid.to_dict(), executor=executor, unit_size=unit_size, progress=progress, engine=engine,
                senders=tuple(str(s) for s in senders), receivers=(f"every {kind.value}",), memory_budget=memory_budget)


def _per_layout(run, model: "Model", prompts: PromptSet, sites: Sequence[Site],  # noqa: ANN001 - a callable
                corruption: str | Corruption, direction: str | Direction) -> PatchResult:
    """Run on each group of prompts whose named / negative positions fall at the same indices,
    with the sites resolved there, and merge in prompt order (:func:`~actpatch.techniques.positions.by_resolved_sites`)."""
    from .patching import _base_side
    from .positions import by_resolved_sites

    return by_resolved_sites(run, model, prompts, sites, corruption, _base_side(direction))
