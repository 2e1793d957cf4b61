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
from ..prompts.promptset import PromptSet, common_prefix, common_suffix
from ..results import PatchResult, ResultInfo
from ..sites import Site
from ..types import Diagnostics

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["BUILTIN_POSITIONS", "is_named", "named_positions", "position_groups", "for_named_positions",
           "by_named_positions", "resolved_site_groups", "by_resolved_sites", "aligned_subset"]

BUILTIN_POSITIONS = ("end", "first_diff", "last_diff")


def is_named(positions: Sequence[object] | None) -> bool:
    """Whether ``positions`` names positions (strings) rather than indices; mixing is an error."""
    if positions is None:
        return False
    return Grid(positions=tuple(positions)).named  # type: ignore[arg-type]


def named_positions(prompts: PromptSet, i: int, side: str = "clean") -> dict[str, int]:
    """Every named position of prompt ``i`` and its token index in the ``side`` prompt
    (``"clean"`` or ``"corrupted"``; the same when the pair is aligned by construction).

    ``first_diff`` / ``last_diff`` are the first / last token of the span where the two prompts
    differ, in each prompt's own indices (the span between their common prefix and their common
    suffix); absent on a side whose span is empty. Builder and prompt-file names come from
    ``attributes[i]["positions"]``, on the corrupted side ``attributes[i]["corrupted_positions"]``
    (for pairs of one length, ``positions`` serves both when that is absent)."""
    clean, corrupted = prompts.clean[i], prompts.corrupted[i]
    own = clean if side == "clean" else corrupted
    T = own.numel()
    out = {"end": T - 1}
    prefix = common_prefix(clean, corrupted)
    if clean.numel() != corrupted.numel() or prefix < T:
        last = T - 1 - common_suffix(clean, corrupted)
        if prefix <= last:
            out["first_diff"], out["last_diff"] = prefix, last
    attrs = prompts.attributes[i]
    named = attrs.get("positions") or {}
    if side == "corrupted":
        same_length = clean.numel() == corrupted.numel()
        named = attrs.get("corrupted_positions") or (named if same_length else {})
    out.update({str(k): int(v) for k, v in named.items()})
    return out


def _groups(prompts: PromptSet, names: Sequence[str]) -> dict[tuple[int, ...], list[int]]:
    """Prompt indices by (lengths, index of each named position on each side)."""
    if len(set(names)) != len(names):
        raise SiteError(f"positions={list(names)} names a position twice.")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(prompts)):
        key: list[int] = [prompts.clean[i].numel(), prompts.corrupted[i].numel()]
        for side in ("clean", "corrupted"):
            have = named_positions(prompts, i, side)
            missing = [r for r in names if r not in have]
            if missing:
                raise PromptError(
                    f"Prompt {i} has no position named {missing[0]!r} in its {side} prompt; it has {sorted(have)}. "
                    f"Built-in names: {', '.join(BUILTIN_POSITIONS)}; builders add others (ioi: IO, S1, S1+1, S2; "
                    f"factual: subject_first, subject_last), or name one with prompts.with_positions(name, "
                    f"[(clean index, corrupted index), ...])."
                )
            key += [have[r] for r in names]
        groups.setdefault(tuple(key), []).append(i)
    return groups


