"""Directions from data, and the interpretability-illusion check for subspace patches.

**Directions.** :func:`diff_of_means`, :func:`probe_direction` and :func:`pca_directions` read a
site's vectors on the clean and corrupted prompts (at one position, by index or by name such as
``"S2"``) and return a :class:`~actpatch.subspace.Subspace` whose provenance says how it was
found.

**The check** (Makelov, Lange & Nanda 2023). A subspace patch can move the output through a
*dormant* direction: patching along ``u = u_row + u_null`` takes its coefficient from the part of
the activation that varies between clean and corrupted runs, which may lie in the null space of
the weights that read the site (``u_null``: causally disconnected), and writes it along ``u_row``
too, a direction that never varies but is read. The patch then shows an effect the model does
not compute. :func:`subspace_check` splits the basis into its parts in the row space and the null
space of the reading weights (the MLP's output projection for ``mlp_post``, a head's slice of the
output projection for ``z`` of one head), measures how much clean and corrupted activations
differ along each part, patches along each part alone and along the whole component, and flags

* ``subspace_illusion``: the effect is not carried by the part the model reads (patching the
  row-space part alone does at most half of it) while the activations vary mostly along the
  disconnected part;
* ``subspace_exceeds_component``: the subspace patch does far more than patching the whole
  component (Makelov et al.'s red flag); ``subspace_larger_than_component`` (info) when it
  merely does more.

For residual-stream sites (and q / k / v) no single reader exists: every later component reads
the residual stream, and q / k / v are read through the softmax. The check then says so and
reports the variation along the basis and the full-component comparison only.

Every check ends in a :class:`~actpatch.subspace.SubspaceVerdict`, worst first: ``illusion`` (one
of the two warnings above), ``unsplit`` (no single reader), ``dormant_pathway_risk`` (half or more
of what the patch moves lies in the reader's null space: the illusion's precondition, flagged
even when the effect is small, unless the read part patched alone reproduces the effect), ``no_effect``, ``partial`` (the subspace carries less than half of
the component's effect), ``exceeds_component`` (more than 1.25x of it) and ``faithful``. "Not an illusion" alone is never reported as a pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SubspaceError
from ..findings import Finding, Level
from ..experiment.core import Experiment
from ..memory import inference_plan
from ..prompts.promptset import PromptSet
from ..sites import Site, SiteKind
from ..subspace import Subspace, SubspaceCheck, SubspaceLike, SubspaceVerdict, as_subspace, width
from ..types import DEFAULT_DIRECTION, Direction, parse_direction
from .exact import execute, patch_plan
from .positions import named_positions

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model

__all__ = ["activations", "diff_of_means", "probe_direction", "pca_directions", "SubspaceCheck", "subspace_check"]


def activations(model: "Model", prompts: PromptSet, site: Site, position: int | str | None = None, *,
                memory_budget: "int | str | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, corrupted)`` vectors (N, d) at ``site``, one per prompt, at ``site.pos`` or at
    ``position`` (an index, or a named position such as ``"S2"`` or ``"end"``, per prompt).
    ``memory_budget``: the runs' activations (bytes or ``"2GiB"``), prompts a few at a time
    when they do not fit at once (:mod:`actpatch.memory`); the vectors do not change."""
    if site.index is not None:
        raise SubspaceError(f"{site}: a single index is not a vector; drop index=.")
    if site.kind.layout[2:3] in (("head",), ("kv_head",)) and site.head is None:
        raise SubspaceError(f"{site}: per-head kinds need a head, e.g. Site({site.kind.value!r}, {site.layer}, head=0).")
    if (site.pos is None) == (position is None):
        raise SubspaceError(f"{site}: give the position either as Site(..., pos=i) or as position= (an index "
                            f"or a name such as 'S2'), not both or neither.")
    exp = _experiment(model, prompts, "finding a direction")
    budget = inference_plan("Finding a direction", model, prompts, [site.full()], memory_budget)
    n = len(prompts)
    clean = torch.empty(n, width(model, site.kind))
    corrupted = torch.empty_like(clean)
    sel = Site(site.kind, site.layer, head=site.head).selector()
    for runs, c_acts, x_acts in exp.paired_activations(site, budget.rows):
        for acts, out in ((c_acts, clean), (x_acts, corrupted)):
            sliced = acts[sel]  # (B, T, d)
            for row, i in enumerate(runs.group.indices.tolist()):
                p = site.pos if position is None else (
                    named_positions(prompts, i)[position] if isinstance(position, str) else int(position))
                out[i] = sliced[row, p].float().cpu()
    return clean, corrupted


