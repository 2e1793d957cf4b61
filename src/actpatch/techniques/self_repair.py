"""Direct vs total effects, and self-repair.

A component's **total effect** is what noising it does (its output taken from the corrupted run,
everything downstream recomputed: :func:`actpatch.sweep`). Its **direct effect** is what the same
change does through the direct path to the logits alone: the clean run's final residual stream
with only this component's write replaced by its corrupted write, every other component frozen
(so the final norm and the unembedding see one changed term).

When the direct effect is much larger than the total effect, or of the opposite sign, later
components compensate for the change: backup heads, the "Hydra effect" (McGrath et al. 2023;
Heimersheim & Nanda 2024 discuss it as a reason a necessary component can look unimportant under
noising). :func:`direct_vs_total` reports both for every head and MLP and flags such components
(finding ``self_repair``).

Hand-built models show both kinds: :func:`actpatch.testing.backup_head_model` (a head that
takes over when an earlier head is knocked out) and :func:`actpatch.testing.backup_model` (the
same with MLP neurons).

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import backup_model
    >>> model, prompts = backup_model()
    >>> dt = ap.circuits.direct_vs_total(model, prompts)
    >>> dt.effects("L0.MLP")  # (direct, total): its direct path does everything, yet noising it does nothing
    (-1.0, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..corruption import Corruption
from .._io import read_json
from ..errors import MethodError, ResultError
from ..experiment.core import Experiment
from ..findings import Finding, Level
from ..hooks import capture, intervene
from ..metrics import normalise, MetricSpec
from ..prompts.promptset import PromptSet
from ..sites import Site
from ..types import Direction
from .patching import sweep

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from ..models.handle import Model

__all__ = ["DirectTotal", "direct_vs_total", "load_direct_total"]


@dataclass(frozen=True)
class DirectTotal:
    """Per component (``L{l}.H{h}``, ``L{l}.MLP``): direct and total effects of noising it, as
    changes of the normalised metric (1 = the clean - corrupted gap; negative = it hurts)."""

    components: tuple[str, ...]
    direct: torch.Tensor
    total: torch.Tensor
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    compensators: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """For each flagged component: the later components whose direct effect moves the other way
    when it is noised (name, normalised change), largest first."""

    def effects(self, component: str) -> tuple[float, float]:
        """(direct, total) of one component, rounded to 6 places."""
        i = self.components.index(component)
        return round(float(self.direct[i]), 6) + 0.0, round(float(self.total[i]), 6) + 0.0

    def disagreements(self, k: int = 10) -> list[tuple[str, float, float]]:
        """The ``k`` components whose direct and total effects differ most: (name, direct, total)."""
        order = (self.direct - self.total).abs().argsort(descending=True)[:k]
        return [(self.components[i], float(self.direct[i]), float(self.total[i])) for i in order.tolist()]

    def to_dict(self) -> dict[str, Any]:
        return {"components": list(self.components), "direct": self.direct.tolist(), "total": self.total.tolist(),
                "findings": [f.to_dict() for f in self.findings]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DirectTotal":
        return cls(components=tuple(d["components"]), direct=torch.tensor(d["direct"]), total=torch.tensor(d["total"]),
                   findings=tuple(Finding.from_dict(f) for f in d.get("findings", [])))

    def plot(self, title: str = "Direct vs total effect of noising each component") -> "go.Figure":
        """Scatter of direct against total effects (the diagonal: no compensation)."""
        import plotly.graph_objects as go

        lo = float(min(self.direct.min(), self.total.min(), -0.1))
        hi = float(max(self.direct.max(), self.total.max(), 0.1))
        fig = go.Figure([go.Scatter(x=self.total.tolist(), y=self.direct.tolist(), mode="markers",
                                    text=list(self.components), hovertemplate="%{text}: total %{x:.3f}, direct %{y:.3f}"
                                    "<extra></extra>", name="components"),
                         go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "#888"},
                                    name="direct = total")])
        fig.update_layout(title=title, xaxis_title="total effect (noising, everything recomputed)",
                          yaxis_title="direct effect (to the logits only)", height=420)
        return fig


def direct_vs_total(
    model: "Model",
    prompts: PromptSet,
    *,
    corruption: str | Corruption = "str",
    metric: MetricSpec = "logit_diff",
    seed: int = 0,
    ratio: float = 2.0,
    min_effect: float = 0.1,
) -> DirectTotal:
    """Direct and total effects of noising every head and MLP (see the module docstring), with a
    ``self_repair`` finding for each component whose direct effect is at least ``min_effect``
    and more than ``ratio`` times its total effect, or of the opposite sign to a total effect
    of at least ``min_effect``."""
    exp = Experiment.setup(model, prompts, direction=Direction.NOISE, corruption=corruption, metric=metric, seed=seed,
                           technique="Direct effects", needs_corrupted_run=True)
    if exp.corruption.draws != 1:
        raise MethodError("Direct effects need one corrupted run per prompt: corruption 'str' or 'resample'.")
    if not model.adapter.capabilities.heads_write_additively:
        raise MethodError(f"The {model.family} family normalises the attention output after the output projection, so "
                          f"one head's write to the residual stream is not defined; direct effects per head need "
                          f"heads that write additively (gpt2, llama, gpt_neox...).")
    L, H = model.n_layers, model.n_heads
    names = tuple(f"L{l}.H{h}" for l in range(L) for h in range(H)) + tuple(f"L{l}.MLP" for l in range(L))
    m = exp.metrics[0]
    raw = torch.empty(len(prompts), len(names))
    clean_all, corr_all = torch.empty(len(prompts)), torch.empty(len(prompts))
    sites = [Site(k, l) for l in range(L) for k in ("z", "mlp_out")]
    groups = []
    with torch.inference_mode():
        for runs in exp.groups():
            with runs.clean.context(model), capture(model, sites + [Site("resid_final")]) as c:
                clean_logits = model.logits(runs.clean.ids, last_only=True)
            with runs.corrupted.context(model), capture(model, sites) as k:
                corr_logits = model.logits(runs.corrupted.ids, last_only=True)
            measure = runs.measurer(exp.metrics, clean_logits)
            rows = torch.arange(runs.rows)
            idx = runs.group.indices
            raw[idx] = _swapped(model, measure, m, c, k).T.float().cpu()
            clean_all[idx] = measure(clean_logits, rows)[m].float().cpu()
            corr_all[idx] = measure(corr_logits, rows)[m].float().cpu()
            groups.append((runs, measure, c, k))
    c_mean, k_mean = float(clean_all.mean()), float(corr_all.mean())
    direct = normalise(raw.mean(0), c_mean, k_mean) - 1.0

    options = dict(direction="noise", corruption=corruption, metric=metric, seed=seed, progress=False)
    heads = sweep(model, prompts, "z", **options)  # type: ignore[arg-type]
    mlps = sweep(model, prompts, "mlp_out", per_position=False, **options)  # type: ignore[arg-type]
    total = torch.cat([heads.values.flatten(), mlps.values.flatten()]) - 1.0

    found = []
    compensators: dict[str, list[tuple[str, float]]] = {}
    for ci, (name, de, te) in enumerate(zip(names, direct.tolist(), total.tolist())):
        if abs(de) >= min_effect and (abs(de) > ratio * abs(te) or (abs(te) >= min_effect and de * te < 0)):
            comp = _compensation(model, groups, names, ci, m, len(prompts), c_mean, k_mean)
            helpers = [(names[j], v) for j, v in sorted(enumerate(comp.tolist()), key=lambda t: -abs(t[1]))
                       if v * de < 0 and abs(v) >= min_effect / 2][:3]
            compensators[name] = helpers
            who = (", ".join(f"{n} ({v:+.3f})" for n, v in helpers) if helpers else
                   "none through a direct path (the repair runs through later components' own inputs)")
            found.append(Finding(
                Level.WARNING, "self_repair",
                f"{name}: noising it moves the metric by {de:+.3f} through its direct path to the logits but only "
                f"{te:+.3f} in total ({'opposite signs' if de * te < 0 else f'{abs(de) / max(abs(te), 1e-9):.1f}x'}; "
                f"1 = the clean - corrupted gap): later components compensate (backup heads, the Hydra effect), so "
                f"noising understates what it does. Compensating, by the change of their direct effect when it is "
                f"noised: {who}.",
                "Read its direct effect (or path patching from it) next to noising, and noise it together with the "
                "compensating components to see what it does without them."))
    return DirectTotal(components=names, direct=direct, total=total, findings=tuple(found), compensators=compensators)


def _swapped(model: "Model", measure: Any, m: Any, base: dict[Site, torch.Tensor],
             other: dict[Site, torch.Tensor]) -> torch.Tensor:
    """(C, B) metric of ``base``'s final residual stream with one component's write at a time
    taken from ``other`` (heads, then MLPs), every other write kept."""
    adapter, L = model.adapter, model.n_layers
    final = base[Site("resid_final")][:, -1]  # (B, d)
    deltas = [adapter.head_writes(l, other[Site("z", l)] - base[Site("z", l)])[:, :, -1] for l in range(L)]  # (H, B, d)
    deltas += [adapter.residual_write(other[Site("mlp_out", l)] - base[Site("mlp_out", l)])[None, :, -1] for l in range(L)]
    changed = torch.cat(deltas) + final[None]  # (C, B, d)
    C, B, d = changed.shape
    logits = adapter.unembed(changed.reshape(C * B, d))
    return measure(logits, torch.arange(B).repeat(C))[m].reshape(C, B)


def _compensation(model: "Model", groups: list, names: tuple[str, ...], ci: int, m: Any, n: int,
                  clean_mean: float, corr_mean: float) -> torch.Tensor:
    """Per component: how much its direct effect changes (normalised) when component ``ci`` is
    noised, i.e. the clean run with ``ci``'s output from the corrupted run."""
    H, L = model.n_heads, model.n_layers
    if ci < L * H:
        layer, head = divmod(ci, H)
        site = Site("z", layer, head=head)
    else:
        site = Site("mlp_out", ci - L * H)
    sites = [Site(k, l) for l in range(L) for k in ("z", "mlp_out")]
    out = torch.empty(n, len(names))
    with torch.inference_mode():
        for runs, measure, c, k in groups:
            with runs.clean.context(model), intervene(model, {site: k[site.full()][site.selector()]}), \
                    capture(model, sites) as noised:
                model.logits(runs.clean.ids, last_only=True)
            out[runs.group.indices] = _swapped(model, measure, m, c, noised).T.float().cpu()
    comp = normalise(out.mean(0), clean_mean, corr_mean) - 1.0
    comp[ci] = 0.0  # the component itself is what was noised
    return comp


def load_direct_total(path: str | Path) -> DirectTotal | None:
    """What a run saved as ``direct_total.json`` (None when there is none)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return DirectTotal.from_dict(read_json(p, "a direct vs total file"))
    except (KeyError, TypeError, ValueError) as e:
        raise ResultError(f"{p}: not a direct vs total file ({e!r}).") from None
