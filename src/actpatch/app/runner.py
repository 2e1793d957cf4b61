"""Run a declarative experiment into an output directory, resumably.

Layout of ``out/``::

    run.json                 the canonical config and its digest (a changed config is refused)
    .actpatch.lock           held while a run writes here (a second run on the folder is refused)
    <name>_<direction>/      one saved PatchResult per target and direction (name: the target,
                             _w<n> for windows, _atp[_qk][_gd] for attribution estimates)
        units/               finished units while the sweep runs (removed when it completes)
    circuits.json            faithfulness curves, when the config asks for circuits
    edges_<method>.csv       every edge's score, largest |score| first
    report.html, figures/    written by actpatch.report

Killed at any moment and started again with the same config and directory, the run skips
finished results, reuses finished units, and ends with tensors bit-identical to an
uninterrupted run (units and chunk sizes are fixed by the config, so the arithmetic repeats).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .._io import read_json
from ..compare import comparable, mark_compared
from ..corruption import Corruption, CorruptionKind, GaussianNoise, parse_corruption
from ..errors import ConfigError, OutputDirError
from .lock import output_lock
from ..experiment.checkpoint import UnitStore
from ..experiment.executor import Executor, executor_for
from ..models.handle import Model
from ..prompts import PromptSet, keep_correct
from ..results import PatchResult
from ..sites import Site
from ..techniques.attribution import attribute
from ..techniques.circuit import Faithfulness, faithfulness, load_curves, save_curves
from ..techniques.eap import EdgeMethod, EdgeScores, edge_attribution
from ..techniques.masks import learn_edge_mask
from ..techniques.patching import sweep
from ..subspace import Subspace
from ..techniques.path import path_sweep
from ..types import Direction, Method
from .catalogue import write_status
from .config import CircuitsConfig, ExperimentConfig, PathConfig, PromptsConfig, TargetConfig
from .subspaces import build_subspace, run_das_jobs
from ..techniques.circuit_io import to_mib_json
from ..techniques.self_repair import direct_vs_total
from ..techniques.mib import MIB_FRACTIONS, CircuitScores, circuit_scores, oracle_edges, random_edges, save_mib

__all__ = ["run_experiment", "load_experiment", "resolve_model"]

DEFAULT_CHUNK = 32
"""Patches per batched forward pass in config experiments (fixed, so resumed ones repeat the arithmetic)."""


def resolve_model(name: str) -> Model:
    """``tiny:<family>`` gives a tiny random test model (see :mod:`actpatch.testing`); anything
    else goes to :func:`actpatch.load_model`."""
    if name.startswith("tiny:"):
        from ..testing import TINY_FAMILIES, tiny_model

        fam = name.split(":", 1)[1]
        if fam not in TINY_FAMILIES:
            raise ConfigError(f"model {name!r}: tiny families are {', '.join(TINY_FAMILIES)}.")
        return tiny_model(fam)
    from ..models.loading import load_model

    return load_model(name)


def build_prompts(model: Model, cfg: ExperimentConfig,
                  log: Callable[[str], None] = lambda _: None) -> tuple[PromptSet, float | None]:
    """The prompt set of a config (kept to the prompts the model solves when asked); ``log``
    gets the run's cost estimate before any forward pass."""
    ps = prompt_set(model, cfg.prompts)
    check_names(cfg, ps)  # before any forward pass, keep_correct's included
    log(cost_estimate(model, ps, cfg))
    share = None
    if cfg.prompts.keep_correct:
        ps, share = keep_correct(model, ps)
    return ps, share


def prompt_set(model: Model, pc: PromptsConfig, key: str = "prompts") -> PromptSet:
    """The prompts a prompts section describes: its file, or its builder with its arguments."""
    from .. import prompts as P

    if pc.file is not None:
        return PromptSet.from_file(model, pc.file)
    builder = getattr(P, pc.builder or "ioi")
    kwargs: dict[str, Any] = dict(pc.args)
    if pc.templates is not None:
        kwargs["templates"] = pc.templates
    try:
        return builder(model, n=pc.n, seed=pc.seed, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}.args: {e}") from None


