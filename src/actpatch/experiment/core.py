"""The experiment core: what every technique does before and after its own computation.

Every entry point (``sweep`` / ``patch``, ``attribute``, ``path_patch`` / ``path_sweep``,
``edge_attribution``) turns (model, prompts, direction, corruption, metrics, seed) into an
:class:`Experiment` here, iterates its :class:`GroupRuns` (per prompt length: the clean,
corrupted, base and source runs and the answers, repeated per corruption draw), records
baselines and patched values in an :class:`Outcome`, and labels the outcome as a
:class:`~actpatch.PatchResult` with typed provenance and diagnostics. Nothing here knows what a
technique computes; nothing in a technique repeats what is here.

Batch layout: a corruption with ``draws`` runs per prompt (Gaussian noise) lays a group out
prompt-major, row ``g * draws + r``; :func:`mean_draws` averages the draws back to prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..checks import check
from ..corruption import Corruption, Run, parse_corruption
from ..errors import ContextLengthError, CorruptionError, MetricError
from ..findings import Finding, from_technique
from ..hooks import capture
from ..metrics import DIFFERENTIABLE, Measurer, Metric, compute_metrics, is_differentiable, parse_metrics, MetricSpec
from ..prompts.promptset import LengthGroup, PromptSet
from ..results import PatchResult, ResultInfo, TechniqueInfo
from ..sites import Site
from ..types import Diagnostics, Direction, Provenance, parse_direction
from .checkpoint import UnitStore
from .executor import Executor, executor_for, progress_bar
from .units import UnitJob, units

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from ..prompts.continuation import Continuation

__all__ = ["Experiment", "GroupRuns", "Outcome", "mean_draws"]


def mean_draws(x: torch.Tensor, draws: int) -> torch.Tensor:
    """(..., G * draws) prompt-major -> (..., G): the mean over each prompt's corruption draws."""
    return x.reshape(*x.shape[:-1], -1, draws).mean(-1)


