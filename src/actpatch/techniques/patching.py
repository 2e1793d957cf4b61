"""``sweep`` and ``patch``: exact activation patching, labelled as a :class:`~actpatch.PatchResult`.

Per length group, one forward pass of the source run and one of the base run give both
baselines and every activation needed (the source activations, the null patch's own
activations, the batched engine's state); the patches then run unit by unit through the
executor seam of :mod:`actpatch.experiment.executor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

import torch

from ..corruption import Corruption, first_difference
from ..engine import BATCHED_KINDS, run_batched, run_reference
from ..engine.batched import base_sites
from ..errors import EngineError, SiteError
from ..experiment.checkpoint import UnitStore
from ..experiment.core import Experiment, GroupRuns, Outcome
from ..experiment.executor import Advance, Executor, Unit, UnitValues, executor_for, progress_bar, units
from ..experiment.plan import Grid, Plan, parse_target, plan_for
from ..findings import from_technique
from ..hooks import capture
from ..metrics import Measurer, Metric
from ..prompts.promptset import PromptSet
from ..results import PatchResult
from ..sites import Site, SiteKind
from ..subspace import Subspace, SubspaceLike, as_subspace
from ..types import DEFAULT_DIRECTION, Direction, Engine, Method, parse_direction, parse_engine
from .positions import by_named_positions, named_positions

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["sweep", "patch", "execute", "SweepJob"]


def choose_engine(plan: Plan, engine: Engine) -> Engine:
    """The engine that runs ``plan``: ``auto`` picks batched where it supports every site."""
    batchable = all(s.kind in BATCHED_KINDS for p in plan.patches for s in p)
    if engine is Engine.BATCHED and not batchable:
        raise EngineError(f"The batched engine does not patch {plan.target.value!r}; use engine='reference' or 'auto'.")
    if engine is Engine.AUTO:
        return Engine.BATCHED if batchable else Engine.REFERENCE
    return engine


@dataclass
class GroupState:
    """What one length group's patches need, from one forward pass of each run."""

    runs: GroupRuns
    source: dict[Site, torch.Tensor]
    base_acts: dict[Site, torch.Tensor]
    base_values: dict[Metric, torch.Tensor]
    measure: Measurer
    diff_start: int


@dataclass(frozen=True)
class SweepJob:
    """Exact patching of ``plan`` in an experiment: prepare a group once, then run any unit of
    its patches. This is what an executor's worker calls."""

    experiment: Experiment
    plan: Plan
    engine: Engine
    chunk_size: int | None = None

    def context(self) -> ContextManager[object]:
        """One attention path for all runs of the job (equal inputs, equal bits) when it patches
        attention internals or runs the batched engine."""
        if self.plan.uses_attention_fn or self.engine is Engine.BATCHED:
            return self.experiment.model.attention_fn()
        return nullcontext()

    def prepare(self, runs: GroupRuns, outcome: Outcome | None = None) -> GroupState:
        exp, model, plan = self.experiment, self.experiment.model, self.plan
        activation_level = exp.corruption.activation_level
        wanted = plan.full_sites()
        with runs.source.context(model), capture(model, [] if activation_level else wanted) as source:
            src_logits = model.logits(runs.source.ids, last_only=True)
        own = [s.full() for s in plan.patches[0]] + (wanted if activation_level else [])
        own += base_sites(model) if self.engine is Engine.BATCHED else []
        with runs.base.context(model), capture(model, list(dict.fromkeys(own))) as base_acts:
            base_logits = model.logits(runs.base.ids, last_only=True)
        if activation_level:  # noising only: base is the clean run
            source = {s: exp.corruption.source(base_acts[s]) for s in wanted}
        clean_logits = runs.clean_logits(base_logits, src_logits)
        measure = runs.measurer(exp.metrics, clean_logits)
        idx = torch.arange(runs.rows)
        base_values, src_values = measure(base_logits, idx), measure(src_logits, idx)
        if outcome is not None:
            outcome.baselines(runs, base_values, src_values)
            outcome.correct(runs, clean_logits)
            # Null patch: the base run's own activations written back must change nothing.
            null = run_reference(model, runs.base, base_acts, plan.patches[:1], measure)
            outcome.null_patch(max(float((null[m][0] - base_values[m]).abs().max()) for m in exp.metrics))
        start = 0 if activation_level else first_difference(runs.base, runs.source)
        return GroupState(runs, source, base_acts, base_values, measure, start)

    def run_unit(self, state: GroupState, unit: Unit, advance: Advance | None = None) -> UnitValues:
        patches = self.plan.patches[unit.start:unit.stop]
        model = self.experiment.model
        if self.engine is Engine.BATCHED:
            return run_batched(model, state.runs.base, state.source, patches, state.measure, advance,
                               diff_start=state.diff_start, chunk_size=self.chunk_size, base_acts=state.base_acts,
                               base_metrics=state.base_values, subspace=self.plan.subspace)
        return run_reference(model, state.runs.base, state.source, patches, state.measure, advance,
                             subspace=self.plan.subspace)


