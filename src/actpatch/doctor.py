"""``doctor``: does actpatch compute the right thing on *this* model? The invariants every
family is tested against, run on any loaded model and reported as pass / fail with the
measured error, plus an estimate of what full sweeps will cost.

Invariants (each on a few prompts; random token pairs unless prompts are given):

* **attention function**: the logits with actpatch's hookable attention equal the model's own
  implementation's (every q / k / v / pattern site is read through it);
* **null patch**: writing every site's own activation back changes no logit;
* **residual chaining**: ``resid_post[l] == resid_pre[l + 1]`` at every layer;
* **z -> attn_out**: patching every head's z of a layer equals patching its attention output;
* **batched == reference**: the batched engine's numbers equal one forward pass per patch, on a
  sample of patches of every site kind (the first and last layer; five positions).

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> report = ap.doctor(tiny_model("llama"))
    >>> report.passed, [c.name for c in report.checks][:2]
    (True, ['attention function', 'null patch'])
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .engine import BATCHED_KINDS
from .experiment.plan import default_per_position
from .hooks import capture, intervene
from .prompts.promptset import PromptSet
from .sites import Site, SiteKind
from .techniques.patching import patch, sweep

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["Check", "Diagnosis", "doctor"]


@dataclass(frozen=True)
class Check:
    """One invariant: whether it held, the largest error measured and the tolerance."""

    name: str
    passed: bool
    error: float
    tolerance: float
    detail: str = ""


@dataclass(frozen=True)
class Diagnosis:
    """The checks of one model, and estimated seconds of a full resid_pre and heads sweep."""

    model: str
    family: str
    checks: list[Check]
    seconds: float
    estimates: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(c.name)}</td><td>{'pass' if c.passed else '<b>FAIL</b>'}</td>"
                       f"<td>{c.error:.2e}</td><td>{c.tolerance:.0e}</td><td>{html.escape(c.detail)}</td></tr>"
                       for c in self.checks)
        return (f"<p><b>doctor</b> {html.escape(self.model)} ({html.escape(self.family)}): "
                f"{'all checks pass' if self.passed else f'{len(self.failed)} failed'}</p>"
                f"<table><tr><th>check</th><th></th><th>error</th><th>tolerance</th><th></th></tr>{rows}</table>")


def _prompts(model: "Model", n: int, length: int, seed: int) -> PromptSet:
    """Random token pairs differing at two positions (answers and alternatives random too)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    hi = min(vocab, 1000)
    clean = torch.randint(1, hi, (n, length), generator=g)
    corrupted = clean.clone()
    for p in (length // 3, length - 3):
        corrupted[:, p] = (clean[:, p] + 1 + torch.randint(0, hi - 2, (n,), generator=g)) % (hi - 1) + 1
    answers = torch.randint(1, hi, (n,), generator=g)
    return PromptSet.from_ids(clean, corrupted, answers, (answers % (hi - 1)) + 1, name="doctor-random")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def doctor(model: "Model", prompts: PromptSet | None = None, *, tol: float = 1e-4, seed: int = 0) -> Diagnosis:
    """Run the invariants on ``model`` (see the module docstring); errors are in logits (or the
    raw logit difference for patches), absolute, against ``tol`` scaled by the logits' size."""
    t0 = time.perf_counter()
    ps = prompts if prompts is not None else _prompts(model, n=2, length=12, seed=seed)
    ids = ps.groups()[0].clean
    L = model.n_layers
    checks: list[Check] = []
    own = model.logits(ids)
    scale = max(1.0, float(own.abs().max()))
    tolerance = tol * scale

    def add(name: str, error: float, detail: str = "", limit: float = tolerance) -> None:
        checks.append(Check(name, error <= limit, error, limit, detail))

    with model.attention_fn():
        ours = model.logits(ids)
    add("attention function", _err(ours, own), "logits with actpatch's attention vs the model's own")

    kinds = [k for k in SiteKind if k in model.adapter.site_kinds]
    sites = [Site(k) if k in (SiteKind.EMBED, SiteKind.RESID_FINAL) else Site(k, l) for k in kinds for l in (0, L - 1)]
    sites = list(dict.fromkeys(sites))
    with model.attention_fn():
        with capture(model, sites) as acts:
            base = model.logits(ids)
        with intervene(model, {s: acts[s].clone() for s in sites}):
            back = model.logits(ids)
    add("null patch", _err(back, base), f"{len(sites)} sites written back with their own values")

    chain = [Site("resid_pre", l) for l in range(L)] + [Site("resid_post", l) for l in range(L)]
    with capture(model, chain) as a:
        model.logits(ids)
    err = max((_err(a[Site("resid_post", l)], a[Site("resid_pre", l + 1)]) for l in range(L - 1)), default=0.0)
    add("residual chaining", err, "resid_post[l] vs resid_pre[l + 1]")

    layers = sorted({0, L - 1})
    err = 0.0
    for l in layers:
        z = patch(model, ps, [Site("z", l)], direction="denoise")
        out = patch(model, ps, [Site("attn_out", l)], direction="denoise")
        err = max(err, _err(z.raw[z.metric], out.raw[out.metric]))
    add("z -> attn_out", err, f"all heads' z vs attn_out patched, layers {layers}")

    worst, which = 0.0, ""
    timing: dict[str, float] = {}
    n_pos = ids.shape[1]
    n_kinds = 0
    sample = sorted({0, 1, n_pos // 2, n_pos - 2, n_pos - 1} & set(range(n_pos)))
    for kind in sorted(BATCHED_KINDS, key=lambda k: k.value):
        if kind not in model.adapter.site_kinds:
            continue
        kw: dict = {"layers": layers}
        if kind is SiteKind.MLP_POST:
            kw["neurons"] = [0, model.d_mlp // 2, model.d_mlp - 1]
        if kind in (SiteKind.Z, SiteKind.Q, SiteKind.PATTERN, SiteKind.K_UNGROUPED, SiteKind.V_UNGROUPED):
            kw["heads"] = sorted({0, model.n_heads - 1})
        if kind in (SiteKind.K, SiteKind.V):
            kw["heads"] = sorted({0, model.n_kv_heads - 1})
        if kind.value in ("resid_pre", "z"):  # the estimates below time a full sweep of these layers
            start = time.perf_counter()
            sweep(model, ps, kind, engine="batched", progress=False, **kw)
            timing[kind.value] = time.perf_counter() - start
        if default_per_position(kind):  # the reference's cost is per patch: a sample of positions
            kw["positions"] = sample
        fast = sweep(model, ps, kind, engine="batched", progress=False, **kw)
        ref = sweep(model, ps, kind, engine="reference", progress=False, **kw)
        e = _err(fast.raw[fast.metric], ref.raw[ref.metric])
        n_kinds += 1
        if e >= worst:
            worst, which = e, kind.value
    add("batched == reference", worst, f"{n_kinds} site kinds on layers {layers}, positions {sample}; "
        f"largest error at {which}")

    per_layer = len(layers)
    estimates = {
        "resid_pre sweep (all layers x positions)": timing.get("resid_pre", 0.0) * L / per_layer,
        "heads sweep (all layers x heads)": timing.get("z", 0.0) * L / per_layer
        * model.n_heads / max(1, len({0, model.n_heads - 1})),
    }
    return Diagnosis(model=model.name, family=model.family, checks=checks, seconds=time.perf_counter() - t0,
                     estimates=estimates)
