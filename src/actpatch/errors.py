"""One root exception, :class:`ActpatchError`, and a subclass per kind of mistake.

Every message names the offending value, what was expected, and how to fix it. Nothing else
(``ValueError``, ``KeyError``, JSON or safetensors errors) reaches the user from the public API
or the CLI for bad input: catch :class:`ActpatchError` to catch them all.
"""

from __future__ import annotations

__all__ = [
    "ActpatchError",
    "ModelNotFoundError",
    "UnsupportedArchitectureError",
    "SiteError",
    "UnsupportedSiteError",
    "SubspaceError",
    "PromptError",
    "ContextLengthError",
    "MetricError",
    "CorruptionError",
    "DirectionError",
    "EngineError",
    "MethodError",
    "ResultError",
    "ConfigError",
    "OutputDirError",
    "ExecutorError",
    "DeviceError",
    "DictionaryError",
    "ArgumentError",
]


class ActpatchError(Exception):
    """Root of every error actpatch raises on purpose."""


class ModelNotFoundError(ActpatchError):
    """A model name or path could not be resolved, or the bundled weights are not installed."""


class UnsupportedArchitectureError(ActpatchError):
    """The model's architecture, or one of its config attributes, is not handled by any adapter."""


class SiteError(ActpatchError):
    """A :class:`~actpatch.Site` (or an axis of a sweep) is malformed or out of range for the model:
    layer, head, position, neuron index."""


class UnsupportedSiteError(SiteError):
    """The site kind does not exist in this model family (e.g. ``resid_mid`` in parallel GPT-NeoX)."""


class PromptError(ActpatchError):
    """A prompt set is invalid: empty, not text, mismatched lengths, multi-token or equal answers."""


class ContextLengthError(PromptError):
    """A prompt is longer than the model's context window."""


class MetricError(ActpatchError):
    """An unknown metric, or a metric that cannot be computed on these inputs."""


class CorruptionError(ActpatchError):
    """A corruption cannot be applied to these prompts or in this direction."""


class DirectionError(ActpatchError):
    """An unknown patching direction (use ``"denoise"`` or ``"noise"``)."""


class EngineError(ActpatchError):
    """An unknown engine, or an engine that cannot patch this target."""


class MethodError(ActpatchError):
    """A technique's option does not apply here (e.g. ``qk_fix`` on an MLP target, GradDrop on
    the residual stream, edge attribution on a family whose heads' writes do not add up)."""


class MemoryBudgetError(MethodError):
    """A memory budget that is malformed, or too small for one prompt even with every block
    recomputed (the message names the smallest budget that fits)."""


class ResultError(ActpatchError):
    """A saved result is missing, incomplete, corrupt, foreign or of an incompatible format; or a
    result cannot be used the way it was asked (unknown metric, mismatched grids)."""


class SubspaceError(ActpatchError):
    """A subspace basis cannot be used: rank-deficient, of the wrong width for the site, or for a
    site kind whose last axis is not a vector (pattern, single indices)."""


class ConfigError(ActpatchError):
    """An experiment config is malformed: bad YAML, unknown key, wrong type, missing file."""


class OutputDirError(ActpatchError):
    """An output directory cannot be used for this experiment (not writable, another config's)."""


class ExecutorError(ActpatchError):
    """An executor cannot run the work: Ray missing or unreachable, a model workers cannot rebuild."""


class DeviceError(ActpatchError):
    """A device or dtype this machine cannot run, or a device map that leaves a layer nowhere."""


class DictionaryError(ActpatchError):
    """A feature dictionary (SAE, transcoder) cannot be read or used: missing files, a pickled
    checkpoint, an unknown architecture or hook name, NaN weights, a width that does not match
    its site, a feature index out of range, a feature site without its dictionary attached."""


class ArgumentError(ActpatchError, TypeError):
    """An entry point got an argument of the wrong kind (checked against its annotation before
    any work); also a ``TypeError``, as Python's own would be."""
