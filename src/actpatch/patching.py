"""``sweep`` and ``patch``: the high-level API that turns (model, prompts, target, direction,
corruption, metrics) into a labelled :class:`~actpatch.PatchResult`."""

from __future__ import annotations

import enum
from contextlib import ExitStack, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .checkpoint import UnitStore
from .checks import check
from .corruption import Corruption, first_difference, parse_corruption
from .engine import BATCHED_KINDS, run_batched, run_reference
from .engine.batched import base_sites
from .errors import ActpatchError, CorruptionError
from .hooks import capture
from .metrics import Measurer, Metric, parse_metrics
from .models.attention import actpatch_attention
from .plan import Patch, Plan, plan_for
from .prompts.promptset import PromptSet
from .results import PatchResult
from .roles import is_named, run_named
from .sites import Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["Direction", "sweep", "patch", "ENGINES"]


class Direction(str, enum.Enum):
    """Which run is patched with which."""

    DENOISE = "denoise"
    """Run the corrupted prompt, write clean activations: is the site *sufficient*?"""
    NOISE = "noise"
    """Run the clean prompt, write corrupted activations: is the site *necessary*?"""


ENGINES = ("auto", "batched", "reference")
"""``auto``: batched where it supports the target (all but embed / resid_final), else reference."""


def _direction(direction: str | Direction) -> Direction:
    try:
        return Direction(direction)
    except ValueError:
        raise ActpatchError(f"Unknown direction {direction!r}; use 'denoise' or 'noise'.") from None


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"actpatch": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _mean_draws(x: torch.Tensor, draws: int) -> torch.Tensor:
    """(..., G * draws) prompt-major -> (..., G)."""
    return x.reshape(*x.shape[:-1], -1, draws).mean(-1)


