"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The graph: upstream nodes write into the residual stream (the embeddings, every attention
head, every MLP); downstream nodes read it (every head's query input, every KV head's key and
value inputs, every MLP, the logits). An edge u -> v is scored

    score(u -> v) = sum over positions of  delta_write_u . d m / d input_v

where ``delta_write_u = write_u(source run) - write_u(base run)`` (a head's write is its slice
of the output projection, without bias) and the gradient is taken on the base run through v's
input only. EAP-IG averages that gradient over ``ig_steps`` points whose input embeddings move
from the source run's to the base run's.

The gradient through one head's query (or key, value) input is a vector-Jacobian product of
the gradient at that head's q (k, v) with the block's own map residual -> q, recomputed from the
base run's residual stream, so the code stays free of family-specific internals. Because the
residual stream is the sum of all upstream writes, the scores of the edges into a node add up
to the first-order effect of changing that node's whole input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .corruption import Corruption, parse_corruption
from .errors import ActpatchError, MetricError
from .hooks import WRITE, _add, capture, intervene
from .metrics import Metric, compute_metrics, parse_metrics
from .models.attention import actpatch_attention
from .patching import Direction, _direction
from .prompts.promptset import PromptSet
from .sites import Site

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .models.handle import Model

__all__ = ["EdgeScores", "edge_attribution"]


