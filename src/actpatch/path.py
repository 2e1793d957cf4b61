"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of senders on the
output *through* chosen receivers only.

For each sender set (noising; denoising swaps the runs):

1. Run the clean prompt with the senders' outputs taken from the corrupted run and every other
   head's output (z) frozen to its clean value; MLPs and norms recompute. Record what the
   receivers read: heads' q / k / v (k / v per KV head under grouped-query attention) or the
   final residual stream.
2. Run the clean prompt again, writing only the recorded receiver inputs. Measure.

Results are normalised like every other result (1 = clean, 0 = corrupted); Wang et al.'s
``(M_pt - M_clean) / (M_clean - M_corrupted)`` is ``value - 1`` for noising.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .checks import check
from .corruption import Corruption, parse_corruption
from .errors import ActpatchError, SiteError
from .hooks import capture, intervene
from .metrics import compute_metrics, parse_metrics
from .models.attention import actpatch_attention
from .patching import Direction, _direction, _mean_draws, _versions
from .prompts.promptset import PromptSet
from .results import PatchResult
from .sites import Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["path_patch", "path_sweep"]

RECEIVER_KINDS = (SiteKind.Q, SiteKind.K, SiteKind.V, SiteKind.RESID_FINAL)
SENDER_KINDS = (SiteKind.Z, SiteKind.MLP_OUT)


def _check(senders: Sequence[Sequence[Site]], receivers: Sequence[Site], model: "Model") -> None:
    if not receivers:
        raise ActpatchError("Path patching needs at least one receiver (q / k / v sites or Site('resid_final')).")
    for s in receivers:
        if s.kind not in RECEIVER_KINDS:
            raise SiteError(f"Receiver {s}: use q, k or v of heads, or resid_final.")
        s.check(model)
    for group in senders:
        if not group:
            raise ActpatchError("An empty sender set; give at least one z or mlp_out site.")
        for s in group:
            if s.kind not in SENDER_KINDS:
                raise SiteError(f"Sender {s}: use head outputs (z) or MLP outputs (mlp_out).")
            s.check(model)


def _run(
    model: "Model",
    prompts: PromptSet,
    sender_sets: Sequence[Sequence[Site]],
    receivers: Sequence[Site],
    direction: str | Direction,
    corruption: str | Corruption,
    metric: str | Sequence[str],
    seed: int,
) -> tuple[dict, dict, dict, Direction, Corruption, list]:
    d = _direction(direction)
    corr = parse_corruption(corruption)
    if corr.activation_level:
        raise ActpatchError("Path patching needs a corrupted run; use corruption 'str', 'resample' or 'gaussian'.")
    metrics = parse_metrics(metric)
    _check(sender_sets, receivers, model)
    corr.prepare(model, prompts)
    n, S, R = len(prompts), len(sender_sets), corr.draws
    raw = {m: torch.empty(n, S) for m in metrics}
    clean_b = {m: torch.empty(n) for m in metrics}
    corr_b = {m: torch.empty(n) for m in metrics}
    L = model.n_layers
    z_all = [Site("z", l) for l in range(L)]
    senders_full = sorted({s.full() for g in sender_sets for s in g}, key=str)
    with actpatch_attention(model.hf):
        for g in prompts.groups():
            clean_run, corr_run = corr.clean_run(g), corr.corrupted_run(model, g, prompts, seed)
            answers, alts = g.answers.repeat_interleave(R), g.alternatives.repeat_interleave(R)
            clean_lp = torch.log_softmax(clean_run.logits(model).float(), -1)
            base, src = (corr_run, clean_run) if d is Direction.DENOISE else (clean_run, corr_run)

            def measure(logits: torch.Tensor) -> dict:
                return compute_metrics(metrics, logits, answers, alts, clean_lp)

            with base.context(model), capture(model, z_all) as frozen:
                base_logits = model.logits(base.ids, last_only=True)
            with src.context(model), capture(model, senders_full) as source:
                src_logits = model.logits(src.ids, last_only=True)
            bm, sm = measure(base_logits), measure(src_logits)
            for m in metrics:
                cb, kb = (bm[m], sm[m]) if base is clean_run else (sm[m], bm[m])
                clean_b[m][g.indices] = _mean_draws(cb, R)
                corr_b[m][g.indices] = _mean_draws(kb, R)
            for i, group in enumerate(sender_sets):
                # step 1: senders from the source run, every other head frozen to the base run
                writes: dict[Site, torch.Tensor] = {z: frozen[z].clone() for z in z_all}
                for s in group:
                    if s.kind == SiteKind.Z:
                        writes[Site("z", s.layer)][s.selector()] = source[s.full()][s.selector()]
                    else:
                        writes[s] = source[s.full()][s.selector()]
                with base.context(model), intervene(model, writes), capture(model, list(receivers)) as recorded:
                    model.logits(base.ids, last_only=True)
                # step 2: only the receivers' inputs change
                with base.context(model), intervene(model, {r: recorded[r] for r in receivers}):
                    out = measure(model.logits(base.ids, last_only=True))
                for m in metrics:
                    raw[m][g.indices, i] = _mean_draws(out[m], R)
    return raw, clean_b, corr_b, d, corr, metrics


