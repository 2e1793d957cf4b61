"""A run's Patchscopes, interchanges, patched generations and feature circuit: each job of the
config runs once, its result saved as ``<kind>_<name>.json`` in the run directory (a resumed
run loads the jobs already there), and :func:`load_extras` reads them back for the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..prompts.promptset import PromptSet
from ..sites import Site
from ..techniques.generation import generate
from ..techniques.interchange import interchange
from ..techniques.patchscope import PatchscopeResult, patchscope

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from .config import ExperimentConfig, InterchangeConfig

__all__ = ["run_extras", "load_extras", "Extras"]

Extras = dict[str, dict[str, Any]]
"""``{"patchscope": {name: PatchscopeResult}, "interchange": {name: dict}, "generation": {name: dict},
"features": {"circuit": dict}}``."""

KINDS = ("patchscope", "interchange", "generation", "features")


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a killed run leaves no half-written job behind


def run_extras(model: "Model", prompts: PromptSet, cfg: "ExperimentConfig", out: Path,
               source_prompts: Callable[["InterchangeConfig"], PromptSet],
               log: Callable[[str], None] = print, corruption: Any = "str") -> None:
    """Run the config's patchscopes, interchanges, generations and feature circuit not yet saved
    in ``out``; ``source_prompts`` builds an interchange's source set; ``corruption`` is the
    run's (the feature circuit's)."""
    for job in cfg.patchscopes:
        path = out / f"patchscope_{job.name}.json"
        if path.is_file():
            log(f"patchscope {job.name}: already done, loaded")
            continue
        sources = job.sources or [prompts.texts[i][0] if prompts.texts else prompts.clean[i].tolist()
                                  for i in range(min(4, len(prompts)))]
        scope = patchscope(model, sources, job.site, layers=job.layers, positions=job.positions,
                           target_prompt=job.target_prompt, target_position=job.target_position,
                           target_layer=job.target_layer, max_new_tokens=job.max_new_tokens)
        _save(path, scope.to_dict())
        share = scope.share_by_layer()
        best = int(share.argmax())
        log(f"patchscope {job.name}: the source token comes back in at least half the cells at "
            f"{int((share >= 0.5).sum())} of {len(scope.layers)} layers (best: layer {scope.layers[best]}, "
            f"{float(share[best]):.0%})")
    for job in cfg.interchanges:
        path = out / f"interchange_{job.name}.json"
        if path.is_file():
            log(f"interchange {job.name}: already done, loaded")
            continue
        source = prompts if job.source is None else source_prompts(job)
        writes = [[tuple(Site.parse(side.strip()) for side in w.split("->", 1)) for w in p.split(" + ")]
                  for p in job.patches]
        res = interchange(model, prompts, source, writes, metric=[m.value for m in cfg.metrics], reduce=job.reduce)
        _save(path, res.to_dict())
        log(f"interchange {job.name}: " + "; ".join(f"{label} {e:+.3f}" for label, e, _ in res.summary()[:3]))
    for job in cfg.generations:
        path = out / f"generation_{job.name}.json"
        if path.is_file():
            log(f"generation {job.name}: already done, loaded")
            continue
        gen = generate(model, job.prompt, {Site.parse(k): v for k, v in job.patches.items()},
                       every_step={Site.parse(k): v for k, v in job.every_step.items()},
                       max_new_tokens=job.max_new_tokens)
        _save(path, gen.to_dict())
        log(f"generation {job.name}: {gen.text[0]!r} (unpatched {gen.baseline_text[0]!r})")  # type: ignore[index]
    if cfg.dictionaries is not None:
        _feature_job(model, prompts, cfg, out, log, corruption)


def _feature_job(model: "Model", prompts: PromptSet, cfg: "ExperimentConfig", out: Path,
                 log: Callable[[str], None], corruption: Any) -> None:
    """The config's dictionaries attached, a feature circuit on the prompts' largest length group."""
    from ..features import bundled, feature_circuit, load_dictionary, top_activations

    path = out / "features_circuit.json"
    if path.is_file():
        log("feature circuit: already done, loaded")
        return
    job = cfg.dictionaries
    assert job is not None
    ds = [d for src in job.sources
          for d in (bundled(model) if src == "bundled" else [load_dictionary(src, model=model)])]
    group = max(prompts.groups(), key=lambda g: len(g.indices))
    sub = prompts.subset(group.indices) if len(group.indices) < len(prompts) else prompts
    if sub is not prompts:
        log(f"feature circuit: on the {len(sub)} prompts of length {group.seq_len} (nodes sit at positions)")
    model.attach(*ds)
    try:
        fc = feature_circuit(model, sub, ds, sizes=job.sizes, corruption=corruption,
                             metric=cfg.metrics[0].value, seed=cfg.seed, validate=job.validate_k)
        examples = {}
        for node in [n for n in fc.circuit() if n.feature != "error"][:8]:
            d = next(x for x in ds if str(x.site) == node.site)
            key = f"{node.site} f{node.feature}"
            if key not in examples:
                examples[key] = [vars(e) for e in top_activations(model, d, sub, int(node.feature), n=job.examples)]
    finally:
        model.detach(*ds)
    data = {**fc.to_dict(), "dictionaries": [d.summary() for d in ds], "examples": examples,
            "top_edges": fc.top_edges(15)}
    _save(path, data)
    best = next((n for n, f in zip(fc.sizes, fc.faithfulness) if f >= 0.8), None)
    log(f"feature circuit: {len(fc.nodes)} nodes scored over {len(ds)} dictionaries; faithfulness "
        f"{fc.faithfulness[-1]:.2f} at {fc.sizes[-1]} nodes" + (f", >= 0.8 from {best}" if best else "")
        + "; AtP vs exact rank correlation " + ", ".join(f"{k} {v['rank_correlation']:.2f}"
                                                          for k, v in fc.validation.items()))




def load_extras(out: str | Path) -> Extras:
    """The saved jobs of a run directory, by kind and name (empty when there are none)."""
    out = Path(out)
    found: Extras = {kind: {} for kind in KINDS}
    for kind in found:
        for p in sorted(out.glob(f"{kind}_*.json")):
            data = json.loads(p.read_text())
            found[kind][p.stem[len(kind) + 1:]] = PatchscopeResult.from_dict(data) if kind == "patchscope" else data
    return found
