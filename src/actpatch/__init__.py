"""actpatch: activation patching on Hugging Face causal language models, done right and fast.

Example:
    >>> import actpatch as ap
    >>> model = ap.load_model()                      # the bundled SmolLM2-135M-Instruct
    >>> prompts = ap.prompts.ioi(model, n=4, seed=0, templates=[0])
    >>> res = ap.sweep(model, prompts, target="resid_pre", layers=[0, 29], progress=False)
    >>> res.dims, tuple(res.values.shape)
    (('layer', 'pos'), (2, 14))
    >>> round(float(res.values[0, 9]), 3)            # S2 at layer 0 carries everything
    1.0
"""

from .errors import (
    ActpatchError,
    CorruptionError,
    MetricError,
    ModelNotFoundError,
    PromptError,
    ResultError,
    SiteError,
    UnsupportedArchitectureError,
    UnsupportedSiteError,
)
from . import prompts
from .attribution import Validation, attribute, validate_attribution
from .checks import Finding, Level, check
from .circuit import EdgeValidation, Faithfulness, faithfulness, run_circuit, top_edges, validate_edges
from .compare import Comparison, Role, compare
from .eap import EdgeScores, edge_attribution
from .corruption import Corruption, GaussianNoise, MeanAblation, Resample, SymmetricReplacement, ZeroAblation
from .hooks import capture, intervene
from .metrics import Metric
from .patching import Direction, patch, sweep
from .path import path_patch, path_sweep
from .prompts import PromptSet
from .results import PatchResult
from .models import DEFAULT_MODEL, Model, load_model, supported_families
from .sites import Site, SiteKind

__version__ = "0.1.0"

__all__ = [
    "ActpatchError",
    "CorruptionError",
    "prompts",
    "Finding",
    "Level",
    "check",
    "Comparison",
    "Role",
    "compare",
    "EdgeScores",
    "Faithfulness",
    "faithfulness",
    "run_circuit",
    "validate_edges",
    "EdgeValidation",
    "top_edges",
    "edge_attribution",
    "Corruption",
    "GaussianNoise",
    "MeanAblation",
    "Resample",
    "SymmetricReplacement",
    "ZeroAblation",
    "Metric",
    "Direction",
    "patch",
    "sweep",
    "attribute",
    "validate_attribution",
    "Validation",
    "path_patch",
    "path_sweep",
    "PromptSet",
    "PatchResult",
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
