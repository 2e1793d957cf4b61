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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ContextManager

from ..errors import ExecutorError
from .checkpoint import UnitStore
from .units import Advance, Executor, Unit, UnitJob, UnitValues, keep_unit, merge, saved_unit, units

if TYPE_CHECKING:  # pragma: no cover
    from .core import GroupRuns

__all__ = ["LocalExecutor", "resolve_executor", "executor_for", "progress_bar", "EXECUTORS",
           # the vocabulary of units, defined in .units
           "Unit", "units", "UnitJob", "UnitValues", "Executor", "Advance"]

EXECUTORS = ("local", "ray")
"""Executors by name (``executor=`` of :func:`actpatch.sweep` and ``actpatch run --executor``)."""


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
                            f"object such as ap.experiment.RayExecutor(address=...).")
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
