"""Config support for subspace targets (``subspace:`` on a target) and DAS jobs (``das:``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


from ..errors import ConfigError
from ..models.handle import Model
from ..prompts.promptset import PromptSet
from ..sites import Site
from ..subspace import Subspace
from ..techniques.das import DASRecord, das
from ..techniques.positions import named_positions
from ..techniques.directions import diff_of_means, pca_directions, probe_direction
from .config import ExperimentConfig, SubspaceMethod, TargetConfig

__all__ = ["build_subspace", "run_das_jobs", "load_das"]


def build_subspace(model: Model, prompts: PromptSet, t: TargetConfig) -> Subspace:
    """The basis of a subspace target: read from its file, or found at each swept layer."""
    c = t.subspace
    if c is None:  # pragma: no cover - callers check
        raise ConfigError("build_subspace() needs a target with a subspace section.")
    if c.method is SubspaceMethod.FILE:
        from safetensors.torch import load_file

        path = Path(str(c.file)).expanduser()
        if not path.is_file():
            raise ConfigError(f"subspace file {str(path)!r} does not exist.")
        tensors = load_file(str(path))
        if "basis" in tensors:
            return Subspace.of(tensors["basis"], method="file", file=str(path))
        per = {int(k.split("_", 1)[1]): v for k, v in tensors.items() if k.startswith("layer_") and k[6:].isdigit()}
        if not per:
            raise ConfigError(f"{path}: expected a tensor 'basis' or tensors 'layer_<l>'; found {sorted(tensors)}.")
        return Subspace.of(per, method="file", file=str(path))
    layers = t.layers if t.layers is not None else list(range(model.n_layers))
    find = {SubspaceMethod.DIFF_OF_MEANS: lambda s: diff_of_means(model, prompts, s, position=c.position),
            SubspaceMethod.PROBE: lambda s: probe_direction(model, prompts, s, position=c.position),
            SubspaceMethod.PCA: lambda s: pca_directions(model, prompts, s, c.k, position=c.position)}[c.method]
    bases = {l: find(Site(t.target, l)).basis_for(None) for l in layers}
    return Subspace.of(bases, method=c.method.value, position=str(c.position))


def _position(prompts: PromptSet, position: int | str) -> int:
    """The index a position takes in every prompt (DAS trains at one index)."""
    if isinstance(position, int):
        return position
    at = {named_positions(prompts, i).get(position) for i in range(len(prompts))}
    if None in at:
        raise ConfigError(f"das position {position!r} is not a named position of every prompt.")
    if len(at) != 1:
        raise ConfigError(f"das position {position!r} falls at indices {sorted(at)}; DAS trains at one index, so use "
                          f"prompts of one layout (e.g. one IOI template and order).")
    return at.pop()


def run_das_jobs(model: Model, prompts: PromptSet, cfg: ExperimentConfig, out: Path, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, DASRecord]:
    """Run each ``das:`` job into ``out/<name>.json`` (numbers, curve, findings) and
    ``out/<name>.safetensors`` (the basis); jobs already written are loaded."""
    from safetensors.torch import save_file

    done: dict[str, DASRecord] = {}
    for job in cfg.das:
        path = out / f"{job.name}.json"
        if path.is_file():
            done[job.name] = DASRecord.from_dict(json.loads(path.read_text()))
            log(f"{job.name}: already done, loaded")
            continue
        site = Site.parse(job.site)
        if job.position is not None:
            if site.pos is not None:
                raise ConfigError(f"{job.name}: give the position in the site or as position:, not both.")
            site = Site(site.kind, site.layer, head=site.head, pos=_position(prompts, job.position))
        r = das(model, prompts, site, job.k, steps=job.steps, lr=job.lr, test_fraction=job.test_fraction,
                seed=cfg.seed, progress=progress)
        record = r.record()
        save_file({"basis": r.subspace.basis_for(site.layer).contiguous()}, str(out / f"{job.name}.safetensors"))
        path.write_text(json.dumps(record.to_dict(), indent=2))
        done[job.name] = record
        log(f"{job.name}: test accuracy {r.test_accuracy:.2f}, subspace effect {r.test_effect:.3f} ({r.seconds:.1f} s)")
    return done


def load_das(out: Path) -> dict[str, DASRecord]:
    """The DAS records a run directory holds, by name."""
    return {p.stem: DASRecord.from_dict(json.loads(p.read_text())) for p in sorted(Path(out).glob("das_*.json"))}
