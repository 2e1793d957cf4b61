"""``sweep`` and ``patch``: exact activation patching, labelled as a :class:`~actpatch.PatchResult`,
with the interpretability-illusion check on subspace patches. The patches themselves run in
:mod:`actpatch.techniques.exact`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..corruption import Corruption
from ..experiment.checkpoint import UnitStore
from ..experiment.executor import Executor, executor_for
from ..experiment.plan import Grid, parse_target, plan_for
from ..findings import from_technique
from ..metrics import MetricSpec
from ..prompts.promptset import PromptSet
from ..results import PatchResult
from ..errors import SiteError
from ..sites import Site, SiteKind, as_sites
from ..subspace import Subspace, SubspaceLike, as_subspace
from ..types import DEFAULT_DIRECTION, Direction, Engine, parse_direction
from .exact import execute, patch_plan
from .positions import by_named_positions, named_positions
from .directions import subspace_check

if TYPE_CHECKING:  # pragma: no cover
    from ..features.dictionary import Dictionary
    from ..models.handle import Model

__all__ = ["sweep", "patch"]


def sweep(
    model: "Model",
    prompts: PromptSet,
    target: "str | SiteKind | Dictionary" = "resid_pre",
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
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
    features: Sequence[int | str] | int | None = None,
    memory_budget: "int | str | None" = None,
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
            batched forward pass (default: as many as fit the memory budget).
        memory_budget: bytes (or ``"4GiB"``) the sweep's activations may take (default: a share
            of free memory, :func:`actpatch.engine.batched.memory_budget`). Each prompt row
            holds its captured activations (every layer, every position) while it runs, so long
            prompts run a chunk of prompts at a time, with identical values;
            ``ap.experiment.estimate(model, prompts, "sweep", target=...)`` says how, before.
        store, unit_size: save finished units of ``unit_size`` patches in a
            :class:`~actpatch.experiment.checkpoint.UnitStore` and reuse those already there
            (resumable runs).
        subspace: patch only the coordinates along a basis (a (k, d) tensor, ``{layer:
            basis}`` or a :class:`~actpatch.subspace.Subspace`), see :mod:`actpatch.subspace`.
            ``check_subspace``: run the interpretability-illusion check
            (:func:`actpatch.subspaces.subspace_check`) on the cell with the largest
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
    if not isinstance(target, (str, SiteKind)):  # a feature dictionary
        features = feature_axis(model, prompts, target, features, subspace)
    elif features is not None:
        raise SiteError(f"features=... applies to a feature dictionary's sweep, not target={target!r}.")
    grid = Grid(per_position=per_position, layers=layers, positions=positions, heads=heads, neurons=neurons,
                window=window, features=features)  # type: ignore[arg-type]
    if subspace is not None and check_subspace and isinstance(prompts, PromptSet) and not prompts.aligned:
        from ..errors import PromptError

        raise PromptError("The interpretability-illusion check patches one site at one index in every prompt, which "
                          "pairs of different token lengths do not share; pass check_subspace=False, or give pairs "
                          "of one length.")
    with executor_for(executor) as run_units:  # one executor (and one set of workers) for the whole call
        options = dict(target=target, direction=direction, metric=metric, seed=seed, engine=engine,
                       chunk_size=chunk_size, progress=progress, unit_size=unit_size, subspace=as_subspace(subspace),
                       memory_budget=memory_budget,
                       executor=None if executor is None else run_units)
        if grid.named:
            res = by_named_positions(
                lambda sub, g, corr, sub_store: _sweep(model, sub, g, corruption=corr, store=sub_store, **options),
                model, prompts, grid, corruption, store, base_side=_base_side(direction))
        else:
            res = _sweep(model, prompts, grid, corruption=corruption, store=store, **options)
    sub = options["subspace"]
    if isinstance(sub, Subspace) and check_subspace:
        site = _strongest_site(model, prompts, res, target, grid, direction)
        if site is not None:
            res = _with_check(model, prompts, res, site, sub, direction=direction, corruption=corruption,
                              metric=metric, seed=seed)
    return res


def feature_axis(model: "Model", prompts: PromptSet, dictionary: "Dictionary",
                  features: Sequence[int | str] | int | None, subspace: object) -> tuple[int | str, ...]:
    """The feature axis of a dictionary's sweep (checked attached; an int: the most active)."""
    from ..features.activity import top_features
    from ..features.dictionary import Dictionary

    if not isinstance(dictionary, Dictionary):
        raise SiteError(f"target={dictionary!r}: give a target name ('resid_pre', 'z', ...) or an attached feature "
                        f"Dictionary.")
    model.attached(dictionary.feature_site)
    if model.attached(dictionary.feature_site) is not dictionary:
        raise SiteError(f"Another dictionary is attached at {dictionary.site}; attach this one to sweep it.")
    if subspace is not None:
        raise SiteError("subspace= does not apply to a feature sweep (a feature is already one direction).")
    if features is None:
        return (*range(dictionary.n_features), "error")
    if isinstance(features, int) and not isinstance(features, bool):
        return (*top_features(model, dictionary, prompts, features), "error")
    return tuple(features)


def _base_side(direction: str | Direction) -> str:
    """Which prompts of a pair the patched (base) run reads: the corrupted ones when denoising."""
    return "corrupted" if parse_direction(direction) is Direction.DENOISE else "clean"


def _strongest_site(model: "Model", prompts: PromptSet, res: PatchResult, target: str | SiteKind, grid: Grid,
                    direction: str | Direction) -> Site | None:
    """The site of the cell whose effect is largest (a named position must fall at one index in
    every prompt; None otherwise)."""
    base = parse_direction(direction).no_effect
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
    sites: Site | Sequence[Site],
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    engine: str | Engine = Engine.AUTO,
    subspace: SubspaceLike | None = None,
    check_subspace: bool = True,
) -> PatchResult:
    """One patch: write all ``sites`` (one Site or a list) together; a site's position may be a
    name (``"end"``, ``"S2"``) or a negative index (-1: the last token), resolved per prompt (the
    prompts are run in groups that share the resolved indices) (with ``subspace``, only their coordinates along
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
    sites = as_sites(sites)
    if any(s.relative for s in sites):  # names and negative indices: resolved per prompt, run per layout
        from .positions import by_resolved_sites, resolved_site_groups

        res = by_resolved_sites(lambda ps, resolved, corr: patch(
            model, ps, resolved, direction=direction, corruption=corr, metric=metric, seed=seed, engine=engine,
            subspace=subspace, check_subspace=False), model, prompts, sites, corruption, _base_side(direction))
        if subspace is not None and check_subspace:  # the check on the largest group, at its indices
            idx, resolved, _ = max(resolved_site_groups(prompts, sites, _base_side(direction)), key=lambda g: len(g[0]))
            res = _with_check(model, prompts.subset(idx), res, resolved[0], as_subspace(subspace), direction=direction,
                              corruption=corruption, metric=metric, seed=seed)
        return res
    plan = patch_plan(sites, as_subspace(subspace))
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
    found = subspace_check(model, prompts, site, subspace, **options)  # type: ignore[arg-type]
    technique = dataclasses.replace(res.info.technique, subspace_check=found)  # type: ignore[type-var]
    out = res.replace(info=res.info.replace(technique=technique))
    out.findings = list(res.findings) + from_technique(found.findings)
    return out
