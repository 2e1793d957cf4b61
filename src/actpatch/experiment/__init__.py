"""The experiment core every technique calls (``core``), its grid of cells (``plan``), units of
work (``units``), executors (``executor``, ``ray_executor``) and saved progress
(``checkpoint``). As a namespace (``ap.experiment``): the grid, the executors, and memory
budgets' plans before a run (``estimate``, :mod:`actpatch.memory`)."""

from ..memory import MemoryPlan
from ..techniques.budgets import estimate
from .executor import LocalExecutor
from .plan import Grid
from .ray_executor import RayExecutor

__all__ = ["Grid", "LocalExecutor", "RayExecutor", "estimate", "MemoryPlan"]
