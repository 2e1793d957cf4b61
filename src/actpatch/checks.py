"""Findings: what a careful reader should know about a result, as data.

Checks return :class:`Finding` objects; results carry them (``res.findings``) and the CLI and
report render them. Codes are stable identifiers that tests and users can filter on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .findings import Finding, Level, Origin, sort_findings
from .corruption import CorruptionKind
from .metrics import UNDEFINED_GAP

if TYPE_CHECKING:  # pragma: no cover
    from .results import PatchResult

__all__ = ["Level", "Finding", "check", "CHECK_CODES"]


# -- checks ------------------------------------------------------------------------------------
# Each check reads a PatchResult (values, baselines, per-prompt data, info) and returns Findings.
# The experiment core records in ``info.diagnostics`` what only a model run can tell: the null-patch error and which
# clean prompts the model gets right.

CLOSE_BASELINES_RATIO = 1.0
"""Warn when |M_clean - M_corrupted| < this x the pooled per-prompt std of the baselines."""
PROB_FLOOR = 0.1
"""Warn about the probability floor when the corrupted P(answer) is below this."""
SATURATION = 0.9
"""Warn about saturation when the clean P(answer) is above this."""
RANGE = (-0.2, 1.2)
"""Normalised values outside this range are reported."""
NULL_PATCH_TOL = 1e-4
"""Largest |metric change| allowed when patching a run's own activations back into it."""
SMALL_GAP = {"logit_diff": 0.1, "logprob": 0.1, "kl": 0.1, "prob": 0.01}
"""Warn when |M_clean - M_corrupted| is below this (the metric's raw units: logits, nats,
probability): normalised values divide by the gap, so a small one magnifies every error."""


def _f(level: Level, code: str, message: str, advice: str = "") -> Finding:
    return Finding(level, code, message, advice, Origin.CHECK)


def _baselines_close(res: "PatchResult") -> list[Finding]:
    out = []
    for m, b in res.baselines.items():
        gap = abs(b["clean"] - b["corrupted"])
        if gap <= UNDEFINED_GAP:
            out.append(_f(Level.ERROR, "normalisation_undefined",
                          f"{m}: clean ({b['clean']:.4g}) and corrupted ({b['corrupted']:.4g}) baselines are equal, "
                          f"so the normalised effect is undefined and reported as NaN.",
                          "Check that the corruption changes the behaviour, or read the raw metric (res.raw)."))
            continue
        c, k = res.clean[m], res.corrupted[m]
        if len(c) < 2:
            continue
        spread = float(((c - c.mean()).pow(2).sum() + (k - k.mean()).pow(2).sum()).div(2 * len(c) - 2).sqrt())
        if gap < CLOSE_BASELINES_RATIO * spread:
            out.append(_f(Level.WARNING, "baselines_close",
                          f"{m}: clean - corrupted = {b['clean'] - b['corrupted']:.3g} is small against the per-prompt "
                          f"spread ({spread:.3g}); normalised values are noisy and can be far outside [0, 1].",
                          "Use a corruption that removes the behaviour more clearly, more prompts, or logit_diff."))
    return out


def _small_gap(res: "PatchResult") -> list[Finding]:
    """A gap too small to normalise by, in the metric's own units, whatever the prompts' spread."""
    out = []
    for m, b in res.baselines.items():
        gap = abs(b["clean"] - b["corrupted"])
        floor = SMALL_GAP.get(m)
        if floor is not None and UNDEFINED_GAP < gap < floor:
            unit = {"logit_diff": "logits", "logprob": "nats", "kl": "nats", "prob": "probability"}[m]
            out.append(_f(Level.WARNING, "small_gap",
                          f"{m}: clean - corrupted = {b['clean'] - b['corrupted']:.3g} {unit}, below {floor:g}: "
                          f"normalised values divide by this gap, so noise, rounding and tiny raw changes look like "
                          f"large effects (a raw change of 0.01 reads as {0.01 / gap:.2g}).",
                          "Use prompts where the model's behaviour differs more between the runs, a corruption that "
                          "removes it more clearly, or read the raw metric (res.per_prompt_raw)."))
    return out