def execute(
    model: "Model",
    prompts: PromptSet,
    plan: Plan,
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    seed: int = 0,
    engine: str | Engine = Engine.AUTO,
    chunk_size: int | None = None,
    progress: bool = True,
    store: UnitStore | None = None,
    unit_size: int = 64,
    executor: str | Executor | None = None,
    grid: Grid | None = None,
    sites: Sequence[Site] = (),
) -> PatchResult:
    """Run every patch of ``plan`` over ``prompts`` and label the outcome (see :func:`sweep`)."""
    if plan.subspace is not None:
        for p in plan.patches:
            for s in p:
                plan.subspace.check(model, s)
    exp = Experiment.setup(model, prompts, direction=direction, corruption=corruption, metric=metric, seed=seed,
                           technique="Activation patching")
    job = SweepJob(exp, plan, choose_engine(plan, parse_engine(engine)), chunk_size)
    lengths = sorted({g.seq_len for g in prompts.groups()})
    for p in plan.patches:  # every site fits every length, checked before any computation
        for s in p:
            for T in lengths:
                s.check(model, seq_len=T)
    n_groups = len(lengths)
    outcome = exp.outcome(len(plan.patches))
    with ExitStack() as stack:
        run_units = stack.enter_context(executor_for(executor))
        stack.enter_context(job.context())
        total = len(plan.patches) * n_groups
        advance = stack.enter_context(progress_bar(progress and total > 1, total, f"patching {plan.target.value}"))
        # Without saved progress or a chosen executor, a group's patches are one unit: the
        # engine then batches across all of them.
        size = unit_size if store is not None or executor is not None else len(plan.patches)
        for runs in exp.groups():
            state = job.prepare(runs, outcome)
            todo = units(runs.index, len(plan.patches), size)
            outcome.patched(runs, run_units.map(job, runs, state, todo, store=store, advance=advance))
    axes = (grid or Grid()).to_dict()
    sub = plan.subspace
    return exp.result(outcome, target=plan.target.value, method=Method.EXACT, dims=plan.dims, coords=plan.coords,
                      engine=job.engine, axes=axes, window=(grid or Grid()).window, sites=tuple(str(s) for s in sites),
                      subspace=sub.describe() if sub is not None else None,
                      findings=list(sub.findings) if sub is not None else [])


def sweep(
    model: "Model",
    prompts: PromptSet,
    target: str | SiteKind = "resid_pre",
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    per_position: bool | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    window: int = 1,
    seed: int = 0,
    engine: str | Engine = Engine.AUTO,
    chunk_size: int | None = None,
    progress: bool = True,
    store: UnitStore | None = None,
    unit_size: int = 64,
    subspace: SubspaceLike | None = None,
    check_subspace: bool = True,
    executor: str | Executor | None = None,
) -> PatchResult:
    """Patch every cell of a target and measure the effect.

    Args:
        target: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (per
            layer x position), ``z``, ``q``, ``k``, ``v``, ``pattern`` (per layer x head, all
            positions), ``mlp_post`` (per layer x neuron), ``embed``, ``resid_final``.
        direction: ``"noise"`` (the default: corrupted into clean, necessity) or ``"denoise"``
            (clean into corrupted: sufficiency); see :data:`actpatch.DEFAULT_DIRECTION`.
        corruption: ``"str"`` (the pairs), ``"resample"``, ``"gaussian"``, ``"mean"``, ``"zero"``
            or a :class:`~actpatch.corruption.Corruption`.
        metric: one metric name or several (all computed from the same patched runs).
        per_position: add / drop the position axis (default: on for residual-like targets).
        layers, positions, heads, neurons: restrict an axis. ``positions`` may also name roles
            (``["S1", "S2", "end"]``, see :mod:`actpatch.techniques.positions`): the position
            axis is then aligned by role across prompts of any lengths. window: patch ``window``
            consecutive layers together (joint effect).
        engine: ``"auto"`` (batched where supported), ``"batched"`` or ``"reference"`` (one
            forward pass per patch: the slow, obviously right oracle). chunk_size: patches per
            batched forward pass (default: from the memory available).
        store, unit_size: save finished units of ``unit_size`` patches in a
            :class:`~actpatch.experiment.checkpoint.UnitStore` and reuse those already there
            (resumable runs).
        subspace: patch only the coordinates along a basis (a (k, d) tensor, ``{layer:
            basis}`` or a :class:`~actpatch.subspace.Subspace`), see :mod:`actpatch.subspace`.
            ``check_subspace``: run the interpretability-illusion check
            (:func:`actpatch.techniques.subspace.subspace_check`) on the cell with the largest
            effect and add its findings (default on).
        executor: where the units of patches run: ``"local"`` (here), ``"ray"`` (actors on the
            Ray cluster this process joined, or a new local one; see
            :class:`~actpatch.experiment.ray_executor.RayExecutor`) or an executor object (one
            :class:`~actpatch.RayExecutor` serves many calls). With an executor the patches run
            in units of ``unit_size``; ``"local"`` and ``"ray"`` then give identical bits.

    Returns:
        A :class:`PatchResult`; ``res.values`` is the normalised effect (1 = clean, 0 = corrupted).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.sweep(m, ps, "resid_pre", direction="denoise", progress=False)
        >>> res.dims, tuple(res.values.shape)
        (('layer', 'pos'), (2, 4))
        >>> round(float(res.values[0, 1]), 5)  # the corrupted position restores everything at layer 0
        1.0
    """
    grid = Grid(per_position=per_position, layers=layers, positions=positions, heads=heads, neurons=neurons,
                window=window)
    with executor_for(executor) as run_units:  # one executor (and one set of workers) for the whole call
        options = dict(target=target, direction=direction, metric=metric, seed=seed, engine=engine,
                       chunk_size=chunk_size, progress=progress, unit_size=unit_size, subspace=as_subspace(subspace),
                       executor=None if executor is None else run_units)
        if grid.named:
            res = by_named_positions(
                lambda sub, g, corr, sub_store: _sweep(model, sub, g, corruption=corr, store=sub_store, **options),
                model, prompts, grid, corruption, store)
        else:
            res = _sweep(model, prompts, grid, corruption=corruption, store=store, **options)
    sub = options["subspace"]
    if isinstance(sub, Subspace) and check_subspace:
        site = _strongest_site(model, prompts, res, target, grid, direction)
        if site is not None:
            res = _with_check(model, prompts, res, site, sub, direction=direction, corruption=corruption,
                              metric=metric, seed=seed)
    return res


