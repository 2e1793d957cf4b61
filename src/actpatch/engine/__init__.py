"""Engines compute the patched metric for every patch of a plan. ``reference`` is the oracle."""

from .reference import run_reference

__all__ = ["run_reference"]