def _task_failure(res: "PatchResult") -> list[Finding]:
    correct = res.info.diagnostics.clean_correct
    if not correct:
        return []
    wrong = [i for i, ok in enumerate(correct) if not ok]
    if not wrong:
        return []
    share = 1 - len(wrong) / len(correct)
    return [_f(Level.WARNING, "task_failure",
               f"The model prefers the alternative over the answer on {len(wrong)} of {len(correct)} clean prompts "
               f"(right on {share:.0%}); first ones: {wrong[:8]}.",
               "Keep only solved prompts: prompts, share = ap.prompts.keep_correct(model, prompts).")]


def _prob_floor(res: "PatchResult") -> list[Finding]:
    if "prob" not in res.raw:
        return []
    b = res.baselines["prob"]
    if b["corrupted"] >= PROB_FLOOR or b["clean"] - b["corrupted"] <= UNDEFINED_GAP:
        return []
    floor = -b["corrupted"] / (b["clean"] - b["corrupted"])
    return [_f(Level.WARNING, "probability_floor",
               f"prob: corrupted P(answer) = {b['corrupted']:.3f}, so no patch can score below {floor:.3f} normalised; "
               f"components that hurt the answer (negative heads) are invisible in this metric (Zhang & Nanda 2023).",
               "Read logit_diff alongside it; use probability only as a secondary metric.")]


def _saturation(res: "PatchResult") -> list[Finding]:
    if "prob" in res.clean:
        p = float(res.clean["prob"].mean())
    elif "logprob" in res.clean:
        p = float(res.clean["logprob"].exp().mean())
    else:
        return []
    if p <= SATURATION:
        return []
    return [_f(Level.WARNING, "saturation",
               f"Clean P(answer) = {p:.3f} > {SATURATION}: probability and log-prob saturate, so patches that make the "
               f"model even more confident barely register and several components can each look complete.",
               "Prefer logit_diff, which does not saturate.")]


def _corruption_notes(res: "PatchResult") -> list[Finding]:
    kind = res.info.corruption.name
    name = kind.value
    if kind is CorruptionKind.GAUSSIAN:
        return [_f(Level.WARNING, "gaussian_noise",
                   "Gaussian-noise corruption pushes the embeddings off the training distribution; it can create "
                   "misleading peaks (Zhang & Nanda 2023).",
                   "Confirm with symmetric token replacement (corruption='str') on paired prompts.")]
    if kind in (CorruptionKind.ZERO, CorruptionKind.MEAN):
        return [_f(Level.INFO, f"{name}_ablation",
                   f"{name.capitalize()} ablation replaces activations by values the model may never see together; "
                   f"effects include the damage of going off-distribution.",
                   "Compare with resample ablation or symmetric token replacement.")]
    return []


def _window(res: "PatchResult") -> list[Finding]:
    w = res.info.window
    if w and w > 1:
        return [_f(Level.INFO, "layer_window",
                   f"Each cell patches a window of {w} consecutive layers: a joint effect of the window, not of one layer.",
                   "Try single layers first (window=1) and read windows as joint effects.")]
    return []


def _out_of_range(res: "PatchResult") -> list[Finding]:
    out = []
    lo, hi = RANGE
    for m in res.metrics:
        v = res.normalised(m)
        finite = torch.isfinite(v)
        bad = finite & ((v < lo) | (v > hi))
        if not bad.any():
            continue
        n = int(bad.sum())
        idx = torch.nonzero(bad)[:5].tolist() if v.dim() else [[]]
        where = ", ".join(_cell_label(res, ix) + f" ({float(v[tuple(ix)]):+.2f})" for ix in idx)
        out.append(_f(Level.WARNING, "out_of_range",
                      f"{m}: {n} normalised value(s) outside [{lo}, {hi}], e.g. {where}: negative components "
                      f"(pushing against the answer) or overshoot.",
                      "Negative components can make partial circuits look like >100% recovery; inspect both signs."))
    return out


