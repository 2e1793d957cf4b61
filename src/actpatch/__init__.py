"""actpatch: activation patching on Hugging Face causal language models, done right and fast.

The top level holds what an experiment needs; the rest sits in namespaces: ``ap.errors`` (every
error class), ``ap.prompts`` (builders), ``ap.corruption`` (corruptions as values),
``ap.circuits`` (graph, edges, circuits, MIB), ``ap.subspaces`` (directions, the illusion
check, DAS), ``ap.experiment`` (grids, executors), ``ap.types`` (enums and records),
``ap.results`` (result metadata), ``ap.features`` (feature dictionaries: SAEs, transcoders).

Example:
    >>> import actpatch as ap
    >>> model = ap.load_model()                      # the bundled SmolLM2-135M-Instruct
    >>> prompts = ap.prompts.ioi(model, n=4, seed=0, templates=[0])
    >>> res = ap.sweep(model, prompts, target="resid_pre", direction="denoise", layers=[0, 29], progress=False)
    >>> res.dims, tuple(res.values.shape)
    (('layer', 'pos'), (2, 14))
    >>> round(float(res.values[0, 9]), 3)            # S2 at layer 0 carries everything
    1.0
"""

from typing import Any

from . import circuits, corruption, errors, experiment, features, prompts, results, subspaces, types
from ._version import __version__
from .checks import check
from .agreement import compare_estimate
from .compare import Comparison, compare
from .doctor import doctor
from .errors import ActpatchError
from .features import load_dictionary
from .findings import Finding, Level
from .hooks import capture, intervene
from .metrics import Metric
from .models import DEFAULT_MODEL, Model, load_model
from .prompts import PromptSet
from .results import PatchResult
from .sites import Site, SiteKind
from .techniques.attribution import attribute, validate_attribution
from .techniques.eap import edge_attribution
from .techniques.generation import generate
from .techniques.interchange import interchange
from .techniques.patchscope import patchscope
from .techniques.path import path_patch, path_sweep
from .techniques.patching import patch, sweep
from .types import DEFAULT_DIRECTION, Direction, Engine

__all__ = [
    # models and sites
    "load_model", "Model", "DEFAULT_MODEL", "Site", "SiteKind", "capture", "intervene", "load_dictionary",
    # experiments
    "PromptSet", "Direction", "DEFAULT_DIRECTION", "Metric", "Engine",
    "sweep", "patch", "attribute", "validate_attribution", "path_patch", "path_sweep", "edge_attribution",
    "generate", "patchscope", "interchange",
    # reading results
    "PatchResult", "Finding", "Level", "check", "compare", "Comparison", "compare_estimate", "doctor", "plot_attention",
    "write_report", "ActpatchError",
    # namespaces
    "prompts", "errors", "corruption", "circuits", "subspaces", "experiment", "features",
    "__version__",
]


from ._arguments import checked, checked_namespace  # noqa: E402

checked_namespace(globals(), __all__)  # wrong kinds of arguments: one clear error, before any work


def __getattr__(name: str) -> Any:
    """``ap.plot_attention`` and ``ap.write_report`` without importing plotly with the package."""
    if name == "plot_attention":
        from .report.figures import plot_attention

        return checked(plot_attention)
    if name == "write_report":
        from .report.html import write_report

        return checked(write_report)
    raise AttributeError(f"module 'actpatch' has no attribute {name!r}")
