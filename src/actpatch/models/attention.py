"""An attention function with hook points for q, k, v and the pattern, and per-model state.

The function is registered with ``transformers.AttentionInterface`` under the name
``"actpatch"`` (and the eager mask builder under the same name) the first time it is needed;
registering is idempotent. :meth:`AttentionState.enabled` switches one model to it while open,
then restores the user's implementation (sdpa, eager...) exactly, so a model loaded with any
implementation can be read and written at these sites.

Everything that varies (hooks on q / k / v / pattern, key / value prefixes of the batched
engine, the saved implementation) lives in the :class:`AttentionState` of one
:class:`~actpatch.Model` handle. The shared function finds the state of the model whose forward
pass is running through a context variable that only holds states while their model is in
attention mode; nothing is written onto the user's modules.

It computes plain eager attention (with Gemma-2 soft-capping when the model passes
``softcap``), which is what every supported family's eager path computes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import nn

from ..sites import SiteKind

__all__ = ["ATTN_IMPL", "AttentionState", "recompute_pattern", "HookFn", "continuation_tail", "hidden_tail"]

ATTN_IMPL = "actpatch"

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class AttentionState:
    """One model's attention hooks and key / value prefixes, keyed by attention module."""

    def __init__(self, hf_model: nn.Module) -> None:
        self.hf_model = hf_model
        # id(attention module) -> kind -> [(priority, seq, fn)], run in that order
        self.hooks: dict[int, dict[SiteKind, list[tuple[int, int, HookFn]]]] = defaultdict(lambda: defaultdict(list))
        # id(attention module) -> (keys, values) of earlier positions, (Bp, KVH, prefix, D); a
        # forward pass of K * Bp rows: row r continues prefix row r % Bp
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # teacher forcing (see actpatch.prompts.continuation): position id and branch of every
        # token of the sequence, prompt then continuation; queries see their own branch only
        self.tree: tuple[torch.Tensor, torch.Tensor] | None = None
        self._own: set[int] | None = None
        self._seq = itertools.count()
        self._depth = 0
        self._saved: str | None = None

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` belongs to this state's model."""
        if self._own is None:
            self._own = {id(m) for m in self.hf_model.modules()}
        return id(module) in self._own

    @contextmanager
    def branched(self, positions: torch.Tensor, branches: torch.Tensor) -> Iterator[None]:
        """While open, attention follows the continuation tree: token ``i`` of the sequence
        (``positions`` and ``branches``, (S,)) attends to earlier prompt tokens and to earlier
        tokens of its own branch, with sliding windows measured in position ids. Keys are the
        sequence's first ``Tk`` tokens and queries its last ``Tq`` of them, as in suffix runs."""
        saved = self.tree
        self.tree = (positions, branches)
        try:
            with self.enabled():
                yield
        finally:
            self.tree = saved

    def replay(self) -> "_Replay":
        """The state forward passes run under now (continuation tree, hidden tail, attention
        path) as a context manager to re-enter later, as often as needed: a block recomputed in
        a backward pass must compute what it computed in the forward pass."""
        return _Replay(self, self.tree, _TAIL.get(), self.active)

    @property
    def active(self) -> bool:
        """Whether the model currently runs the actpatch attention function."""
        return self._depth > 0

    def has(self, module: nn.Module, *kinds: SiteKind) -> bool:
        """Whether hooks of any of ``kinds`` are attached to ``module``."""
        hooks = self.hooks.get(id(module), {})
        return any(hooks.get(kind) for kind in kinds)

    def run(self, module: nn.Module, kind: SiteKind, x: torch.Tensor) -> torch.Tensor:
        for _, _, fn in sorted(self.hooks.get(id(module), {}).get(kind, ()), key=lambda t: (t[0], t[1])):
            out = fn(x)
            if out is not None:
                x = out
        return x

    @contextmanager
    def enabled(self) -> Iterator[None]:
        """Route the model's attention through the hookable eager function while open
        (nestable), then restore the user's implementation. Runs that are compared with each
        other should use the same attention path: sdpa and eager differ in the last float bits."""
        _ensure_registered()
        config = self.hf_model.config
        if self._depth == 0:
            self._saved = config._attn_implementation
            config._attn_implementation = ATTN_IMPL
        self._depth += 1
        token = _ACTIVE.set(_ACTIVE.get() + (self,))
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self._depth -= 1
            if self._depth == 0:
                config._attn_implementation = self._saved

    @contextmanager
    def hooked(self, entries: list[tuple[nn.Module, SiteKind, int, HookFn]]) -> Iterator[None]:
        """Attach ``(attention module, kind, priority, fn)`` hooks, run in (priority, order of
        attachment), while the context is open."""
        if not entries:
            yield
            return
        added: list[tuple[int, SiteKind, tuple[int, int, HookFn]]] = []
        with self.enabled():
            try:
                for module, kind, prio, fn in entries:
                    item = (prio, next(self._seq), fn)
                    self.hooks[id(module)][kind].append(item)
                    added.append((id(module), kind, item))
                yield
            finally:
                for mid, kind, item in added:
                    lst = self.hooks[mid][kind]
                    lst.remove(item)
                    if not lst:
                        del self.hooks[mid][kind]
                    if not self.hooks[mid]:
                        del self.hooks[mid]

    @contextmanager
    def key_value_prefix(self, prefixes: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Prepend cached keys / values (Bp, KVH, prefix, D) per attention module while open. The
        forward pass may run ``K * Bp`` rows, row ``r`` continuing prefix row ``r % Bp`` (the
        batched engine's patches of the same prompts): the prefix is read, never copied per row."""
        for module, kv in prefixes.items():
            self.prefix[id(module)] = kv
        try:
            yield
        finally:
            for module in prefixes:
                self.prefix.pop(id(module), None)


_ACTIVE: ContextVar[tuple[AttentionState, ...]] = ContextVar("actpatch_attention_states", default=())
"""The states of the models now in attention mode (innermost last); empty outside contexts."""


def _state_of(module: nn.Module) -> AttentionState | None:
    for state in reversed(_ACTIVE.get()):
        if id(module) in state.hooks or id(module) in state.prefix or (state.tree is not None and state.owns(module)):
            return state
    return None


class _Replay:
    """A re-enterable context: an :class:`AttentionState`'s tree, hidden tail and attention path
    as they were when :meth:`AttentionState.replay` was called."""

    def __init__(self, state: AttentionState, tree: tuple[torch.Tensor, torch.Tensor] | None, tail: int, on: bool) -> None:
        self.state, self.tree, self.tail, self.on = state, tree, tail, on
        self._stack: list = []

    def __enter__(self) -> None:
        enabled = self.state.enabled() if self.on else None
        if enabled is not None:
            enabled.__enter__()
        self._stack.append((self.state.tree, _TAIL.set(self.tail), enabled))
        self.state.tree = self.tree

    def __exit__(self, *exc: object) -> None:
        tree, token, enabled = self._stack.pop()
        self.state.tree = tree
        _TAIL.reset(token)
        if enabled is not None:
            enabled.__exit__(*exc)


_TAIL: ContextVar[int] = ContextVar("actpatch_continuation_tail", default=0)
"""How many trailing positions of the running sequence are continuation tokens, hidden from site hooks."""


def hidden_tail() -> int:
    """Trailing positions (continuation tokens) that site hooks must not see now (0 outside
    teacher-forced runs)."""
    return _TAIL.get()


@contextmanager
def continuation_tail(n: int) -> Iterator[None]:
    """While open, the last ``n`` positions of every forward pass are continuation tokens:
    captures and writes at sites see the prompt positions only (see :mod:`actpatch.hooks`)."""
    token = _TAIL.set(int(n))
    try:
        yield
    finally:
        _TAIL.reset(token)


def _tree_allowed(tree: tuple[torch.Tensor, torch.Tensor], tq: int, tk: int, window: int | None,
                  device: torch.device) -> torch.Tensor:
    """(Tq, Tk) allowed keys under the continuation tree: earlier tokens of the prompt or of the
    query's own branch (within the sliding window, in position ids)."""
    positions, branches = (t.to(device) for t in tree)
    qi = torch.arange(tk - tq, tk, device=device)
    ki = torch.arange(tk, device=device)
    bq, bk = branches[qi][:, None], branches[ki][None, :]
    allowed = (ki[None, :] <= qi[:, None]) & ((bk == 0) | (bk == bq))
    if window:
        allowed = allowed & (positions[qi][:, None] - positions[ki][None, :] < window)
    return allowed


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
    state = _state_of(module)
    # Hook functions see (B, T, heads, D), the layout of z; transpose back afterwards.
    q, k, v = query, key, value
    if state is not None:
        q = state.run(module, SiteKind.Q, query.transpose(1, 2)).transpose(1, 2)
        k = state.run(module, SiteKind.K, key.transpose(1, 2)).transpose(1, 2)
        v = state.run(module, SiteKind.V, value.transpose(1, 2)).transpose(1, 2)
    prefix = state.prefix.get(id(module)) if state is not None else None
    ungroup = state is not None and state.has(module, SiteKind.K_UNGROUPED, SiteKind.V_UNGROUPED)
    if ungroup:  # one copy of each KV head per query head that reads it, hooked per query head
        g = q.shape[1] // k.shape[1]
        k = state.run(module, SiteKind.K_UNGROUPED, k.repeat_interleave(g, 1).transpose(1, 2)).transpose(1, 2)
        v = state.run(module, SiteKind.V_UNGROUPED, v.repeat_interleave(g, 1).transpose(1, 2)).transpose(1, 2)
        if prefix is not None:
            prefix = (prefix[0].repeat_interleave(g, 1), prefix[1].repeat_interleave(g, 1))
    B, H, Tq, D = q.shape
    P = 0 if prefix is None else prefix[0].shape[2]
    if scaling is None:
        scaling = D**-0.5
    scores = _grouped_scores(q, k)
    if prefix is not None:  # the shared prefix's scores first: keys in position order
        kp = prefix[0].to(k.device, k.dtype)
        scores = torch.cat([_shared(q, kp.transpose(-1, -2)), scores], dim=-1)
    scores = scores.mul_(scaling)  # in place here and below: at long prompts the (Tq, Tk) passes dominate
    Tk = scores.shape[-1]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    tree = state.tree if state is not None else None
    if tree is not None:  # teacher forcing: the continuation tree replaces the causal mask
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        scores = scores.masked_fill_(~_tree_allowed(tree, Tq, Tk, window, scores.device), float("-inf"))
    elif attention_mask is not None:
        mask = attention_mask[:, :, :, :Tk]
        scores = scores.add_(mask) if mask.dtype == scores.dtype else scores + mask
    else:  # suffix runs pass no mask: causal, queries are the last Tq of Tk positions
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        scores = scores.masked_fill_(~_causal(Tq, Tk, window, scores.device), float("-inf"))
    pattern = torch.softmax(scores, dim=-1, dtype=_softmax_dtype(q.dtype)).to(q.dtype)
    if state is not None:
        pattern = state.run(module, SiteKind.PATTERN, pattern)
    if prefix is None:
        out = _grouped_mix(pattern, v)
    else:  # two partial products summed: in float32 for half-precision models, rounded once as one product would be
        acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
        out = (_shared(pattern[..., :P].to(acc), prefix[1].to(v.device, acc))
               + _grouped_mix(pattern[..., P:].to(acc), v.to(acc))).to(v.dtype)
    out = out.transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, pattern


def _grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Unscaled ``q k^T`` (B, H, Tq, Tk) of queries (B, H, Tq, D) and keys (B, KVH, Tk, D) under
    grouped-query attention (query head h reads KV head h // (H / KVH)): each KV head's query
    heads are stacked along the query axis, so no key is copied per query head."""
    B, H, Tq, D = q.shape
    kvh = k.shape[1]
    return torch.matmul(q.reshape(B, kvh, H // kvh * Tq, D), k.transpose(-1, -2)).view(B, H, Tq, k.shape[2])


def _grouped_mix(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``pattern v`` (B, H, Tq, D) of a pattern (B, H, Tq, Tk) and values (B, KVH, Tk, D), grouped
    as in :func:`_grouped_scores`."""
    B, H, Tq, Tk = pattern.shape
    kvh = v.shape[1]
    return torch.matmul(pattern.reshape(B, kvh, H // kvh * Tq, Tk), v).view(B, H, Tq, v.shape[-1])


def _shared(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x m`` per row for rows (K * Bp, H, Tq, X) of which row r reads ``m[r % Bp]`` ((Bp, KVH,
    X, Y), grouped-query as in :func:`_grouped_scores`): the batched engine's K patches of Bp
    prompts against their prompts' cached prefix, one product per prompt and KV head with every
    patch's queries stacked, never a copy of the prefix per patch. Returns (K * Bp, H, Tq, Y)."""
    rows, H, Tq, X = x.shape
    Bp, kvh, _, Y = m.shape
    if rows % Bp:
        raise ValueError(f"{rows} query rows do not repeat a prefix of {Bp} rows")
    K, g = rows // Bp, H // kvh
    stacked = x.reshape(K, Bp, kvh, g, Tq, X).permute(1, 2, 0, 3, 4, 5).reshape(Bp, kvh, K * g * Tq, X)
    out = torch.matmul(stacked, m).view(Bp, kvh, K, g, Tq, Y)
    return out.permute(2, 0, 1, 3, 4, 5).reshape(rows, H, Tq, Y)


def recompute_pattern(module: nn.Module, q: torch.Tensor, k: torch.Tensor,
                      tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The attention pattern ``(B, H, Tq, Tk)`` this module computes from queries ``(B, Tq, H, D)``
    and keys ``(B, Tk, KVH, D)`` (the sites' layout): scaling, soft-capping, causal mask (or the
    continuation ``tree``'s, (positions, branches) of a teacher-forced sequence) and sliding
    window as in :func:`_actpatch_attention`. Used by AtP*'s exact softmax recomputation."""
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    D, Tq, Tk = qh.shape[-1], qh.shape[2], kh.shape[2]
    scores = _grouped_scores(qh, kh) * getattr(module, "scaling", D**-0.5)
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    window = getattr(module, "sliding_window", None)
    allowed = _causal(Tq, Tk, window, scores.device) if tree is None else _tree_allowed(tree, Tq, Tk, window,
                                                                                        scores.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=_softmax_dtype(q.dtype)).to(q.dtype)


def _causal(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) mask of allowed keys: query i sits at absolute position tk - tq + i."""
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    kpos = torch.arange(tk, device=device)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (qpos - kpos < window)
    return allowed


def _ensure_registered() -> None:
    """Register the function and its mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if AttentionInterface._global_mapping.get(ATTN_IMPL) is not _actpatch_attention:
        AttentionInterface.register(ATTN_IMPL, _actpatch_attention)
        AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax runs in float32 (as every family's eager path), or in float64 for float64
    models (whose reason to exist is precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
