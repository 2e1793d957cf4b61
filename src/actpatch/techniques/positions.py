"""Named positions: a position axis by name ("S1", "S2", "end", ...) instead of by index, so that
position-resolved sweeps run over prompts of different lengths and layouts (e.g. every IOI
template, ABBA and BABA together).

A named position is one token position per prompt. Every prompt pair has the built-in names

* ``end``: the last position (where the answer is predicted);
* ``first_diff`` / ``last_diff``: the first / last position where clean and corrupted differ
  (for a subject swap, ``last_diff`` is the subject's last token, ROME's key position);

and builders add their own in the prompt attributes, ``attributes[i]["positions"]``: the IOI
builder records ``IO``, ``S1``, ``S1+1`` and ``S2``, the factual builder ``subject_first`` and
``subject_last``. Prompts are grouped by where their named
positions fall; each group is swept with ordinary integer positions and the groups are put back together
in prompt order, with the position axis labelled by the names. Corruptions must not depend
on which prompts share a batch: ``str`` and ``zero`` do not, Gaussian noise keeps the sigma of
the whole set, and ``resample`` / ``mean`` (which draw on the other prompts) are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..checks import check
from ..findings import technique_findings
from ..corruption import Corruption, CorruptionKind, GaussianNoise, parse_corruption
from ..errors import CorruptionError, PromptError, SiteError
from ..experiment.checkpoint import UnitStore
from ..experiment.plan import Grid
from ..prompts.promptset import PromptSet
from ..results import PatchResult, ResultInfo
from ..sites import Site
from ..types import Diagnostics

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["BUILTIN_POSITIONS", "is_named", "named_positions", "position_groups", "for_named_positions",
           "by_named_positions", "resolved_site_groups", "by_resolved_sites"]

BUILTIN_POSITIONS = ("end", "first_diff", "last_diff")


def is_named(positions: Sequence[object] | None) -> bool:
    """Whether ``positions`` names positions (strings) rather than indices; mixing is an error."""
    if positions is None:
        return False
    return Grid(positions=tuple(positions)).named  # type: ignore[arg-type]


def named_positions(prompts: PromptSet, i: int) -> dict[str, int]:
    """Every named position of prompt ``i`` and its token index."""
    clean, corrupted = prompts.clean[i], prompts.corrupted[i]
    diff = (clean != corrupted).nonzero().flatten().tolist()
    out = {"end": clean.numel() - 1}
    if diff:
        out["first_diff"], out["last_diff"] = diff[0], diff[-1]
    out.update({str(k): int(v) for k, v in (prompts.attributes[i].get("positions") or {}).items()})
    return out


def _groups(prompts: PromptSet, names: Sequence[str]) -> dict[tuple[int, ...], list[int]]:
    """Prompt indices by (length, index of each named position)."""
    if len(set(names)) != len(names):
        raise SiteError(f"positions={list(names)} names a position twice.")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(prompts)):
        have = named_positions(prompts, i)
        missing = [r for r in names if r not in have]
        if missing:
            raise PromptError(
                f"Prompt {i} has no position named {missing[0]!r}; it has {sorted(have)}. Built-in names: "
                f"{', '.join(BUILTIN_POSITIONS)}; builders add others (ioi: IO, S1, S1+1, S2; factual: subject_first, "
                f"subject_last), or set attributes[i]['positions'] = {{name: index}}."
            )
        groups.setdefault((prompts.clean[i].numel(), *(have[r] for r in names)), []).append(i)
    return groups


def position_groups(prompts: PromptSet, names: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt indices, token index of each named position) for each group of prompts that share
    their length and named positions."""
    return [(idx, list(key[1:])) for key, idx in _groups(prompts, [str(r) for r in names]).items()]


def for_named_positions(corruption: "str | Corruption", model: "Model", prompts: PromptSet) -> Corruption:
    """The corruption to run on the groups: one that does not depend on which prompts share
    a batch. Gaussian noise keeps the sigma of the whole set; resample and mean ablation draw on
    the other prompts of the set, which the groups would change, and are refused."""
    corr = parse_corruption(corruption)
    if isinstance(corr, GaussianNoise):
        return corr.fixed(model, prompts)
    if corr.kind in (CorruptionKind.RESAMPLE, CorruptionKind.MEAN):
        raise CorruptionError(
            f"Named positions split the prompts by layout, and corruption {corr.name!r} draws on the other "
            f"prompts of the set; use 'str', 'gaussian' or 'zero', or integer positions on prompts of one layout."
        )
    return corr


GroupRun = Callable[[PromptSet, Grid, Corruption, "UnitStore | None"], PatchResult]
"""``(prompts of one group, the grid with that group's position indices, the corruption, the
group's unit store) -> a position-resolved result``."""