def _experiment(model: "Model", prompts: PromptSet, what: str) -> Experiment:
    """The paired runs directions are read from (clean and corrupted prompts), with the
    core's input checks (a PromptSet, prompts within the context window)."""
    return Experiment.setup(model, prompts, direction=Direction.DENOISE, corruption="str", metric="logit_diff",
                            seed=0, technique=what, continuations=True)


def _found_on(model: "Model", prompts: PromptSet) -> dict[str, Any]:
    """What a found direction's provenance records about where it was found."""
    return {"model": model.name, "weight_hash": model.weight_hash, "n_prompts": len(prompts)}


def _where(site: Site, position: int | str | None) -> str:
    return str(site) if position is None else f"{site}@{position}"


def diff_of_means(model: "Model", prompts: PromptSet, site: Site, *, position: int | str | None = None,
                  memory_budget: "int | str | None" = None) -> Subspace:
    """The unit vector along mean(clean) - mean(corrupted) at the site (k = 1). ``memory_budget``:
    as in :func:`activations`."""
    clean, corrupted = activations(model, prompts, site, position, memory_budget=memory_budget)
    d = clean.mean(0) - corrupted.mean(0)
    if d.norm() < 1e-12:
        raise SubspaceError(f"{_where(site, position)}: clean and corrupted activations have equal means; "
                            f"there is no difference-of-means direction here.")
    return Subspace.of(d / d.norm(), method="diff_of_means", site=_where(site, position), **_found_on(model, prompts),
                       mean_gap=float(d.norm()))