def cost_estimate(model: Model, prompts: PromptSet, cfg: ExperimentConfig) -> str:
    """What the config's targets and paths will cost, in prompt runs (one forward pass of one
    prompt; a patched run counts as one, an attribution estimate as three: two forwards and a
    backward), counted from the same plans the sweeps use, before any of them runs. Circuits and
    DAS jobs are named, not counted."""
    from ..experiment.plan import Grid, plan_for

    n, d = len(prompts), len(cfg.directions)
    lengths = sorted(set(prompts.lengths.tolist()))
    parts, total = [], 0
    for t in cfg.targets:
        named = bool(t.positions) and isinstance(t.positions[0], str)
        grid = Grid(per_position=t.per_position, layers=t.layers, positions=None if named else t.positions,
                    heads=t.heads, neurons=t.neurons, window=t.window)
        try:
            plan = plan_for(model, prompts if len(lengths) == 1 else prompts.subset([0]), t.target, grid)
            cells = len(plan.patches)
            if named and "pos" in plan.dims:
                cells = cells // len(plan.coords["pos"]) * len(t.positions or [])
        except Exception:  # an axis the sweep itself will refuse with its own message: not counted, said so
            parts.append(f"{t.name} not estimated")
            continue
        runs = (3 * n if t.method is Method.ATP else cells * n) * d
        total += runs
        parts.append(f"{t.name} {cells} cells")
    for pc in cfg.paths:
        senders = (len(pc.layers) if pc.layers is not None else model.n_layers) * (
            (len(pc.heads) if pc.heads is not None else model.n_heads) if pc.sender == "z" else 1)
        total += senders * n * d
        parts.append(f"{pc.name} {senders} senders")
    extra = [w for w, on in (("circuits", cfg.circuits is not None), ("DAS", bool(cfg.das))) if on]
    return (f"cost estimate: about {total:,} prompt runs ({', '.join(parts) or 'no sweeps'}; {n} prompts x {d} "
            f"direction(s))" + (f", plus {' and '.join(extra)}" if extra else ""))


def check_names(cfg: ExperimentConfig, prompts: PromptSet) -> None:
    """Every position a config names or indexes, checked against every prompt before the first
    forward pass; one :class:`ConfigError` names each bad entry by its config key."""
    from ..techniques.positions import named_positions

    wanted: list[tuple[str, int | str, bool]] = []  # (config key, name or index, must be one index everywhere)
    for i, t in enumerate(cfg.targets):
        wanted += [(f"targets[{i}].positions", p, False) for p in t.positions or []]
        if t.subspace is not None and t.subspace.file is None:
            wanted.append((f"targets[{i}].subspace.position", t.subspace.position, False))
    wanted += [(f"das[{i}].position", d.position, True) for i, d in enumerate(cfg.das) if d.position is not None]
    if not wanted:
        return
    # a name must exist in both prompts of a pair (unaligned pairs name their corrupted side apart)
    have = [{k: v for k, v in named_positions(prompts, j).items() if k in named_positions(prompts, j, "corrupted")}
            for j in range(len(prompts))]
    shortest = int(prompts.lengths.min())
    common = sorted(set.intersection(*(set(h) for h in have)))
    problems = []
    for key, name, single in wanted:
        if isinstance(name, int):
            if not -shortest <= name < shortest:
                problems.append(f"{key}: position {name} is outside the shortest prompt ({shortest} tokens: "
                                f"0 to {shortest - 1}, or a name: {', '.join(common)}).")
            continue
        lacking = [j for j, h in enumerate(have) if name not in h]
        if lacking:
            which = ", ".join(map(str, lacking[:5])) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            problems.append(f"{key}: {name!r} is not a named position of prompt(s) {which}; every prompt has "
                            f"{', '.join(common)}.")
        elif single and len({h[name] for h in have}) > 1:
            problems.append(f"{key}: {name!r} falls at different token indices across the prompts "
                            f"({sorted({h[name] for h in have})}); this job needs one index: use prompts of one "
                            f"template, or an index.")
    if problems:
        raise ConfigError("The config names positions these prompts do not have (nothing was run):\n"
                          + "\n".join(problems))


def build_corruption(cfg: ExperimentConfig) -> Corruption:
    c = cfg.corruption
    if c.name is CorruptionKind.GAUSSIAN:
        return GaussianNoise(scale=c.scale, n_draws=c.n_draws, positions=c.positions)
    return parse_corruption(c.name)


