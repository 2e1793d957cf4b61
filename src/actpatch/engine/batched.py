"""The batched engine: the reference engine's numbers, computed with far less work.

Three savings, each exact:

1. **Known no-ops.** Base and source runs read the same tokens before the first position where
   their inputs differ (``diff_start``), so, attention being causal, their activations there
   are equal: writes before ``diff_start`` change nothing. A patch made only of such writes
   scores the base run's metric without running.
2. **Prefix and layer reuse.** A patch whose earliest write is at (layer ``l``, position ``q``)
   cannot change anything at layers < ``l`` or positions < ``q``. Its row starts at block
   ``l`` from the base run's residual stream, computes positions ``q..T-1`` only, and attends to
   the base run's cached keys / values for positions < ``q`` (read in place: every patch of a
   prompt shares them, one attention product per prompt with all its patches' queries stacked).
3. **Batching.** Patches with the same ``q`` share a forward pass, one row per (patch, prompt).
   Rows are sorted by start layer and join the batch at their layer ("staggered start"), so
   every block runs once per chunk on exactly the rows that need it. Only the last position's
   logits are computed.

Everything runs through the ``actpatch`` attention function (eager attention with hook points
and a key/value prefix), in inference mode, in chunks sized from the memory available.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch

from ..errors import EngineError
from ..hooks import WRITE, HookFn, _hooks, capture
from ..metrics import Measure, Metric
from ..subspace import along
from ..sites import Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from ..corruption import Run
    from ..models.adapters import Adapter
    from ..models.handle import Model
    from ..prompts.continuation import Continuation
    from ..experiment.plan import Patch
    from ..subspace import Subspace

__all__ = ["run_batched", "run_blocks", "row_bytes", "SUPPORTED", "memory_budget", "free_memory", "base_sites"]


def base_sites(model: "Model") -> list[Site]:
    """What the batched engine reads from the base run: residual stream, keys and values of every layer."""
    return [Site(k, l) for l in range(model.n_layers) for k in ("resid_pre", "k", "v")]

SUPPORTED = frozenset(SiteKind) - {SiteKind.EMBED, SiteKind.RESID_FINAL}
"""Kinds the batched engine patches (the others run on the reference engine)."""


def free_memory(device: torch.device | str = "cpu") -> int:
    """Free bytes where activations will live: the accelerator's free memory (CUDA, from the
    driver) when ``device`` is one, else the host's available memory (``/proc/meminfo``; 8 GiB
    when it cannot be read)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    free = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return free