def by_named_positions(run: GroupRun, model: "Model", prompts: PromptSet, grid: Grid,
                       corruption: "str | Corruption", store: UnitStore | None = None) -> PatchResult:
    """Run ``run`` (a sweep or an attribution) on each group of prompts whose named positions
    share token indices, and merge the results in prompt order, the position axis labelled by
    the names; a ``store`` gets one sub-store per group, so each resumes on its own."""
    if grid.per_position is False:
        raise SiteError("Named positions need the position axis; drop per_position=False.")
    corr = for_named_positions(corruption, model, prompts)
    names = [str(r) for r in grid.positions or ()]
    parts = []
    for number, (idx, where) in enumerate(position_groups(prompts, names)):
        uniq = sorted(set(where))
        sub_store = None if store is None else UnitStore(store.root / f"group{number}")
        res = run(prompts.subset(idx), grid.replace(positions=tuple(uniq), per_position=True), corr, sub_store)
        parts.append((idx, [uniq.index(p) for p in where], res))
    first = parts[0][2]
    axis = 1 + first.dims.index("pos")  # raw tensors lead with the prompt dim
    n = len(prompts)
    raw = {m: torch.empty(n, *first.shape[: axis - 1], len(names), *first.shape[axis:], dtype=r.dtype)
           for m, r in first.raw.items()}
    clean = {m: torch.empty(n) for m in first.raw}
    corrupted = {m: torch.empty(n) for m in first.raw}
    for idx, cols, res in parts:
        ix = torch.tensor(idx)
        for m in res.raw:
            raw[m][ix] = res.raw[m].index_select(axis, torch.tensor(cols))
            clean[m][ix], corrupted[m][ix] = res.clean[m], res.corrupted[m]
    info = _merged_info(first.info.replace(grid={**first.info.grid, "positions": names}),
                        [(idx, r) for idx, _, r in parts], prompts)
    merged = PatchResult(dims=first.dims, coords={**first.coords, "pos": names}, raw=raw, clean=clean,
                         corrupted=corrupted, info=info)
    # check() findings are recomputed on the whole set; the technique's own ones are kept once
    merged.findings = check(merged) + technique_findings([f for _, _, r in parts for f in r.findings])
    return merged


def _merged_info(info: ResultInfo, parts: list[tuple[list[int], PatchResult]], prompts: PromptSet) -> ResultInfo:
    """``info`` of the first group's result, made the whole set's: provenance, attributes,
    number of groups, and the groups' diagnostics put back in prompt order."""
    n = len(prompts)
    correct: list[bool] | None = [False] * n
    for idx, res in parts:
        cc = res.info.diagnostics.clean_correct
        if cc is None or correct is None:
            correct = None
        else:
            for i, c in zip(idx, cc):
                correct[i] = c
    nulls = [r.info.diagnostics.null_patch_max_abs for _, r in parts if r.info.diagnostics.null_patch_max_abs is not None]
    return info.replace(
        provenance=dataclasses.replace(info.provenance, prompts=prompts.describe()),
        prompt_attributes=tuple(dict(a) for a in prompts.attributes),
        role_groups=len(parts),
        diagnostics=Diagnostics(clean_correct=tuple(correct) if correct is not None else None,
                                null_patch_max_abs=max(nulls) if nulls else None),
    )


def resolved_site_groups(prompts: PromptSet, sites: Sequence[Site]) -> list[tuple[list[int], list[Site]]]:
    """(prompt indices, the sites at token indices) for each group of prompts where the sites'
    relative positions (names, negative indices) fall at the same indices."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(prompts)):
        T = prompts.clean[i].numel()
        have = named_positions(prompts, i)
        resolved = []
        for s in sites:
            if not s.relative:
                resolved.append(s)
                continue
            if isinstance(s.pos, int):
                if T + s.pos < 0:
                    raise SiteError(f"{s}: position {s.pos} is before the start of prompt {i} ({T} tokens).")
                resolved.append(s.at(T + s.pos))
            elif s.pos in have:
                resolved.append(s.at(have[s.pos]))
            else:
                raise PromptError(f"{s}: prompt {i} has no position named {s.pos!r}; it has {sorted(have)}. Builders "
                                  f"and prompt files name positions (ioi: IO, S1, S1+1, S2), or use an index.")
        groups.setdefault(tuple(resolved), []).append(i)
    return [(idx, list(key)) for key, idx in groups.items()]


def by_resolved_sites(run: Callable[[PromptSet, list[Site], Corruption], PatchResult], model: "Model",
                      prompts: PromptSet, sites: Sequence[Site], corruption: "str | Corruption") -> PatchResult:
    """Run a single patch (``run(prompts of one group, its resolved sites, corruption)``) on each
    group of :func:`resolved_site_groups` and merge the per-prompt values in prompt order."""
    corr = for_named_positions(corruption, model, prompts)
    parts = [(idx, run(prompts.subset(idx), resolved, corr)) for idx, resolved in resolved_site_groups(prompts, sites)]
    first = parts[0][1]
    n = len(prompts)
    raw = {m: torch.empty(n, *r.shape[1:], dtype=r.dtype) for m, r in first.raw.items()}
    clean = {m: torch.empty(n) for m in first.raw}
    corrupted = {m: torch.empty(n) for m in first.raw}
    for idx, res in parts:
        ix = torch.tensor(idx)
        for m in res.raw:
            raw[m][ix], clean[m][ix], corrupted[m][ix] = res.raw[m], res.clean[m], res.corrupted[m]
    info = _merged_info(first.info, parts, prompts)
    merged = PatchResult(dims=first.dims, coords=first.coords, raw=raw, clean=clean, corrupted=corrupted, info=info)
    merged.findings = check(merged) + technique_findings([f for _, r in parts for f in r.findings])
    return merged