def execute(
    model: "Model",
    prompts: PromptSet,
    plan: Plan,
    *,
    direction: str | Direction = Direction.DENOISE,
    corruption: str | Corruption = "str",
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    seed: int = 0,
    engine: str = "auto",
    chunk_size: int | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    store: UnitStore | None = None,
    unit_size: int = 64,
) -> PatchResult:
    """Run every patch of ``plan`` over ``prompts`` and label the outcome (see :func:`sweep`)."""
    d = _direction(direction)
    corr = parse_corruption(corruption)
    metrics = parse_metrics(metric)
    if engine not in ENGINES:
        raise ActpatchError(f"Unknown engine {engine!r}; available: {', '.join(ENGINES)}.")
    batchable = all(s.kind in BATCHED_KINDS for p in plan.patches for s in p)
    if engine == "batched" and not batchable:
        raise ActpatchError(f"The batched engine does not patch {plan.target.value!r}; use engine='reference' or 'auto'.")
    engine = ("batched" if batchable else "reference") if engine == "auto" else engine
    if corr.activation_level and d is Direction.DENOISE:
        raise CorruptionError(
            f"Corruption {corr.name!r} replaces activations, so there is no corrupted run to denoise. "
            f"Use direction='noise', or corruption='str' / 'resample' / 'gaussian' for denoising."
        )
    groups = prompts.groups()
    for g in groups:
        for p in plan.patches:
            for s in p:
                s.check(model, seq_len=g.seq_len)
    corr.prepare(model, prompts)
    n, P, R = len(prompts), len(plan.patches), corr.draws
    raw = {m: torch.empty(n, P) for m in metrics}
    clean_b = {m: torch.empty(n) for m in metrics}
    clean_correct = torch.zeros(n, dtype=torch.bool)
    null_err = 0.0
    corr_b = {m: torch.empty(n) for m in metrics}
    with ExitStack() as stack:
        if plan.uses_attention_fn or engine == "batched":  # one attention path for all runs: equal inputs, equal bits
            stack.enter_context(actpatch_attention(model.hf))
        advance = stack.enter_context(_progress(progress and P * len(groups) > 1, P * len(groups), plan))
        for gi, g in enumerate(groups):
            clean_run, corr_run = corr.clean_run(g), corr.corrupted_run(model, g, prompts, seed)
            answers, alts = g.answers.repeat_interleave(R), g.alternatives.repeat_interleave(R)
            base, src_run = (corr_run, clean_run) if d is Direction.DENOISE else (clean_run, corr_run)
            # One forward pass of each run gives both baselines and every activation needed: the
            # source activations, the null patch's own activations, the batched engine's state.
            wanted = plan.full_sites()
            with src_run.context(model), capture(model, [] if corr.activation_level else wanted) as source:
                src_logits = model.logits(src_run.ids, last_only=True)
            own = [s.full() for s in plan.patches[0]] + (wanted if corr.activation_level else [])
            own += base_sites(model) if engine == "batched" else []
            with base.context(model), capture(model, list(dict.fromkeys(own))) as base_acts:
                base_logits = model.logits(base.ids, last_only=True)
            if corr.activation_level:  # noising only: base is the clean run
                source = {s: corr.source(base_acts[s]) for s in wanted}
            clean_logits = base_logits if base is clean_run else src_logits
            clean_lp = torch.log_softmax(clean_logits.float(), -1) if Metric.KL in metrics else None
            measure = Measurer(metrics, answers, alts, clean_lp)
            idx = torch.arange(len(answers))
            right = clean_logits[idx, answers] > clean_logits[idx, alts]
            clean_correct[g.indices] = right.reshape(-1, R).all(1)
            base_b, src_b = measure(base_logits, idx), measure(src_logits, idx)
            for m in metrics:
                c, k = (base_b[m], src_b[m]) if base is clean_run else (src_b[m], base_b[m])
                clean_b[m][g.indices] = _mean_draws(c, R)
                corr_b[m][g.indices] = _mean_draws(k, R)
            # Null patch: the base run's own activations written back must change nothing.
            null = run_reference(model, base, base_acts, plan.patches[:1], measure)
            null_err = max(null_err, max(float((null[m][0] - base_b[m]).abs().max()) for m in metrics))
            start = 0 if corr.activation_level else first_difference(base, src_run)

            def run(patches: Sequence[Patch]) -> dict[Metric, torch.Tensor]:
                if engine == "batched":
                    return run_batched(model, base, source, patches, measure, advance, diff_start=start,
                                       chunk_size=chunk_size, base_acts=base_acts, base_metrics=base_b)
                return run_reference(model, base, source, patches, measure, advance)

            out = run(plan.patches) if store is None else _run_units(run, plan.patches, store, gi, unit_size, metrics, advance)
            for m in metrics:
                raw[m][g.indices] = _mean_draws(out[m], R).T
    shape = plan.shape
    result = PatchResult(
        dims=plan.dims,
        coords=plan.coords,
        raw={m.value: raw[m].reshape(n, *shape) for m in metrics},
        clean={m.value: clean_b[m] for m in metrics},
        corrupted={m.value: corr_b[m] for m in metrics},
        meta={
            "target": plan.target.value,
            "direction": d.value,
            "corruption": corr.describe(),
            "metrics": [m.value for m in metrics],
            "seed": seed,
            "engine": engine,
            "model": {"name": model.name, "family": model.family, "weight_hash": model.weight_hash},
            "prompts": prompts.describe(),
            "versions": _versions(),
            "prompt_attributes": [dict(a) for a in prompts.attributes],
            "clean_correct": clean_correct.tolist(),
            "null_patch_max_abs": null_err,
            **(extra_meta or {}),
        },
    )
    result.findings.extend(check(result))
    return result


def _run_units(
    run: Callable[[Sequence[Patch]], dict[Metric, torch.Tensor]],
    patches: Sequence[Patch],
    store: UnitStore,
    group: int,
    unit_size: int,
    metrics: list[Metric],
    advance: Callable[[int], None] | None,
) -> dict[Metric, torch.Tensor]:
    """Run patches in units of ``unit_size``, reusing units already in ``store`` and saving each
    new one as soon as it is done."""
    parts: list[dict[Metric, torch.Tensor]] = []
    for u, i in enumerate(range(0, len(patches), unit_size)):
        key = f"g{group}_u{u}"
        saved = store.get(key)
        if saved is not None:
            parts.append({m: saved[m.value] for m in metrics})
            if advance is not None:
                advance(len(patches[i : i + unit_size]))
            continue
        res = run(patches[i : i + unit_size])
        store.put(key, {m.value: v for m, v in res.items()})
        parts.append(res)
    return {m: torch.cat([p[m] for p in parts]) for m in metrics}