def probe_direction(model: "Model", prompts: PromptSet, site: Site, *, position: int | str | None = None,
                    l2: float = 1e-3, steps: int = 200, memory_budget: "int | str | None" = None) -> Subspace:
    """The weight direction of a logistic-regression probe telling clean (1) from corrupted (0)
    vectors at the site (L2-regularised, features standardised, fitted with L-BFGS); its
    training accuracy is in the provenance. ``memory_budget``: as in :func:`activations`."""
    clean, corrupted = activations(model, prompts, site, position, memory_budget=memory_budget)
    x = torch.cat([clean, corrupted]).double()
    y = torch.cat([torch.ones(len(clean)), torch.zeros(len(corrupted))]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    direction = (w.detach() / sd).float()  # back to the activations' coordinates
    if direction.norm() < 1e-12:
        raise SubspaceError(f"{_where(site, position)}: the probe found no direction (the two sets are identical).")
    acc = float((((z @ w + b) > 0).double() == y).double().mean())
    return Subspace.of(direction / direction.norm(), method="probe", site=_where(site, position),
                       **_found_on(model, prompts), train_accuracy=acc)


def pca_directions(model: "Model", prompts: PromptSet, site: Site, k: int = 1, *,
                   position: int | str | None = None, memory_budget: "int | str | None" = None) -> Subspace:
    """The top ``k`` principal directions of the differences clean - corrupted (uncentred, so
    the first follows their mean when it dominates); the share of the differences' energy they
    hold is in the provenance. ``memory_budget``: as in :func:`activations`."""
    clean, corrupted = activations(model, prompts, site, position, memory_budget=memory_budget)
    diffs = clean - corrupted
    if k < 1 or k > min(diffs.shape):
        raise SubspaceError(f"k={k}: ask for 1..{min(diffs.shape)} directions (prompts x width limits it).")
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    if s[k - 1] <= 1e-8 * max(float(s[0]), 1e-30):
        raise SubspaceError(f"{_where(site, position)}: the differences span fewer than {k} directions.")
    energy = float((s[:k] ** 2).sum() / (s**2).sum())
    return Subspace.of(vh[:k], method="pca", site=_where(site, position), **_found_on(model, prompts), energy=energy)


# -- the illusion check ---------------------------------------------------------------------


def _row_basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the row space of M (out, in), from its SVD."""
    _, s, vh = torch.linalg.svd(M.float().cpu(), full_matrices=False)
    keep = s > s.max() * max(M.shape) * torch.finfo(torch.float32).eps
    return vh[keep]


def _part(U: torch.Tensor, P: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis of the projections of U's rows by P, or None when they vanish."""
    V = U @ P
    u, s, vh = torch.linalg.svd(V, full_matrices=False)
    keep = s > 1e-4
    return vh[keep] if keep.any() else None


def _variation(model: "Model", prompts: PromptSet, site: Site, parts: dict[str, torch.Tensor | None],
               null: torch.Tensor | None = None) -> tuple[dict[str, float], float | None]:
    """Mean norm, over prompts and patched positions, of the clean - corrupted difference
    projected on each part of the basis; and, given the projector on the reader's null space,
    the share (squared norm) of what the patch moves (the difference projected on the basis)
    that lies in that null space."""
    sel = Site(site.kind, site.layer, head=site.head, pos=site.pos).selector()
    norms: dict[str, list[torch.Tensor]] = {k: [] for k, v in parts.items() if v is not None}
    U = parts["subspace"]
    moved = unread = 0.0
    for _, clean, corrupted in _experiment(model, prompts, "the subspace check").paired_activations(site):
        diff = clean[sel].float().cpu() - corrupted[sel].float().cpu()
        for name, B in parts.items():
            if B is not None:
                norms[name].append((diff @ B.T).norm(dim=-1).flatten())
        if null is not None and U is not None:
            w = (diff @ U.T) @ U  # what the patch writes: the difference along the basis
            moved += float(w.double().pow(2).sum())
            unread += float((w @ null).double().pow(2).sum())
    share = unread / moved if null is not None and moved > 0 else None
    return {name: float(torch.cat(v).mean()) for name, v in norms.items()}, share


def _verdict(reader: str | None, flagged: bool, effect_share: float | None, null_share: float | None,
             e_sub: float, e_row: float | None, e_full: float, min_effect: float) -> SubspaceVerdict:
    """The named outcome (see :class:`~actpatch.subspace.SubspaceVerdict`), worst first. Most of
    the moved variation in the null space is a risk unless the read part alone, patched by
    itself, reproduces a real effect (within a quarter): then the unread variation is shown not
    to be what moves the output."""
    if flagged:
        return SubspaceVerdict.ILLUSION
    if reader is None:
        return SubspaceVerdict.UNSPLIT
    read_part_does_it = abs(e_sub) >= min_effect and e_row is not None and abs(e_row - e_sub) <= 0.25 * abs(e_sub)
    if null_share is not None and null_share >= 0.5 and not read_part_does_it:
        return SubspaceVerdict.DORMANT_PATHWAY_RISK
    if abs(e_sub) < min_effect and abs(e_full) < min_effect:
        return SubspaceVerdict.NO_EFFECT
    if effect_share is None or effect_share < 0.5:
        return SubspaceVerdict.PARTIAL
    if effect_share > 1.25:
        return SubspaceVerdict.EXCEEDS_COMPONENT
    return SubspaceVerdict.FAITHFUL


def _findings(site: Site, reader: str | None, row_share: float | None, variation: dict[str, float],
              effects: dict[str, float | None], min_effect: float) -> list[Finding]:
    """The check's verdicts from its numbers (effects as changes from the base run, in units of
    the clean - corrupted gap); ``reader`` is None when no single set of weights reads the site."""
    found: list[Finding] = []
    e_sub, e_row, e_full = effects["subspace"] or 0.0, effects.get("row"), effects["component"] or 0.0
    gap = "in units of the clean - corrupted gap"
    if reader is None:
        why = ("it is read through the softmax" if site.kind in (SiteKind.Q, SiteKind.K, SiteKind.V)
               else "every later component reads the residual stream")
        found.append(Finding(
            Level.INFO, "subspace_check_limited",
            f"{site}: no single set of weights reads this {site.kind.value} ({why}), "
            f"so the check cannot split the basis into read and unread parts; it reports the variation along the "
            f"basis ({variation['subspace']:.3g}) and the subspace vs full-component effects "
            f"({e_sub:.3f} vs {e_full:.3f}, {gap}).",
            "Check the same direction at mlp_post or a head's z, where the reading weights are known."))
    else:
        v_row, v_null = variation.get("row", 0.0), variation.get("null", 0.0)
        if abs(e_sub) >= min_effect and (e_row is None or abs(e_row) <= 0.5 * abs(e_sub)) and v_null >= 2 * v_row:
            found.append(Finding(
                Level.WARNING, "subspace_illusion",
                f"{site}: patching along the basis moves the metric by {e_sub:.3f} ({gap}), but along its part the "
                f"{reader} reads (share {row_share:.2f} of the basis) only by "
                f"{0.0 if e_row is None else e_row:.3f}; clean and corrupted activations differ by {v_null:.3g} "
                f"along the unread (null-space) part and by {v_row:.3g} along the read part. The effect comes "
                f"from writing a direction that does not vary (a dormant pathway), not from the feature the "
                f"model uses (Makelov, Lange & Nanda 2023).",
                "Do not read this direction as the model's representation; patch its row-space part, or find "
                "the direction where the reading weights are (e.g. DAS on the reader's output)."))
    if abs(e_sub) >= min_effect and abs(e_full) < 0.25 * abs(e_sub):
        found.append(Finding(
            Level.WARNING, "subspace_exceeds_component",
            f"{site}: the subspace patch moves the metric by {e_sub:.3f} but patching the whole component only "
            f"by {e_full:.3f} ({gap}): a subspace cannot carry more than its component unless the patch creates "
            f"a signal the model does not have.",
            "Treat the subspace effect as suspect (interpretability illusion); compare with the full component."))
    if not any(f.level is Level.WARNING for f in found) and abs(e_sub) >= min_effect and abs(e_sub) > 1.25 * abs(e_full) + 0.05:
        found.append(Finding(
            Level.INFO, "subspace_larger_than_component",
            f"{site}: the subspace patch moves the metric more than the whole component ({e_sub:.3f} vs {e_full:.3f}, "
            f"{gap}): the rest of the component pushes the other way, or the patch writes a signal the model does "
            f"not carry (a learned basis can find such directions).",
            "Compare the subspace's effect on held-out prompts and at mlp_post / z, where the check can split it."))
    return found


def _verdict_finding(site: Site, verdict: SubspaceVerdict, reader: str | None, effect_share: float | None,
                     null_share: float | None, values: dict[str, float | None]) -> Finding | None:
    """The finding that states the verdict in words, on the result's scale (illusions already
    have theirs, and a site without a reader has ``subspace_check_limited``)."""
    share = "n/a" if effect_share is None else f"{effect_share:.0%}"
    null = "n/a" if null_share is None else f"{null_share:.0%}"
    nums = (f"value {values['subspace']:.3f} along the subspace, {values['component']:.3f} for the whole component "
            f"(the result's scale); it carries {share} of the component's effect, and {null} of what it moves lies "
            f"in the null space of the {reader}")
    if verdict is SubspaceVerdict.DORMANT_PATHWAY_RISK:
        return Finding(
            Level.WARNING, "subspace_dormant_risk",
            f"{site}: most of what this patch moves is invisible to the {reader}: {nums}. No illusion shows here, "
            f"but this is its precondition (Makelov, Lange & Nanda 2023): a basis fitted to these activations "
            f"(DAS, a probe) can produce an effect the model does not compute.",
            "Read any effect along this subspace as suspect; prefer bases inside the reader's row space.")
    if verdict is SubspaceVerdict.PARTIAL:
        return Finding(
            Level.INFO, "subspace_partial",
            f"{site}: the subspace carries only part of the component's effect: {nums}.",
            "The component does more than this subspace: look for the rest before calling it the mechanism.")
    if verdict is SubspaceVerdict.NO_EFFECT:
        return Finding(Level.INFO, "subspace_no_effect", f"{site}: neither the subspace nor the component moves "
                       f"the metric: {nums}.")
    if verdict is SubspaceVerdict.FAITHFUL:
        return Finding(Level.INFO, "subspace_faithful", f"{site}: the subspace carries the component's effect "
                       f"through what the {reader} reads (its read part alone does what the whole subspace does "
                       f"when the unread share is large): {nums}.")
    return None


def subspace_check(model: "Model", prompts: PromptSet, site: Site, subspace: SubspaceLike, *,
                   direction: str | Direction = DEFAULT_DIRECTION, min_effect: float = 0.1, known: float | None = None,
                   **patch_options: Any) -> SubspaceCheck:
    """Run the interpretability-illusion check for patching ``site`` along ``subspace`` (see the
    module docstring); ``patch_options`` (corruption, metric, seed) go to every patch. ``known``:
    the normalised value of the subspace patch itself when the caller already ran it."""
    sub = as_subspace(subspace)
    if sub is None:
        raise SubspaceError("subspace_check() needs a basis: a (k, d) tensor, {layer: basis} or an ap.subspaces.Subspace.")
    base_value = parse_direction(direction).no_effect
    sub.check(model, site)
    U = sub.basis_for(site.layer)
    M = model.adapter.reader_map(site)
    parts: dict[str, torch.Tensor | None] = {"subspace": U}
    row_share = None
    reader = None
    if M is not None:
        R = _row_basis(M)
        P_row = R.T @ R
        parts["row"] = _part(U, P_row)
        parts["null"] = _part(U, torch.eye(U.shape[1]) - P_row)
        row_share = float((U @ P_row).pow(2).sum() / U.shape[0])
        reader = "MLP output projection" if site.kind is SiteKind.MLP_POST else f"head {site.head}'s output projection"

    variation, null_share = _variation(model, prompts, site, parts, None if M is None else torch.eye(U.shape[1]) - P_row)

    def effect(basis: torch.Tensor | None) -> float | None:
        if basis is None:
            return None
        plan = patch_plan([site], None if basis is _WHOLE else Subspace.of(basis))
        res = execute(model, prompts, plan, direction=direction, progress=False, **patch_options)
        return float(res.values) - base_value

    effects = {name: (known - base_value if name == "subspace" and known is not None else effect(B))
               for name, B in parts.items()}
    effects["component"] = effect(_WHOLE)

    found = _findings(site, reader, row_share, variation, effects, min_effect)
    e_sub, e_full = effects["subspace"] or 0.0, effects["component"] or 0.0
    effect_share = e_sub / e_full if abs(e_full) >= min_effect else None
    flagged = any(f.code in ("subspace_illusion", "subspace_exceeds_component") for f in found)
    verdict = _verdict(reader, flagged, effect_share, null_share, e_sub, effects.get("row"), e_full, min_effect)
    values = {k: None if v is None else v + base_value for k, v in effects.items()}
    said = _verdict_finding(site, verdict, reader, effect_share, null_share, values)
    return SubspaceCheck(site=site, direction=parse_direction(direction).value, reader=reader, row_share=row_share,
                         variation=variation, effects=effects, findings=tuple(found + ([said] if said else [])),
                         verdict=verdict, effect_share=effect_share, null_share=null_share, min_effect=min_effect)


_WHOLE = torch.empty(0)
"""Sentinel: patch the whole component."""
