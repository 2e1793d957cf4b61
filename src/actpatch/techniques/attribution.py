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

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..corruption import Corruption, from_description
from ..errors import MethodError, ResultError, SiteError
from ..agreement import Agreement, AgreementReading, cell_label, choose_cells, exact_is_affordable
from ..experiment.core import Experiment, mean_draws
from ..experiment.plan import Grid, Plan, plan_for
from ..findings import Finding, Level, Origin
from ..hooks import capture, gradient_taps, intervene, recompute_blocks
from ..memory import MemoryPlan, activation_bytes, backward_bytes, plan, sequence
from ..metrics import DIFFERENTIABLE, normalise, MetricSpec
from ..models.relevance import DEFAULT_RULES, check_rules, relevance_rules
from ..prompts.promptset import PromptSet
from ..results import AtpInfo, PatchResult
from ..sites import Site, SiteKind
from ..types import DEFAULT_DIRECTION, Direction, Estimate, Method
from . import graddrop
from .graddrop import dropped_gradients, trace_blocks
from .exact import dictionary_info, execute
from .patching import feature_axis
from .positions import by_named_positions, for_named_positions, position_groups

RESIDUAL_KINDS = (SiteKind.EMBED, SiteKind.RESID_PRE, SiteKind.RESID_MID, SiteKind.RESID_POST, SiteKind.RESID_FINAL)

if TYPE_CHECKING:  # pragma: no cover
    from ..features.dictionary import Dictionary
    from ..models.handle import Model

__all__ = ["attribute", "validate_attribution", "Validation", "DIFFERENTIABLE"]


def attribute(
    model: "Model",
    prompts: PromptSet,
    target: "str | SiteKind | Dictionary" = "z",
    *,
    direction: str | Direction = DEFAULT_DIRECTION,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    per_position: bool | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    features: Sequence[int | str] | int | None = None,
    window: int = 1,
    seed: int = 0,
    qk_fix: bool = False,
    grad_drop: bool = False,
    method: str = "atp",
    memory_budget: "int | str | None" = None,
) -> PatchResult:
    """AtP estimates for every cell of a target, as a :class:`PatchResult` (``info.method ==
    Method.ATP``) laid out exactly like :func:`actpatch.sweep`'s, so the two can be compared.

    ``method="relp"``: relevance patching (RelP, Jafari et al. 2025), ``(a_src - a_base) * c``
    with LRP's propagation coefficients ``c`` in place of the gradient: norms' scales held
    constant, activations passed as if linear, gated products split in half
    (:mod:`actpatch.models.relevance`). Same cost as AtP, same layout (``info.label ==
    "relp"``); reported to track exact patching far better than AtP on MLP outputs and the
    residual stream. Check it the same way, with :func:`validate_attribution`.

    ``qk_fix=True`` (AtP*'s first change, Kramár et al. 2024) estimates query and key patches
    by recomputing the attention softmax exactly with the patched side, then taking the
    first-order effect of the pattern change: ``sum (A_patched - A_base) * dm/dA``. This
    removes the false negatives of saturated attention; everything downstream of the pattern is
    still linearised.

    ``grad_drop=True`` (AtP*'s second change) repeats the estimate once per layer with the
    gradient through that layer's residual contribution dropped and scores each cell by
    ``1 / (L - 1) * sum_l |estimate_l|`` (see :mod:`actpatch.techniques.graddrop`), which exposes
    components whose direct and indirect effects cancel. The score is a magnitude
    (``info.estimate == Estimate.MAGNITUDE``); it is stored as an effect in the behaviour's
    direction (noising: ``1 - score``, denoising: ``score``, normalised), so negative components
    show as positive ones. Both options together are AtP*. GradDrop costs about
    ``1 + (L - 1) / 2`` backward passes and applies to components (heads, attention / MLP
    outputs, neurons), not to the residual stream.

    ``memory_budget``: bytes or a size such as ``"2GiB"`` for the activations and buffers (not
    the weights): prompts then run a few at a time, or one at a time with every block
    recomputed in the backward pass, with the same estimates (:mod:`actpatch.memory`; default:
    a share of the free memory); a budget too small for one prompt is refused before any work,
    naming the smallest that fits.

    An attached feature dictionary as ``target`` estimates every feature and the error term at
    every position (``features=`` as in :func:`actpatch.sweep`: a list, or an int for the top-k
    active ones): ``(f_src - f_base) * dm/df``, the node attribution of sparse feature circuits
    (Marks et al. 2024), from the same 2 forward passes and 1 backward pass.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> est = ap.attribute(m, ps, "z", direction="noise")
        >>> est.dims, est.info.label
        (('layer', 'head'), 'atp')
        >>> exact = ap.sweep(m, ps, "z", direction="noise", progress=False)  # what it estimates
    """
    if not isinstance(target, (str, SiteKind)):  # a feature dictionary
        features = feature_axis(model, prompts, target, features, None)
    elif features is not None:
        raise SiteError(f"features=... applies to a feature dictionary's attribution, not target={target!r}.")
    grid = Grid(per_position=per_position, layers=layers, positions=positions, heads=heads, neurons=neurons,
                window=window, features=features)  # type: ignore[arg-type]
    if method not in ("atp", "relp"):
        raise MethodError(f"method={method!r}: use 'atp' (gradients) or 'relp' (LRP propagation coefficients).")
    if method == "relp" and (qk_fix or grad_drop):
        raise MethodError("qk_fix and grad_drop are AtP*'s changes to gradients; RelP replaces the gradients "
                          "altogether. Use one of method='relp' or AtP* (method='atp', qk_fix / grad_drop).")
    options: dict[str, Any] = dict(direction=direction, metric=metric, seed=seed, qk_fix=qk_fix, grad_drop=grad_drop,
                                   relp=method == "relp", memory_budget=memory_budget)
    if grid.named:
        return by_named_positions(lambda sub, g, corr, _: _attribute(model, sub, target, g, corr, **options),
                                  model, prompts, grid, corruption)
    return _attribute(model, prompts, target, grid, corruption, **options)