def _strongest_site(model: "Model", prompts: PromptSet, res: PatchResult, target: str | SiteKind, grid: Grid,
                    direction: str | Direction) -> Site | None:
    """The site of the cell whose effect is largest (a named position must fall at one index in
    every prompt; None otherwise)."""
    base = 1.0 if parse_direction(direction) is Direction.NOISE else 0.0
    strongest = int((res.values - base).nan_to_num(0.0).abs().flatten().argmax()) if res.dims else 0
    if not grid.named:
        return plan_for(model, prompts, target, grid, whole_vectors=True).patches[strongest][0]
    cell = dict(zip(res.dims, (int(i) for i in torch.unravel_index(torch.tensor(strongest), res.shape))))
    name = res.coords["pos"][cell["pos"]]
    at = {named_positions(prompts, i)[name] for i in range(len(prompts))}
    if len(at) != 1:
        return None
    coords = {d: res.coords[d][i] for d, i in cell.items() if d != "pos"}
    return Site(parse_target(target), coords.get("layer"), head=coords.get("head", coords.get("kv_head")), pos=at.pop())


def _sweep(model: "Model", prompts: PromptSet, grid: Grid, *, target: str | SiteKind, store: UnitStore | None,
           subspace: Subspace | None = None, **options: object) -> PatchResult:
    plan = dataclasses.replace(plan_for(model, prompts, target, grid, whole_vectors=subspace is not None),
                               subspace=subspace)
    return execute(model, prompts, plan, store=store, grid=grid, **options)  # type: ignore[arg-type]


def patch(
    model: "Model",
    prompts: PromptSet,
    sites: Sequence[Site],
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    seed: int = 0,
    engine: str | Engine = Engine.AUTO,
    subspace: SubspaceLike | None = None,
    check_subspace: bool = True,
) -> PatchResult:
    """One patch: write all ``sites`` together (with ``subspace``, only their coordinates along
    it, and the interpretability-illusion check's findings added unless ``check_subspace`` is
    False; see :func:`sweep`). The result has no dims (``res.values`` is a 0-d tensor).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("gpt2")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> round(float(ap.patch(m, ps, [ap.Site("resid_pre", 0)], direction="denoise").values), 4)
        1.0
    """
    sites = list(sites)
    if not sites:
        raise SiteError("patch() needs at least one Site, e.g. [ap.Site('resid_pre', 0)].")
    bad = [s for s in sites if not isinstance(s, Site)]
    if bad:
        raise SiteError(f"patch() takes Site objects, got {bad[0]!r}; e.g. ap.Site('z', 3, head=1) or "
                        f"ap.Site.parse('z.L3.H1').")
    plan = Plan(target=sites[0].kind, dims=(), coords={}, patches=(tuple(sites),), subspace=as_subspace(subspace))
    res = execute(model, prompts, plan, direction=direction, corruption=corruption, metric=metric, seed=seed,
                  engine=engine, progress=False, sites=sites)
    if plan.subspace is not None and check_subspace:
        known = float(res.values) if len(sites) == 1 else None  # the check's own subspace patch: already run
        res = _with_check(model, prompts, res, plan.patches[0][0], plan.subspace, known=known, direction=direction,
                          corruption=corruption, metric=metric, seed=seed)
    return res


def _with_check(model: "Model", prompts: PromptSet, res: PatchResult, site: Site, subspace: Subspace,
                **options: object) -> PatchResult:
    """``res`` with the illusion check of patching ``site`` along ``subspace`` added."""
    from .subspace import subspace_check

    found = subspace_check(model, prompts, site, subspace, **options)  # type: ignore[arg-type]
    out = res.replace(info=res.info.replace(extra={**res.info.extra, "subspace_check": found.to_dict()}))
    out.findings = list(res.findings) + from_technique(found.findings)
    return out
