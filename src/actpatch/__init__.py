"""actpatch: activation patching on Hugging Face causal language models, done right and fast.

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

from .errors import (
    ActpatchError,
    ConfigError,
    ContextLengthError,
    CorruptionError,
    DeviceError,
    DirectionError,
    EngineError,
    ExecutorError,
    MethodError,
    MetricError,
    ModelNotFoundError,
    OutputDirError,
    PromptError,
    ResultError,
    SiteError,
    SubspaceError,
    UnsupportedArchitectureError,
    UnsupportedSiteError,
)
from . import prompts
from .checks import check
from .compare import Comparison, Role, compare, mark_compared
from .corruption import (
    Corruption,
    CorruptionKind,
    GaussianNoise,
    MeanAblation,
    Resample,
    SymmetricReplacement,
    ZeroAblation,
)
from .doctor import Check, Diagnosis, doctor
from .experiment.executor import LocalExecutor
from .experiment.plan import Grid
from .experiment.ray_executor import RayExecutor
from .findings import Finding, Level
from .hooks import capture, intervene
from .metrics import Metric
from .models import DEFAULT_MODEL, Model, load_model, supported_families
from .prompts import PromptSet
from ._plots import plot_attention
from .results import PatchResult, ResultInfo
from .sites import Site, SiteKind
from .subspace import Subspace
from .techniques.attribution import Validation, attribute, validate_attribution
from .techniques.circuit import EdgeValidation, Faithfulness, faithfulness, run_circuit, top_edges, validate_edges
from .techniques.eap import EdgeScores, edge_attribution
from .techniques.graph import Edge, Graph, Node, NodeKind, Port, PortKind
from .techniques.circuit_io import from_mib_json, load_edge_scores, save_edge_scores, to_mib_json
from .techniques.das import DASResult, das
from .techniques.mib import MIB_FRACTIONS, CircuitScores, circuit_scores, compare_methods, random_edges
from .techniques.patching import patch, sweep
from .techniques.peap import (PositionalEdgeScores, positional_edge_attribution, positional_faithfulness,
                              top_positional_edges)
from .techniques.self_repair import DirectTotal, direct_vs_total
from .techniques.subspace import SubspaceCheck, diff_of_means, pca_directions, probe_direction, subspace_check
from .techniques.path import path_patch, path_sweep
from .types import DEFAULT_DIRECTION, Diagnostics, Direction, Engine, Estimate, Method, Provenance

__version__ = "0.2.0"

__all__ = [
    # errors
    "ActpatchError", "ConfigError", "ContextLengthError", "CorruptionError", "DirectionError", "EngineError",
    "ExecutorError", "DeviceError",
    "MethodError", "MetricError", "ModelNotFoundError", "OutputDirError", "PromptError", "ResultError", "SiteError",
    "SubspaceError", "UnsupportedArchitectureError", "UnsupportedSiteError",
    # models and sites
    "DEFAULT_MODEL", "Model", "load_model", "supported_families", "Site", "SiteKind", "capture", "intervene",
    "Subspace",
    # experiments
    "prompts", "PromptSet", "Corruption", "CorruptionKind", "GaussianNoise", "MeanAblation", "Resample",
    "SymmetricReplacement", "ZeroAblation", "Metric", "Direction", "DEFAULT_DIRECTION", "Engine", "Method", "Estimate",
    "Grid", "LocalExecutor", "RayExecutor", "sweep", "patch", "attribute", "validate_attribution", "Validation", "path_patch", "path_sweep",
    "edge_attribution", "EdgeScores", "Graph", "Node", "NodeKind", "Port", "PortKind", "Edge", "top_edges",
    "run_circuit", "faithfulness", "Faithfulness", "validate_edges", "EdgeValidation", "diff_of_means",
    "probe_direction", "pca_directions", "subspace_check", "SubspaceCheck", "das", "DASResult",
    "circuit_scores", "CircuitScores", "compare_methods", "random_edges", "MIB_FRACTIONS", "to_mib_json",
    "from_mib_json", "save_edge_scores", "load_edge_scores", "direct_vs_total", "DirectTotal",
    "positional_edge_attribution", "PositionalEdgeScores", "top_positional_edges", "positional_faithfulness",
    # results and reading them
    "PatchResult", "ResultInfo", "Provenance", "Diagnostics", "Finding", "Level", "check", "Comparison", "Role",
    "compare", "mark_compared", "plot_attention", "doctor", "Diagnosis", "Check",
    "__version__",
]
