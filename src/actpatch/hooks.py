"""Read and write activations at typed :class:`~actpatch.Site` s.

:func:`capture` records activations; :func:`intervene` replaces them. Both are context managers
over torch hooks (and the ``actpatch`` attention function for q / k / v / pattern) and always
remove what they added, also when the forward pass raises.

Writes run before reads at the same point, so a capture sees what the model actually used.

In a teacher-forced run (answers of several tokens, see :mod:`actpatch.prompts.continuation`)
the continuation tokens after the prompt are invisible here: captures return, and writes
change, the prompt positions only (``whole=True`` on the engine's own captures sees them).

Example:
    >>> import torch, actpatch as ap
    >>> from actpatch.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with ap.capture(model, [ap.Site("resid_pre", 1)]) as acts:
    ...     _ = model.logits(ids)
    >>> acts[ap.Site("resid_pre", 1)].shape
    torch.Size([1, 4, 64])
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from .models.attention import HookFn, hidden_tail
from .errors import SiteError
from .sites import ATTENTION_FN_KINDS, FEATURE_KINDS, Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model

__all__ = ["capture", "intervene", "stop_after", "gradient_taps", "recompute_blocks", "recomputing", "Value"]

Value = Union[torch.Tensor, float, Callable[[torch.Tensor], torch.Tensor]]
"""A replacement: a tensor (broadcast to the site's slice), a number, or a function of the
current slice returning its replacement."""

_RECOMPUTING: ContextVar[bool] = ContextVar("actpatch_recomputing", default=False)


def recomputing() -> bool:
    """Whether the forward pass now running is a block's recomputation during a backward pass
    (:func:`recompute_blocks`): hooks that record (captures, gradient taps) leave their records
    alone then, since the graph the backward pass follows is the first forward pass's."""
    return _RECOMPUTING.get()


@contextmanager
def recompute_blocks(model: "Model") -> Iterator[None]:
    """While open, every block keeps only its input for the backward pass and recomputes the
    rest when the backward pass reaches it (activation checkpointing, torch's non-reentrant
    kind): a forward and backward pass then holds one block's activations at a time, for about
    one more forward pass of compute. Writes (patches, taps) apply again in the recomputation,
    so it computes the same values, under the attention state of the first pass
    (:meth:`~actpatch.models.attention.AttentionState.replay`); reads do not record twice
    (:func:`recomputing`). Keep the context open until the backward pass is done: hooks
    removed before it would be missing from the recomputation."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.adapter.blocks)

    def wrapped(block: nn.Module) -> Callable:
        original = block.forward

        def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the block's own signature
            calls = [0]

            def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
                calls[0] += 1
                token = _RECOMPUTING.set(calls[0] > 1 or _RECOMPUTING.get())
                try:
                    return original(*a, **k)
                finally:
                    _RECOMPUTING.reset(token)

            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            again = model.attention_state.replay()  # e.g. a teacher-forced run's tree, gone by the backward pass
            return checkpoint(run, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), again), **kwargs)

        return forward

    for block in blocks:
        block.forward = wrapped(block)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's method


# Order at one hook point: resid_mid's block-output correction, then writes (outer context
# first), then an attached dictionary's features (their own writes, then reads), then reads.
# One torch hook per (module, side) dispatches to all entries in that order.
FIX, WRITE, FEATURES, READ = -1, 0, 0.5, 1


def _first(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[return-value]


class _Point:
    """All entries on one module's first input or (first) output, behind a single torch hook."""

    def __init__(self, module: nn.Module, where: str) -> None:
        self.entries: list[tuple[float, int, HookFn]] = []
        if where == "input":
            self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self.handle = module.register_forward_hook(self._post)

    def _apply(self, x: torch.Tensor) -> torch.Tensor | None:
        changed = False
        for _, _, fn in sorted(self.entries, key=lambda e: (e[0], e[1])):
            out = fn(x)
            if out is not None:
                x, changed = out, True
        return x if changed else None

    def _pre(self, mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = self._apply(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = self._apply(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    def _post(self, mod: nn.Module, args: tuple, output: object) -> object:
        new = self._apply(_first(output))
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new  # type: ignore[index]


def _prompt_only(fn: HookFn, kind: SiteKind) -> HookFn:
    """``fn`` on the prompt positions of ``x`` only, when the running forward pass has
    continuation tokens at its end (:func:`~actpatch.models.attention.continuation_tail`);
    ``fn`` itself otherwise. The pattern hides its last query and key positions."""
    pattern = kind == SiteKind.PATTERN

    def wrapped(x: torch.Tensor) -> torch.Tensor | None:
        tail = hidden_tail()
        if not tail:
            return fn(x)
        idx = (slice(None), slice(None), slice(0, x.shape[2] - tail), slice(0, x.shape[3] - tail)) if pattern \
            else (slice(None), slice(0, x.shape[1] - tail))
        new = fn(x[idx])
        if new is None:
            return None
        out = x.clone()
        out[idx] = new
        return out

    return wrapped


def _add(model: "Model", module: nn.Module, where: str, fn: HookFn, priority: float, kind: SiteKind,
         whole: bool = False) -> Callable[[], None]:
    """Attach ``fn`` at one module side of ``model``; returns its remover. The points live in
    the model handle's registry (``model.hook_points``), one torch hook per module side. Unless
    ``whole``, ``fn`` sees the prompt positions only (:func:`_prompt_only`)."""
    if not whole:
        fn = _prompt_only(fn, kind)
    points = model.hook_points
    key = (id(module), where)
    point = points.get(key)
    if point is None:
        point = points[key] = _Point(module, where)
    entry = (priority, model.next_hook_seq(), fn)
    point.entries.append(entry)

    def remove() -> None:
        point.entries.remove(entry)
        if not point.entries:
            point.handle.remove()
            del points[key]

    return remove


def _heads_view(fn: HookFn, n_heads: int) -> HookFn:
    """Present a (B, T, H*D) tensor to ``fn`` as (B, T, H, D) (z at the output projection)."""

    def wrapped(x: torch.Tensor) -> torch.Tensor | None:
        out = fn(x.view(*x.shape[:-1], n_heads, -1))
        return None if out is None else out.reshape(x.shape)

    return wrapped


@contextmanager
def _hooks(model: "Model", entries: list[tuple[Site, HookFn, float]], whole: bool = False) -> Iterator[None]:
    """Attach ``(full site, fn, priority)`` entries for the duration of the context; ``whole``:
    they see continuation positions too."""
    adapter = model.adapter
    removers: list[Callable[[], None]] = []
    attn_entries = []
    with ExitStack() as stack:
        try:
            for site, fn, prio in entries:
                if site.kind in FEATURE_KINDS:
                    removers.append(_feature_entry(model, site, fn, prio))
                elif site.kind in ATTENTION_FN_KINDS:
                    attn_fn = fn if whole else _prompt_only(fn, site.kind)
                    attn_entries.append((adapter.attention(site.layer), site.kind, prio, attn_fn))  # type: ignore[arg-type]
                elif site.kind == SiteKind.RESID_MID and prio == WRITE:
                    removers.extend(_resid_mid_write(model, site, fn, whole))
                else:
                    module, where = adapter.hook_point(site)
                    if site.kind == SiteKind.Z:
                        fn = _heads_view(fn, model.n_heads)
                    removers.append(_add(model, module, where, fn, prio, site.kind, whole))
            stack.enter_context(model.attention_state.hooked(attn_entries))
            yield
        finally:
            for remove in reversed(removers):
                remove()


def _resid_mid_write(model: "Model", site: Site, fn: HookFn, whole: bool = False,
                     priority: float = WRITE) -> list[Callable[[], None]]:
    """resid_mid is read at the MLP's input norm, but the block also adds it to the MLP output
    through a separate variable: write the norm's input and add the same change to the block's
    output (before any resid_post write on that block)."""
    delta: list[torch.Tensor] = []

    def at_norm(x: torch.Tensor) -> torch.Tensor | None:
        new = fn(x)
        delta.clear()
        if new is not None:
            delta.append(new - x)
        return new

    def at_block(x: torch.Tensor) -> torch.Tensor | None:
        return x + delta.pop() if delta else None

    norm, where = model.adapter.hook_point(site)
    block, side = model.adapter.hook_point(Site(SiteKind.RESID_POST, site.layer))
    return [_add(model, norm, where, at_norm, priority, site.kind, whole),
            _add(model, block, side, at_block, FIX, SiteKind.RESID_POST, whole)]


class _FeaturePoint:
    """An attached dictionary's feature and error entries, behind one entry at its site.

    While it has entries, the activation ``y`` at the dictionary's site is computed as
    ``decode(f) + error`` with ``f = encode(x)`` (``x``: the input, ``y`` itself for an SAE,
    the read site's activation for a transcoder) and ``error = y - decode(f)``; the entries
    (writes first, then reads) see and replace ``f`` and ``error``. With no write, ``y`` is
    returned untouched (attaching is exactly the identity)."""

    def __init__(self, model: "Model", dictionary: object) -> None:
        self.d = dictionary
        self.entries: list[tuple[float, int, SiteKind, HookFn]] = []
        self.input: list[torch.Tensor] = []
        site, reads = dictionary.site, dictionary.reads  # type: ignore[attr-defined]
        if site.kind == SiteKind.RESID_MID:
            self.removers = _resid_mid_write(model, site, self._run, priority=FEATURES)
        else:
            module, where = model.adapter.hook_point(site)
            self.removers = [_add(model, module, where, self._run, FEATURES, site.kind)]
        if reads is not None:  # a transcoder: its input, read earlier in the same block
            module, where = model.adapter.hook_point(reads)
            self.removers.append(_add(model, module, where, self._read_input, READ, reads.kind))

    def _read_input(self, x: torch.Tensor) -> None:
        self.input[:] = [x]

    def _run(self, y: torch.Tensor) -> torch.Tensor | None:
        d = self.d
        x = self.input[0] if d.reads is not None else y  # type: ignore[attr-defined]
        f, ctx = d.encode_with_context(x)  # type: ignore[attr-defined]
        err = y.to(f.dtype) - d.decode(f, x, ctx)  # type: ignore[attr-defined]
        changed = False
        for _, _, kind, fn in sorted(self.entries, key=lambda e: (e[0], e[1])):
            out = fn(f if kind == SiteKind.FEATURE else err)
            if out is not None:
                changed = True
                if kind == SiteKind.FEATURE:
                    f = out
                else:
                    err = out
        if not changed:
            return None
        return (d.decode(f, x, ctx) + err).to(y.dtype)  # type: ignore[attr-defined]

    def close(self) -> None:
        for remove in reversed(self.removers):
            remove()


def _feature_entry(model: "Model", site: Site, fn: HookFn, priority: float) -> Callable[[], None]:
    """Attach ``fn`` to the feature or error term of the dictionary attached at ``site``; the
    dictionary's :class:`_FeaturePoint` lives while it has entries."""
    d = model.attached(site)
    key = (id(d), "features")
    point = model.hook_points.get(key)
    if point is None:
        point = model.hook_points[key] = _FeaturePoint(model, d)
    entry = (priority, model.next_hook_seq(), site.kind, fn)
    point.entries.append(entry)

    def remove() -> None:
        point.entries.remove(entry)
        if not point.entries:
            point.close()
            del model.hook_points[key]

    return remove


@contextmanager
def capture(model: "Model", sites: list[Site] | tuple[Site, ...], *, detach: bool = True,
            whole: bool = False) -> Iterator[dict[Site, torch.Tensor]]:
    """Record the activations at ``sites`` during forward passes run inside the context.

    Returns a dict filled as the model runs: ``acts[site]`` is the site's slice (e.g.
    ``Site("z", 3, head=1)`` gives ``(batch, pos, d_head)``). A later forward overwrites it.
    Set ``detach=False`` to keep the autograd graph; ``whole=True`` includes the continuation
    tokens of a teacher-forced run (by default only the prompt positions are recorded).
    """
    for s in sites:
        s.check(model)
    acts: dict[Site, torch.Tensor] = {}
    by_full: dict[Site, list[Site]] = {}
    for s in sites:
        by_full.setdefault(s.full(), []).append(s)

    def reader(wanted: list[Site]) -> HookFn:
        def fn(x: torch.Tensor) -> None:
            if _RECOMPUTING.get():
                return None
            for s in wanted:
                y = x if s.is_full else _slice(s, x)  # the tensor itself when whole (autograd reaches it)
                acts[s] = y.detach() if detach else y
            return None

        return fn

    with _hooks(model, [(full, reader(w), READ) for full, w in by_full.items()], whole=whole):
        yield acts


def _slice(site: Site, x: torch.Tensor) -> torch.Tensor:
    """``x[site.selector()]``; a position or index beyond this input is a :class:`SiteError`."""
    sel = site.selector()
    for axis, (i, size) in enumerate(zip(sel, x.shape)):
        if isinstance(i, int) and i >= size:
            name = site.kind.layout[axis]
            raise SiteError(f"{site}: {name} {i} is out of range for this input ({name} has {size}: 0..{size - 1}).")
    return x[sel]


def _writer(site: Site, value: Value) -> HookFn:
    sel = site.selector()

    def fn(x: torch.Tensor) -> torch.Tensor:
        current = _slice(site, x)
        new = value(current) if callable(value) else value
        out = x.clone()
        try:
            out[sel] = new if not isinstance(new, torch.Tensor) else new.to(device=out.device, dtype=out.dtype)
        except RuntimeError as e:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise SiteError(f"{site}: cannot write a value of shape {shape} into a slice of shape "
                            f"{tuple(current.shape)} ({e}).") from None
        return out

    return fn


@contextmanager
def intervene(model: "Model", patches: Mapping[Site, Value], *, whole: bool = False) -> Iterator[None]:
    """Replace activations at sites during forward passes run inside the context.

    ``patches`` maps a site to a tensor broadcast onto its slice, a number, or a function of the
    current slice. Example: ``intervene(model, {Site("z", 2, head=0): 0.0})`` zero-ablates head
    2.0 at every position. ``whole=True`` also reaches the continuation tokens of a
    teacher-forced run (gradient taps that must see every position).
    """
    for site in patches:
        site.check(model)
    with _hooks(model, [(site.full(), _writer(site, value), WRITE) for site, value in patches.items()], whole=whole):
        yield


class _Stopped(Exception):
    """Raised by :func:`stop_after`'s hook to end a forward pass early."""


@contextmanager
def stop_after(model: "Model", site: Site) -> Iterator[None]:
    """End the forward pass run inside the context as soon as ``site`` is computed (after the
    reads of :func:`capture` contexts entered before this one): for passes whose only purpose
    is to record early activations, e.g. a block's q / k / v without its attention and MLP.

    Example: ``with capture(model, [Site("q", 3)]) as a, stop_after(model, Site("v", 3)):
    model.logits(ids)`` runs layers 0..3 up to layer 3's values."""
    site.check(model)

    def stop(x: torch.Tensor) -> None:
        raise _Stopped

    try:
        with _hooks(model, [(site.full(), stop, READ)]):
            yield
    except _Stopped:
        pass


def gradient_taps(sites: "Sequence[Site]", keep_values: bool = True) -> tuple[dict, dict]:
    """Hooks that add a zero (requiring grad) at each site, for :func:`intervene`: one backward
    pass then gives the gradient at every site (AtP, EAP). Returns the hooks and the dict they
    fill on each forward pass: ``{site: (zero, the site's value, detached)}``. The zero is one
    scalar broadcast to the site's shape (no memory of its own; its gradient still has the
    site's shape); ``keep_values=False`` keeps no values (``None``), so a recomputed pass does
    not hold every site's activation for the whole backward pass."""
    taken: dict = {}

    def tap(site: Site) -> HookFn:
        def fn(x: torch.Tensor) -> torch.Tensor:
            if _RECOMPUTING.get():  # the same value; the gradient goes to the first pass's zero
                return x + torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
            z = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True).expand(x.shape)
            taken[site] = (z, x.detach() if keep_values else None)
            return x + z

        return fn

    return {s: tap(s) for s in sites}, taken
