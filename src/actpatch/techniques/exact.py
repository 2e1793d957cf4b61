"""Exact patching of a :class:`~actpatch.experiment.plan.Plan`: the job an executor runs and
:func:`execute`, which every exact technique calls (``sweep``, ``patch``, the subspace
illusion check, attribution's validation).

Per length group, one forward pass of the source run and one of the base run give both
baselines and every activation needed (the source activations, the null patch's own
activations, the batched engine's state); the patches then run unit by unit through the
executor seam of :mod:`actpatch.experiment.executor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

import torch

from ..corruption import Corruption, first_difference
from ..engine import BATCHED_KINDS, run_batched, run_reference
from ..engine.batched import base_sites, row_bytes
from ..errors import EngineError, SiteError
from ..experiment.checkpoint import UnitStore
from ..experiment.core import Experiment, GroupRuns, Outcome
from ..experiment.executor import Executor
from ..experiment.plan import Grid, Plan
from ..experiment.units import Advance, Unit, UnitValues
from ..hooks import capture
from ..memory import MemoryPlan, block_bytes, capture_bytes, forward_plan, sequence
from ..metrics import Measurer, Metric, MetricSpec
from ..prompts.promptset import PromptSet
from ..results import ExactInfo, PatchResult
from ..sites import Site, SiteKind
from ..subspace import Subspace
from ..types import DEFAULT_DIRECTION, Direction, Engine, parse_engine

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["execute", "patch_plan", "SweepJob", "choose_engine", "sweep_memory_plan"]


def patch_plan(sites: Sequence[Site], subspace: Subspace | None = None) -> Plan:
    """The plan of one patch writing all ``sites`` together (optionally along ``subspace``)."""
    sites = list(sites)
    if not sites:
        raise SiteError("patch() needs at least one Site, e.g. [ap.Site('resid_pre', 0)].")
    bad = [s for s in sites if not isinstance(s, Site)]
    if bad:
        raise SiteError(f"patch() takes Site objects, got {bad[0]!r}; e.g. ap.Site('z', 3, head=1) or "
                        f"ap.Site.parse('z.L3.H1').")
    return Plan(target=sites[0].kind, dims=(), coords={}, patches=(tuple(sites),), subspace=subspace)


def choose_engine(plan: Plan, engine: Engine) -> Engine:
    """The engine that runs ``plan``: ``auto`` picks batched where it supports every site."""
    batchable = all(s.kind in BATCHED_KINDS for p in plan.patches for s in p)
    if engine is Engine.BATCHED and not batchable:
        raise EngineError(f"The batched engine does not patch {plan.target.value!r}; use engine='reference' or 'auto'.")
    if engine is Engine.AUTO:
        return Engine.BATCHED if batchable else Engine.REFERENCE
    return engine


def _sweep_bytes(model: "Model", prompts: PromptSet, plan: Plan, engine: Engine, whole_own: bool) -> tuple[int, int]:
    """``(held, work)``: bytes per prompt row that an exact sweep holds while a chunk of prompts
    runs (the source run's captures, the base run's own, the batched engine's base state, both
    baselines' logits) and that one patch of it needs while it runs (one block's activations).
    ``whole_own``: the base run is captured at every site of the plan too (mean / zero
    ablation, unaligned pairs)."""
    T, readouts = sequence(prompts)
    e = torch.finfo(model.dtype).bits // 8

    def size(s: Site) -> int:
        return capture_bytes(model, s, T)

    wanted = plan.full_sites()
    own = list(dict.fromkeys([s.full() for s in plan.patches[0]] + (wanted if whole_own else [])))
    held = sum(map(size, wanted)) + sum(map(size, own)) + 2 * readouts * model.vocab_size * 4
    work = block_bytes(model, T) + 2 * T * model.d_model * e
    if engine is Engine.BATCHED:  # the engine recomputes positions from the first one a patch writes
        held += sum(map(size, base_sites(model)))
        q = min(min((s.pos if isinstance(s.pos, int) and s.pos >= 0 else 0) for s in p) for p in plan.patches)
        work = max(work, row_bytes(model, min(q, T - 1), T, 0, readouts))
    return held, work


def sweep_memory_plan(model: "Model", prompts: PromptSet, plan: Plan, engine: Engine,
                      memory_budget: "int | str | None", *, draws: int = 1, whole_own: bool = False) -> MemoryPlan:
    """Prompt rows an exact sweep runs at once under ``memory_budget`` (steps 1-2 of
    :func:`actpatch.memory.plan`): each row holds its captures while its chunk runs and needs
    room for at least one patch; the batched engine fills what is left with patches. Its
    forward-pass equivalents are an upper bound (the batched engine reruns only what a patch
    changes). A prompt that alone exceeds a given budget is refused, naming the smallest; under
    the default budget it runs alone."""
    held, work = _sweep_bytes(model, prompts, plan, engine, whole_own)
    return forward_plan("Exact patching", model, memory_budget, total_rows=len(prompts) * draws, held=held, work=work,
                        passes=2 + len(plan.patches), draws=draws)


@dataclass
class GroupState:
    """What one length group's patches need, from one forward pass of each run."""

    runs: GroupRuns
    source: dict[Site, torch.Tensor]
    base_acts: dict[Site, torch.Tensor]
    base_values: dict[Metric, torch.Tensor]
    measure: Measurer
    diff_start: int
    engine_acts: dict[Site, torch.Tensor]
    """What the batched engine reads from the base run (:func:`base_sites`, every position)."""


