"""One root exception, :class:`ActpatchError`, and a subclass per kind of mistake.

Every message names the offending value, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ActpatchError",
    "ModelNotFoundError",
    "UnsupportedArchitectureError",
    "SiteError",
    "UnsupportedSiteError",
    "PromptError",
    "MetricError",
    "CorruptionError",
    "ResultError",
]


class ActpatchError(Exception):
    """Root of every error actpatch raises on purpose."""


class ModelNotFoundError(ActpatchError):
    """A model name or path could not be resolved, or the bundled weights are not installed."""


class UnsupportedArchitectureError(ActpatchError):
    """The model's architecture, or one of its config attributes, is not handled by any adapter."""


class SiteError(ActpatchError):
    """A :class:`~actpatch.Site` is malformed or out of range for the model (layer, head, position...)."""


class UnsupportedSiteError(SiteError):
    """The site kind does not exist in this model family (e.g. ``resid_mid`` in parallel GPT-NeoX)."""


class PromptError(ActpatchError):
    """A prompt set is invalid: empty, mismatched lengths, multi-token or equal answers."""


class MetricError(ActpatchError):
    """An unknown metric, or a metric that cannot be computed on these inputs."""


class ResultError(ActpatchError):
    """A saved result is missing, corrupt, or of an incompatible format version."""


class CorruptionError(ActpatchError):
    """A corruption cannot be applied to these prompts or in this direction."""
