"""An attention function with hook points for q, k, v and the pattern.

Registered with ``transformers.AttentionInterface`` under the name ``"actpatch"`` (and with the
eager mask builder under the same name) the first time it is needed. :func:`attention_hooks`
switches a model to it only while hooks on q / k / v / pattern are active, then restores the
user's implementation (sdpa, eager...), so a model loaded with any implementation can be read
and written at these sites.

It computes plain eager attention (with Gemma-2 soft-capping when the model passes
``softcap``), which is what every supported family's eager path computes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..sites import SiteKind

__all__ = ["ATTN_IMPL", "attention_hooks", "actpatch_attention", "key_value_prefix"]

ATTN_IMPL = "actpatch"

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
# id(attention module) -> kind -> [(priority, seq, fn)]: run in that order (writes, outer
# context first, then reads).
_ACTIVE: dict[int, dict[SiteKind, list[tuple[int, int, HookFn]]]] = defaultdict(lambda: defaultdict(list))
_seq = itertools.count()
_registered = False
# id(attention module) -> (keys, values) of earlier positions, (B, KVH, prefix, D), prepended to
# the keys / values of the positions being computed (suffix runs of the batched engine).
_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _run(module: nn.Module, kind: SiteKind, x: torch.Tensor) -> torch.Tensor:
    per_module = _ACTIVE.get(id(module))
    if not per_module:
        return x
    for _, _, fn in sorted(per_module.get(kind, ()), key=lambda t: (t[0], t[1])):
        out = fn(x)
        if out is not None:
            x = out
    return x


def _actpatch_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Tq, D)
    key: torch.Tensor,  # (B, KVH, Tk, D)
    value: torch.Tensor,  # (B, KVH, Tk, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Hook functions see (B, T, heads, D), the layout of z; transpose back afterwards.
    q = _run(module, SiteKind.Q, query.transpose(1, 2)).transpose(1, 2)
    k = _run(module, SiteKind.K, key.transpose(1, 2)).transpose(1, 2)
    v = _run(module, SiteKind.V, value.transpose(1, 2)).transpose(1, 2)
    prefix = _PREFIX.get(id(module))
    if prefix is not None:
        k = torch.cat([prefix[0].to(k.dtype), k], dim=2)
        v = torch.cat([prefix[1].to(v.dtype), v], dim=2)
    B, H, Tq, D = q.shape
    kvh, Tk = k.shape[1], k.shape[2]
    g = H // kvh  # grouped-query attention: query head h reads KV head h // g (no copies)
    if scaling is None:
        scaling = D**-0.5
    scores = torch.matmul(q.reshape(B, kvh, g, Tq, D), k.unsqueeze(2).transpose(-1, -2)).reshape(B, H, Tq, Tk) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :Tk]
    else:  # suffix runs pass no mask: causal, queries are the last Tq of Tk positions
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        scores = scores.masked_fill(~_causal(Tq, Tk, window, scores.device), float("-inf"))
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    pattern = _run(module, SiteKind.PATTERN, pattern)
    out = torch.matmul(pattern.reshape(B, kvh, g, Tq, Tk), v.unsqueeze(2)).reshape(B, H, Tq, -1)
    out = out.transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, pattern


def recompute_pattern(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention pattern ``(B, H, Tq, Tk)`` this module computes from queries ``(B, Tq, H, D)``
    and keys ``(B, Tk, KVH, D)`` (the sites' layout): scaling, soft-capping, causal mask and
    sliding window as in :func:`_actpatch_attention`. Used by AtP*'s exact softmax recomputation."""
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    B, H, Tq, D = qh.shape
    kvh, Tk = kh.shape[1], kh.shape[2]
    scores = torch.matmul(qh.reshape(B, kvh, H // kvh, Tq, D), kh.unsqueeze(2).transpose(-1, -2)).reshape(B, H, Tq, Tk)
    scores = scores * getattr(module, "scaling", D**-0.5)
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_causal(Tq, Tk, getattr(module, "sliding_window", None), scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def _causal(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) mask of allowed keys: query i sits at absolute position tk - tq + i."""
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (qpos - kpos < window)
    return allowed


@contextmanager
def key_value_prefix(prefixes: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Prepend cached keys / values (B, KVH, prefix, D) per attention module while open."""
    for module, kv in prefixes.items():
        _PREFIX[id(module)] = kv
    try:
        yield
    finally:
        for module in prefixes:
            _PREFIX.pop(id(module), None)


def _ensure_registered() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, _actpatch_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
    _registered = True


@contextmanager
def actpatch_attention(hf_model: nn.Module) -> Iterator[None]:
    """Route the model's attention through the hookable eager function while open (nestable),
    then restore the user's implementation. Runs that are compared with each other should use
    the same attention path: sdpa and eager differ in the last float bits."""
    _ensure_registered()
    config = hf_model.config
    depth = getattr(hf_model, "_actpatch_attn_depth", 0)
    if depth == 0:
        hf_model._actpatch_attn_saved = config._attn_implementation  # type: ignore[attr-defined]
        config._attn_implementation = ATTN_IMPL
    hf_model._actpatch_attn_depth = depth + 1  # type: ignore[attr-defined]
    try:
        yield
    finally:
        hf_model._actpatch_attn_depth -= 1  # type: ignore[attr-defined]
        if hf_model._actpatch_attn_depth == 0:
            config._attn_implementation = hf_model._actpatch_attn_saved  # type: ignore[attr-defined]


@contextmanager
def attention_hooks(
    hf_model: nn.Module, entries: list[tuple[nn.Module, SiteKind, int, HookFn]]
) -> Iterator[None]:
    """Attach ``(attention module, kind, priority, fn)`` hooks, run in (priority, order of
    attachment), while the context is open."""
    if not entries:
        yield
        return
    added: list[tuple[int, SiteKind, tuple[int, int, HookFn]]] = []
    with actpatch_attention(hf_model):
        try:
            for module, kind, prio, fn in entries:
                item = (prio, next(_seq), fn)
                _ACTIVE[id(module)][kind].append(item)
                added.append((id(module), kind, item))
            yield
        finally:
            for mid, kind, item in added:
                lst = _ACTIVE[mid][kind]
                lst.remove(item)
                if not lst:
                    del _ACTIVE[mid][kind]
                if not _ACTIVE[mid]:
                    del _ACTIVE[mid]
