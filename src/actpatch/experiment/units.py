"""Units of work: the cells of a :class:`UnitJob` cut into :class:`Unit` s, what an executor
runs (:class:`Executor`), and saving and merging their values. A leaf of the experiment core:
the local executor (:mod:`.executor`) and the Ray executor (:mod:`.ray_executor`) both build on
it, neither on the other."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

import torch

from ..metrics import MetricLike, metric_named
from .checkpoint import UnitStore

if TYPE_CHECKING:  # pragma: no cover
    from .core import Experiment, GroupRuns

__all__ = ["Advance", "Unit", "units", "UnitValues", "UnitJob", "Executor", "without_model", "with_model",
           "saved_unit", "keep_unit", "merge"]

Advance = Callable[[int], None]
"""Progress callback: ``advance(k)`` after ``k`` more cells are done."""

@dataclass(frozen=True)
class Unit:
    """Cells ``start:stop`` of length group ``group``; the ``index``-th unit of that group, or
    of its prompts ``part`` = (first, stop) when a memory budget runs the group in chunks."""

    group: int
    index: int
    start: int
    stop: int
    part: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """The unit's name in a :class:`UnitStore` (stable across runs of the same config; a
        chunk's units name its prompts, so a resume under another budget never mixes rows)."""
        if self.part is None:
            return f"g{self.group}_u{self.index}"
        return f"g{self.group}_p{self.part[0]}-{self.part[1]}_u{self.index}"

    def __len__(self) -> int:
        return self.stop - self.start


def units(group: int, n_cells: int, unit_size: int, part: tuple[int, int] | None = None) -> list[Unit]:
    """Cells ``0..n_cells-1`` of a group (or of its prompts ``part``), in units of
    ``unit_size`` (the last may be shorter)."""
    size = max(1, int(unit_size))
    return [Unit(group, u, i, min(i + size, n_cells), part) for u, i in enumerate(range(0, n_cells, size))]


UnitValues = dict[MetricLike, torch.Tensor]
"""A unit's values: ``{metric: (cells in the unit, rows)}``."""


class UnitJob(Protocol):
    """A technique's cells, as executors run them. A frozen dataclass whose only unpicklable
    part is ``experiment.model`` (executors that ship it swap the model out and back in)."""

    experiment: "Experiment"

    def context(self) -> ContextManager[Any]:
        """The context every forward pass of the job runs in (e.g. the hookable attention)."""
        ...

    def prepare(self, runs: "GroupRuns") -> Any:
        """One length group's state (its forward passes), shared by all of its units."""
        ...

    def run_unit(self, state: Any, unit: Unit, advance: Advance | None = None) -> UnitValues:
        """The values of one unit's cells."""
        ...


def without_model(job: UnitJob) -> UnitJob:
    """``job`` with its experiment's model removed: what is shipped to workers."""
    return dataclasses.replace(job, experiment=dataclasses.replace(job.experiment, model=None))  # type: ignore[type-var]


def with_model(job: UnitJob, model: Any) -> UnitJob:
    """A shipped job bound to a worker's own model."""
    return dataclasses.replace(job, experiment=dataclasses.replace(job.experiment, model=model))  # type: ignore[type-var]


class Executor(Protocol):
    """Runs the units ``todo`` of one prepared group of ``job``; returns their values
    concatenated along the cell axis, in unit order. ``state`` is the group's state prepared
    here (an executor whose workers prepare their own may ignore it)."""

    def map(self, job: UnitJob, runs: "GroupRuns", state: Any, todo: Sequence[Unit], *,
            store: UnitStore | None = None, advance: Advance | None = None) -> UnitValues: ...


def saved_unit(store: UnitStore | None, unit: Unit) -> UnitValues | None:
    """A unit's values from ``store`` when it was finished before."""
    saved = store.get(unit.key) if store is not None else None
    return None if saved is None else {metric_named(k): v for k, v in saved.items()}


def keep_unit(store: UnitStore | None, unit: Unit, values: UnitValues) -> None:
    """Save a finished unit (no-op without a store)."""
    if store is not None:
        store.put(unit.key, {m.value: v for m, v in values.items()})


def merge(parts: Sequence[UnitValues]) -> UnitValues:
    """Units' values, concatenated in the order given."""
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}