def _attribute(model: "Model", prompts: PromptSet, target: str | SiteKind, grid: Grid, corruption: str | Corruption, *,
               direction: str | Direction, metric: MetricSpec, seed: int, qk_fix: bool,
               grad_drop: bool, relp: bool = False, memory_budget: "int | str | None" = None) -> PatchResult:
    # AtP*'s softmax recomputation and GradDrop's block boundaries see the prompt's queries only
    exact_qk = qk_fix and isinstance(target, (str, SiteKind)) and SiteKind(target) in (SiteKind.Q, SiteKind.K)
    exp = Experiment.setup(model, prompts, direction=direction, corruption=corruption, metric=metric, seed=seed,
                           technique=("Relevance patching (RelP)" if relp else "Attribution patching")
                           + (" with qk_fix (AtP*)" if exact_qk else "")
                           + (" with grad_drop" if grad_drop else ""), differentiable=True,
                           continuations=True)
    plan = plan_for(model, prompts, target, grid)
    qk = qk_fix and plan.target in (SiteKind.Q, SiteKind.K)
    if qk_fix and not qk:
        raise MethodError(f"qk_fix applies to q and k targets, not {plan.target.value!r}.")
    if grad_drop:
        _check_grad_drop(model, plan, grid.window)
    if relp:
        check_rules(model, DEFAULT_RULES)
    full = tapped_sites(plan, qk)
    metrics = exp.metrics
    budget = attribution_memory_plan(model, prompts, full, memory_budget, grad_drop=grad_drop, draws=exp.corruption.draws,
                                     pattern=plan.uses_attention_fn)
    # float64: raw = base + estimate must keep the estimate (float32 would round it to the
    # spacing at |base|: 4.8e-7 at a logit difference of 5.5, and smaller estimates to 0)
    outcome = exp.outcome(len(plan.patches), dtype=torch.float64)
    base_b = {m: torch.empty(exp.n) for m in metrics}  # grad_drop: the base run's metric, per prompt
    with ExitStack() as stack:
        if plan.uses_attention_fn:
            stack.enter_context(model.attention_fn())
        for runs in exp.groups(budget.rows):
            source, src_logits = exp.source_activations(runs, full)
            # one forward and one backward pass of the base run with a zero at every site
            taps, zeros = gradient_taps(full)
            T = runs.base.ids.shape[1]
            cont = runs.base.continuation
            # qk_fix recomputes whole patterns: the continuation's queries read the patched keys too
            tree = cont.tree(T) if qk and cont is not None and not cont.is_single else None

            with ExitStack() as run:
                boundary = _enter_base_run(run, model, runs.base, taps, qk=qk, grad_drop=grad_drop, relp=relp,
                                           recompute=budget.recompute)
                logits = runs.base.readout(model, grad=True)
                measure = runs.measurer(metrics, runs.clean_logits(logits.detach(), src_logits))
                values = measure(logits, torch.arange(runs.rows))
                # one backward pass per metric (GradDrop: and a partial one per dropped layer), inside
                # the run's context: recomputed blocks see the same hooks
                est: dict = {}
                for i, m in enumerate(metrics):
                    if grad_drop:
                        est[m] = _grad_drop_sum(model, plan.patches, values[m].sum(), zeros, source, boundary, qk, tree)
                        continue
                    gs = torch.autograd.grad(values[m].sum(), [zeros[s][0] for s in full],
                                             retain_graph=i < len(metrics) - 1, allow_unused=True)
                    with torch.no_grad():
                        est[m] = _estimate(model, plan.patches, zeros, source, dict(zip(full, gs)), qk, tree)  # (P, G*R)
            base_vals = {m: v.detach() for m, v in values.items()}
            outcome.baselines(runs, base_vals, measure(src_logits, torch.arange(runs.rows)))
            if grad_drop:
                outcome.patched(runs, {m: graddrop.combine(est[m], model.n_layers) for m in metrics})
                for m in metrics:
                    base_b[m][runs.group.indices] = mean_draws(base_vals[m].float().cpu(), runs.draws)
            else:
                outcome.patched(runs, {m: est[m].double() + base_vals[m].double() for m in metrics})
    if grad_drop:  # magnitudes, laid out as effects in the direction clean -> corrupted (noising) or back
        for m in metrics:
            towards = torch.sign(outcome.clean[m].mean() - outcome.corrupted[m].mean())
            if exp.direction is Direction.NOISE:
                towards = -towards
            outcome.raw[m] = base_b[m][:, None] + towards * outcome.raw[m]
    technique = AtpInfo(estimate=Estimate.MAGNITUDE if grad_drop else Estimate.SIGNED, qk_fix=qk, grad_drop=grad_drop,
                        relp=relp, dictionary=dictionary_info(model, plan))
    return exp.result(outcome, target=plan.target.value, technique=technique, dims=plan.dims, coords=plan.coords,
                      grid=grid.to_dict(), findings=_atp_findings(plan, grad_drop, relp))


