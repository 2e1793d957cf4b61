"""Units of work and how they are run: the seam between a technique and where it runs.

A technique that evaluates many cells (a sweep's patches, a path sweep's sender sets) is a
:class:`UnitJob`: it prepares a length group once (one forward pass of each run) and computes
any :class:`Unit` of that group's cells from the prepared state. It splits each group's cells
into units of ``unit_size`` and hands an executor the job, the group and the units. The
executor decides where and when each unit runs; results come back **in unit order** and are
concatenated, so any executor gives the local executor's numbers bit for bit (same units, same
arithmetic).

:class:`LocalExecutor` runs units here, in order. A distributed executor
(:class:`~actpatch.experiment.ray_executor.RayExecutor`) ships the job without its model to
workers that rebuild the model from its :class:`~actpatch.models.recipe.Recipe`, prepare the
group themselves and run units. Both skip units already in a
:class:`~actpatch.experiment.checkpoint.UnitStore` and save each new one as soon as it is done,
so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

import torch

from ..errors import ExecutorError
from ..metrics import Metric
from .checkpoint import UnitStore

if TYPE_CHECKING:  # pragma: no cover
    from .core import Experiment, GroupRuns

__all__ = ["Unit", "units", "UnitJob", "Executor", "LocalExecutor", "resolve_executor", "executor_for", "progress_bar",
           "Advance", "EXECUTORS"]

Advance = Callable[[int], None]
"""Progress callback: ``advance(k)`` after ``k`` more cells are done."""

EXECUTORS = ("local", "ray")
"""Executors by name (``executor=`` of :func:`actpatch.sweep` and ``actpatch run --executor``)."""


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
    return None if saved is None else {Metric(k): v for k, v in saved.items()}


def keep_unit(store: UnitStore | None, unit: Unit, values: UnitValues) -> None:
    """Save a finished unit (no-op without a store)."""
    if store is not None:
        store.put(unit.key, {m.value: v for m, v in values.items()})


def merge(parts: Sequence[UnitValues]) -> UnitValues:
    """Units' values, concatenated in the order given."""
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


class LocalExecutor:
    """Run units here, in order; with a ``store``, reuse finished units and save new ones."""

    def map(self, job: UnitJob, runs: "GroupRuns", state: Any, todo: Sequence[Unit], *,
            store: UnitStore | None = None, advance: Advance | None = None) -> UnitValues:
        parts: list[UnitValues] = []
        for unit in todo:
            values = saved_unit(store, unit)
            if values is not None:
                if advance is not None:
                    advance(len(unit))
            else:
                values = job.run_unit(state, unit, advance)
                keep_unit(store, unit, values)
            parts.append(values)
        return merge(parts)


def resolve_executor(executor: "str | Executor | None") -> tuple[Executor, bool]:
    """An executor from a name (``"local"``, ``"ray"``) or an instance, and whether the caller
    owns it (made here: close it when done)."""
    if executor is None or executor == "local":
        return LocalExecutor(), False
    if executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(), True
    if isinstance(executor, str):
        raise ExecutorError(f"executor={executor!r}: use {' or '.join(repr(e) for e in EXECUTORS)}, or an executor "
                            f"object such as ap.RayExecutor(address=...).")
    if not callable(getattr(executor, "map", None)):
        raise ExecutorError(f"executor={type(executor).__name__}: an executor has a map(job, runs, state, todo) method.")
    return executor, False


@contextmanager
def executor_for(executor: "str | Executor | None") -> Iterator[Executor]:
    """:func:`resolve_executor` as a context: an executor made here (``"ray"``: its actors) is
    closed on exit; one passed in stays open for its owner."""
    run_units, owned = resolve_executor(executor)
    try:
        yield run_units
    finally:
        if owned:
            run_units.close()  # type: ignore[attr-defined]


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
