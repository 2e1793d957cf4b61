"""The vocabulary of an experiment, declared once: enums for the modes every entry point takes
and the frozen records every result carries.

Entry points accept the enum members or their string values (``"noise"`` is
``Direction.NOISE``); configs (pydantic) take the same enums, so each vocabulary is written in
one place only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ActpatchError, DirectionError, EngineError

if TYPE_CHECKING:  # pragma: no cover
    from .models.handle import Model
    from .prompts.promptset import PromptSet

__all__ = ["Direction", "Method", "Engine", "Estimate", "Provenance", "Diagnostics", "DEFAULT_DIRECTION", "parse_enum",
           "parse_direction", "parse_engine"]


class Direction(str, enum.Enum):
    """Which run is patched with which."""

    DENOISE = "denoise"
    """Run the corrupted prompt, write clean activations: is the site *sufficient*?"""
    NOISE = "noise"
    """Run the clean prompt, write corrupted activations: is the site *necessary*?"""

    @property
    def no_effect(self) -> float:
        """The normalised value of a patch that changes nothing: the base run's, 0 (corrupted)
        when denoising and 1 (clean) when noising. Plots centre on it; effects are read from it.

        Example:
            >>> Direction.NOISE.no_effect, Direction.DENOISE.no_effect
            (1.0, 0.0)
        """
        return 1.0 if self is Direction.NOISE else 0.0


DEFAULT_DIRECTION = Direction.NOISE
"""The default of every entry point (``sweep``, ``patch``, ``attribute``, ``path_patch``,
``path_sweep``, ``edge_attribution``): noising, the direction attribution methods estimate and
circuits are cut in. Pass ``direction="denoise"`` for sufficiency, and run both
(:func:`actpatch.compare`)."""


class Method(str, enum.Enum):
    """How a result's numbers were obtained."""

    EXACT = "exact"
    """Activation patching: one patched forward pass per cell (whatever the engine)."""
    ATP = "atp"
    """Attribution patching: first-order estimates from gradients (AtP, AtP*)."""
    PATH = "path_patching"
    """Path patching: senders' effects through chosen receivers only."""


class Engine(str, enum.Enum):
    """Which engine computes exact patches."""

    AUTO = "auto"
    """``batched`` where it supports the target (all but embed / resid_final), else ``reference``."""
    BATCHED = "batched"
    """Many patches per forward pass, prefix / layer reuse, known no-ops skipped (the default)."""
    REFERENCE = "reference"
    """One forward pass per patch: the slow, obviously right oracle."""


class Estimate(str, enum.Enum):
    """What an attribution value estimates."""

    SIGNED = "signed"
    """The patched metric, with its sign (AtP, the QK fix)."""
    MAGNITUDE = "magnitude"
    """|effect| laid out in the behaviour's direction (GradDrop): ranks, loses the sign."""


E = TypeVar("E", bound=enum.Enum)


def parse_enum(kind: type[E], value: Any, what: str, error: type[ActpatchError] = ActpatchError) -> E:
    """``kind(value)``, or ``error`` naming ``what``, the bad value and the choices.

    Example:
        >>> parse_enum(Direction, "noise", "direction")
        <Direction.NOISE: 'noise'>
    """
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)  # type: ignore[attr-defined]
        raise error(f"Unknown {what} {value!r}; use one of {choices}.") from None


def parse_direction(direction: "str | Direction") -> Direction:
    """A :class:`Direction` from its value; :class:`~actpatch.DirectionError` otherwise."""
    return parse_enum(Direction, direction, "direction", DirectionError)


def parse_engine(engine: "str | Engine") -> Engine:
    """An :class:`Engine` from its value; :class:`~actpatch.EngineError` otherwise."""
    return parse_enum(Engine, engine, "engine", EngineError)


@dataclass(frozen=True)
class Provenance:
    """Where a result comes from: model (name, family, weight hash), prompt set, package versions."""

    model: str
    family: str
    weight_hash: str
    prompts: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    """The model's parameter dtype (``bfloat16``, ``float16``: effects near the rounding of the
    logits are flagged as precision noise)."""

    @classmethod
    def of(cls, model: "Model", prompts: "PromptSet") -> "Provenance":
        """The provenance of an experiment on ``model`` and ``prompts`` with the installed packages."""
        import torch
        import transformers

        from ._version import __version__

        return cls(model=model.name, family=model.family, weight_hash=model.weight_hash, prompts=prompts.describe(),
                   versions={"actpatch": __version__, "torch": torch.__version__,
                             "transformers": transformers.__version__},
                   dtype=str(model.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Diagnostics:
    """What only the model runs can tell, per prompt or over the result."""

    clean_correct: tuple[bool, ...] | None = None
    """Per prompt: the model prefers the answer over the alternative on the clean prompt."""
    null_patch_max_abs: float | None = None
    """Largest |metric change| from writing the base run's own activations back into it."""
