"""Engines compute the patched metric for every patch of a plan.

``reference`` (one forward pass per patch) is the oracle; ``batched`` computes the same numbers
with batching, prefix / layer reuse and known no-ops, and is the default.
"""

from .batched import SUPPORTED as BATCHED_KINDS
from .batched import run_batched
from .reference import run_reference

__all__ = ["run_reference", "run_batched", "BATCHED_KINDS"]