def tapped_sites(plan: Plan, qk: bool) -> list[Site]:
    """The whole activations AtP taps for ``plan``: its sites' full tensors; with ``qk`` (AtP*'s
    QK fix) every patched layer's queries, keys and pattern too."""
    full = plan.full_sites()
    if qk:
        qk_layers = sorted({s.layer for s in full})  # type: ignore[type-var]
        full = list(dict.fromkeys(full + [Site(k, l) for l in qk_layers for k in ("q", "k", "pattern")]))
    return full


def _enter_base_run(stack: ExitStack, model: "Model", base: Any, taps: dict, *, qk: bool, grad_drop: bool,
                    relp: bool, recompute: bool) -> list:
    """Enter what the base run's forward and backward passes run under (autograd, the run's own
    hooks, GradDrop's block boundaries, RelP's rules, the taps, recomputed blocks); returns the
    boundaries (empty without GradDrop)."""
    stack.enter_context(torch.enable_grad())
    stack.enter_context(base.context(model))
    boundary = stack.enter_context(trace_blocks(model)) if grad_drop else []
    if relp:
        stack.enter_context(relevance_rules(model))
    stack.enter_context(intervene(model, taps, whole=qk))
    if recompute:
        stack.enter_context(recompute_blocks(model))
    return boundary