def _prepare_dir(out: Path, cfg: ExperimentConfig) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"Output directory {str(out)!r} is not writable ({e.strerror}); choose another with --out.") from None
    state = out / "run.json"
    digest = cfg.digest()
    if state.is_file():
        old = read_json(state, "an experiment directory")
        if not isinstance(old, dict) or old.get("digest") != digest:
            raise OutputDirError(
                f"{out} holds an experiment of a different config (digest "
                f"{old.get('digest') if isinstance(old, dict) else '?'} vs {digest}); "
                f"use another --out directory, or delete {out} to start over."
            )
        return
    if any((p / "meta.json").is_file() for p in out.iterdir()):
        raise OutputDirError(f"{out} already holds results that no run.json describes; use another --out directory.")
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps({"digest": digest, "config": cfg.model_dump(mode="json")}, indent=2))
    os.replace(tmp, state)


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    model: Model | None = None,
    executor: str | Executor | None = None,
) -> dict[str, PatchResult]:
    """Run every (target or path, direction) of ``cfg`` into ``out``, then its circuits; returns
    the results by name. ``executor`` runs the exact sweeps' and path sweeps' units
    (``"local"``, ``"ray"`` or an executor object; one for the whole run)."""
    out = Path(out)
    with output_lock(out):  # one run per folder: a second is refused, naming the first
        _prepare_dir(out, cfg)
        write_status(out, "running", started=dt.datetime.now().isoformat(timespec="seconds"))
        try:
            with executor_for(executor) as run_units:
                results = _run(cfg, out, progress=progress, log=log, model=model, executor=run_units)
        except BaseException as e:  # recorded for `actpatch runs`, then raised as it was
            write_status(out, "failed" if isinstance(e, Exception) else "stopped",
                         error=f"{type(e).__name__}: {e}".strip())
            raise
        write_status(out, "complete", error=None)
    return results


def _run(cfg: ExperimentConfig, out: Path, *, progress: bool, log: Callable[[str], None],
         model: Model | None, executor: Executor) -> dict[str, PatchResult]:
    model = model or resolve_model(cfg.model)
    prompts, share = build_prompts(model, cfg, log)
    if share is not None:
        log(f"{prompts.name}: {len(prompts)} prompts kept (model right on {share:.0%} of them)")
    corruption = build_corruption(cfg)
    results: dict[str, PatchResult] = {}
    jobs = [(t.name, _target_job(model, prompts, cfg, corruption, t, progress, log, executor)) for t in cfg.targets]
    jobs += [(p.name, _path_job(model, prompts, cfg, corruption, p, progress, executor)) for p in cfg.paths]
    for base, job in jobs:
        for direction in cfg.directions:
            name = f"{base}_{direction.value}"
            target_dir = out / name
            if (target_dir / "meta.json").is_file():
                results[name] = PatchResult.load(target_dir)
                log(f"{name}: already done, loaded")
                continue
            res = job(direction, target_dir)
            notes = {"config_digest": cfg.digest()}
            if share is not None:
                notes["kept_share"] = share
            res = res.replace(info=res.info.replace(extra={**res.info.extra, **notes}))
            res.save(target_dir)
            shutil.rmtree(target_dir / "units", ignore_errors=True)
            results[name] = res
            log(f"{name}: done")
    if cfg.circuits is not None:
        find_circuits(model, prompts, cfg, out, log)
    if cfg.das:
        run_das_jobs(model, prompts, cfg, out, progress=progress, log=log)
    if cfg.patchscopes or cfg.interchanges or cfg.generations or cfg.dictionaries:
        from .extras import run_extras

        run_extras(model, prompts, cfg, out, lambda job: prompt_set(model, job.source, f"interchanges.{job.name}.source"),
                   log, corruption=corruption)
    for base, _ in jobs:
        d, n = results.get(f"{base}_denoise"), results.get(f"{base}_noise")
        if d is not None and n is not None and comparable(d, n) and not (d.info.compared and n.info.compared):
            for name, res in ((f"{base}_denoise", d), (f"{base}_noise", n)):  # both directions read together
                results[name] = mark_compared(res)
                results[name].save(out / name)
    return results


