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

__all__ = ["ATTN_IMPL", "attention_hooks", "actpatch_attention"]

ATTN_IMPL = "actpatch"

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
# id(attention module) -> kind -> [(priority, seq, fn)]: run in that order (writes, outer
# context first, then reads).
_ACTIVE: dict[int, dict[SiteKind, list[tuple[int, int, HookFn]]]] = defaultdict(lambda: defaultdict(list))
_seq = itertools.count()
_registered = False


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
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    pattern = _run(module, SiteKind.PATTERN, pattern)
    out = torch.matmul(pattern, v).transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, pattern


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