@dataclass(frozen=True)
class SweepJob:
    """Exact patching of ``plan`` in an experiment: prepare a group once, then run any unit of
    its patches. This is what an executor's worker calls."""

    experiment: Experiment
    plan: Plan
    engine: Engine
    chunk_size: int | None = None
    budget: int | None = None
    """Bytes a chunk of prompts may use (None: the engine's default)."""
    held: int = 0
    """Bytes a prompt row holds while its chunk runs (:func:`sweep_memory_plan`): the rest of
    ``budget`` is the engine's, for patches."""

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
            src_logits = runs.source.readout(model)
        alignment = exp.prompts.meta.get("alignment")
        own = [s.full() for s in plan.patches[0]] + (wanted if activation_level or alignment else [])
        with ExitStack() as stack:
            stack.enter_context(runs.base.context(model))
            base_acts = stack.enter_context(capture(model, list(dict.fromkeys(own))))
            # the batched engine's suffix runs start from the base run at every position,
            # continuation tokens included
            engine_acts = stack.enter_context(capture(model, base_sites(model) if self.engine is Engine.BATCHED
                                                      else [], whole=True))
            base_logits = runs.base.readout(model)
        if activation_level:  # noising only: base is the clean run
            source = exp.ablated(runs, {s: base_acts[s] for s in wanted})
        if alignment:  # unaligned pairs: the source's activations moved to the base run's indices
            source = {s: realigned(source[s], base_acts[s], alignment, runs.base_is_clean) for s in wanted}
        clean_logits = runs.clean_logits(base_logits, src_logits)
        measure = runs.measurer(exp.metrics, clean_logits)
        idx = torch.arange(runs.rows)
        base_values, src_values = measure(base_logits, idx), measure(src_logits, idx)
        if outcome is not None:
            outcome.baselines(runs, base_values, src_values)
            outcome.correct(runs, clean_logits)
            outcome.null_patch(self.null_patch(runs, base_acts, measure))
        start = 0 if activation_level or alignment else first_difference(runs.base, runs.source)
        return GroupState(runs, source, base_acts, base_values, measure, start, engine_acts)

    def null_patch(self, runs: GroupRuns, base_acts: dict[Site, torch.Tensor], measure: Measurer) -> float:
        """The largest |metric change| when the base run's own activations are written back by the
        first patch's hooks. On the first row alone (a check of the hooks, not another run of the
        whole group), against that row run alone without hooks (batch sizes change low-precision
        sums): two one-row forward passes. Even when the group is that one row the unhooked run is
        its own pass: the base run carried capture hooks, and a hook that changed what it read
        would change both sides of the comparison alike."""
        model, metrics = self.experiment.model, self.experiment.metrics
        one = runs.base.select(torch.arange(1))
        with one.context(model):
            alone = measure(one.readout(model), torch.arange(1))
        null = run_reference(model, one, {s: a[:1] for s, a in base_acts.items()}, self.plan.patches[:1], measure)
        return max(float((null[m][0] - alone[m]).abs().max()) for m in metrics)

    def run_unit(self, state: GroupState, unit: Unit, advance: Advance | None = None) -> UnitValues:
        patches = self.plan.patches[unit.start:unit.stop]
        model = self.experiment.model
        if self.engine is Engine.BATCHED:
            return run_batched(model, state.runs.base, state.source, patches, state.measure, advance,
                               diff_start=state.diff_start, chunk_size=self.chunk_size, base_acts=state.engine_acts,
                               base_metrics=state.base_values, subspace=self.plan.subspace,
                               budget=None if self.budget is None else max(0, self.budget - self.held * state.runs.rows))
        return run_reference(model, state.runs.base, state.source, patches, state.measure, advance,
                             subspace=self.plan.subspace)


