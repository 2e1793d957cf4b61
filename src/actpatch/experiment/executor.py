"""Units of work and how they are run: the seam between a technique and where it runs.

A technique that evaluates many cells (a sweep's patches, a path sweep's sender sets) splits
each length group's cells into :class:`Unit` s of ``unit_size`` and hands an executor the units
and a function that computes one unit from the group's prepared state. The executor decides
where and when each unit runs; results come back **in unit order** and are concatenated, so
any executor gives the local executor's numbers bit for bit (same units, same arithmetic).

:class:`LocalExecutor` runs units here, in order, skipping those already in a
:class:`~actpatch.experiment.checkpoint.UnitStore` and saving each new one as soon as it is
done (a killed run resumes). A distributed executor implements the same :class:`Executor`
protocol: its workers rebuild the model, prepare the group state themselves and run units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch

from ..metrics import Metric
from .checkpoint import UnitStore

__all__ = ["Unit", "units", "Executor", "LocalExecutor", "progress_bar", "Advance"]

Advance = Callable[[int], None]
"""Progress callback: ``advance(k)`` after ``k`` more cells are done."""


@dataclass(frozen=True)
class Unit:
    """Cells ``start:stop`` of length group ``group``; the ``index``-th unit of that group."""

    group: int
    index: int
    start: int
    stop: int

    @property
    def key(self) -> str:
        """The unit's name in a :class:`UnitStore` (stable across runs of the same config)."""
        return f"g{self.group}_u{self.index}"

    def __len__(self) -> int:
        return self.stop - self.start


def units(group: int, n_cells: int, unit_size: int) -> list[Unit]:
    """Cells ``0..n_cells-1`` of a group, in units of ``unit_size`` (the last may be shorter)."""
    size = max(1, int(unit_size))
    return [Unit(group, u, i, min(i + size, n_cells)) for u, i in enumerate(range(0, n_cells, size))]


UnitValues = dict[Metric, torch.Tensor]
"""A unit's values: ``{metric: (cells in the unit, rows)}``."""


class Executor(Protocol):
    """Runs units; returns their values concatenated along the cell axis, in unit order."""

    def map(self, todo: Sequence[Unit], work: Callable[[Unit], UnitValues]) -> UnitValues: ...


class LocalExecutor:
    """Run units here, in order; with a ``store``, reuse finished units and save new ones."""

    def __init__(self, store: UnitStore | None = None, advance: Advance | None = None) -> None:
        self.store = store
        self.advance = advance

    def map(self, todo: Sequence[Unit], work: Callable[[Unit], UnitValues]) -> UnitValues:
        parts: list[UnitValues] = []
        for unit in todo:
            saved = self.store.get(unit.key) if self.store is not None else None
            if saved is not None:
                parts.append({Metric(k): v for k, v in saved.items()})
                if self.advance is not None:
                    self.advance(len(unit))
                continue
            values = work(unit)
            if self.store is not None:
                self.store.put(unit.key, {m.value: v for m, v in values.items()})
            parts.append(values)
        return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


def progress_bar(enabled: bool, total: int, description: str) -> ContextManager[Advance | None]:
    """A rich progress bar (elapsed, ETA) yielding its ``advance`` callback; ``None`` when off."""
    if not enabled:
        return nullcontext(None)

    @contextmanager
    def bar() -> Iterator[Advance]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as prog:
            task = prog.add_task(description, total=total)
            yield lambda k: prog.advance(task, k)

    return bar()