Job = Callable[[Direction, Path], PatchResult]
"""One result of a run: (direction, its directory) -> the result."""


def _target_job(model: Model, prompts: PromptSet, cfg: ExperimentConfig, corruption: Corruption, t: TargetConfig,
                progress: bool, log: Callable[[str], None], executor: Executor) -> Job:
    axes = dict(per_position=t.per_position, layers=t.layers, positions=t.positions, heads=t.heads,
                neurons=t.neurons, window=t.window)

    found: list[Subspace] = []  # the target's basis, found once for both directions

    def job(direction: Direction, target_dir: Path) -> PatchResult:
        if t.method is Method.ATP:  # a few passes: nothing to resume
            return attribute(model, prompts, t.target, direction=direction, corruption=corruption,
                             metric=cfg.metrics, seed=cfg.seed, qk_fix=t.qk_fix, grad_drop=t.grad_drop,
                             memory_budget=cfg.memory_budget, **axes)
        store = UnitStore(target_dir / "units")
        if len(store):
            log(f"{target_dir.name}: resuming from {len(store)} saved unit(s)")
        extra: dict[str, Any] = {}
        if t.subspace is not None:
            if not found:
                found.append(build_subspace(model, prompts, t))
            extra = {"subspace": found[0], "check_subspace": t.subspace.check}
        return sweep(model, prompts, t.target, direction=direction, corruption=corruption, metric=cfg.metrics,
                     seed=cfg.seed, engine=cfg.engine, chunk_size=cfg.chunk_size or DEFAULT_CHUNK, progress=progress,
                     store=store, unit_size=cfg.unit_size, executor=executor, memory_budget=cfg.memory_budget,
                     **axes, **extra)

    return job


def _path_job(model: Model, prompts: PromptSet, cfg: ExperimentConfig, corruption: Corruption, p: PathConfig,
              progress: bool, executor: Executor) -> Job:
    def job(direction: Direction, target_dir: Path) -> PatchResult:
        return path_sweep(model, prompts, [Site.parse(r) for r in p.receivers], sender=p.sender, layers=p.layers,
                          heads=p.heads, direction=direction, corruption=corruption, metric=cfg.metrics, seed=cfg.seed,
                          executor=executor, store=UnitStore(target_dir / "units"), progress=progress,
                          memory_budget=cfg.memory_budget)

    return job