@dataclass(frozen=True)
class EdgeScores:
    """Scores of every edge, ``scores[u, v]`` (mean over prompts; NaN where u cannot reach v).

    ``upstream`` names: ``embed``, ``L{l}.H{h}``, ``L{l}.MLP``; ``downstream``: ``L{l}.H{h}.q``,
    ``L{l}.KV{j}.k`` / ``.v``, ``L{l}.MLP``, ``logits``."""

    upstream: list[str]
    downstream: list[str]
    scores: torch.Tensor  # (U, V)
    per_prompt: torch.Tensor  # (n_prompts, U, V)
    meta: dict

    def top(self, n: int) -> list[tuple[str, str, float]]:
        """The ``n`` edges with the largest |score|: (upstream, downstream, score)."""
        flat = self.scores.nan_to_num(0.0).abs().flatten()
        idx = flat.argsort(descending=True)[:n]
        V = len(self.downstream)
        return [(self.upstream[i // V], self.downstream[i % V], float(self.scores.flatten()[i])) for i in idx.tolist()]

    def into(self, node: str) -> torch.Tensor:
        """Scores of the edges into a downstream node (NaN for unreachable upstream nodes)."""
        return self.scores[:, self.downstream.index(node)]

    def to_pandas(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [(u, v, float(self.scores[i, j])) for i, u in enumerate(self.upstream)
                for j, v in enumerate(self.downstream) if not torch.isnan(self.scores[i, j])]
        return pd.DataFrame(rows, columns=["upstream", "downstream", "score"])


def _graph(model: "Model") -> tuple[list[str], list[tuple[int, int]], list[str], list[tuple[str, int, int]]]:
    """Node names and (layer, head) of upstream nodes; names and (channel, layer, index) of
    downstream ones. Layer -1 is the embedding; layer L the logits."""
    L, H, KV = model.n_layers, model.n_heads, model.n_kv_heads
    up_names, up = ["embed"], [(-1, -1)]
    down_names, down = [], []
    for l in range(L):
        for h in range(H):
            up_names.append(f"L{l}.H{h}")
            up.append((l, h))
        up_names.append(f"L{l}.MLP")
        up.append((l, -2))
        down_names += [f"L{l}.H{h}.q" for h in range(H)] + [f"L{l}.KV{j}.k" for j in range(KV)] + [f"L{l}.KV{j}.v" for j in range(KV)]
        down += [("q", l, h) for h in range(H)] + [("k", l, j) for j in range(KV)] + [("v", l, j) for j in range(KV)]
        down_names.append(f"L{l}.MLP")
        down.append(("mlp", l, -1))
    down_names.append("logits")
    down.append(("logits", L, -1))
    return up_names, up, down_names, down


def _reachable(model: "Model", up: list[tuple[int, int]], down: list[tuple[str, int, int]]) -> torch.Tensor:
    ok = torch.zeros(len(up), len(down), dtype=torch.bool)
    parallel = model.adapter.parallel
    for j, (chan, dl, _) in enumerate(down):
        for i, (ul, uh) in enumerate(up):
            if ul < dl or (chan == "mlp" and ul == dl and uh >= 0 and not parallel):
                ok[i, j] = True
    return ok


def _head_writes(model: "Model", layer: int, dz: torch.Tensor) -> torch.Tensor:
    """(H, B, T, d_model): each head's write into the residual for z changes ``dz`` (B, T, H, D)."""
    o_proj = model.adapter.block_module(layer, model.adapter.spec.o_proj)
    B, T, H, D = dz.shape
    eye = torch.eye(H, dtype=dz.dtype)[:, None, None, :, None]  # (H, 1, 1, H, 1)
    masked = (dz[None] * eye).reshape(H, B, T, H * D)
    # .forward, not __call__: no hooks, so this may run inside captures on the same module
    return o_proj.forward(masked) - o_proj.forward(torch.zeros_like(masked[:1]))


def _input_grads(model: "Model", resid: dict[Site, torch.Tensor], grads: dict) -> list[torch.Tensor]:
    """Per layer, (H + 2 KVH, B, T, d) gradients through each head's q, k, v input: the
    vector-Jacobian products of the q / k / v gradients with the block's residual -> q / k / v map."""
    adapter = model.adapter
    out = []
    for l in range(model.n_layers):
        x = resid[Site("resid_pre", l)].detach().requires_grad_(True)
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)[None]
        with torch.enable_grad(), capture(model, [Site(k, l) for k in "qkv"], detach=False) as acts:
            adapter.run_block(l, x, pos, adapter.position_embeddings(x, pos))
        rows = []
        for kind, n in (("q", model.n_heads), ("k", model.n_kv_heads), ("v", model.n_kv_heads)):
            a, g = acts[Site(kind, l)], grads[Site(kind, l)]
            for h in range(n):
                (gx,) = torch.autograd.grad(a[:, :, h], x, grad_outputs=g[:, :, h], retain_graph=True)
                rows.append(gx)
        out.append(torch.stack(rows))
    return out


def edge_attribution(
    model: "Model",
    prompts: PromptSet,
    *,
    direction: str | Direction = "noise",
    corruption: str | Corruption = "str",
    metric: str = "logit_diff",
    ig_steps: int = 0,
    seed: int = 0,
) -> EdgeScores:
    """Score every edge of the head / MLP graph (EAP; EAP-IG with ``ig_steps > 0``).

    Example:
        >>> import actpatch as ap
        >>> from actpatch.testing import tiny_model
        >>> ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
        >>> edges = ap.edge_attribution(tiny_model("llama", n_layers=2), ps)
        >>> len(edges.upstream), len(edges.downstream)
        (11, 27)
    """
    d = _direction(direction)
    corr = parse_corruption(corruption)
    m = parse_metrics(metric)[0]
    if m not in (Metric.LOGIT_DIFF, Metric.LOGPROB, Metric.PROB, Metric.KL):
        raise MetricError(f"Edge attribution needs a differentiable metric, not {m.value!r}.")
    if corr.activation_level:
        raise ActpatchError("Edge attribution needs a corrupted run; use corruption 'str', 'resample' or 'gaussian'.")
    if model.adapter.spec.attn_out != model.adapter.spec.attn:
        raise ActpatchError(
            f"The {model.family} family normalises the attention output after the output projection, so heads' "
            f"writes do not add up; edge attribution needs per-head writes (gpt2, llama, gpt_neox)."
        )
    if ig_steps < 0:
        raise ActpatchError(f"ig_steps={ig_steps}: use 0 (EAP) or a positive number of steps (EAP-IG, 5-30).")
    up_names, up, down_names, down = _graph(model)
    ok = _reachable(model, up, down)
    L = model.n_layers
    z_sites = [Site("z", l) for l in range(L)]
    mlp_sites = [Site("mlp_out", l) for l in range(L)]
    resid_sites = [Site("resid_pre", l) for l in range(L)]
    corr.prepare(model, prompts)
    R = corr.draws
    per_prompt = torch.zeros(len(prompts), len(up), len(down))
    with actpatch_attention(model.hf):
        for g in prompts.groups():
            clean_run, corr_run = corr.clean_run(g), corr.corrupted_run(model, g, prompts, seed)
            answers, alts = g.answers.repeat_interleave(R), g.alternatives.repeat_interleave(R)
            base, src = (corr_run, clean_run) if d is Direction.DENOISE else (clean_run, corr_run)
            keep = z_sites + mlp_sites + resid_sites
            with src.context(model), capture(model, keep + [Site("embed")]) as s_acts:
                src_logits = model.logits(src.ids, last_only=True)
            with base.context(model), capture(model, keep + [Site("embed")]) as b_acts:
                base_logits = model.logits(base.ids, last_only=True)
            clean_lp = torch.log_softmax((base_logits if base is clean_run else src_logits).float(), -1)
            # upstream writes: (U, B, T, d)
            with torch.no_grad():
                writes = [s_acts[Site("resid_pre", 0)] - b_acts[Site("resid_pre", 0)]]
                for l in range(L):
                    writes += list(_head_writes(model, l, s_acts[Site("z", l)] - b_acts[Site("z", l)]))
                    writes.append(s_acts[Site("mlp_out", l)] - b_acts[Site("mlp_out", l)])
            W = torch.stack(writes)
            steps = [1.0] if ig_steps == 0 else [(k + 1) / ig_steps for k in range(ig_steps)]
            G = None
            for alpha in steps:
                G_step = _downstream_grads(model, base, b_acts, s_acts, alpha, answers, alts, clean_lp, m)
                G = G_step if G is None else G + G_step
            G = G / len(steps)  # type: ignore[operator]
            scores = torch.einsum("ubtd,vbtd->buv", W.float(), G.float())  # (B, U, V)
            per_prompt[g.indices] = scores.reshape(-1, R, len(up), len(down)).mean(1)
    per_prompt[:, ~ok] = float("nan")
    return EdgeScores(upstream=up_names, downstream=down_names, scores=per_prompt.mean(0), per_prompt=per_prompt,
                      meta={"direction": d.value, "corruption": corr.describe(), "metric": m.value,
                            "method": "eap-ig" if ig_steps else "eap", "ig_steps": ig_steps, "seed": seed,
                            "model": {"name": model.name, "weight_hash": model.weight_hash}})


def _downstream_grads(model, base, b_acts, s_acts, alpha, answers, alts, clean_lp, metric) -> torch.Tensor:  # noqa: ANN001
    """(V, B, T, d): gradients of the metric through each downstream node's input, on the base
    run, or (EAP-IG) on a run whose embeddings sit ``alpha`` of the way from source to base."""
    L = model.n_layers
    adapter = model.adapter
    zeros: dict = {}

    def tap(key):  # noqa: ANN001, ANN202
        def fn(x: torch.Tensor) -> torch.Tensor:
            z = torch.zeros_like(x, requires_grad=True)
            zeros[key] = z
            return x + z

        return fn

    patches: dict = {Site(k, l): tap(Site(k, l)) for l in range(L) for k in "qkv"}
    patches[Site("resid_final")] = tap("logits")
    if alpha != 1.0:
        e_base, e_src = b_acts[Site("embed")], s_acts[Site("embed")]
        patches[Site("embed")] = e_src + alpha * (e_base - e_src)
    removers = []
    with torch.enable_grad(), base.context(model), intervene(model, patches), capture(model, [Site("resid_pre", l) for l in range(L)]) as resid:
        try:
            for l in range(L):  # the MLP's own input (its norm's input), not the residual skip path
                norm = adapter.block_module(l, adapter.spec.mlp_in_norm)  # type: ignore[arg-type]
                removers.append(_add(norm, "input", tap(("mlp", l)), WRITE))
            logits = model.hf(input_ids=base.ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            for r in removers:
                r()
        value = compute_metrics([metric], logits, answers, alts, clean_lp)[metric].sum()
        keys = [Site(k, l) for l in range(L) for k in "qkv"] + [("mlp", l) for l in range(L)] + ["logits"]
        gs = dict(zip(keys, torch.autograd.grad(value, [zeros[k] for k in keys], allow_unused=True)))
    gs = {k: (v if v is not None else torch.zeros_like(zeros[k])) for k, v in gs.items()}
    qkv = _input_grads(model, resid, gs)
    out = []
    for l in range(L):
        out += list(qkv[l])
        out.append(gs[("mlp", l)])
    out.append(gs["logits"])
    return torch.stack(out)