def _null_patch(res: "PatchResult") -> list[Finding]:
    err = res.info.diagnostics.null_patch_max_abs
    if err is None or err <= NULL_PATCH_TOL:
        return []
    return [_f(Level.ERROR, "null_patch_failed",
               f"Patching the base run's own activations back into it changed the metric by {err:.3g} "
               f"(> {NULL_PATCH_TOL}); every effect in this result is suspect.",
               "The model is not deterministic (dropout in train mode? call model.hf.eval()) or hooks are "
               "mis-attached; report this with the model id.")]


def _single_direction(res: "PatchResult") -> list[Finding]:
    """Sweeps only: a single patch (no dims) is a question about one intervention, not a map of
    components to read in both directions."""
    if res.info.compared or not res.dims:
        return []
    d = res.info.direction.value
    other = "noise" if d == "denoise" else "denoise"
    what = "sufficiency (denoising)" if d == "denoise" else "necessity (noising)"
    return [_f(Level.INFO, "single_direction",
               f"Only {what} was measured; the two directions are not mirror images (Heimersheim & Nanda 2024).",
               f"Run direction='{other}' too and read both with ap.compare(denoise_result, noise_result).")]


_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
"""Half a unit in the last place, relative: the rounding of one value in that dtype."""


def _precision_noise(res: "PatchResult") -> list[Finding]:
    """Half-precision models round every logit to a relative ``eps``: the logit difference of
    two logits of size |l| moves by up to ~2 eps |l| from rounding alone. Effects smaller than
    that (in units of the clean - corrupted gap) cannot be told from noise."""
    eps = _EPS.get(res.info.provenance.dtype)
    if eps is None or not res.dims:
        return []
    out = []
    for m in res.metrics:
        b = res.baselines[m]
        gap = abs(b["clean"] - b["corrupted"])
        if gap == 0:
            continue
        floor = 4 * eps * max(abs(b["clean"]), abs(b["corrupted"]), gap) / gap  # normalised units
        base = res.info.direction.no_effect
        moved = (res.normalised(m) - base).abs()
        small = torch.isfinite(moved) & (moved < floor) & (moved > 0)
        n = int(small.sum())
        if n:
            out.append(_f(Level.INFO, "precision_noise",
                          f"{m}: {n} of {moved.numel()} cells move the metric by less than {floor:.3g} of the clean - "
                          f"corrupted gap, the rounding of {res.info.provenance.dtype} logits; read them as zero.",
                          "Run in float32 (dtype=torch.float32) to resolve effects this small."))
    return out


CHECKS = (_baselines_close, _small_gap, _task_failure, _prob_floor, _saturation, _corruption_notes, _window, _out_of_range,
          _null_patch, _single_direction, _precision_noise)


CHECK_CODES = frozenset({
    "normalisation_undefined", "baselines_close", "small_gap", "task_failure", "probability_floor", "saturation", "gaussian_noise",
    "zero_ablation", "mean_ablation", "layer_window", "out_of_range", "null_patch_failed", "single_direction",
    "precision_noise"})
"""Every code :func:`check` can emit. Only results saved before findings recorded their
:class:`~actpatch.findings.Origin` (formats 1 and 2) need it: their other findings are the technique's."""


def check(result: "PatchResult") -> list[Finding]:
    """Every best-practice check on a :class:`~actpatch.PatchResult`; errors first.

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import micro_model
        >>> model, prompts = micro_model("and")
        >>> res = ap.sweep(model, prompts, "mlp_out", metric=["logit_diff", "prob"], direction="denoise", progress=False)
        >>> [f.code for f in ap.check(res)]
        ['single_direction']
        >>> res = ap.sweep(model, prompts, "mlp_out", corruption=ap.corruption.GaussianNoise(), direction="denoise", progress=False)
        >>> [f.code for f in ap.check(res)]
        ['gaussian_noise', 'single_direction']
    """
    return sort_findings([f for c in CHECKS for f in c(result)])


def _cell_label(res: "PatchResult", ix: list[int]) -> str:
    return ", ".join(f"{d}={res.coords[d][i]}" for d, i in zip(res.dims, ix)) or "the patch"
