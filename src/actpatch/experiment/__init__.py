"""The experiment core every technique calls (``core``), its grid of cells (``plan``), units of
work (``units``), executors (``executor``, ``ray_executor``) and saved progress
(``checkpoint``). As a namespace (``ap.experiment``): the grid and the executors."""

from .executor import LocalExecutor
from .plan import Grid
from .ray_executor import RayExecutor

__all__ = ["Grid", "LocalExecutor", "RayExecutor"]
