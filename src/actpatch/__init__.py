"""actpatch: activation patching on Hugging Face causal language models, done right and fast.

Example:
    >>> import actpatch as ap
    >>> model = ap.load_model()  # doctest: +SKIP
    >>> prompts = ap.prompts.ioi(model, n=8, seed=0)  # doctest: +SKIP
    >>> res = ap.sweep(model, prompts, target="resid_pre")  # doctest: +SKIP
"""

from .errors import (
    ActpatchError,
    MetricError,
    ModelNotFoundError,
    PromptError,
    ResultError,
    SiteError,
    UnsupportedArchitectureError,
    UnsupportedSiteError,
)
from .hooks import capture, intervene
from .models import DEFAULT_MODEL, Model, load_model, supported_families
from .sites import Site, SiteKind

__version__ = "0.1.0"

__all__ = [
    "ActpatchError",
    "MetricError",
    "ModelNotFoundError",
    "PromptError",
    "ResultError",
    "SiteError",
    "UnsupportedArchitectureError",
    "UnsupportedSiteError",
    "capture",
    "intervene",
    "DEFAULT_MODEL",
    "Model",
    "load_model",
    "supported_families",
    "Site",
    "SiteKind",
    "__version__",
]