def realigned(source: torch.Tensor, base: torch.Tensor, alignment: Sequence[tuple[int, int]],
              base_is_clean: bool) -> torch.Tensor:
    """The source run's activations ``(B, Ts, ...)`` in the base run's indices ``(B, Tb, ...)``:
    at each aligned (clean index, corrupted index) the source's own index, elsewhere the base's
    value (so a write there changes nothing)."""
    out = base.clone()
    seen: dict[int, int] = {}
    for c, k in alignment:
        b, src = (c, k) if base_is_clean else (k, c)
        if seen.setdefault(b, src) != src:
            raise SiteError(f"One patch writes base index {b} from two source indices ({seen[b]} and {src}): two "
                            f"named positions of one patch meet in one prompt but not in the other; patch them "
                            f"separately.")
        out[:, b] = source[:, src].to(out.dtype)
    return out


def _check_aligned_sites(prompts: PromptSet, plan: Plan, direction: Direction) -> None:
    """On unaligned pairs every write must sit at an aligned (named) position of the base prompts."""
    alignment = prompts.meta.get("alignment")
    if alignment is None:
        return
    at = {c if direction is Direction.NOISE else k for c, k in alignment}
    for p in plan.patches:
        for s in p:
            if s.kind.layout[1] != "pos" or s.pos not in at:
                raise SiteError(f"{s}: on pairs of different lengths a patch writes at named positions only (here "
                                f"base indices {sorted(at)}); name every position (Site(pos='end'), positions=[...]) "
                                f"and patch kinds with a position axis (not 'pattern').")


def dictionary_info(model: "Model", plan: Plan) -> dict | None:
    """A feature sweep's dictionary, described (None for other plans)."""
    if plan.target is not SiteKind.FEATURE or plan.dims[:1] != ("feature",):
        return None
    d = model.attached(plan.patches[0][0])
    return {"label": d.label, "site": str(d.site), "reads": None if d.reads is None else str(d.reads),
            "n_features": d.n_features, "activation": d.activation.value}


def execute(
    model: "Model",
    prompts: PromptSet,
    plan: Plan,
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    engine: str | Engine = Engine.AUTO,
    chunk_size: int | None = None,
    progress: bool = True,
    store: UnitStore | None = None,
    unit_size: int = 64,
    executor: str | Executor | None = None,
    grid: Grid | None = None,
    sites: Sequence[Site] = (),
    memory_budget: "int | str | None" = None,
) -> PatchResult:
    """Run every patch of ``plan`` over ``prompts`` and label the outcome (see :func:`sweep`):
    per length group, or per chunk of its prompts that fits ``memory_budget``."""
    if plan.subspace is not None:
        for p in plan.patches:
            for s in p:
                plan.subspace.check(model, s)
    exp = Experiment.setup(model, prompts, direction=direction, corruption=corruption, metric=metric, seed=seed,
                           technique="Activation patching", continuations=True, unaligned=True)
    _check_aligned_sites(prompts, plan, exp.direction)
    chosen = choose_engine(plan, parse_engine(engine))
    base_is_clean = exp.direction is Direction.NOISE
    lengths = sorted({g.seq_len if base_is_clean else int(g.corrupted.shape[1]) for g in prompts.groups()})
    for p in plan.patches:  # every site fits every length, checked before any computation
        for s in p:
            for T in lengths:
                s.check(model, seq_len=T)
    whole_own = exp.corruption.activation_level or "alignment" in prompts.meta
    budget = sweep_memory_plan(model, prompts, plan, chosen, memory_budget, draws=exp.corruption.draws,
                               whole_own=whole_own)
    job = SweepJob(exp, plan, chosen, chunk_size, budget.budget, budget.held)
    # Without saved progress or a chosen executor, a group's patches are one unit: the engine
    # then batches across all of them.
    size = unit_size if store is not None or executor is not None else len(plan.patches)
    outcome = exp.run(job, len(plan.patches), executor=executor, store=store, unit_size=size, progress=progress,
                      description=f"patching {plan.target.value}",
                      max_rows=budget.rows if budget.rows < budget.total_rows else None)
    sub = plan.subspace
    technique = ExactInfo(engine=job.engine, sites=tuple(str(s) for s in sites),
                          subspace=sub.describe() if sub is not None else None,
                          dictionary=dictionary_info(model, plan))
    return exp.result(outcome, target=plan.target.value, technique=technique, dims=plan.dims, coords=plan.coords,
                      grid=(grid or Grid()).to_dict(), findings=list(sub.findings) if sub is not None else [])
