"""Plans: a sweep target expanded into a grid of patches (each a tuple of :class:`Site` s)
with named dims and coordinates."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import SiteError
from ..sites import ATTENTION_FN_KINDS, FEATURE_KINDS, HEAD_KINDS, KV_KINDS, Site, SiteKind

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from ..subspace import Subspace
    from ..prompts.promptset import PromptSet
    from ..features.dictionary import Dictionary

__all__ = ["Grid", "Patch", "Plan", "make_plan", "feature_plan", "plan_for", "parse_target", "default_per_position", "TARGETS"]

Patch = tuple[Site, ...]
"""Sites written together in one patched forward pass."""

TARGETS = tuple(k.value for k in SiteKind)


@dataclass(frozen=True)
class Plan:
    """Patches laid out on a grid: ``patches[i]`` is the cell ``numpy.unravel_index(i, shape)``."""

    target: SiteKind
    dims: tuple[str, ...]
    coords: dict[str, list]
    patches: tuple[Patch, ...]
    subspace: "Subspace | None" = None
    """Patch only the coordinates along this subspace (:mod:`actpatch.subspace`)."""

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


@dataclass(frozen=True)
class Grid:
    """Which cells of a target to patch or estimate: the axes every entry point takes.

    ``per_position`` adds / drops the position axis (default: on for residual-like targets);
    ``layers``, ``positions``, ``heads``, ``neurons`` restrict an axis (``positions`` may name
    roles such as ``["S1", "S2", "end"]``, see :mod:`actpatch.techniques.positions`);
    ``window=k`` patches k consecutive layers together.

    Example:
        >>> Grid(layers=[0, 2], window=2).to_dict()["layers"]
        [0, 2]
    """

    per_position: bool | None = None
    layers: tuple[int, ...] | None = None
    positions: tuple[int | str, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    window: int = 1
    features: tuple[int | str, ...] | None = None
    """For a feature dictionary's sweep: feature indices, and ``"error"`` for its error term."""

    def __post_init__(self) -> None:
        for name in ("layers", "positions", "heads", "neurons", "features"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, (str, bytes)):
                raise SiteError(f"{name}={v!r}: give a list, e.g. {name}=[{v!r}].")
            try:
                items = tuple(v)
            except TypeError:
                raise SiteError(f"{name}={v!r}: give a list of indices.") from None
            for x in items:
                ok = isinstance(x, int) and not isinstance(x, bool) or (name == "positions" and isinstance(x, str)) \
                    or (name == "features" and x == "error")
                if not ok:
                    raise SiteError(f"{name}={list(items)}: {x!r} is not an index"
                                    + {"positions": " or a role name.", "features": " or 'error'."}.get(name, "."))
            object.__setattr__(self, name, items)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise SiteError(f"window={self.window!r}: use 1 (single layers) or more.")

    @property
    def named(self) -> bool:
        """Whether ``positions`` names roles rather than indices (mixing is an error)."""
        if self.positions is None:
            return False
        kinds = {isinstance(p, str) for p in self.positions}
        if kinds == {True, False}:
            raise SiteError(f"positions={list(self.positions)}: use either indices or role names, not both.")
        return kinds == {True}

    def replace(self, **changes: object) -> "Grid":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (recorded in results' ``info.grid``)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def pick_axis(name: str, given: Sequence[int] | None, n: int) -> list[int]:
    if given is None:
        return list(range(n))
    vals = list(given)
    bad = [v for v in vals if not 0 <= v < n]
    if bad or not vals:
        raise SiteError(f"{name}={vals}: valid values are 0..{n - 1} (and at least one).")
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
    grid: Grid = Grid(),
    *,
    seq_len: int | None,
    pos_labels: Sequence[str] | None = None,
    whole_vectors: bool = False,
) -> Plan:
    """Expand a target into patches.

    Residual-like targets (resid_*, attn_out, mlp_out) default to one patch per (layer,
    position); head targets (z, q, k, v, pattern) to one per (layer, head) over all positions;
    mlp_post to one per (layer, neuron). ``grid.per_position`` toggles the position axis.
    ``window=k`` patches layers l..l+k-1 together (clipped at the last layer), labelled by the
    first layer. ``seq_len`` is needed for a position axis. ``whole_vectors`` (subspace
    patching) drops the neuron axis: each patch moves whole mlp_post vectors.
    """
    kind = parse_target(target)
    if kind == SiteKind.FEATURE or kind in FEATURE_KINDS:
        raise SiteError("Feature sweeps take the dictionary as their target (sweep(model, prompts, dictionary)).")
    if grid.features is not None:
        raise SiteError(f"features=... applies to a feature dictionary's sweep, not {kind.value!r}.")
    window = grid.window
    if window > 1 and not kind.per_layer:
        raise SiteError(f"window={window} needs a per-layer target, not {kind.value!r}.")
    per_position = default_per_position(kind) if grid.per_position is None else grid.per_position
    if per_position and seq_len is None:
        raise SiteError("A position axis needs prompts of one token length (see PromptSet.seq_len).")
    if grid.named:
        raise SiteError("make_plan() takes position indices; named positions go through actpatch.techniques.positions.")
    Site(kind, 0 if kind.per_layer else None).check(model)  # family support (e.g. resid_mid)

    dims: list[str] = []
    coords: dict[str, list] = {}
    axes: list[list[int]] = []
    kv = kind in KV_KINDS
    for applies, dim, keyword, given, size, where in (  # the axes before the position axis, in order
        (kind.per_layer, "layer", "layers", grid.layers, model.n_layers, "per-layer targets"),
        (kind in HEAD_KINDS, "kv_head" if kv else "head", "heads", grid.heads,
         model.n_kv_heads if kv else model.n_heads, "head targets (z, q, k, v, pattern)"),
        (kind == SiteKind.MLP_POST and not whole_vectors, "neuron", "neurons", grid.neurons, model.d_mlp,
         "mlp_post without a subspace (a subspace patch moves the whole vector)"),
    ):
        if applies:
            values = pick_axis(keyword, given, size)
            dims.append(dim)
            coords[dim] = values
            axes.append(values)
        elif given is not None:
            raise SiteError(f"{keyword}=... applies to {where}, not {kind.value!r}.")
    if per_position:
        ps = pick_axis("positions", grid.positions, int(seq_len))  # type: ignore[arg-type]
        dims.append("pos")
        coords["pos"] = [pos_labels[p] for p in ps] if pos_labels else ps
        axes.append(ps)
    elif grid.positions is not None:
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


