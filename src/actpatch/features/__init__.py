"""Feature dictionaries (SAEs, transcoders) as sites: load, attach, patch, attribute.

- :class:`Dictionary` (:mod:`.dictionary`): weights, architecture, encode / decode;
- :func:`load_dictionary` / :func:`save_dictionary` (:mod:`.io`): SAELens's on-disk layout;
- :func:`attach` (:mod:`.attach`): a dictionary's features and error term become sites.
"""

from .activity import FeatureExample, top_activations, top_features
from .attach import attach
from .dictionary import Activation, Dictionary, Normalization
from .io import load_dictionary, save_dictionary, site_of_hook

__all__ = ["Dictionary", "Activation", "Normalization", "attach", "top_features", "top_activations",
           "FeatureExample", "load_dictionary", "save_dictionary", "site_of_hook"]