def _progress(enabled: bool, total: int, plan: Plan) -> Any:
    if not enabled:
        return nullcontext(None)
    from contextlib import contextmanager

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    @contextmanager
    def bar() -> Iterator[Callable[[int], None]]:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as prog:
            task = prog.add_task(f"patching {plan.target.value}", total=total)
            yield lambda k: prog.advance(task, k)

    return bar()


def sweep(
    model: "Model",
    prompts: PromptSet,
    target: str | SiteKind = "resid_pre",
    *,
    direction: str | Direction = "denoise",
    corruption: str | Corruption = "str",
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    per_position: bool | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    window: int = 1,
    seed: int = 0,
    engine: str = "auto",
    chunk_size: int | None = None,
    progress: bool = True,
    store: UnitStore | None = None,
    unit_size: int = 64,
) -> PatchResult:
    """Patch every cell of a target and measure the effect.

    Args:
        target: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (per
            layer x position), ``z``, ``q``, ``k``, ``v``, ``pattern`` (per layer x head, all
            positions), ``mlp_post`` (per layer x neuron), ``embed``, ``resid_final``.
        direction: ``"denoise"`` (clean into corrupted: sufficiency) or ``"noise"`` (corrupted
            into clean: necessity).
        corruption: ``"str"`` (the pairs), ``"resample"``, ``"gaussian"``, ``"mean"``, ``"zero"``
            or a :class:`~actpatch.corruption.Corruption`.
        metric: one metric name or several (all computed from the same patched runs).
        per_position: add / drop the position axis (default: on for residual-like targets).
        layers, positions, heads, neurons: restrict an axis. ``positions`` may also name roles
            (``["S1", "S2", "end"]``, see :mod:`actpatch.roles`): the position axis is then
            aligned by role across prompts of any lengths. window: patch ``window``
            consecutive layers together (joint effect).
        engine: ``"auto"`` (batched where supported), ``"batched"`` or ``"reference"`` (one
            forward pass per patch: the slow, obviously right oracle). chunk_size: patches per
            batched forward pass (default: from the memory available).
        store, unit_size: save finished units of ``unit_size`` patches in a
            :class:`~actpatch.checkpoint.UnitStore` and reuse those already there (resumable runs).

    Returns:
        A :class:`PatchResult`; ``res.values`` is the normalised effect (1 = clean, 0 = corrupted).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.sweep(m, ps, "resid_pre", progress=False)
        >>> res.dims, tuple(res.values.shape)
        (('layer', 'pos'), (2, 4))
        >>> round(float(res.values[0, 1]), 5)  # the corrupted position restores everything at layer 0
        1.0
    """
    if is_named(positions):
        return run_named(sweep, model, prompts, positions, per_position=per_position, corruption=corruption,  # type: ignore[arg-type]
                         store=store, target=target, direction=direction, metric=metric, layers=layers, heads=heads,
                         neurons=neurons, window=window, seed=seed, engine=engine, chunk_size=chunk_size,
                         progress=progress, unit_size=unit_size)
    plan = plan_for(model, prompts, target, per_position=per_position, layers=layers, positions=positions,
                    heads=heads, neurons=neurons, window=window)
    return execute(model, prompts, plan, direction=direction, corruption=corruption, metric=metric, seed=seed,
                   engine=engine, chunk_size=chunk_size, progress=progress, extra_meta={"window": window},
                   store=store, unit_size=unit_size)


def patch(
    model: "Model",
    prompts: PromptSet,
    sites: Sequence[Site],
    *,
    direction: str | Direction = "denoise",
    corruption: str | Corruption = "str",
    metric: str | Metric | Sequence[str | Metric] = "logit_diff",
    seed: int = 0,
    engine: str = "auto",
) -> PatchResult:
    """One patch: write all ``sites`` together. The result has no dims (``res.values`` is a
    0-d tensor).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("gpt2")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> round(float(ap.patch(m, ps, [ap.Site("resid_pre", 0)]).values), 5)
        1.0
    """
    if not sites:
        raise ActpatchError("patch() needs at least one Site.")
    plan = Plan(target=sites[0].kind, dims=(), coords={}, patches=(tuple(sites),))
    return execute(model, prompts, plan, direction=direction, corruption=corruption, metric=metric, seed=seed,
                   engine=engine, progress=False, extra_meta={"sites": [str(s) for s in sites]})
