"""Feature dictionaries (SAEs, transcoders) as sites: load, attach, patch, attribute.

- :class:`Dictionary` (:mod:`.dictionary`): weights, architecture, encode / decode;
- :func:`load_dictionary` / :func:`save_dictionary` (:mod:`.io`): SAELens's on-disk layout;
- :func:`attach` (:mod:`.attach`): a dictionary's features and error term become sites;
- :func:`feature_circuit` (:mod:`.circuit`): sparse feature circuits, faithfulness and completeness;
- :func:`bundled` (:mod:`.builtin`): small TopK SAEs for a model, trained on first use and cached
  (:mod:`.train`: the trainer and :func:`dictionary_quality`).
"""

from .activity import FeatureExample, top_activations, top_features
from .attach import attach
from .builtin import Recipe, bundled
from .circuit import FeatureCircuit, FeatureEdge, FeatureNode, feature_circuit
from .dictionary import Activation, Dictionary, Normalization
from .io import load_dictionary, save_dictionary, site_of_hook
from .train import dictionary_quality, train_topk

__all__ = ["Dictionary", "Activation", "Normalization", "attach", "top_features", "top_activations",
           "FeatureExample", "load_dictionary", "save_dictionary", "site_of_hook", "bundled", "Recipe",
           "train_topk", "dictionary_quality", "feature_circuit", "FeatureCircuit", "FeatureNode", "FeatureEdge"]
