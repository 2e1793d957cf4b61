"""Plans: a sweep target expanded into a grid of patches (each a tuple of :class:`Site` s)
with named dims and coordinates."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import SiteError
from .sites import ATTENTION_FN_KINDS, HEAD_KINDS, KV_KINDS, Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model
    from .prompts.promptset import PromptSet

__all__ = ["Patch", "Plan", "make_plan", "plan_for", "parse_target", "default_per_position", "TARGETS"]

Patch = tuple[Site, ...]
"""Sites written together in one patched forward pass."""

TARGETS = tuple(k.value for k in SiteKind)
_LAYERLESS = (SiteKind.EMBED, SiteKind.RESID_FINAL)


@dataclass(frozen=True)
class Plan:
    """Patches laid out on a grid: ``patches[i]`` is the cell ``numpy.unravel_index(i, shape)``."""

    target: SiteKind
    dims: tuple[str, ...]
    coords: dict[str, list]
    patches: tuple[Patch, ...]

    @property
    def uses_attention_fn(self) -> bool:
        """Whether any patched site lives inside the attention function (q, k, v, pattern)."""
        return any(s.kind in ATTENTION_FN_KINDS for p in self.patches for s in p)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)

    def full_sites(self) -> list[Site]:
        """The whole activations the patches slice (what to capture from the source run)."""
        seen: dict[Site, None] = {}
        for p in self.patches:
            for s in p:
                seen.setdefault(s.full(), None)
        return list(seen)


def _pick(name: str, given: Sequence[int] | None, n: int) -> list[int]:
    if given is None:
        return list(range(n))
    vals = [int(v) for v in given]
    bad = [v for v in vals if not 0 <= v < n]
    if bad or not vals:
        raise SiteError(f"{name}={list(given)}: valid values are 0..{n - 1} (and at least one).")
    return vals


def parse_target(target: str | SiteKind) -> SiteKind:
    """The :class:`SiteKind` of a sweep target name."""
    try:
        return SiteKind(target)
    except ValueError:
        raise SiteError(f"Unknown target {target!r}; use one of: {', '.join(TARGETS)}.") from None


def default_per_position(kind: SiteKind) -> bool:
    """Residual-like targets get a position axis by default; heads and neurons do not."""
    return kind not in HEAD_KINDS and kind != SiteKind.MLP_POST


def make_plan(
    model: "Model",
    target: str | SiteKind,
    *,
    seq_len: int | None,
    pos_labels: Sequence[str] | None = None,
    per_position: bool | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    window: int = 1,
) -> Plan:
    """Expand a target into patches.

    Residual-like targets (resid_*, attn_out, mlp_out) default to one patch per (layer,
    position); head targets (z, q, k, v, pattern) to one per (layer, head) over all positions;
    mlp_post to one per (layer, neuron). ``per_position`` toggles the position axis.
    ``window=k`` patches layers l..l+k-1 together (clipped at the last layer), labelled by the
    first layer. ``seq_len`` is needed for a position axis.
    """
    kind = parse_target(target)
    if window < 1:
        raise SiteError(f"window={window}: use 1 (single layers) or more.")
    if window > 1 and kind in _LAYERLESS:
        raise SiteError(f"window={window} needs a per-layer target, not {kind.value!r}.")
    if per_position is None:
        per_position = default_per_position(kind)
    if per_position and seq_len is None:
        raise SiteError("A position axis needs prompts of one token length (see PromptSet.seq_len).")
    Site(kind, None if kind in _LAYERLESS else 0).check(model)  # family support (e.g. resid_mid)

    dims: list[str] = []
    coords: dict[str, list] = {}
    axes: list[list[int]] = []
    if kind not in _LAYERLESS:
        lays = _pick("layers", layers, model.n_layers)
        dims.append("layer")
        coords["layer"] = lays
        axes.append(lays)
    if kind in HEAD_KINDS:
        name = "kv_head" if kind in KV_KINDS else "head"
        hs = _pick("heads", heads, model.n_kv_heads if kind in KV_KINDS else model.n_heads)
        dims.append(name)
        coords[name] = hs
        axes.append(hs)
    if kind == SiteKind.MLP_POST:
        ns = _pick("neurons", neurons, model.d_mlp)
        dims.append("neuron")
        coords["neuron"] = ns
        axes.append(ns)
    if per_position:
        ps = _pick("positions", positions, int(seq_len))  # type: ignore[arg-type]
        dims.append("pos")
        coords["pos"] = [pos_labels[p] for p in ps] if pos_labels else ps
        axes.append(ps)
    elif positions is not None:
        raise SiteError("positions=... needs per_position=True.")

    patches: list[Patch] = []
    for cell in itertools.product(*axes) if axes else [()]:
        named = dict(zip(dims, cell))
        pos = named.get("pos")
        head = named.get("head", named.get("kv_head"))
        index = named.get("neuron")
        if "layer" in named:
            first = named["layer"]
            window_layers = range(first, min(first + window, model.n_layers))
            patches.append(tuple(Site(kind, l, head=head, pos=pos, index=index) for l in window_layers))
        else:
            patches.append((Site(kind, head=head, pos=pos, index=index),))
    return Plan(target=kind, dims=tuple(dims), coords=coords, patches=tuple(patches))


def plan_for(
    model: "Model",
    prompts: "PromptSet",
    target: str | SiteKind,
    *,
    per_position: bool | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    window: int = 1,
) -> Plan:
    """:func:`make_plan` for a prompt set: a position axis takes the set's (single) token
    length and its token labels."""
    wants_pos = per_position if per_position is not None else default_per_position(parse_target(target))
    return make_plan(model, target, seq_len=prompts.seq_len if wants_pos else None,
                     pos_labels=prompts.position_labels(model) if wants_pos else None, per_position=wants_pos,
                     layers=layers, positions=positions, heads=heads, neurons=neurons, window=window)
