"""A small, deterministic TopK SAE trainer, and the quality figures of a dictionary.

Why our own: the field's trainers pull in what actpatch does not run on (SAELens needs
TransformerLens; dictionary_learning needs nnsight); a TopK SAE (Gao et al. 2024) trains in
a few dozen lines. The recipe:

- activations of the site on token windows (the first token of each window is left out: in
  many models it carries a "massive activation", hundreds of times the others' norm, which
  would dominate the loss; that token is identical in a clean / corrupted pair, so patches
  never touch it);
- inputs scaled by one constant so their mean squared norm is ``d_in`` (folded into the
  weights at the end: the saved dictionary takes raw activations);
- ``b_dec`` starts at the data mean, decoder rows at random unit vectors, the encoder at
  their transpose; Adam on the mean squared error, decoder rows renormalised after each
  step, plus the AuxK loss (the top ``k_aux`` dead latents reconstruct the residual) so fewer
  features die; the encoder's gradient is taken through the ``k`` chosen latents only;
- everything seeded: the same data and seed give the same weights on one machine.

:func:`dictionary_quality` reports the fraction of variance unexplained (FVU), L0, dead
features, and how much a metric moves when the reconstruction replaces the activation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import DictionaryError
from ..hooks import capture, stop_after
from ..sites import Site
from .dictionary import Activation, Dictionary

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from ..prompts.promptset import PromptSet

__all__ = ["collect_activations", "train_topk", "dictionary_quality"]


def collect_activations(model: "Model", sites: Sequence[Site], sequences: Sequence[Sequence[int]], *,
                        batch_size: int = 16, skip_first: bool = True) -> dict[Site, torch.Tensor]:
    """``{site: (n_tokens, width)}`` float32 activations of ``sequences`` (token id lists; runs
    of equal length share a forward pass, which stops after the deepest site)."""
    sites = list(sites)
    last = max(sites, key=lambda s: (s.layer, s.kind.value))
    by_len: dict[int, list[Sequence[int]]] = {}
    for seq in sequences:
        if len(seq) > (1 if skip_first else 0):
            by_len.setdefault(len(seq), []).append(seq)
    out: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    with torch.inference_mode():
        for T, seqs in sorted(by_len.items()):
            for i in range(0, len(seqs), batch_size):
                ids = torch.tensor(seqs[i:i + batch_size])
                with capture(model, sites) as acts, stop_after(model, Site("resid_post", last.layer)):
                    model.hf(input_ids=ids.to(model.device), use_cache=False)
                for s in sites:
                    a = acts[s][:, 1:] if skip_first else acts[s]
                    out[s].append(a.reshape(-1, a.shape[-1]).float().cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def train_topk(x: torch.Tensor, site: Site, *, n_features: int, k: int, steps: int = 1000, batch: int = 512,
               lr: float = 1e-3, seed: int = 0, k_aux: int = 64, aux_weight: float = 1 / 32,
               progress: Callable[[int], None] | None = None) -> Dictionary:
    """A TopK SAE on activations ``x`` (n, d) for ``site`` (see the module docstring).

    Each step encodes the batch densely without gradients, picks the top ``k`` latents, and
    recomputes only those ``k`` pre-activations with gradients (a gather of ``k`` encoder
    columns): the encoder's backward pass costs ``k / n_features`` of a dense one, and the
    gradient is the same (the top-k selection has no gradient)."""
    if x.dim() != 2 or x.shape[0] < batch:
        raise DictionaryError(f"Training needs (n, d) activations with n >= batch={batch}, got {tuple(x.shape)}.")
    if not 0 < k <= n_features:
        raise DictionaryError(f"k={k} must be in 1..n_features={n_features}.")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the gathers' backward (index_put) would add in any order
    try:
        return _train_topk(x, site, n_features=n_features, k=k, steps=steps, batch=batch, lr=lr, seed=seed,
                           k_aux=k_aux, aux_weight=aux_weight, progress=progress)
    finally:
        torch.use_deterministic_algorithms(prev)


def _train_topk(x: torch.Tensor, site: Site, *, n_features: int, k: int, steps: int, batch: int, lr: float,
                seed: int, k_aux: int, aux_weight: float, progress: Callable[[int], None] | None) -> Dictionary:
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    scale = math.sqrt(d / float(x.pow(2).sum(-1).mean()))
    data = x * scale
    W_dec = torch.randn(n_features, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    # the encoder is kept as (F, d) rows (its transpose is the saved W_enc): gathers take rows
    params = {"W_enc_t": W_dec.clone(), "b_enc": torch.zeros(n_features), "W_dec": W_dec, "b_dec": data.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    since_fired = torch.zeros(n_features)
    W_enc_t, b_enc, W_dec_p, b_dec = params["W_enc_t"], params["b_enc"], params["W_dec"], params["b_dec"]
    for _ in range(steps):
        xb = data[torch.randint(0, n, (batch,), generator=g)]
        centred = xb - b_dec
        with torch.no_grad():
            pre = torch.addmm(b_enc, centred, W_enc_t.T)
            idx = pre.topk(k, dim=-1).indices  # (B, k)
        vals = (torch.einsum("bd,bkd->bk", centred, W_enc_t[idx]) + b_enc[idx]).relu()
        recon = torch.einsum("bk,bkd->bd", vals, W_dec_p[idx]) + b_dec
        loss = (recon - xb).pow(2).sum(-1).mean()
        with torch.no_grad():
            fired = torch.zeros(n_features, dtype=torch.bool)
            fired[idx[vals > 0]] = True
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + batch)
            dead = since_fired > n  # not active on an epoch's worth of tokens
        if bool(dead.any()):  # AuxK: the dead latents learn to explain the residual
            ka = min(k_aux, int(dead.sum()))
            with torch.no_grad():
                aidx = pre.masked_fill(~dead, -float("inf")).topk(ka, dim=-1).indices
            avals = (torch.einsum("bd,bkd->bk", centred.detach(), W_enc_t[aidx]) + b_enc[aidx]).relu()
            aux = torch.einsum("bk,bkd->bd", avals, W_dec_p[aidx])
            loss = loss + aux_weight * (aux - (xb - recon).detach()).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec_p /= W_dec_p.norm(dim=1, keepdim=True)
        if progress is not None:
            progress(1)
    with torch.no_grad():  # fold the input scale into the weights: the dictionary reads raw activations
        W_enc = W_enc_t.detach().T * scale
        W_dec_out = W_dec_p.detach() / scale
        b_dec_out = b_dec.detach() / scale
    return Dictionary(W_enc.contiguous(), b_enc.detach().clone(), W_dec_out.contiguous(), b_dec_out.clone(), site,
                      activation=Activation.TOPK, k=k)


def dictionary_quality(d: Dictionary, x: torch.Tensor, *, model: "Model | None" = None,
                       prompts: "PromptSet | None" = None, metric: str = "logit_diff") -> dict[str, Any]:
    """Quality figures on held-out activations ``x`` (n, d_in): ``fvu`` (fraction of variance
    unexplained), ``l0`` (mean active features per token), ``dead`` (share of features never
    active on ``x``); with ``model`` and ``prompts`` (single-token answers), the mean clean
    logit difference with the model's own activation (``logit_diff``) and with the
    reconstruction in its place (``logit_diff_recon``: the error term zeroed at every position
    but the first, which the trainer leaves out), in raw units."""
    with torch.no_grad():
        f = d.encode(x)
        recon = d.decode(f, x)
        fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        out: dict[str, Any] = {"fvu": round(fvu, 4), "l0": round(float((f > 0).sum(-1).float().mean()), 2),
                               "dead": round(float(((f > 0).sum(0) == 0).float().mean()), 4), "tokens": int(x.shape[0])}
    if model is not None and prompts is not None:
        out.update(_logit_diffs(model, d, prompts))
    return out


def _logit_diffs(model: "Model", d: Dictionary, prompts: "PromptSet") -> dict[str, float]:
    """Mean clean logit difference with the model's own activation and with the
    reconstruction in its place (the error term zeroed at every position but the first)."""
    from ..hooks import intervene

    if prompts.multi_token:
        raise DictionaryError("The reconstruction's metric change is measured on single-token answers.")

    def drop_error(e: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros_like(e)
        kept[:, 0] = e[:, 0]
        return kept

    own, recon = [], []
    with _attached(model, d):
        for group in prompts.groups():
            rows = torch.arange(len(group.indices))
            for out, ctx in ((own, None), (recon, {d.error_site(): drop_error})):
                if ctx is None:
                    logits = model.logits(group.clean, last_only=True)
                else:
                    with intervene(model, ctx):
                        logits = model.logits(group.clean, last_only=True)
                out.append((logits[rows, group.answers] - logits[rows, group.alternatives]).float())
    a, b = torch.cat(own), torch.cat(recon)
    return {"logit_diff": round(float(a.mean()), 4), "logit_diff_recon": round(float(b.mean()), 4)}


def _attached(model: "Model", d: Dictionary) -> Any:
    from .activity import _attached as attached

    return attached(model, d)