@dataclass(frozen=True)
class GroupRuns:
    """The runs of one length group of prompts.

    ``base`` is the run that gets patched and ``source`` the run whose activations are written
    into it: (corrupted, clean) for denoising, (clean, corrupted) for noising. For
    activation-level corruptions (mean, zero) ``source`` is the pairs' corrupted run, which
    gives the corrupted baseline; the written activations come from
    :meth:`~actpatch.corruption.Corruption.source`.
    """

    index: int
    group: LengthGroup
    clean: Run
    corrupted: Run
    base: Run
    source: Run
    answers: torch.Tensor  # (G * draws,) first answer tokens
    alternatives: torch.Tensor  # (G * draws,)
    draws: int
    continuation: "Continuation | None" = None
    """Per row, the answers' tokens when some have several (teacher-forced)."""
    part: tuple[int, int] | None = None
    """The prompts ``start:stop`` of the length group these runs hold (:meth:`split`); None: all."""

    @property
    def base_is_clean(self) -> bool:
        return self.base is self.clean

    @property
    def rows(self) -> int:
        """Rows of the batch: prompts x draws."""
        return int(self.answers.shape[0])

    def split(self, max_rows: int | None) -> Iterator["GroupRuns"]:
        """This group in chunks of whole prompts (each with all its draws), at most ``max_rows``
        rows each but never less than one prompt: what a memory budget runs one at a time. Each
        chunk's runs are rows of this group's (corruption draws and resampled partners included),
        so the chunks compute what the whole group computes."""
        per = max(1, (max_rows or self.rows) // self.draws)
        G = len(self.group.indices)
        if per >= G:
            yield self
            return
        for start in range(0, G, per):
            yield self.part_of(start, min(start + per, G))

    def part_of(self, start: int, stop: int) -> "GroupRuns":
        """The runs of this group's prompts ``start:stop`` (with all their draws)."""
        prompts = torch.arange(start, stop)
        rows = (prompts[:, None] * self.draws + torch.arange(self.draws)).flatten()
        g = self.group
        sub = dataclasses.replace(g, indices=g.indices[prompts], clean=g.clean[prompts], corrupted=g.corrupted[prompts],
                                  answers=g.answers[prompts], alternatives=g.alternatives[prompts],
                                  continuation=None if g.continuation is None else g.continuation.select(prompts))
        clean, corrupted = self.clean.select(rows), self.corrupted.select(rows)
        base, source = (clean, corrupted) if self.base_is_clean else (corrupted, clean)
        return dataclasses.replace(self, group=sub, clean=clean, corrupted=corrupted, base=base, source=source,
                                   answers=self.answers[rows], alternatives=self.alternatives[rows],
                                   continuation=None if self.continuation is None else self.continuation.select(rows),
                                   part=(start, stop))

    def clean_logits(self, base_logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
        """Of a base and a source run's logits, the clean run's."""
        return base_logits if self.base_is_clean else source_logits

    def measurer(self, metrics: Sequence[Metric], clean_logits: torch.Tensor | None) -> Measurer:
        """Metrics of this group's rows; ``clean_logits`` (last position) give KL its reference."""
        needs_lp = Metric.KL in metrics and clean_logits is not None
        clean_lp = torch.log_softmax(clean_logits.detach().float(), -1) if needs_lp else None  # type: ignore[union-attr]
        return Measurer(list(metrics), self.answers, self.alternatives, clean_lp, self.continuation)

    def correct(self, clean_logits: torch.Tensor) -> torch.Tensor:
        """(G,) whether the model prefers the answer on each clean prompt (every draw): its
        teacher-forced log-probability above the alternative's (for single tokens, its logit)."""
        ld = compute_metrics([Metric.LOGIT_DIFF], clean_logits, self.answers, self.alternatives, None,
                             self.continuation)[Metric.LOGIT_DIFF]
        return (ld > 0).reshape(-1, self.draws).all(1).to(clean_logits.device)


@dataclass(frozen=True)
class Experiment:
    """Validated inputs of one experiment, shared by every technique. Build with :meth:`setup`."""

    model: "Model"
    prompts: PromptSet
    direction: Direction
    corruption: Corruption
    """A prepared copy (set-level statistics measured); the caller's object is never changed."""
    metrics: tuple[Metric, ...]
    seed: int
    _pooled: dict = field(default_factory=dict, compare=False, repr=False)
    """Per (length group, site): the group's sum of clean activations, for pooled corruptions
    (mean ablation) run a chunk of prompts at a time (:meth:`ablated`)."""

    @classmethod
    def setup(
        cls,
        model: "Model",
        prompts: PromptSet,
        *,
        direction: str | Direction,
        corruption: str | Corruption,
        metric: MetricSpec,
        seed: int,
        technique: str,
        needs_corrupted_run: bool = False,
        differentiable: bool = False,
        continuations: bool = False,
        unaligned: bool = False,
    ) -> "Experiment":
        """Validate the shared inputs, refusing with one specific error each:

        * unknown direction / corruption / metric;
        * a prompt longer than the model's context window (before any computation);
        * ``differentiable``: a discrete metric for a gradient-based technique;
        * an activation-level corruption (mean, zero) with denoising, or with a technique that
          ``needs_corrupted_run``;
        * answers of several tokens for a technique that does not score ``continuations``
          (teacher-forced) yet;
        * pairs of different token lengths, unless the technique patches ``unaligned`` pairs
          (exact patching) and the prompts carry their alignment by named positions, with the
          pairs' own corruption ``str``.
        """
        if not isinstance(prompts, PromptSet):
            from ..errors import PromptError

            raise PromptError(f"{technique} takes a PromptSet, got {type(prompts).__name__}; build one with "
                              f"ap.PromptSet.from_pairs(model, pairs) or a builder such as ap.prompts.ioi(model).")
        if prompts.multi_token and not continuations:
            from ..errors import PromptError

            longest = int(prompts.continuation_lengths.max())
            raise PromptError(f"{technique} scores single-token answers only; these prompts have answers of up to "
                              f"{longest} tokens. Use ap.sweep / ap.patch, ap.attribute, ap.edge_attribution, circuits "
                              f"(ap.circuits: runs, faithfulness, MIB scores) or DAS for "
                              f"multi-token answers, or give single-token answers (e.g. the first token of each).")
        d = parse_direction(direction)
        corr = parse_corruption(corruption)
        _check_alignment(prompts, corr, technique, unaligned)
        metrics = tuple(parse_metrics(metric))
        if differentiable:
            bad = [m.value for m in metrics if not is_differentiable(m)]
            if bad:
                raise MetricError(f"{technique} needs differentiable metrics; {bad} are discrete. "
                                  f"Use {', '.join(m.value for m in DIFFERENTIABLE)}.")
        if corr.activation_level and needs_corrupted_run:
            raise CorruptionError(f"{technique} needs a corrupted run per prompt; corruption {corr.name!r} replaces "
                                  f"activations instead. Use corruption 'str', 'resample' or 'gaussian'.")
        if corr.activation_level and d is Direction.DENOISE:
            raise CorruptionError(
                f"Corruption {corr.name!r} replaces activations, so there is no corrupted run to denoise. "
                f"Use direction='noise', or corruption='str' / 'resample' / 'gaussian' for denoising."
            )
        limit = model.context_length
        # the last answer token is never read in
        total = torch.maximum(prompts.lengths, prompts.corrupted_lengths) + prompts.continuation_lengths - 1
        longest = int(total.max())
        if limit is not None and longest > limit:
            which = int(total.argmax())
            extra = (f" with its answer ({int(prompts.continuation_lengths[which])} tokens, "
                     f"{int(prompts.lengths[which])} in the prompt)") if prompts.multi_token else ""
            raise ContextLengthError(f"Prompt {which} has {longest} tokens{extra}; {model.name} reads at most {limit}. "
                                     f"Shorten the prompts or answers, or drop the long ones.")
        return cls(model=model, prompts=prompts, direction=d, corruption=corr.prepared(model, prompts),
                   metrics=metrics, seed=int(seed))

    @property
    def n(self) -> int:
        return len(self.prompts)

    def groups(self, max_rows: int | None = None) -> Iterator[GroupRuns]:
        """Per length group (in order of first appearance), its runs; with ``max_rows``, in
        chunks of at most that many rows (:meth:`GroupRuns.split`), for memory budgets."""
        for i, g in enumerate(self.prompts.groups()):
            yield from self._runs(i, g).split(max_rows)

    def group(self, index: int, part: tuple[int, int] | None = None) -> GroupRuns:
        """The runs of length group ``index`` alone (each group's corruption is seeded by its
        length, so this equals the ``index``-th of :meth:`groups`), or of its prompts
        ``part`` = (start, stop) (a chunk of :meth:`groups` with ``max_rows``): what a worker
        rebuilds."""
        runs = self._runs(index, self.prompts.groups()[index])
        return runs if part is None else runs.part_of(*part)

    def _runs(self, i: int, g: LengthGroup) -> GroupRuns:
        corr, R = self.corruption, self.corruption.draws
        cont = g.continuation.repeat_interleave(R) if g.continuation is not None else None
        clean = corr.clean_run(g).with_continuation(cont)
        corrupted = corr.corrupted_run(self.model, g, self.prompts, self.seed).with_continuation(cont)
        base, source = (corrupted, clean) if self.direction is Direction.DENOISE else (clean, corrupted)
        return GroupRuns(index=i, group=g, clean=clean, corrupted=corrupted, base=base, source=source,
                         answers=g.answers.repeat_interleave(R), alternatives=g.alternatives.repeat_interleave(R),
                         draws=R, continuation=cont)

    def source_activations(self, runs: GroupRuns, sites: Sequence[Site]) -> tuple[dict[Site, torch.Tensor], torch.Tensor]:
        """The whole activations to write at ``sites`` and the source run's readout logits:
        captured on the source run, or (mean / zero ablation) the corruption's transform of the
        clean run's activations."""
        model, corr = self.model, self.corruption
        with runs.source.context(model), capture(model, [] if corr.activation_level else list(sites)) as source:
            logits = runs.source.readout(model)
        if corr.activation_level:
            with capture(model, list(sites)) as clean:
                runs.clean.readout(model)
            source = self.ablated(runs, clean)
        return source, logits

    def ablated(self, runs: GroupRuns, clean: dict[Site, torch.Tensor]) -> dict[Site, torch.Tensor]:
        """An activation-level corruption's activations for ``runs`` given their clean ones. A
        corruption pooled over the length group (mean ablation) on a chunk of it
        (:meth:`GroupRuns.split`) pools over the whole group, summed a chunk at a time (once per
        group and site), so chunks write what the whole group would."""
        corr = self.corruption
        if runs.part is None or not corr.pooled:
            return {s: corr.source(a) for s, a in clean.items()}
        missing = [s for s in clean if (runs.index, s) not in self._pooled]
        if missing:
            whole = self.group(runs.index)
            width, G = runs.part[1] - runs.part[0], len(whole.group.indices)
            sums: dict[Site, torch.Tensor] = {}
            with torch.no_grad():
                for start in range(0, G, width):
                    chunk = whole.part_of(start, min(start + width, G))
                    with chunk.clean.context(self.model), capture(self.model, missing) as acts:
                        chunk.clean.readout(self.model)
                    for s in missing:
                        part = acts[s].sum(0, keepdim=True, dtype=torch.float64)
                        sums[s] = part if s not in sums else sums[s] + part
            for s in missing:
                self._pooled[(runs.index, s)] = sums[s]
        rows = runs.draws * len(self.prompts.groups()[runs.index].indices)  # the whole group's
        return {s: corr.pooled_source(self._pooled[(runs.index, s)], rows, a) for s, a in clean.items()}

    def paired_activations(self, site: Site, max_rows: int | None = None) -> Iterator[tuple[GroupRuns, torch.Tensor, torch.Tensor]]:
        """Per length group (in chunks of ``max_rows`` rows: :meth:`groups`): its runs and the
        whole activations at ``site`` on the clean and on the corrupted run (no gradients). The
        one loop the direction finders and DAS read their vectors from."""
        full = site.full()
        with torch.no_grad():
            for runs in self.groups(max_rows):
                got = []
                for run in (runs.clean, runs.corrupted):
                    with run.context(self.model), capture(self.model, [full]) as acts:
                        run.readout(self.model)
                    got.append(acts[full])
                yield runs, got[0], got[1]

    def outcome(self, n_cells: int, dtype: torch.dtype = torch.float32) -> "Outcome":
        """An empty :class:`Outcome` for ``n_cells`` patches (or estimates) per prompt, whose
        patched values are kept in ``dtype`` (float64 for estimates added to a baseline, so
        that the estimate stays recoverable exactly)."""
        return Outcome(self, n_cells, dtype)

    def run(self, job: "UnitJob", n_cells: int, *, executor: "str | Executor | None" = None,
            store: UnitStore | None = None, unit_size: int = 64, progress: bool = False,
            description: str = "patching", max_rows: int | None = None) -> "Outcome":
        """Every cell of ``job`` over every length group: each group prepared once (its
        baselines recorded), its cells cut into units of ``unit_size`` and handed to
        ``executor`` (saved to and resumed from ``store``), with one progress bar over all.
        ``max_rows``: groups run in chunks of at most that many prompt rows (a memory budget),
        each chunk prepared and run on its own; its units are named by its prompts."""
        outcome = self.outcome(n_cells)
        per = max(1, (max_rows or self.n * self.corruption.draws) // self.corruption.draws)  # prompts a chunk
        total = n_cells * sum(-(-len(g.indices) // per) for g in self.prompts.groups())
        with ExitStack() as stack:
            run_units = stack.enter_context(executor_for(executor))
            stack.enter_context(job.context())
            advance = stack.enter_context(progress_bar(progress and total > 1, total, description))
            for runs in self.groups(max_rows):
                state = job.prepare(runs, outcome)  # type: ignore[call-arg]
                todo = units(runs.index, n_cells, unit_size, runs.part)
                outcome.patched(runs, run_units.map(job, runs, state, todo, store=store, advance=advance))
                del state  # this chunk's captures freed before the next chunk's are taken
        return outcome

    def provenance(self) -> Provenance:
        return Provenance.of(self.model, self.prompts)

    def result(self, outcome: "Outcome", *, target: str, technique: TechniqueInfo, dims: tuple[str, ...],
               coords: dict[str, list], grid: dict[str, Any] | None = None,
               findings: Sequence[Finding] = ()) -> PatchResult:
        """Label an outcome: a :class:`PatchResult` with the common info, the technique's typed
        part, the best-practice checks' findings, then the technique's own ``findings``."""
        shape = tuple(len(coords[d]) for d in dims)
        diag = Diagnostics(
            clean_correct=tuple(bool(x) for x in outcome.clean_correct.tolist()) if outcome.has_correct else None,
            null_patch_max_abs=outcome.null_patch_max_abs,
        )
        res = PatchResult(
            dims=dims, coords=coords,
            raw={m.value: outcome.raw[m].reshape(self.n, *shape) for m in self.metrics},
            clean={m.value: outcome.clean[m] for m in self.metrics},
            corrupted={m.value: outcome.corrupted[m] for m in self.metrics},
            info=ResultInfo(target=target, direction=self.direction, technique=technique,
                            metrics=tuple(m.value for m in self.metrics), corruption=self.corruption.describe(),
                            seed=self.seed, provenance=self.provenance(), diagnostics=diag, grid=dict(grid or {}),
                            prompt_texts=self.prompts.texts,
                            prompt_attributes=tuple(dict(a) for a in self.prompts.attributes)),
        )
        res.findings = check(res) + from_technique(list(findings) + answer_findings(self.prompts))
        return res


def _check_alignment(prompts: PromptSet, corr: Corruption, technique: str, unaligned: bool) -> None:
    """Pairs of different lengths (or carrying an alignment by name) only where the technique
    patches them, with their own corrupted prompts, at named positions."""
    from ..corruption import CorruptionKind
    from ..errors import PromptError

    bad = prompts.unaligned_pairs()
    if not bad and "alignment" not in prompts.meta:
        return
    i = bad[0] if bad else 0
    what = (f"pairs {bad[:8]}{' ...' if len(bad) > 8 else ''} have clean and corrupted prompts of different token "
            f"lengths (pair {i}: {prompts.clean[i].numel()} vs {prompts.corrupted[i].numel()})") if bad else \
        "these pairs are aligned by name"
    if not unaligned:
        raise PromptError(f"{technique} needs pairs of one token length; {what}. Patch them with ap.sweep(..., "
                          f"positions=['first_diff', 'last_diff', 'end']) or ap.patch with Site(pos=<name>), or "
                          f"give pairs of equal token length.")
    if corr.kind is not CorruptionKind.STR:
        raise CorruptionError(f"Corruption {corr.name!r} on unaligned pairs: {what}; only the pairs' own corrupted "
                              f"prompts (corruption='str') match them position by position.")
    if "alignment" not in prompts.meta:
        raise PromptError(f"Integer positions on unaligned pairs: {what}, so an index means different tokens in the "
                          f"two prompts. Use named positions: positions=['first_diff', 'last_diff', 'end'] (or a "
                          f"builder's names, or prompts.with_positions(name, pairs)) in ap.sweep, Site(pos=<name>) "
                          f"in ap.patch.")


def answer_findings(prompts: PromptSet) -> list[Finding]:
    """What the prompts' answers tell before any patching: answers of several tokens whose first
    token is the alternative's first token too (the first readout then cannot tell them apart:
    the logit difference lives in later tokens, read after the continuation's own computation)."""
    if not prompts.multi_token:
        return []
    shared = [i for i in range(len(prompts)) if int(prompts.answers[i]) == int(prompts.alternatives[i])]
    if not shared:
        return []
    from ..findings import Level

    shown = ", ".join(map(str, shared[:10])) + (", ..." if len(shared) > 10 else "")
    return [Finding(Level.INFO, "answers_share_first_token",
                    f"{len(shared)} of {len(prompts)} prompts ({shown}) have an answer and an alternative that begin "
                    f"with the same token; their logit difference is decided by the later answer tokens, so effects "
                    f"measure how patches at prompt positions change the continuation, not the first guess.",
                    "Read these prompts' effects as effects on the continuation; to study the first token, pick "
                    "alternatives that differ from the answer at their first token.")]


@dataclass
class Outcome:
    """Per prompt: the patched metric of every cell, both baselines, diagnostics; filled group
    by group, each value averaged over the corruption's draws."""

    experiment: Experiment
    n_cells: int
    dtype: torch.dtype = torch.float32
    raw: dict[Metric, torch.Tensor] = field(init=False)
    clean: dict[Metric, torch.Tensor] = field(init=False)
    corrupted: dict[Metric, torch.Tensor] = field(init=False)
    clean_correct: torch.Tensor = field(init=False)
    has_correct: bool = False
    null_patch_max_abs: float | None = None

    def __post_init__(self) -> None:
        n, ms = self.experiment.n, self.experiment.metrics
        self.raw = {m: torch.empty(n, self.n_cells, dtype=self.dtype) for m in ms}
        self.clean = {m: torch.empty(n) for m in ms}
        self.corrupted = {m: torch.empty(n) for m in ms}
        self.clean_correct = torch.zeros(n, dtype=torch.bool)

    def baselines(self, runs: GroupRuns, base: dict[Metric, torch.Tensor], source: dict[Metric, torch.Tensor]) -> None:
        """Record the base and source runs' metrics ``{metric: (rows,)}`` as clean / corrupted."""
        for m in self.experiment.metrics:
            c, k = (base[m], source[m]) if runs.base_is_clean else (source[m], base[m])
            self.clean[m][runs.group.indices] = mean_draws(c.detach().float().cpu(), runs.draws)
            self.corrupted[m][runs.group.indices] = mean_draws(k.detach().float().cpu(), runs.draws)

    def patched(self, runs: GroupRuns, values: dict[Metric, torch.Tensor]) -> None:
        """Record ``{metric: (n_cells, rows)}`` for this group's prompts."""
        for m in self.experiment.metrics:
            self.raw[m][runs.group.indices] = mean_draws(values[m].detach().to(self.dtype).cpu(), runs.draws).T

    def correct(self, runs: GroupRuns, clean_logits: torch.Tensor) -> None:
        """Record which clean prompts of this group the model gets right."""
        self.clean_correct[runs.group.indices] = runs.correct(clean_logits).cpu()
        self.has_correct = True

    def null_patch(self, error: float) -> None:
        """Record a null patch's |metric change| (the largest is kept)."""
        self.null_patch_max_abs = max(self.null_patch_max_abs or 0.0, float(error))