def attribution_memory_plan(model: "Model", prompts: PromptSet, sites: Sequence[Site],
                            memory_budget: "int | str | None", *, grad_drop: bool = False, draws: int = 1,
                            pattern: bool = True) -> MemoryPlan:
    """How :func:`attribute` runs under ``memory_budget`` (:func:`actpatch.memory.plan`), from its
    bytes per prompt row at the longest prompt: the forward and backward pass plus, at every
    tapped site (``sites``: whole activations), the source run's activation, the base run's,
    the gradient and their product (GradDrop: two more, its dropped gradients). ``pattern``:
    whether the run keeps attention patterns (actpatch's attention function: q / k / v /
    pattern targets; the model's fused attention otherwise)."""
    T, readouts = sequence(prompts)
    taps = sum(activation_bytes(model, s, T) for s in sites) * (6 if grad_drop else 4)
    passes = 4 + (model.n_layers - 1) if grad_drop else 4  # source run, base run + backward; GradDrop's partial ones
    return plan("Attribution", model, memory_budget, total_rows=len(prompts) * draws,
                per_row=backward_bytes(model, T, readouts, pattern=pattern) + taps,
                per_row_recomputed=backward_bytes(model, T, readouts, recompute=True, pattern=pattern) + taps,
                passes=passes, draws=draws)


def _check_grad_drop(model: "Model", plan: Plan, window: int) -> None:
    if plan.target is SiteKind.FEATURE:
        raise MethodError("grad_drop scores components (heads, attn_out, mlp_out, neurons), not a dictionary's "
                          "features. Use plain AtP (grad_drop=False) and check it with ap.validate_attribution.")
    if plan.target in RESIDUAL_KINDS:
        raise MethodError(f"grad_drop scores components (heads, attn_out, mlp_out, neurons, q / k / v, pattern), "
                            f"not {plan.target.value!r}: every gradient path of the residual stream passes its own "
                            f"layer's skip connection. Use exact patching for the residual stream.")
    if window != 1:
        raise MethodError(f"grad_drop is defined for single-layer components; window={window} spans layers. Use window=1.")
    if model.n_layers < 2:
        raise MethodError("grad_drop needs a model with at least two layers (it averages over L - 1 dropped layers).")


