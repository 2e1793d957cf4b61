"""How to rebuild a model in another process: the loader that made it and its arguments.

A distributed executor ships a :class:`Recipe` instead of weights: each worker calls the same
loader (the bundled models come from the same packages and cache, a hub model from the shared
HF cache) and then checks that its weights hash to the driver's. :func:`actpatch.load_model`
and :func:`actpatch.testing.tiny_model` record their recipe on the model; a model built in
memory (``ap.Model(hf_module)``) has none and cannot be shipped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .handle import Model

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """``loader(*args, **kwargs)`` rebuilds the model; ``loader`` is ``"module:function"``."""

    loader: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> "Model":
        module, fn = self.loader.split(":")
        model = getattr(importlib.import_module(module), fn)(*self.args, **self.kwargs)
        return model

    def on_device(self, device: str) -> "Recipe":
        """The same model loaded on ``device`` (a worker's GPU); a device map is kept as given."""
        if "device" not in self.kwargs or self.kwargs.get("device_map") is not None:
            return self
        return replace(self, kwargs={**self.kwargs, "device": device})

    def describe(self) -> str:
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.loader.split(':')[1]}({', '.join(shown)})"
