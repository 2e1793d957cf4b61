"""The reference engine: one forward pass per patch. Short and obviously right; the oracle
that every faster engine is tested against."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..hooks import intervene
from ..metrics import Measure, Metric
from ..sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from ..corruption import Run
    from ..models.handle import Model
    from ..experiment.plan import Patch
    from ..subspace import Subspace



def run_reference(
    model: "Model",
    base: "Run",
    source: dict[Site, torch.Tensor],
    patches: Sequence["Patch"],
    measure: Measure,
    advance: Callable[[int], None] | None = None,
    subspace: "Subspace | None" = None,
) -> dict[Metric, torch.Tensor]:
    """Run ``base`` once per patch with the patch's sites overwritten by ``source`` (full-site
    activations of the source run, batch-aligned with ``base``); with ``subspace``, only their
    coordinates along it (:meth:`~actpatch.subspace.Subspace.apply`). Returns ``{metric:
    (n_patches, B)}``."""
    rows: list[dict[Metric, torch.Tensor]] = []
    all_rows = torch.arange(base.ids.shape[0])
    for patch in patches:
        values: dict[Site, object] = {site: source[site.full()][site.selector()] for site in patch}
        if subspace is not None:
            values = {site: (lambda x, v=v, l=site.layer: subspace.apply(x, v, l)) for site, v in values.items()}
        with base.context(model), intervene(model, values):
            logits = base.readout(model)
        rows.append(measure(logits, all_rows))
        if advance is not None:
            advance(1)
    return {m: torch.stack([r[m] for r in rows]) for m in rows[0]}
