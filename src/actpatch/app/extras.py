"""A run's Patchscopes, interchanges and patched generations: each job of the config runs once,
its result saved as ``<kind>_<name>.json`` in the run directory (a resumed run loads the jobs
already there), and :func:`load_extras` reads them back for the report."""

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
"""``{"patchscope": {name: PatchscopeResult}, "interchange": {name: dict}, "generation": {name: dict}}``."""


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a killed run leaves no half-written job behind


def run_extras(model: "Model", prompts: PromptSet, cfg: "ExperimentConfig", out: Path,
               source_prompts: Callable[["InterchangeConfig"], PromptSet],
               log: Callable[[str], None] = print) -> None:
    """Run the config's patchscopes, interchanges and generations not yet saved in ``out``;
    ``source_prompts`` builds an interchange's source set."""
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


def load_extras(out: str | Path) -> Extras:
    """The saved jobs of a run directory, by kind and name (empty when there are none)."""
    out = Path(out)
    found: Extras = {"patchscope": {}, "interchange": {}, "generation": {}}
    for kind in found:
        for p in sorted(out.glob(f"{kind}_*.json")):
            data = json.loads(p.read_text())
            found[kind][p.stem[len(kind) + 1:]] = PatchscopeResult.from_dict(data) if kind == "patchscope" else data
    return found
