"""Memory budgets: how many prompts run at once, and whether blocks are recomputed, so that a
technique's activations stay inside ``memory_budget``. Mostly for the gradient techniques;
exact sweeps (:func:`actpatch.techniques.exact.sweep_memory_plan`) and forward-only techniques
(:func:`inference_plan`) use steps 1-2 below for the activations they capture.

A forward and backward pass keeps, for every block, what its backward pass reads: about
``12 d_model + 4 d_mlp + n_heads * T`` values per token (measured with autograd's saved-tensor
hooks on a SmolLM2-shaped model: 12,371 + 1.0 x n_heads x T at d_model 576, d_mlp 1536), which
grows with the square of the prompt length through the attention pattern. A technique adds its
own buffers (the source run's activations, gradients at its taps, EAP's node writes). Each
technique states its bytes per prompt (:func:`estimate`), and :func:`plan` runs

1. all prompts of a length group at once when they fit,
2. else as many prompts at a time as fit (every prompt is computed alone, so the values do not
   change),
3. else as many prompts at a time as fit with every block recomputed in the backward pass
   (:func:`~actpatch.hooks.recompute_blocks`: one block's activations at a time, for about one
   more forward pass),
4. else (techniques whose buffers are sums over positions: EAP, EAP-IG, RelP edges) one prompt
   at a time, recomputed, its buffers built and contracted a span of positions at a time,
5. else refuses, before any work, naming the smallest budget that fits one prompt.

The budget covers the technique's activations and buffers, not the model's weights. ``None``
takes :func:`actpatch.engine.batched.memory_budget` (a quarter of the free memory, capped;
``$ACTPATCH_MEMORY_BUDGET`` overrides).

Example:
    >>> from actpatch.memory import parse_budget
    >>> parse_budget("1.5 GiB"), parse_budget(4096)
    (1610612736, 4096)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .errors import MemoryBudgetError
from .sites import Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model
    from .prompts.promptset import PromptSet

__all__ = ["Budget", "MemoryPlan", "inference_plan", "forward_plan", "sequence", "parse_budget", "plan", "activation_bytes",
           "capture_bytes", "block_bytes", "backward_bytes", "format_bytes"]

Budget = "int | str | None"
"""A memory budget: bytes, a size such as ``"4GiB"`` / ``"512 MB"``, or None for the default."""

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_budget(budget: "int | str | None", device: torch.device | str = "cpu") -> int:
    """Bytes of ``budget``: an int (bytes), a string such as ``"4GiB"``, ``"1.5 GB"``, ``"512MiB"``
    (GiB / MiB / KiB are powers of 1024, GB / MB / KB of 1000, a bare G / M / K of 1024), or
    None for the default budget of ``device``."""
    if budget is None:
        from .engine.batched import memory_budget

        return memory_budget(device)
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise MemoryBudgetError(f"memory_budget={budget!r}: give bytes (an int) or a size such as '4GiB' or '512MiB'.")
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise MemoryBudgetError(f"memory_budget={budget!r} is not a size; write e.g. '4GiB', '1.5GB' or '512MiB'.")
        budget = int(float(m.group(1)) * _UNITS[unit])
    if budget <= 0:
        raise MemoryBudgetError(f"memory_budget={budget!r} must be positive; give e.g. '4GiB'.")
    return int(budget)


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (e.g. ``'1.50 GiB'``)."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _element(model: "Model") -> int:
    return torch.finfo(model.dtype).bits // 8


def activation_bytes(model: "Model", site: Site, T: int) -> int:
    """Bytes of one prompt's whole activation at ``site``'s kind (its full tensor, every position,
    head and layer given by the site) for a prompt of ``T`` tokens."""
    sizes = {"pos": T, "query_pos": T, "key_pos": T, "head": model.n_heads, "kv_head": model.n_kv_heads,
             "d_head": model.d_head, "d_model": model.d_model, "d_mlp": model.d_mlp}
    n = 1
    for axis in SiteKind(site.kind).layout[1:]:
        # a dictionary's features: its width is unknown here; count 16 x d_model (typical SAEs)
        n *= sizes.get(axis, 16 * model.d_model)
    return n * max(4, _element(model))  # gradients and estimates are kept in float32 at least


def capture_bytes(model: "Model", site: Site, T: int) -> int:
    """Bytes of one prompt's whole activation at ``site``'s kind as a forward pass captures it
    (in the model's dtype; :func:`activation_bytes` counts gradients' float32)."""
    e = _element(model)
    return activation_bytes(model, site, T) // max(4, e) * e


def block_bytes(model: "Model", T: int, pattern: bool = True) -> int:
    """Bytes one block keeps for the backward pass for one prompt of ``T`` tokens (see the
    module docstring for the per-token count, rounded up). ``pattern``: the attention pattern is
    kept too (actpatch's eager attention function; the model's fused attention keeps none)."""
    per_token = 12 * model.d_model + 4 * model.d_mlp + (model.n_heads * T if pattern else 2 * model.n_heads)
    return int(1.25 * T * per_token) * _element(model)


def backward_bytes(model: "Model", T: int, readouts: int = 1, recompute: bool = False, pattern: bool = True) -> int:
    """Bytes one prompt's forward and backward pass holds: every block's saved activations, or
    (``recompute``) every block's input and one block's activations; plus the readout logits.
    ``pattern``: as in :func:`block_bytes`."""
    logits = 3 * readouts * model.vocab_size * 4
    if recompute:
        return model.n_layers * T * model.d_model * _element(model) + block_bytes(model, T, pattern) + logits
    return model.n_layers * block_bytes(model, T, pattern) + logits


@dataclass(frozen=True)
class MemoryPlan:
    """How a technique runs under a budget: ``rows`` prompt rows at a time (a row is a prompt, or
    one corruption draw of it), ``recompute`` whether blocks are recomputed, ``positions`` how
    many positions its buffers hold at a time (0: all), and the estimated peak ``bytes`` of one
    chunk. ``forward_equivalents``: the work in forward passes of the whole prompt set (a
    backward pass counts two, a recomputed block one more)."""

    technique: str
    budget: int
    rows: int
    total_rows: int
    recompute: bool
    bytes: int
    per_row: int
    forward_equivalents: float
    recomputed_per_row: int = 0
    """Bytes a row with every block recomputed (what the smallest feasible budget is made of)."""
    positions: int = 0
    """Positions a span (0: every position at once; see :func:`plan`, step 4)."""
    held: int = 0
    """Of ``per_row``, the bytes a row holds while its whole chunk runs (a forward-only
    technique's captures, :func:`forward_plan`); the rest of the budget is working memory."""

    @property
    def chunks(self) -> int:
        return math.ceil(self.total_rows / self.rows)

    def __str__(self) -> str:
        how = "every block recomputed, " if self.recompute else ""
        span = f", {self.positions} positions at a time" if self.positions else ""
        return (f"{self.technique}: {self.rows} of {self.total_rows} prompt rows at a time ({how}{self.chunks} chunks"
                f"{span}), about {format_bytes(self.bytes)} of a {format_bytes(self.budget)} budget; "
                f"{self.forward_equivalents:g} forward-pass equivalents")


def plan(technique: str, model: "Model", budget: "int | str | None", *, total_rows: int, per_row: int,
         per_row_recomputed: int, passes: float, draws: int = 1,
         spanned: "Callable[[int], int] | None" = None, positions: int = 0) -> MemoryPlan:
    """Rows per chunk under ``budget`` for a technique needing ``per_row`` bytes a row without
    recomputation (the longest length group's) and ``per_row_recomputed`` with; ``passes``:
    forward-pass equivalents of the whole run; ``draws``: rows per prompt (a chunk holds whole
    prompts). ``spanned``: bytes of a recomputed row whose buffers hold ``n`` of its
    ``positions`` at a time, for techniques that can work so (step 4 of the module docstring)."""
    limit = parse_budget(budget, model.device)
    unit, unit_recomputed = per_row * draws, per_row_recomputed * draws
    if unit <= limit:
        rows = draws * max(1, min(total_rows // draws, limit // max(1, unit)))
        return MemoryPlan(technique, limit, rows, total_rows, False, rows * per_row, per_row, passes, per_row_recomputed)
    if unit_recomputed <= limit and unit_recomputed < unit:
        # recomputation adds one forward pass to each forward + backward pass (three forwards' worth)
        rows = draws * max(1, min(total_rows // draws, limit // max(1, unit_recomputed)))
        return MemoryPlan(technique, limit, rows, total_rows, True, rows * per_row_recomputed, per_row_recomputed,
                          passes * 4 / 3, per_row_recomputed)
    smallest = unit_recomputed
    if spanned is not None and positions > 1:
        smallest = min(smallest, spanned(1) * draws)
        lo, hi = 0, positions - 1  # the longest span that fits (bytes grow with the span)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if spanned(mid) * draws <= limit else (lo, mid - 1)
        if lo:
            return MemoryPlan(technique, limit, draws, total_rows, True, spanned(lo) * draws, spanned(lo), passes * 4 / 3,
                              per_row_recomputed, positions=lo)
    how = (f" even with every block recomputed{', one position at a time' if smallest < unit_recomputed else ''} "
           f"({format_bytes(unit)} without)" if unit_recomputed < unit else "")
    raise MemoryBudgetError(
        f"{technique}: one prompt needs about {format_bytes(smallest)}{how}; "
        f"memory_budget={format_bytes(limit)} does not fit it. Give "
        f"memory_budget='{math.ceil(smallest / 2**20)}MiB' or more, or shorten the prompts.")


def sequence(prompts: "PromptSet") -> tuple[int, int]:
    """``(T, readouts)`` a memory estimate counts per prompt row: the longest prompt plus, for
    answers of several tokens, both teacher-forced branches (answer and alternative: an upper
    bound), and the positions whose logits the metrics read."""
    C = int(prompts.continuation_lengths.max()) - 1
    return int(torch.maximum(prompts.lengths, prompts.corrupted_lengths).max()) + 2 * C, 2 * C + 1


def forward_plan(technique: str, model: "Model", budget: "int | str | None", *, total_rows: int, held: int, work: int,
                 passes: float, draws: int = 1) -> MemoryPlan:
    """:func:`plan` for a technique that runs no backward pass (nothing to recompute), whose
    rows each hold ``held`` bytes while their chunk runs and need ``work`` bytes more for one
    step of work: a given ``budget`` too small for one prompt is refused, naming the smallest;
    the default budget (a share of free memory, not the user's word) then runs one prompt at a
    time instead."""
    per_row = held + work
    try:
        p = plan(technique, model, budget, total_rows=total_rows, per_row=per_row, per_row_recomputed=per_row,
                 passes=passes, draws=draws)
    except MemoryBudgetError:
        if budget is not None:
            raise
        p = MemoryPlan(technique, parse_budget(None, model.device), draws, total_rows, False, per_row * draws, per_row,
                       passes, per_row)
    return dataclasses.replace(p, held=held)


def inference_plan(technique: str, model: "Model", prompts: "PromptSet", sites: "list[Site]",
                   memory_budget: "int | str | None") -> MemoryPlan:
    """:func:`plan` for a technique that only runs forward passes (no gradients) and captures
    the whole activations at ``sites`` of the clean and the corrupted run: one block's
    activations at a time, the residual stream, the captures."""
    T, readouts = sequence(prompts)
    per_row = block_bytes(model, T) + 2 * T * model.d_model * _element(model) + 2 * sum(
        activation_bytes(model, s, T) for s in sites) + 3 * readouts * model.vocab_size * 4
    return plan(technique, model, memory_budget, total_rows=len(prompts), per_row=per_row, per_row_recomputed=per_row,
                passes=2)
