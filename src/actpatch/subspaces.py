"""Subspace and direction patching, as one namespace (``ap.subspaces``): the basis value
(:class:`Subspace`), direction finders, the interpretability-illusion check and DAS. The code
lives in :mod:`actpatch.subspace` (the value) and :mod:`actpatch.techniques.directions` /
:mod:`actpatch.techniques.das`; this module only gathers the public names.

Example:
    >>> import actpatch as ap
    >>> from actpatch.testing import random_pairs, tiny_model
    >>> m, ps = tiny_model("gpt2"), random_pairs(n=2)
    >>> d = ap.subspaces.diff_of_means(m, ps, ap.Site("resid_pre", 1), position="end")
    >>> d.k, d.d
    (1, 64)
"""

from .subspace import Subspace, SubspaceVerdict
from .techniques.das import DASRecord, DASResult, das
from .techniques.directions import SubspaceCheck, diff_of_means, pca_directions, probe_direction, subspace_check

__all__ = ["Subspace", "diff_of_means", "probe_direction", "pca_directions", "subspace_check", "SubspaceCheck",
           "SubspaceVerdict", "das",
           "DASResult", "DASRecord"]

from ._arguments import checked_namespace  # noqa: E402

checked_namespace(globals(), __all__)  # wrong kinds of arguments: one clear error, before any work
