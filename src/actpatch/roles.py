"""Named positions: a position axis by role ("S1", "S2", "end", ...) instead of by index, so that
position-resolved sweeps run over prompts of different lengths and layouts (e.g. every IOI
template, ABBA and BABA together).

A role names one token position per prompt. Every prompt pair has the built-in roles

* ``end``: the last position (where the answer is predicted);
* ``first_diff`` / ``last_diff``: the first / last position where clean and corrupted differ
  (for a subject swap, ``last_diff`` is the subject's last token, ROME's key position);

and builders add their own in the prompt attributes, ``attributes[i]["positions"]``: the IOI
builder records ``IO``, ``S1``, ``S1+1`` and ``S2``, the factual builder ``subject_first`` and
``subject_last``. Prompts are grouped by where their roles
fall; each group is swept with ordinary integer positions and the groups are put back together
in prompt order, with the position axis labelled by the role names. Corruptions must not depend
on which prompts share a batch: ``str`` and ``zero`` do not, Gaussian noise keeps the sigma of
the whole set, and ``resample`` / ``mean`` (which draw on the other prompts) are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .checkpoint import UnitStore
from .checks import check
from .corruption import Corruption, GaussianNoise, parse_corruption
from .errors import CorruptionError, PromptError, SiteError
from .prompts.promptset import PromptSet
from .results import PatchResult

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["BUILTIN_ROLES", "is_named", "role_positions", "role_groups", "by_role", "for_roles", "run_named"]

BUILTIN_ROLES = ("end", "first_diff", "last_diff")


def is_named(positions: Sequence[Any] | None) -> bool:
    """Whether ``positions`` names roles (strings) rather than indices; mixing is an error."""
    if positions is None or isinstance(positions, (str, bytes)):
        if isinstance(positions, (str, bytes)):
            raise SiteError(f"positions={positions!r}: give a list, e.g. [{positions!r}].")
        return False
    kinds = {isinstance(p, str) for p in positions}
    if kinds == {True, False}:
        raise SiteError(f"positions={list(positions)}: use either indices or role names, not both.")
    return kinds == {True}


def role_positions(prompts: PromptSet, i: int) -> dict[str, int]:
    """Every role of prompt ``i`` and its token position."""
    clean, corrupted = prompts.clean[i], prompts.corrupted[i]
    diff = (clean != corrupted).nonzero().flatten().tolist()
    out = {"end": clean.numel() - 1}
    if diff:
        out["first_diff"], out["last_diff"] = diff[0], diff[-1]
    out.update({str(k): int(v) for k, v in (prompts.attributes[i].get("positions") or {}).items()})
    return out


def _groups(prompts: PromptSet, roles: Sequence[str]) -> dict[tuple[int, ...], list[int]]:
    """Prompt indices by (length, position of each role)."""
    if len(set(roles)) != len(roles):
        raise SiteError(f"positions={list(roles)} names a role twice.")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(prompts)):
        have = role_positions(prompts, i)
        missing = [r for r in roles if r not in have]
        if missing:
            raise PromptError(
                f"Prompt {i} has no position named {missing[0]!r}; it has {sorted(have)}. Built-in roles: "
                f"{', '.join(BUILTIN_ROLES)}; builders add others (ioi: IO, S1, S1+1, S2; factual: subject_first, subject_last), or set "
                f"attributes[i]['positions'] = {{name: index}}."
            )
        groups.setdefault((prompts.clean[i].numel(), *(have[r] for r in roles)), []).append(i)
    return groups


def role_groups(prompts: PromptSet, roles: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt indices, token position of each role) for each group of prompts that share
    their length and role positions."""
    return [(idx, list(key[1:])) for key, idx in _groups(prompts, [str(r) for r in roles]).items()]