def feature_plan(dictionary: "Dictionary", grid: Grid, *, seq_len: int | None,
                 pos_labels: Sequence[str] | None = None) -> Plan:
    """One patch per (feature, position) of an attached dictionary (per feature at every
    position with ``per_position=False``): ``grid.features`` lists the features, ``"error"``
    the error term (default: every feature, then the error term)."""
    for name in ("layers", "heads", "neurons"):
        if getattr(grid, name) is not None:
            raise SiteError(f"{name}=... does not apply to a feature sweep (its dictionary sits at one site); "
                            f"choose features=[...] and positions=[...].")
    if grid.window != 1:
        raise SiteError(f"window={grid.window}: a feature sweep patches one dictionary's site.")
    features = list(grid.features) if grid.features is not None else [*range(dictionary.n_features), "error"]
    bad = [f for f in features if f != "error" and not 0 <= int(f) < dictionary.n_features]
    if bad or not features:
        raise SiteError(f"features={features}: valid values are 0..{dictionary.n_features - 1} and 'error' (and "
                        f"at least one).")
    per_position = True if grid.per_position is None else grid.per_position
    if per_position and seq_len is None:
        raise SiteError("A position axis needs prompts of one token length (see PromptSet.seq_len).")
    if grid.named:
        raise SiteError("feature_plan() takes position indices; named positions go through "
                        "actpatch.techniques.positions.")
    positions: list[int | None] = pick_axis("positions", grid.positions, int(seq_len)) if per_position else [None]  # type: ignore[arg-type]
    patches = tuple((dictionary.error_site(p) if f == "error" else dictionary.feature(int(f), p),)
                    for f in features for p in positions)
    dims, coords = ("feature",), {"feature": features}
    if per_position:
        dims, coords = ("feature", "pos"), {**coords, "pos": [pos_labels[p] for p in positions] if pos_labels
                                             else positions}  # type: ignore[index]
    elif grid.positions is not None:
        raise SiteError("positions=... needs per_position=True.")
    return Plan(target=SiteKind.FEATURE, dims=dims, coords=coords, patches=patches)


def plan_for(model: "Model", prompts: "PromptSet", target: "str | SiteKind | Dictionary", grid: Grid = Grid(),
             whole_vectors: bool = False) -> Plan:
    """:func:`make_plan` for a prompt set: a position axis takes the set's (single) token
    length and its token labels (a feature dictionary as ``target``: :func:`feature_plan`)."""
    if not isinstance(target, (str, SiteKind)):  # a feature dictionary
        wants = True if grid.per_position is None else grid.per_position
        if wants and not prompts.aligned:
            longest = max(int(prompts.lengths.max()), int(prompts.corrupted_lengths.max()))
            return feature_plan(target, grid.replace(per_position=True), seq_len=longest)
        return feature_plan(target, grid, seq_len=prompts.seq_len if wants else None,
                            pos_labels=prompts.position_labels(model) if wants else None)
    kind = parse_target(target)
    wants_pos = grid.per_position if grid.per_position is not None else default_per_position(kind)
    if wants_pos and not prompts.aligned:  # unaligned pairs (named positions): indices of either prompt
        longest = max(int(prompts.lengths.max()), int(prompts.corrupted_lengths.max()))
        return make_plan(model, kind, grid.replace(per_position=True), seq_len=longest, whole_vectors=whole_vectors)
    return make_plan(model, kind, grid.replace(per_position=wants_pos),
                     seq_len=prompts.seq_len if wants_pos else None,
                     pos_labels=prompts.position_labels(model) if wants_pos else None, whole_vectors=whole_vectors)