def memory_budget(device: torch.device | str = "cpu") -> int:
    """Bytes the engine may use for activations: a quarter of the free memory of ``device`` (see
    :func:`free_memory`), at most 2 GiB on the host and 16 GiB on an accelerator;
    ``$ACTPATCH_MEMORY_BUDGET`` (bytes) overrides."""
    env = os.environ.get("ACTPATCH_MEMORY_BUDGET")
    if env:
        return int(env)
    cap = (16 << 30) if torch.device(device).type == "cuda" else (2 << 30)
    return min(free_memory(device) // 4, cap)


def row_bytes(model: "Model", q: int, T: int, C: int = 0, readouts: int = 0) -> int:
    """Rough peak bytes of one (patch, prompt) row computing positions q..T-1 and ``C``
    continuation tokens in one block, plus its ``readouts`` full-vocabulary logits. Its
    attention scores over all ``T + C`` keys count (and their copies: scaled, masked,
    normalised, split at the prefix); the base run's keys and values before ``q`` do not: the
    rows of one prompt read them where the base run left them (see the ``actpatch`` attention
    function), so they are the caller's (:func:`base_sites`), held once per prompt."""
    ts = T - q + C
    per_token = 12 * model.d_model + 4 * model.d_mlp + 6 * model.n_heads * (T + C)
    return (ts * per_token + 2 * readouts * model.vocab_size) * torch.finfo(model.dtype).bits // 8


CACHE_BYTES = 8 << 20
"""On the host, a chunk's MLP activations are held to about this many bytes (patches a chunk:
:func:`cache_patches`)."""


def cache_patches(model: "Model", tokens: int) -> int:
    """Patches a chunk on the host when each patch computes ``tokens`` token rows: as many as keep
    the chunk's MLP hidden activations within :data:`CACHE_BYTES` (at least one), so that the
    block's elementwise passes run from the processor's cache. On 2 CPU cores the bundled model's
    all-heads sweep of 32 prompts took 45-47 s in one chunk of 270 heads (each activation about
    100 MB, every pass a trip to memory) and 29 s in chunks within 8 MiB (33 s within 16 MiB).
    Unbounded on accelerators."""
    if model.device.type != "cpu":
        return 1 << 62
    return max(1, CACHE_BYTES // max(1, tokens * model.d_mlp * torch.finfo(model.dtype).bits // 8))


def _views(site: Site, q: int) -> tuple[tuple, tuple]:
    """Index tuples (without the batch axis) into the destination (suffix positions q..T-1)
    and the source (all T positions) tensors for one site."""
    dest, src = [], []
    layout = site.kind.layout[1:]
    for axis in layout:
        if axis in ("pos", "query_pos"):
            if site.pos is None:
                dest.append(slice(None))
                src.append(slice(q, None))
            else:
                dest.append(site.pos - q)
                src.append(site.pos)
        elif axis in ("head", "kv_head"):
            dest.append(slice(None) if site.head is None else site.head)
            src.append(dest[-1])
        else:  # the last axis: a model / head / neuron dimension, or key position (absolute)
            dest.append(slice(None) if site.index is None else site.index)
            src.append(dest[-1])
    return tuple(dest), tuple(src)


def _rows_writer(writes: list[tuple[slice, tuple, torch.Tensor]], projector: torch.Tensor | None = None) -> HookFn:
    """Write each (row block, dest index, value) into the active batch; with a ``projector``
    ``P = U^T U``, only the coordinates along U (``x + (value - x) P``). Rows are sorted by
    start layer, so a patch's rows always sit at the same (leading) indices."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for rows, dest, value in writes:
            if rows.start < out.shape[0]:
                idx = (slice(None), *dest)
                if projector is None:
                    out[rows][idx] = value.to(out.dtype)
                else:
                    out[rows][idx] = along(out[rows][idx], value, projector)
        return out

    return fn


def run_batched(
    model: "Model",
    base: "Run",
    source: dict[Site, torch.Tensor],
    patches: Sequence["Patch"],
    measure: Measure,
    advance: Callable[[int], None] | None = None,
    *,
    diff_start: int = 0,
    chunk_size: int | None = None,
    base_acts: dict[Site, torch.Tensor] | None = None,
    base_metrics: dict[Metric, torch.Tensor] | None = None,
    subspace: "Subspace | None" = None,
    budget: int | None = None,
) -> dict[Metric, torch.Tensor]:
    """Same contract as :func:`~actpatch.engine.reference.run_reference` (``{metric: (n_patches,
    B)}``), plus ``diff_start``: the first position where base and source inputs may differ (0
    when unsure, e.g. for mean / zero ablation). ``chunk_size`` caps patches per forward pass
    (default: as many as fit ``budget`` bytes, by default :func:`memory_budget`). ``base_acts`` (at least :func:`base_sites`) and
    ``base_metrics`` spare a forward pass when the caller already ran the base run. ``subspace``
    writes only the coordinates along it, as the reference engine does."""
    B, T = base.ids.shape
    L = model.n_layers
    attn = [model.adapter.attention(l) for l in range(L)]
    cont = base.continuation if base.continuation is not None and not base.continuation.is_single else None
    C = 0 if cont is None else cont.n_tokens
    with torch.inference_mode(), model.attention_fn():
        if base_acts is None or base_metrics is None:
            with base.context(model), capture(model, base_sites(model), whole=True) as base_acts:
                base_metrics = measure(base.readout(model), torch.arange(B))
        acts = base_acts
        out = {m: v.new_empty(len(patches), B) for m, v in base_metrics.items()}

        by_start: dict[int, list[tuple[int, int, list[Site]]]] = {}
        for i, patch in enumerate(patches):
            live = [s for s in patch if s.pos is None or s.pos >= diff_start] if diff_start < T else []
            if not live:  # every write lands where base == source: a known no-op
                for m, v in base_metrics.items():
                    out[m][i] = v
                continue
            q = min(diff_start if s.pos is None else s.pos for s in live)
            by_start.setdefault(q, []).append((min(s.layer for s in live), i, live))  # type: ignore[type-var]
        if advance is not None and len(patches) > sum(map(len, by_start.values())):
            advance(len(patches) - sum(map(len, by_start.values())))

        if chunk_size is None and budget is None:
            budget = memory_budget(model.device)
        for q, items in sorted(by_start.items()):
            items.sort(key=lambda t: t[0])
            readouts = 0 if getattr(measure, "tokens", None) is not None else 1  # unembedded a few rows at a time
            per_chunk = chunk_size or min(max(1, (budget or 0) // max(1, row_bytes(model, q, T, C, readouts) * B)),
                                          cache_patches(model, B * (T - q + C)))
            c = 0
            while c < len(items):
                chunk = items[c : c + per_chunk]
                try:
                    metrics = _run_chunk(model, acts, source, chunk, q, B, T, attn, measure, subspace, cont)
                except torch.OutOfMemoryError:
                    if per_chunk == 1:
                        raise EngineError(f"Out of memory patching one patch of {B} prompts x {T} tokens on "
                                          f"{model.device}: use fewer prompts per call, or a device with more "
                                          f"free memory.") from None
                    per_chunk = max(1, per_chunk // 2)  # and keep the smaller size for the rest
                    release_memory(model.device)
                    continue
                for k, (_, i, _) in enumerate(chunk):
                    for m in out:
                        out[m][i] = metrics[m][k * B : (k + 1) * B]
                if advance is not None:
                    advance(len(chunk))
                c += len(chunk)
    return out


def run_blocks(model: "Model", hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start .. stop - 1`` on ``hidden`` (rows, T, d_model), the residual stream entering
    block ``start`` at positions 0..T-1, through the actpatch attention function (open
    :meth:`Model.attention_fn` around it): a forward pass that skips the layers below ``start``,
    whose residual stream the caller already has. Site hooks on the blocks fire as in a full pass;
    the final norm and unembedding do not run (:meth:`Adapter.unembed`)."""
    adapter = model.adapter
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    pos_emb = adapter.position_embeddings(hidden, position_ids) if stop > start else None
    for layer in range(start, stop):
        hidden = adapter.run_block(layer, hidden, position_ids, pos_emb)
    return hidden


def release_memory(device: torch.device) -> None:
    """Return cached blocks to the accelerator after an out-of-memory error (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_chunk(
    model: "Model",
    acts: dict[Site, torch.Tensor],
    source: dict[Site, torch.Tensor],
    chunk: list[tuple[int, int, list[Site]]],
    q: int,
    B: int,
    T: int,
    attn: list[torch.nn.Module],
    measure: Measure,
    subspace: "Subspace | None" = None,
    cont: "Continuation | None" = None,
) -> dict[Metric, torch.Tensor]:
    """One staggered forward pass over ``len(chunk) * B`` rows computing positions q..T-1 and,
    teacher-forced, the continuation tokens after them (``cont``: the continuation tree of
    :mod:`actpatch.prompts.continuation`; the writes see the prompt positions only)."""
    adapter = model.adapter
    K = len(chunk)
    starts = torch.tensor([t[0] for t in chunk]).repeat_interleave(B)  # (K*B,) sorted
    base_row = torch.arange(B).repeat(K)  # row k*B + b reads prompt b
    writes: dict[Site, list[tuple[slice, tuple, torch.Tensor]]] = {}
    for k, (_, _, sites) in enumerate(chunk):
        for s in sites:
            dest, src = _views(s, q)
            writes.setdefault(s.full(), []).append((slice(k * B, (k + 1) * B), dest, source[s.full()][(slice(None), *src)]))
    C = 0 if cont is None else cont.n_tokens
    positions = torch.arange(q, T)
    tree: ContextManager[None] = nullcontext()
    if C:
        positions = torch.cat([positions, cont.positions(T)])  # type: ignore[union-attr]
        tree = model.teacher_forced(*cont.tree(T), C)  # type: ignore[union-attr]
    position_ids = positions.to(model.device)[None]
    hidden = None
    pos_emb = None
    ref = acts[Site("resid_pre", 0)]
    hooks = [(site, _rows_writer(w, None if subspace is None else subspace.projector(site.layer, ref)), WRITE)
             for site, w in writes.items()]
    with _hooks(model, hooks), tree:
        for layer in range(model.n_layers):
            n = int((starts <= layer).sum())
            if n == 0:
                continue
            have = 0 if hidden is None else hidden.shape[0]
            if n > have:  # rows starting here enter with the base run's residual stream
                fresh = acts[Site("resid_pre", layer)][base_row[have:n], q:]
                # (on a split model the rows so far come from the previous block's device)
                hidden = fresh if hidden is None else torch.cat([hidden, fresh.to(hidden.device, hidden.dtype)])
            if pos_emb is None:
                pos_emb = adapter.position_embeddings(hidden, position_ids)
            prefix = {}
            if q > 0:  # the n = K * B rows read the B prompts' cached keys / values, shared
                prefix = {attn[layer]: (acts[Site("k", layer)][:, :q].transpose(1, 2),
                                        acts[Site("v", layer)][:, :q].transpose(1, 2))}
            with model.attention_state.key_value_prefix(prefix):
                hidden = adapter.run_block(layer, hidden, position_ids, pos_emb)
    tokens = getattr(measure, "tokens", None)
    if tokens is not None:
        return measure(adapter.unembed(hidden[:, -1], tokens), base_row, compact=True)  # type: ignore[index]
    # full-vocabulary logits at every readout: a few rows at a time (cache-sized, not one
    # (rows, readouts, vocab) tensor of gigabytes)
    step = max(1, READOUT_ROWS // (C + 1))
    first = getattr(measure, "first_tokens", None)
    parts = [measure(_readouts(adapter, hidden[r : r + step, -(C + 1):], first), base_row[r : r + step])  # type: ignore[index]
             for r in range(0, hidden.shape[0], step)]  # type: ignore[union-attr]
    return {m: torch.cat([part[m] for part in parts]) for m in parts[0]}


def _readouts(adapter: "Adapter", hidden: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """(rows, readouts, vocab) logits of (rows, readouts, d) final states; with ``first`` (the
    measurer's :attr:`~actpatch.metrics.Measurer.first_tokens`) readout 0 is unembedded at
    those ids only, the rest of it -inf (the logit difference reads nothing else there)."""
    if first is None:
        return adapter.unembed(hidden)
    rest = adapter.unembed(hidden[:, 1:])  # (rows, C, vocab)
    head = rest.new_full((hidden.shape[0], rest.shape[-1]), float("-inf"))
    head[:, first.to(head.device)] = adapter.unembed(hidden[:, 0], first.to(hidden.device)).to(head.dtype)
    return torch.cat([head[:, None], rest], 1)


READOUT_ROWS = 256
"""Readout positions unembedded at once by the batched engine (full vocabulary)."""