def for_roles(corruption: "str | Corruption", model: "Model", prompts: PromptSet) -> Corruption:
    """The corruption to run on the role groups: one that does not depend on which prompts share
    a batch. Gaussian noise keeps the sigma of the whole set; resample and mean ablation draw on
    the other prompts of the set, which the groups would change, and are refused."""
    corr = parse_corruption(corruption)
    if isinstance(corr, GaussianNoise):
        return corr.fixed(model, prompts)
    if corr.name in ("resample", "mean"):
        raise CorruptionError(
            f"Named positions split the prompts by layout, and corruption {corr.name!r} draws on the other "
            f"prompts of the set; use 'str', 'gaussian' or 'zero', or integer positions on prompts of one layout."
        )
    return corr


def run_named(fn: Callable[..., PatchResult], model: "Model", prompts: PromptSet, positions: Sequence[str], *,
              per_position: bool | None, corruption: "str | Corruption", store: UnitStore | None = None,
              **kw: Any) -> PatchResult:
    """``fn(model, sub_prompts, positions=[indices], per_position=True, corruption=..., **kw)``
    (:func:`actpatch.sweep` or :func:`actpatch.attribute`) on each role group, merged by
    :func:`by_role`; a ``store`` gets one sub-store per group, so each resumes on its own."""
    if per_position is False:
        raise SiteError("Named positions need the position axis; drop per_position=False.")
    corr = for_roles(corruption, model, prompts)

    def run(sub: PromptSet, pos: list[int], number: int) -> PatchResult:
        extra = {} if store is None else {"store": UnitStore(store.root / f"group{number}")}
        return fn(model, sub, positions=pos, per_position=True, corruption=corr, **extra, **kw)

    return by_role(run, prompts, positions)


def by_role(run: Callable[[PromptSet, list[int], int], PatchResult], prompts: PromptSet, roles: Sequence[str]) -> PatchResult:
    """Run ``run(sub_prompts, positions, group_number)`` (a position-resolved sweep) on each group
    of prompts whose roles share positions, and merge the results into one whose ``pos`` axis is
    ``roles``."""
    roles = [str(r) for r in roles]
    parts = []
    for number, (idx, where) in enumerate(role_groups(prompts, roles)):
        uniq = sorted(set(where))
        res = run(prompts.subset(idx), uniq, number)
        if "pos" not in res.dims:
            raise SiteError("Named positions need a position axis (per_position=True).")
        parts.append((idx, [uniq.index(p) for p in where], res))
    first = parts[0][2]
    axis = 1 + first.dims.index("pos")  # raw tensors lead with the prompt dim
    n = len(prompts)
    raw = {m: torch.empty(n, *first.shape[: axis - 1], len(roles), *first.shape[axis:]) for m in first.raw}
    clean = {m: torch.empty(n) for m in first.raw}
    corrupted = {m: torch.empty(n) for m in first.raw}
    for idx, cols, res in parts:
        ix = torch.tensor(idx)
        for m in res.raw:
            raw[m][ix] = res.raw[m].index_select(axis, torch.tensor(cols))
            clean[m][ix], corrupted[m][ix] = res.clean[m], res.corrupted[m]
    meta = dict(first.meta)
    meta["plan"] = {**meta.get("plan", {}), "positions": roles}
    meta["prompts"] = prompts.describe()
    meta["prompt_attributes"] = [dict(a) for a in prompts.attributes]
    meta["role_groups"] = len(parts)
    if "clean_correct" in meta:  # per prompt: back in prompt order
        correct = [False] * n
        for idx, _, r in parts:
            for i, c in zip(idx, r.meta.get("clean_correct", [])):
                correct[i] = c
        meta["clean_correct"] = correct
    errs = [r.meta["null_patch_max_abs"] for _, _, r in parts if r.meta.get("null_patch_max_abs") is not None]
    if errs:
        meta["null_patch_max_abs"] = max(errs)
    merged = PatchResult(dims=first.dims, coords={**first.coords, "pos": roles}, raw=raw, clean=clean,
                         corrupted=corrupted, meta=meta)
    # check() findings are recomputed on the whole set; the method's own ones (AtP) are kept once
    extra = {(f.code, f.message): f for _, _, r in parts for f in r.findings if f.code.startswith("attribution_")}
    merged.findings = check(merged) + list(extra.values())
    return merged
