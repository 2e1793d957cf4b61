"""Attribution patching (AtP, Nanda 2023): a first-order estimate of every patch at once.

For a patch writing source activations ``a_src`` into the base run at activation ``a``::

    m(patched) ~ m(base) + sum over the patched elements of (a_src - a_base) * dm/da |base

with the gradient taken on the base run: the clean run for noising, the corrupted run for
denoising (where ``a_src - a_base = a_clean - a_corr``, the sign-flipped noising delta). Per
length group it costs one forward pass of the source run, one forward and one backward pass of
the base run, whatever the number of patches (the two forward passes also give the baselines).

The gradient is read by adding a zero tensor that requires grad at every patched activation
(``a + 0``), which leaves the forward values unchanged and keeps the paths through later layers.

Known failure cases (Kramár et al. 2024): the residual stream and the first-layer MLP (large,
non-linear changes), queries / keys of heads whose attention is saturated (``qk_fix``), and
components whose direct and indirect effects cancel (``grad_drop``, :mod:`actpatch.graddrop`);
always check with :func:`validate_attribution`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from . import graddrop
from .checks import Finding, Level, check
from .corruption import Corruption, from_description, parse_corruption
from .errors import ActpatchError, MetricError
from .graddrop import dropped_gradients, trace_blocks
from .hooks import capture, intervene
from .metrics import DIFFERENTIABLE, compute_metrics, normalise, parse_metrics
from .models.attention import actpatch_attention, recompute_pattern
from .patching import Direction, _direction, _mean_draws, _versions, execute
from .plan import Plan, plan_for
from .prompts.promptset import PromptSet
from .results import PatchResult
from .roles import for_roles, is_named, role_groups, run_named
from .sites import Site, SiteKind
from .stats import spearman

RESIDUAL_KINDS = (SiteKind.EMBED, SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.RESID_FINAL)

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["attribute", "validate_attribution", "Validation", "DIFFERENTIABLE"]



def attribute(
    model: "Model",
    prompts: PromptSet,
    target: str = "z",
    *,
    direction: str | Direction = "noise",
    corruption: str | Corruption = "str",
    metric: str | Sequence[str] = "logit_diff",
    per_position: bool | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    window: int = 1,
    seed: int = 0,
    qk_fix: bool = False,
    grad_drop: bool = False,
) -> PatchResult:
    """AtP estimates for every cell of a target, as a :class:`PatchResult` (``meta["method"]
    == "atp"``) laid out exactly like :func:`actpatch.sweep`'s, so the two can be compared.

    ``qk_fix=True`` (AtP*'s first change, Kramár et al. 2024) estimates query and key patches
    by recomputing the attention softmax exactly with the patched side, then taking the
    first-order effect of the pattern change: ``sum (A_patched - A_base) * dm/dA``. This
    removes the false negatives of saturated attention; everything downstream of the pattern is
    still linearised.

    ``grad_drop=True`` (AtP*'s second change) repeats the estimate once per layer with the
    gradient through that layer's residual contribution dropped and scores each cell by
    ``1 / (L - 1) * sum_l |estimate_l|`` (see :mod:`actpatch.graddrop`), which exposes
    components whose direct and indirect effects cancel. The score is a magnitude
    (``meta["estimate"] == "magnitude"``); it is stored as an effect in the behaviour's
    direction (noising: ``1 - score``, denoising: ``score``, normalised), so negative components
    show as positive ones. Both options together are AtP*. GradDrop costs about
    ``1 + (L - 1) / 2`` backward passes and applies to components (heads, attention / MLP outputs, neurons), not to the
    residual stream.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> est = ap.attribute(m, ps, "z", direction="noise")
        >>> est.dims, est.meta["method"]
        (('layer', 'head'), 'atp')
        >>> exact = ap.sweep(m, ps, "z", direction="noise", progress=False)  # what it estimates
    """
    if is_named(positions):
        return run_named(attribute, model, prompts, positions, per_position=per_position, corruption=corruption,  # type: ignore[arg-type]
                         target=target, direction=direction, metric=metric, layers=layers, heads=heads,
                         neurons=neurons, window=window, seed=seed, qk_fix=qk_fix, grad_drop=grad_drop)
    d = _direction(direction)
    corr = parse_corruption(corruption)
    metrics = parse_metrics(metric)
    bad = [m.value for m in metrics if m not in DIFFERENTIABLE]
    if bad:
        raise MetricError(f"Attribution needs differentiable metrics; {bad} are discrete. Use logit_diff, logprob, prob or kl.")
    if corr.activation_level and d is Direction.DENOISE:
        raise ActpatchError(f"Corruption {corr.name!r} has no corrupted run to denoise; use direction='noise'.")
    kw = dict(per_position=per_position, layers=layers, positions=positions, heads=heads, neurons=neurons, window=window)
    plan = plan_for(model, prompts, target, **kw)
    qk = qk_fix and plan.target in (SiteKind.Q, SiteKind.K)
    if qk_fix and not qk:
        raise ActpatchError(f"qk_fix applies to q and k targets, not {plan.target.value!r}.")
    if grad_drop:
        _check_grad_drop(model, plan, window)
    full = plan.full_sites()
    if qk:  # base queries and keys, and the gradient at the pattern, of every patched layer
        layers = sorted({s.layer for s in full})
        full = list(dict.fromkeys(full + [Site(k, l) for l in layers for k in ("q", "k", "pattern")]))
    corr.prepare(model, prompts)
    n, P, R = len(prompts), len(plan.patches), corr.draws
    raw = {m: torch.empty(n, P) for m in metrics}
    base_b = {m: torch.empty(n) for m in metrics}  # grad_drop: the base run's metric, per prompt
    clean_b = {m: torch.empty(n) for m in metrics}
    corr_b = {m: torch.empty(n) for m in metrics}
    with ExitStack() as stack:
        if plan.uses_attention_fn:
            stack.enter_context(actpatch_attention(model.hf))
        for g in prompts.groups():
            clean_run, corr_run = corr.clean_run(g), corr.corrupted_run(model, g, prompts, seed)
            answers, alts = g.answers.repeat_interleave(R), g.alternatives.repeat_interleave(R)
            base, src = (corr_run, clean_run) if d is Direction.DENOISE else (clean_run, corr_run)
            if corr.activation_level:  # source: transformed clean activations; "src" logits: the pairs' corrupted run
                with capture(model, full) as clean_acts:
                    model.logits(clean_run.ids, last_only=True)
                source = {s: corr.source(a) for s, a in clean_acts.items()}
                src_logits = corr_run.logits(model)
            else:
                with src.context(model), capture(model, full) as source:
                    src_logits = model.logits(src.ids, last_only=True)
            # one forward and one backward pass of the base run with a zero at every site
            zeros: dict = {}

            def tap(site: Any) -> Any:
                def fn(x: torch.Tensor) -> torch.Tensor:
                    z = torch.zeros_like(x, requires_grad=True)
                    zeros[site] = (z, x.detach())
                    return x + z

                return fn

            with ExitStack() as run:
                run.enter_context(torch.enable_grad())
                run.enter_context(base.context(model))
                boundary = run.enter_context(trace_blocks(model)) if grad_drop else []
                run.enter_context(intervene(model, {s: tap(s) for s in full}))
                logits = model.hf(input_ids=base.ids, use_cache=False, logits_to_keep=1).logits[:, -1]
                clean_logits = logits.detach() if base is clean_run else src_logits
                clean_lp = torch.log_softmax(clean_logits.float(), -1)
                values = compute_metrics(metrics, logits, answers, alts, clean_lp)
            # one backward pass per metric (GradDrop: and a partial one per dropped layer)
            est: dict = {}
            for i, m in enumerate(metrics):
                if grad_drop:
                    est[m] = _grad_drop_sum(model, plan.patches, values[m].sum(), zeros, source, boundary, qk)
                    continue
                gs = torch.autograd.grad(values[m].sum(), [zeros[s][0] for s in full],
                                         retain_graph=i < len(metrics) - 1, allow_unused=True)
                with torch.no_grad():
                    est[m] = _estimate(model, plan.patches, zeros, source, dict(zip(full, gs)), qk)  # (P, G*R)
            base_vals = {m: v.detach() for m, v in values.items()}
            other = compute_metrics(metrics, src_logits, answers, alts, clean_lp)
            for m in metrics:
                cb, kb = (base_vals[m], other[m]) if base is clean_run else (other[m], base_vals[m])
                clean_b[m][g.indices] = _mean_draws(cb, R)
                corr_b[m][g.indices] = _mean_draws(kb, R)
                if grad_drop:
                    raw[m][g.indices] = _mean_draws(graddrop.combine(est[m], model.n_layers), R).T
                    base_b[m][g.indices] = _mean_draws(base_vals[m], R)
                else:
                    raw[m][g.indices] = _mean_draws(est[m] + base_vals[m], R).T
    if grad_drop:  # magnitudes, laid out as effects in the direction clean -> corrupted (noising) or back
        for m in metrics:
            towards = torch.sign(clean_b[m].mean() - corr_b[m].mean())
            if d is Direction.NOISE:
                towards = -towards
            raw[m] = base_b[m][:, None] + towards * raw[m]
    res = PatchResult(
        dims=plan.dims, coords=plan.coords,
        raw={m.value: raw[m].reshape(n, *plan.shape) for m in metrics},
        clean={m.value: clean_b[m] for m in metrics}, corrupted={m.value: corr_b[m] for m in metrics},
        meta={"target": plan.target.value, "direction": d.value, "corruption": corr.describe(),
              "metrics": [m.value for m in metrics], "seed": seed, "method": "atp", "engine": _engine(qk, grad_drop),
              "estimate": "magnitude" if grad_drop else "signed",
              "plan": {k: (list(v) if isinstance(v, range) else v) for k, v in kw.items()},
              "model": {"name": model.name, "family": model.family, "weight_hash": model.weight_hash},
              "prompts": prompts.describe(), "versions": _versions(),
              "prompt_attributes": [dict(a) for a in prompts.attributes], "window": window},
    )
    res.findings = check(res) + _atp_findings(plan, grad_drop)
    return res


def _engine(qk: bool, grad_drop: bool) -> str:
    return "atp*" if qk and grad_drop else "atp+qk_fix" if qk else "atp+graddrop" if grad_drop else "atp"


def _check_grad_drop(model: "Model", plan: Plan, window: int) -> None:
    if plan.target in RESIDUAL_KINDS:
        raise ActpatchError(f"grad_drop scores components (heads, attn_out, mlp_out, neurons, q / k / v, pattern), "
                            f"not {plan.target.value!r}: every gradient path of the residual stream passes its own "
                            f"layer's skip connection. Use exact patching for the residual stream.")
    if window != 1:
        raise ActpatchError(f"grad_drop is defined for single-layer components; window={window} spans layers. Use window=1.")
    if model.n_layers < 2:
        raise ActpatchError("grad_drop needs a model with at least two layers (it averages over L - 1 dropped layers).")


def _estimate(model: "Model", patches: Sequence[tuple], zeros: dict, source: dict, grads: dict, qk: bool) -> torch.Tensor:
    """First-order effect of each patch, (P, batch), from one set of gradients at the taps."""
    if qk:
        return torch.stack([_qk_effect(model, patch, zeros, source, grads) for patch in patches])
    full = dict.fromkeys(s.full() for patch in patches for s in patch)
    prod = {s: (source[s] - zeros[s][1]) * (grads[s] if grads[s] is not None else 0.0) for s in full}
    per_site = _site_sums(prod, [s for patch in patches for s in patch])
    return torch.stack([sum(per_site[s] for s in patch) for patch in patches])


def _grad_drop_sum(model: "Model", patches: Sequence[tuple], metric: torch.Tensor, zeros: dict, source: dict,
                   boundary: list, qk: bool) -> torch.Tensor:
    """sum over dropped layers l of |estimate with l dropped|, (P, batch). A patch in layer j
    scores plain AtP for the j layers below it and 0 for its own, so only layers above it need
    the dropped gradients."""
    layer_of = torch.tensor([patch[0].layer for patch in patches])
    taps = {s: z for s, (z, _) in zeros.items()}
    passes = dropped_gradients(metric, taps, boundary)
    with torch.no_grad():
        plain = _estimate(model, patches, zeros, source, next(passes), qk)
        total = layer_of[:, None] * plain.abs()
    for layer, grads in enumerate(passes, start=1):
        idx = (layer_of < layer).nonzero().flatten().tolist()
        if not idx:
            continue
        with torch.no_grad():
            total[idx] += _estimate(model, [patches[i] for i in idx], zeros, source, grads, qk).abs()
    return total


def _qk_effect(model: "Model", patch: tuple, zeros: dict, source: dict, grads: dict) -> torch.Tensor:
    """AtP* QK fix for one patch of q / k sites: exact pattern change, times dm/dA."""
    total = 0.0
    g = model.n_heads // model.n_kv_heads
    for site in patch:
        l = site.layer
        q, k = zeros[Site("q", l)][1], zeros[Site("k", l)][1]  # base values, (B, T, heads, D)
        base_pattern = zeros[Site("pattern", l)][1]
        new_q, new_k = q.clone(), k.clone()
        target = new_q if site.kind == SiteKind.Q else new_k
        target[site.selector()] = source[site.full()][site.selector()]
        heads = [site.head] if site.kind == SiteKind.Q and site.head is not None else (
            list(range(site.head * g, (site.head + 1) * g)) if site.head is not None else list(range(model.n_heads)))
        module = model.adapter.block_module(l, model.adapter.spec.attn)
        new_pattern = recompute_pattern(module, new_q, new_k)
        grad = grads[Site("pattern", l)]
        if grad is None:  # no path from this layer's pattern to the metric (GradDrop of its own layer)
            total = total + torch.zeros(new_pattern.shape[0])
            continue
        delta = (new_pattern - base_pattern)[:, heads]
        total = total + (delta * grad[:, heads]).flatten(1).sum(1)
    return total  # type: ignore[return-value]


def _site_sums(prod: dict, sites: list) -> dict:
    """``prod[site.full()][site.selector()]`` summed over everything but the batch, for many
    sites at once: sites sharing a full activation and indexed axes take one gather."""
    groups: dict = {}
    for s in dict.fromkeys(sites):
        sel = s.selector()[1:]
        axes = tuple(i for i, v in enumerate(sel) if isinstance(v, int))
        groups.setdefault((s.full(), axes), []).append(s)
    out = {}
    for (full, axes), members in groups.items():
        x = prod[full]
        rest = [1 + i for i in range(x.dim() - 1) if i not in axes]
        x = x.sum(dim=rest) if rest else x  # (B, *indexed axes)
        idx = tuple(torch.tensor([s.selector()[1 + a] for s in members]) for a in axes)
        vals = x[(slice(None), *idx)] if idx else x[:, None].expand(-1, len(members))  # (B, n)
        out.update({s: vals[:, k] for k, s in enumerate(members)})
    return out


def _atp_findings(plan: Plan, grad_drop: bool = False) -> list[Finding]:
    out = [Finding(Level.INFO, "attribution_estimate",
                   "Values are first-order (AtP) estimates of patching, not exact patches.",
                   "Check the largest ones with ap.validate_attribution(model, prompts, result).")]
    if grad_drop:
        out.append(Finding(Level.INFO, "attribution_magnitude",
                           "GradDrop scores are magnitudes, shown as effects in the behaviour's direction: a "
                           "component that works against the behaviour looks like one that supports it.",
                           "Read signs from plain AtP (grad_drop=False) or exact patching."))
    if plan.target in RESIDUAL_KINDS:
        out.append(Finding(Level.WARNING, "attribution_residual",
                           "AtP on the residual stream linearises large changes through every later layer; it is "
                           "known to be unreliable there (Kramár et al. 2024).",
                           "Use exact patching (ap.sweep) for the residual stream."))
    if plan.target in (SiteKind.MLP_OUT, SiteKind.MLP_POST) and any(s.layer == 0 for p in plan.patches for s in p):
        out.append(Finding(Level.WARNING, "attribution_mlp0",
                           "The first-layer MLP often acts as an extended embedding with large, non-linear effects; "
                           "AtP estimates there are unreliable (Kramár et al. 2024).",
                           "Patch MLP 0 exactly."))
    return out


@dataclass(frozen=True)
class Validation:
    """Exact patching of a subset of an attribution result's cells."""

    cells: list[tuple[int, ...]]
    estimate: torch.Tensor
    exact: torch.Tensor
    rank_correlation: float
    findings: list[Finding]

    def disagreements(self, k: int = 5) -> list[tuple[tuple[int, ...], float, float]]:
        """The ``k`` cells where estimate and exact value differ most: (cell, estimate, exact)."""
        order = (self.estimate - self.exact).abs().argsort(descending=True)[:k]
        return [(self.cells[i], float(self.estimate[i]), float(self.exact[i])) for i in order.tolist()]


def validate_attribution(
    model: "Model", prompts: PromptSet, result: PatchResult, *, k: int = 10, n_random: int = 10, seed: int = 0,
    saturation: float = 0.99,
) -> Validation:
    """Patch exactly the ``k`` cells with the largest |estimated effect| and ``n_random`` others,
    and compare: rank correlation, largest disagreements, and Findings for the known failure
    cases (residual stream, MLP 0, q / k of heads with saturated attention).

    For a GradDrop result (magnitudes) ``estimate`` and ``exact`` hold |effect| (normalised),
    and the rank correlation compares those."""
    if result.meta.get("method") != "atp":
        raise ActpatchError("validate_attribution() takes a result of ap.attribute().")
    est = result.values.flatten()
    order = (est - 1.0).abs().argsort(descending=True) if result.meta["direction"] == "noise" else est.abs().argsort(descending=True)
    top = order[:k].tolist()
    rest = order[k:]
    gen = torch.Generator().manual_seed(seed)
    rand = rest[torch.randperm(len(rest), generator=gen)[:n_random]].tolist()
    chosen = top + rand
    e, x = est[chosen], _exact_cells(model, prompts, result, chosen)
    if result.meta.get("estimate") == "magnitude":  # GradDrop ranks |effect|: compare magnitudes
        ref = 1.0 if result.meta["direction"] == "noise" else 0.0
        e, x = (e - ref).abs(), (x - ref).abs()
    rho = spearman(e, x) if len(chosen) > 2 else float("nan")
    cells = [_unravel(i, result.shape) for i in chosen]
    findings = [f for f in result.findings if f.code.startswith("attribution_") and f.code != "attribution_estimate"]
    findings.append(Finding(Level.INFO if rho >= 0.7 else Level.WARNING, "attribution_agreement",
                            f"Rank correlation of AtP estimates with exact patching on {len(chosen)} cells "
                            f"({k} largest, {len(rand)} random): {rho:.3f}.",
                            "Below ~0.7, trust exact patching and read the estimates only as a screen."))
    if result.meta["target"] in ("q", "k"):
        layers = sorted({result.coords["layer"][c[result.dims.index("layer")]] for c in cells})
        findings.extend(_saturated(model, prompts, layers, saturation))
    return Validation(cells=cells, estimate=e, exact=x, rank_correlation=rho, findings=findings)


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(i, shape))


def _exact_cells(model: "Model", prompts: PromptSet, result: PatchResult, chosen: list[int]) -> torch.Tensor:
    """Normalised exact patching of the result's cells ``chosen`` (flat indices), over the same
    prompts, corruption and seed; with named positions, per group of prompts whose roles share
    token positions (:mod:`actpatch.roles`)."""
    kw, target, m = dict(result.meta["plan"]), result.meta["target"], result.metric
    run = dict(direction=result.meta["direction"], corruption=from_description(result.meta.get("corruption")),
               metric=m, seed=result.meta.get("seed", 0), progress=False)

    def cells_of(plan: Plan, cells: list[int]) -> Plan:
        return Plan(target=plan.target, dims=("cell",), coords={"cell": chosen}, patches=tuple(plan.patches[c] for c in cells))

    roles = kw.get("positions")
    if not is_named(roles):
        return execute(model, prompts, cells_of(plan_for(model, prompts, target, **kw), chosen), **run).values
    run["corruption"] = for_roles(run["corruption"], model, prompts)
    axis = result.dims.index("pos")
    raw, clean, corrupted = torch.empty(len(prompts), len(chosen)), torch.empty(len(prompts)), torch.empty(len(prompts))
    for idx, where in role_groups(prompts, roles):
        uniq = sorted(set(where))
        sub = prompts.subset(idx)
        plan = plan_for(model, sub, target, **{**kw, "positions": uniq, "per_position": True})
        cells = []
        for i in chosen:
            cell = list(_unravel(i, result.shape))
            cell[axis] = uniq.index(where[cell[axis]])
            cells.append(int(np.ravel_multi_index(cell, plan.shape)))
        part = execute(model, sub, cells_of(plan, cells), **run)
        ix = torch.tensor(idx)
        raw[ix], clean[ix], corrupted[ix] = part.raw[m], part.clean[m], part.corrupted[m]
    return normalise(raw.mean(0), float(clean.mean()), float(corrupted.mean()))


def _saturated(model: "Model", prompts: PromptSet, layers: list[int], threshold: float) -> list[Finding]:
    """Heads in the validated q / k cells' ``layers`` whose attention (last position, clean run)
    puts more than ``threshold`` on one key: softmax saturation makes AtP on q / k unreliable."""
    sat = []
    for g in prompts.groups():
        with capture(model, [Site("pattern", l) for l in layers]) as acts:  # type: ignore[arg-type]
            model.logits(g.clean, last_only=True)
        for l in layers:
            peak = acts[Site("pattern", l)][:, :, -1].amax(-1).mean(0)  # (H,)
            sat += [(l, h, float(p)) for h, p in enumerate(peak.tolist()) if p > threshold]
    if not sat:
        return []
    heads = ", ".join(f"L{l}H{h} ({p:.3f})" for l, h, p in sorted(set(sat))[:8])
    return [Finding(Level.WARNING, "attribution_saturated_attention",
                    f"Heads with saturated attention at the last position: {heads}; AtP on their queries / keys "
                    f"misses the softmax's non-linearity (Kramár et al. 2024).",
                    "Patch these heads' q / k exactly.")]
