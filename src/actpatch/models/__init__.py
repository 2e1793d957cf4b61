"""Model loading, the :class:`Model` handle and per-family adapters."""

from .adapters import Adapter, FamilySpec, supported_families
from .handle import Model
from .loading import DEFAULT_MODEL, cache_dir, load_model

__all__ = ["Adapter", "FamilySpec", "Model", "load_model", "cache_dir", "DEFAULT_MODEL", "supported_families"]
