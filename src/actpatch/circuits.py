"""Circuits, as one namespace (``ap.circuits``): the computational graph of a model, edge
attribution (EAP, EAP-IG, per position), exact circuit runs and faithfulness, MIB's scores and
files, and direct vs total effects. The code lives in :mod:`actpatch.techniques`; this module
only gathers the public names.

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import random_pairs, tiny_model
    >>> m, ps = tiny_model("gpt2"), random_pairs(n=2)
    >>> edges = ap.edge_attribution(m, ps)
    >>> keep = ap.circuits.top_edges(edges, 10)
    >>> int(keep.sum()), tuple(ap.circuits.run_circuit(m, ps, keep).shape)
    (10, (2,))
"""

from .techniques.circuit import (EdgeValidation, Faithfulness, faithfulness, greedy_edges, run_circuit, top_edges,
                                 validate_edges)
from .techniques.circuit_io import (SUBMISSION_PERCENTS, from_mib_json, from_mib_submission, load_edge_scores,
                                    save_edge_scores, to_mib_json, to_mib_submission)
from .techniques.eap import EdgeScores, edge_attribution
from .techniques.graph import Edge, Graph, GraphLayout, Node, NodeKind, Port, PortKind
from .techniques.masks import learn_edge_mask
from .techniques.mib import MIB_FRACTIONS, CircuitScores, circuit_scores, compare_methods, random_edges
from .techniques.peap import (PositionalEdgeScores, positional_edge_attribution, positional_faithfulness,
                              top_positional_edges)
from .techniques.self_repair import DirectTotal, direct_vs_total

__all__ = [
    # the graph
    "Graph", "GraphLayout", "Node", "NodeKind", "Port", "PortKind", "Edge",
    # edge attribution
    "edge_attribution", "EdgeScores", "positional_edge_attribution", "PositionalEdgeScores",
    # circuits
    "top_edges", "greedy_edges", "learn_edge_mask", "top_positional_edges", "run_circuit", "faithfulness", "positional_faithfulness",
    "Faithfulness", "validate_edges", "EdgeValidation", "direct_vs_total", "DirectTotal",
    # MIB
    "circuit_scores", "CircuitScores", "compare_methods", "random_edges", "MIB_FRACTIONS", "to_mib_json",
    "from_mib_json", "save_edge_scores", "load_edge_scores", "to_mib_submission", "from_mib_submission",
    "SUBMISSION_PERCENTS",
]

from ._arguments import checked_namespace  # noqa: E402

checked_namespace(globals(), __all__)  # wrong kinds of arguments: one clear error, before any work