def _result(model, prompts, raw, clean_b, corr_b, d, corr, metrics, dims, coords, shape, meta) -> PatchResult:  # noqa: ANN001
    n = len(prompts)
    res = PatchResult(
        dims=dims, coords=coords,
        raw={m.value: raw[m].reshape(n, *shape) for m in metrics},
        clean={m.value: clean_b[m] for m in metrics}, corrupted={m.value: corr_b[m] for m in metrics},
        meta={"direction": d.value, "corruption": corr.describe(), "metrics": [m.value for m in metrics],
              "method": "path_patching", "model": {"name": model.name, "family": model.family,
                                                   "weight_hash": model.weight_hash},
              "prompts": prompts.describe(), "versions": _versions(),
              "prompt_attributes": [dict(a) for a in prompts.attributes], **meta},
    )
    res.findings = check(res)
    return res


def path_patch(
    model: "Model",
    prompts: PromptSet,
    senders: Sequence[Site],
    receivers: Sequence[Site],
    *,
    direction: str | Direction = "noise",
    corruption: str | Corruption = "str",
    metric: str | Sequence[str] = "logit_diff",
    seed: int = 0,
) -> PatchResult:
    """The effect of one sender set on the output through ``receivers`` only (no dims).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> m = tiny_model("llama")
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> res = ap.path_patch(m, ps, [ap.Site("z", 0, head=1)], [ap.Site("q", 1, head=2)])
        >>> res.values.shape
        torch.Size([])
    """
    raw, cb, kb, d, corr, metrics = _run(model, prompts, [list(senders)], receivers, direction, corruption, metric, seed)
    return _result(model, prompts, raw, cb, kb, d, corr, metrics, (), {}, (),
                   {"target": "path", "senders": [str(s) for s in senders], "receivers": [str(r) for r in receivers]})


def path_sweep(
    model: "Model",
    prompts: PromptSet,
    receivers: Sequence[Site],
    *,
    sender: str = "z",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    direction: str | Direction = "noise",
    corruption: str | Corruption = "str",
    metric: str | Sequence[str] = "logit_diff",
    seed: int = 0,
) -> PatchResult:
    """Path-patch every sender head (``sender="z"``, dims layer x head) or MLP
    (``sender="mlp_out"``, dims layer) into ``receivers``. Senders at or after the last
    receiver layer cannot reach it and are skipped only by the model's causality (they score
    the clean value)."""
    kind = SiteKind(sender)
    if kind not in SENDER_KINDS:
        raise SiteError(f"sender={sender!r}: use 'z' (heads) or 'mlp_out'.")
    lays = list(range(model.n_layers)) if layers is None else list(layers)
    if kind == SiteKind.Z:
        hs = list(range(model.n_heads)) if heads is None else list(heads)
        sets = [[Site("z", l, head=h)] for l in lays for h in hs]
        dims, coords, shape = ("layer", "head"), {"layer": lays, "head": hs}, (len(lays), len(hs))
    else:
        sets = [[Site("mlp_out", l)] for l in lays]
        dims, coords, shape = ("layer",), {"layer": lays}, (len(lays),)
    raw, cb, kb, d, corr, metrics = _run(model, prompts, sets, receivers, direction, corruption, metric, seed)
    return _result(model, prompts, raw, cb, kb, d, corr, metrics, dims, coords, shape,
                   {"target": f"path:{kind.value}", "receivers": [str(r) for r in receivers]})