def find_circuits(model: Model, prompts: PromptSet, cfg: ExperimentConfig, out: Path,
                  log: Callable[[str], None] = print) -> dict[str, Faithfulness]:
    """Edge scores of each method of ``cfg.circuits`` (saved as ``edges_<method>.csv``, sorted by
    |score|) and their faithfulness curves (``circuits.json``, which the report plots). A run
    that already has ``circuits.json`` loads it."""
    c = cfg.circuits
    if c is None:
        raise ConfigError("find_circuits() needs a config with a circuits section (circuits: {methods: [eap]}).")
    path = out / "circuits.json"
    curves = load_curves(path)
    if curves:
        log("circuits: already done, loaded")
        return curves
    corruption = build_corruption(cfg)
    mib: dict[str, CircuitScores] = {}
    first: Any = None  # the first method's edge scores, which the oracle re-scores exactly
    fractions = tuple(c.fractions) if c.fractions else MIB_FRACTIONS
    for method in c.methods:
        name, edges = _edges_of(method, c, model, prompts, cfg, corruption, out)
        for w in edges.extra.get("warnings", []):
            log(f"warning, {name}: {w}")
        table = edges.to_pandas()
        table.reindex(table.score.abs().sort_values(ascending=False).index).to_csv(out / f"edges_{edges.method}.csv", index=False)
        to_mib_json(edges, out / f"graph_{edges.method}.json")  # readable by the EAP-IG / MIB code
        first = first if first is not None else edges
        if c.evaluate == "mib":
            options = dict(fractions=fractions, corruption=corruption, metric=cfg.metrics[0].value, seed=cfg.seed,
                           selection=c.selection, memory_budget=cfg.memory_budget)
            mib[name] = circuit_scores(model, prompts, edges, **options)  # type: ignore[arg-type]
            if "random" not in mib:
                mib["random"] = circuit_scores(model, prompts, random_edges(edges, cfg.seed), **options)  # type: ignore[arg-type]
            log(f"MIB, {name}: CPR {mib[name].cpr:.3f}, CMD {mib[name].cmd:.3f} ({mib[name].seconds:.1f} s)")
        curves[name] = faithfulness(model, prompts, edges, sizes=c.sizes, corruption=corruption, metric=cfg.metrics[0].value,
                                    seed=cfg.seed, memory_budget=cfg.memory_budget)
        log(f"Top edges, {name}: " + "; ".join(f"{u} -> {v} {s:+.2f}" for u, v, s in edges.top(5)))
        log(f"Faithfulness, {name}: " + ", ".join(f"{n} edges {v:+.2f}" for n, v in zip(c.sizes, curves[name].values.tolist())))
    if mib and c.oracle_k:
        exact = oracle_edges(model, prompts, first, c.oracle_k)
        name = f"exact ({exact.extra['oracle_k']} edges of {first.method.upper()})"
        mib[name] = circuit_scores(model, prompts, exact, fractions=fractions, corruption=corruption,
                                   metric=cfg.metrics[0].value, seed=cfg.seed, selection=c.selection,
                                   memory_budget=cfg.memory_budget)
        log(f"MIB, {name}: CPR {mib[name].cpr:.3f}, CMD {mib[name].cmd:.3f} ({mib[name].seconds:.1f} s)")
    if mib:
        save_mib(mib, out / "mib.json")
    if c.direct_vs_total:
        dt = direct_vs_total(model, prompts, corruption=corruption, metric=cfg.metrics[0].value, seed=cfg.seed)
        (out / "direct_total.json").write_text(json.dumps(dt.to_dict()))
        log("Direct vs total: " + "; ".join(f"{n} {d:+.2f} / {t:+.2f}" for n, d, t in dt.disagreements(5)))
    save_curves(curves, path)
    return curves


def _edges_of(method: "EdgeMethod | str", c: CircuitsConfig, model: "Model", prompts: PromptSet,
              cfg: ExperimentConfig, corruption: Any, out: Path) -> tuple[str, EdgeScores]:
    """A circuits method's display name and edge scores; a learned mask checkpoints its training
    in ``out`` (a killed run resumes it)."""
    if method == "mask":  # (a config's CircuitMethod is a str enum)
        edges = learn_edge_mask(model, prompts, density=c.mask_density, steps=c.mask_steps, corruption=corruption,
                                metric=cfg.metrics[0].value, seed=cfg.seed, layout=c.layout,
                                checkpoint=out / "mask.safetensors")
        return f"mask ({c.mask_steps} steps)", edges
    how = EdgeMethod(str(getattr(method, "value", method)))
    steps, on = how.steps(c.ig_steps), how.ig_target
    name = ((f"EAP-IG ({steps} steps" + (", activations)" if on == "activations" else ")")) if steps
            else "RelP" if how is EdgeMethod.RELP else "EAP")
    return name, edge_attribution(model, prompts, corruption=corruption, metric=cfg.metrics[0].value, ig_steps=steps,
                                  seed=cfg.seed, ig_target=on, layout=c.layout, method=how,
                                  memory_budget=cfg.memory_budget)


def load_experiment(out: str | Path) -> tuple[dict[str, Any], dict[str, PatchResult]]:
    """The config (as saved; empty for results saved from Python) and the finished results of an
    experiment directory, of one result folder (``res.save``) or of a folder of them."""
    out = Path(out)
    if not out.is_dir():
        raise OutputDirError(f"{out}: no such directory; pass the --out directory of `actpatch run` or `actpatch demo`.")
    from .catalogue import saved_results

    state = out / "run.json"
    results = {p.name: PatchResult.load(p) for p in saved_results(out)}
    jobs = any(out.glob(f"{kind}_*.json") for kind in ("patchscope", "interchange", "generation", "features"))
    if not results and not jobs:
        raise OutputDirError(f"{out} holds no finished results (expected subdirectories with meta.json, or a "
                             f"folder written by res.save).")
    saved = read_json(state, "an experiment directory") if state.is_file() else {}
    cfg = saved.get("config", {}) if isinstance(saved, dict) else {}
    return cfg, results