def position_groups(prompts: PromptSet, names: Sequence[str]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt indices, token index of each named position in the clean prompts, in the
    corrupted prompts) for each group of prompts that share their lengths and named positions."""
    k = len(names)
    return [(idx, list(key[2 : 2 + k]), list(key[2 + k :]))
            for key, idx in _groups(prompts, [str(r) for r in names]).items()]


def aligned_subset(prompts: PromptSet, idx: list[int], clean_at: Sequence[int], corrupted_at: Sequence[int]) -> PromptSet:
    """``prompts.subset(idx)``, carrying in ``meta["alignment"]`` the (clean index, corrupted
    index) of each named position when the two sides' indices differ (unaligned pairs): the exact
    engines then write the source run's activation at its own index into the base run's."""
    sub = prompts.subset(idx)
    if list(clean_at) == list(corrupted_at) and sub.aligned:
        return sub
    return dataclasses.replace(sub, meta={**sub.meta, "alignment": tuple(sorted(set(zip(clean_at, corrupted_at))))})


def _passes(where: Sequence[int], other: Sequence[int]) -> list[list[int]]:
    """The named positions split into runs in which each base index reads one source index
    (on unaligned pairs two names may share a base index but not the source's: e.g. a one-token
    subject's ``first_diff`` and ``last_diff`` against a two-token one). One pass when aligned."""
    passes: list[list[int]] = []
    for j in range(len(where)):
        for group in passes:
            if all(where[o] != where[j] or other[o] == other[j] for o in group):
                group.append(j)
                break
        else:
            passes.append([j])
    return passes


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
                       corruption: "str | Corruption", store: UnitStore | None = None,
                       base_side: str = "clean") -> PatchResult:
    """Run ``run`` (a sweep or an attribution) on each group of prompts whose named positions
    share token indices, and merge the results in prompt order, the position axis labelled by
    the names; a ``store`` gets one sub-store per group, so each resumes on its own. Positions
    are indices of the ``base_side`` prompts (the patched run's); on unaligned pairs the group
    carries its alignment (:func:`aligned_subset`)."""
    if grid.per_position is False:
        raise SiteError("Named positions need the position axis; drop per_position=False.")
    corr = for_named_positions(corruption, model, prompts)
    names = [str(r) for r in grid.positions or ()]
    parts = []  # (prompt indices, name columns, their columns in the part's result, the result)
    for number, (idx, clean_at, corrupted_at) in enumerate(position_groups(prompts, names)):
        where, other = (corrupted_at, clean_at) if base_side == "corrupted" else (clean_at, corrupted_at)
        passes = _passes(where, other)
        for pnum, js in enumerate(passes):
            uniq = sorted({where[j] for j in js})
            sub_store = None if store is None else UnitStore(
                store.root / (f"group{number}" if len(passes) == 1 else f"group{number}.{pnum}"))
            sub = aligned_subset(prompts, idx, [clean_at[j] for j in js], [corrupted_at[j] for j in js])
            res = run(sub, grid.replace(positions=tuple(uniq), per_position=True), corr, sub_store)
            parts.append((idx, js, [uniq.index(where[j]) for j in js], res))
    first = parts[0][3]
    axis = 1 + first.dims.index("pos")  # raw tensors lead with the prompt dim
    n = len(prompts)
    raw = {m: torch.empty(n, *first.shape[: axis - 1], len(names), *first.shape[axis:], dtype=r.dtype)
           for m, r in first.raw.items()}
    clean = {m: torch.empty(n) for m in first.raw}
    corrupted = {m: torch.empty(n) for m in first.raw}
    for idx, js, cols, res in parts:
        ix = torch.tensor(idx)
        for m in res.raw:
            for j, col in zip(js, cols):
                raw[m].select(axis, j)[ix] = res.raw[m].select(axis, col)
            clean[m][ix], corrupted[m][ix] = res.clean[m], res.corrupted[m]
    info = _merged_info(first.info.replace(grid={**first.info.grid, "positions": names}),
                        [(idx, r) for idx, _, _, r in parts], prompts)
    merged = PatchResult(dims=first.dims, coords={**first.coords, "pos": names}, raw=raw, clean=clean,
                         corrupted=corrupted, info=info)
    # check() findings are recomputed on the whole set; the technique's own ones are kept once
    merged.findings = check(merged) + technique_findings([f for *_, r in parts for f in r.findings])
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


def _resolve_site(prompts: PromptSet, s: Site, i: int, side: str) -> int:
    ids = prompts.clean[i] if side == "clean" else prompts.corrupted[i]
    T = ids.numel()
    if isinstance(s.pos, int):
        if s.pos >= 0:
            return s.pos
        if T + s.pos < 0:
            raise SiteError(f"{s}: position {s.pos} is before the start of prompt {i} ({T} tokens).")
        return T + s.pos
    have = named_positions(prompts, i, side)
    if s.pos not in have:
        raise PromptError(f"{s}: prompt {i} has no position named {s.pos!r} in its {side} prompt; it has "
                          f"{sorted(have)}. Builders and prompt files name positions (ioi: IO, S1, S1+1, S2), "
                          f"prompts.with_positions(name, pairs) adds one, or use an index.")
    return have[s.pos]


def resolved_site_groups(prompts: PromptSet, sites: Sequence[Site],
                         base_side: str = "clean") -> list[tuple[list[int], list[Site], tuple]]:
    """(prompt indices, the sites at the ``base_side`` prompts' token indices, the (clean,
    corrupted) index pairs of relative sites) for each group of prompts where the sites'
    relative positions (names, negative indices) fall at the same indices on both sides."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(prompts)):
        resolved, pairs = [], []
        for s in sites:
            if not s.relative:
                resolved.append(s)
                continue
            c, k = _resolve_site(prompts, s, i, "clean"), _resolve_site(prompts, s, i, "corrupted")
            resolved.append(s.at(k if base_side == "corrupted" else c))
            pairs.append((c, k))
        key = (tuple(resolved), tuple(pairs), prompts.clean[i].numel(), prompts.corrupted[i].numel())
        groups.setdefault(key, []).append(i)
    return [(idx, list(key[0]), key[1]) for key, idx in groups.items()]


def by_resolved_sites(run: Callable[[PromptSet, list[Site], Corruption], PatchResult], model: "Model",
                      prompts: PromptSet, sites: Sequence[Site], corruption: "str | Corruption",
                      base_side: str = "clean") -> PatchResult:
    """Run a single patch (``run(prompts of one group, its resolved sites, corruption)``) on each
    group of :func:`resolved_site_groups` and merge the per-prompt values in prompt order."""
    corr = for_named_positions(corruption, model, prompts)
    parts = []
    for idx, resolved, pairs in resolved_site_groups(prompts, sites, base_side):
        sub = aligned_subset(prompts, idx, [c for c, _ in pairs], [k for _, k in pairs])
        parts.append((idx, run(sub, resolved, corr)))
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