def _estimate(model: "Model", patches: Sequence[tuple], zeros: dict, source: dict, grads: dict, qk: bool,
              tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """First-order effect of each patch, (P, batch), from one set of gradients at the taps."""
    if qk:
        return torch.stack([_qk_effect(model, patch, zeros, source, grads, tree) for patch in patches])
    full = dict.fromkeys(s.full() for patch in patches for s in patch)
    prod = {s: (source[s] - zeros[s][1]) * (grads[s] if grads[s] is not None else 0.0) for s in full}
    per_site = _site_sums(prod, [s for patch in patches for s in patch])
    return torch.stack([sum(per_site[s] for s in patch) for patch in patches])


def _grad_drop_sum(model: "Model", patches: Sequence[tuple], metric: torch.Tensor, zeros: dict, source: dict,
                   boundary: list, qk: bool, tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum over dropped layers l of |estimate with l dropped|, (P, batch). A patch in layer j
    scores plain AtP for the j layers below it and 0 for its own, so only layers above it need
    the dropped gradients."""
    layer_of = torch.tensor([patch[0].layer for patch in patches], device=metric.device)
    taps = {s: z for s, (z, _) in zeros.items()}
    passes = dropped_gradients(metric, taps, boundary)
    with torch.no_grad():
        plain = _estimate(model, patches, zeros, source, next(passes), qk, tree)
        total = layer_of[:, None] * plain.abs()
    for layer, grads in enumerate(passes, start=1):
        idx = (layer_of < layer).nonzero().flatten().tolist()  # (patch indices)
        if not idx:
            continue
        with torch.no_grad():
            total[idx] += _estimate(model, [patches[i] for i in idx], zeros, source, grads, qk, tree).abs()
    return total


def _qk_effect(model: "Model", patch: tuple, zeros: dict, source: dict, grads: dict,
               tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """AtP* QK fix for one patch of q / k sites: exact pattern change, times dm/dA. With answers
    of several tokens (``tree``) the taps hold the whole teacher-forced sequence: the patch
    writes prompt positions, and the pattern is recomputed over every query, continuation
    tokens included."""
    total = 0.0
    g = model.n_heads // model.n_kv_heads
    for site in patch:
        l = site.layer
        q, k = zeros[Site("q", l)][1], zeros[Site("k", l)][1]  # base values, (B, S, heads, D)
        base_pattern = zeros[Site("pattern", l)][1]
        new_q, new_k = q.clone(), k.clone()
        src = source[site.full()]  # (B, T, heads, D): the prompt's positions
        target = (new_q if site.kind == SiteKind.Q else new_k)[:, : src.shape[1]]  # a view of them
        target[site.selector()] = src[site.selector()]
        heads = [site.head] if site.kind == SiteKind.Q and site.head is not None else (
            list(range(site.head * g, (site.head + 1) * g)) if site.head is not None else list(range(model.n_heads)))
        new_pattern = model.adapter.recompute_pattern(l, new_q, new_k, tree)
        grad = grads[Site("pattern", l)]
        if grad is None:  # no path from this layer's pattern to the metric (GradDrop of its own layer)
            total = total + torch.zeros(new_pattern.shape[0], device=new_pattern.device)
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


def _atp_findings(plan: Plan, grad_drop: bool = False, relp: bool = False) -> list[Finding]:
    what = "RelP (first-order, with LRP coefficients)" if relp else "first-order (AtP)"
    out = [Finding(Level.INFO, "attribution_estimate",
                   f"Values are {what} estimates of patching, not exact patches.",
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
class Validation(AgreementReading):
    """Exact patching of an attribution result's cells (all of them, or a sample chosen to find
    what the estimate misses), read as an :class:`~actpatch.agreement.Agreement`."""

    cells: list[tuple[int, ...]]
    agreement: Agreement
    findings: list[Finding]

    def disagreements(self, k: int = 5) -> list[tuple[tuple[int, ...], float, float]]:
        """The ``k`` cells where estimate and exact value differ most: (cell, estimate, exact)."""
        order = (self.estimate - self.exact).abs().argsort(descending=True)[:k]
        return [(self.cells[i], float(self.estimate[i]), float(self.exact[i])) for i in order.tolist()]

    def plot(self) -> Any:
        return self.agreement.plot()


def validate_attribution(
    model: "Model", prompts: PromptSet, result: PatchResult, *, k: int = 10, n_random: int = 10, seed: int = 0,
    saturation: float = 0.99, exhaustive: bool | None = None, budget_s: float = 60.0,
) -> Validation:
    """Check an attribution result against exact patching, looking for what it *misses*.

    Every cell is patched exactly when that fits ``budget_s`` seconds (estimated from one
    timed forward pass; ``exhaustive=True`` / ``False`` forces the choice). Otherwise the cells
    checked are the estimate's ``k`` largest, their grid neighbours and ``n_random`` cells drawn
    from strata over the rest of its ranking (:func:`actpatch.agreement.choose_cells`). Reports
    the rank correlation, the recall of the exact top-k in the estimate's top-2k, the largest
    error in raw metric units, a warning naming the components the estimate misranks, and the
    known failure cases (residual stream, MLP 0, q / k of heads with saturated attention).

    For a GradDrop result (magnitudes) ``estimate`` and ``exact`` hold |effect|."""
    if not isinstance(result, PatchResult) or result.info.method is not Method.ATP:
        raise ResultError("validate_attribution() takes a result of ap.attribute().")
    if k < 1 or n_random < 0 or budget_s < 0:
        raise ResultError(f"k={k}, n_random={n_random}, budget_s={budget_s}: give k >= 1, n_random >= 0, budget_s >= 0.")
    est, ref = result.values.flatten(), result.info.direction.no_effect
    order = (est - ref).abs().argsort(descending=True, stable=True)
    if exhaustive is None:
        exhaustive = exact_is_affordable(len(est), _seconds_per_cell(model, prompts, result), budget_s)
    why = ({int(i): "all" for i in order.tolist()} if exhaustive
           else choose_cells(order, result.shape, k=k, n_random=n_random, seed=seed))
    chosen = list(why)
    e, x = est[chosen] - ref, _exact_cells(model, prompts, result, chosen) - ref
    if result.info.estimate is Estimate.MAGNITUDE:  # GradDrop ranks |effect|: compare magnitudes
        e, x = e.abs(), x.abs()
    rank = torch.empty(len(est), dtype=torch.long)
    rank[order] = torch.arange(len(est))
    cells = [_unravel(i, result.shape) for i in chosen]
    b = result.baselines[result.metric]
    what = "RelP" if result.info.relp else "AtP*" if result.info.qk_fix or result.info.grad_drop else "AtP"
    agreement = Agreement.of([cell_label(result.dims, result.coords, i, result.shape) for i in chosen], e, x,
                             est_rank=rank[chosen], n_cells=len(est), k=k, scale=abs(b["clean"] - b["corrupted"]),
                             exhaustive=exhaustive, what=what, reasons=[why[i] for i in chosen])
    findings = [f for f in result.findings if f.origin is Origin.TECHNIQUE and f.code != "attribution_estimate"]
    findings.extend(agreement.findings)
    if result.info.target in (SiteKind.Q.value, SiteKind.K.value):
        layers = sorted({result.coords["layer"][c[result.dims.index("layer")]] for c in cells})
        findings.extend(_saturated(model, prompts, layers, saturation))
    return Validation(cells=cells, agreement=agreement, findings=findings)


def _seconds_per_cell(model: "Model", prompts: PromptSet, result: PatchResult) -> float:
    """What one exactly patched cell costs, roughly: one timed forward pass over every prompt
    (each run as many times as the corruption draws)."""
    draws = from_description(result.info.corruption).draws
    t0 = time.perf_counter()
    with torch.no_grad():
        for g in prompts.groups():
            model.logits(g.clean, last_only=True)
    return (time.perf_counter() - t0) * draws


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(i, shape))


def _exact_cells(model: "Model", prompts: PromptSet, result: PatchResult, chosen: list[int]) -> torch.Tensor:
    """Normalised exact patching of the result's cells ``chosen`` (flat indices), over the same
    prompts, corruption and seed; with named positions, per group of prompts whose named
    positions share token indices (:mod:`actpatch.techniques.positions`)."""
    info, m = result.info, result.metric
    grid = Grid(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in info.grid.items()})
    target: Any = info.target
    if getattr(info.technique, "dictionary", None):  # features: the dictionary attached where it was
        site = Site.parse(info.technique.dictionary["site"])
        target = model.dictionaries.get(site)
        if target is None or target.label != info.technique.dictionary["label"]:
            raise ResultError(f"This attribution is over the dictionary {info.technique.dictionary['label']} at "
                              f"{site}; attach it again (model.attach(d)) to validate it.")
    run: dict[str, Any] = dict(direction=info.direction, corruption=from_description(info.corruption), metric=m,
                               seed=info.seed, progress=False)

    def cells_of(plan: Plan, cells: list[int]) -> Plan:
        return Plan(target=plan.target, dims=("cell",), coords={"cell": chosen}, patches=tuple(plan.patches[c] for c in cells))

    if not grid.named:
        return execute(model, prompts, cells_of(plan_for(model, prompts, target, grid), chosen), **run).values
    run["corruption"] = for_named_positions(run["corruption"], model, prompts)
    axis = result.dims.index("pos")
    raw, clean, corrupted = torch.empty(len(prompts), len(chosen)), torch.empty(len(prompts)), torch.empty(len(prompts))
    for idx, where, _ in position_groups(prompts, [str(p) for p in grid.positions or ()]):
        uniq = sorted(set(where))
        sub = prompts.subset(idx)
        plan = plan_for(model, sub, target, grid.replace(positions=tuple(uniq), per_position=True))
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
