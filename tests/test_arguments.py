"""Every public entry point, fed a value of the wrong kind in each parameter, answers with an
ActpatchError (never a bare AttributeError / TypeError from deep inside), naming the parameter
where no specific check of its own did."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import actpatch as ap
from actpatch.testing import random_pairs, tiny_model


@pytest.fixture(scope="module")
def calls():
    m, ps = tiny_model("gpt2", n_layers=2), random_pairs(n=2)
    den = ap.sweep(m, ps, "z", direction="denoise", progress=False)
    noi = ap.sweep(m, ps, "z", progress=False)
    est, edges, site = ap.attribute(m, ps, "z"), ap.edge_attribution(m, ps), ap.Site("resid_pre", 1)
    return {
        "sweep": (ap.sweep, dict(model=m, prompts=ps, target="z", progress=False)),
        "patch": (ap.patch, dict(model=m, prompts=ps, sites=[site])),
        "attribute": (ap.attribute, dict(model=m, prompts=ps, target="z")),
        "validate_attribution": (ap.validate_attribution, dict(model=m, prompts=ps, result=est)),
        "path_patch": (ap.path_patch, dict(model=m, prompts=ps, senders=[ap.Site("z", 0, head=1)],
                                           receivers=[ap.Site("resid_final")])),
        "path_sweep": (ap.path_sweep, dict(model=m, prompts=ps, receivers=[ap.Site("resid_final")], progress=False)),
        "edge_attribution": (ap.edge_attribution, dict(model=m, prompts=ps)),
        "compare": (ap.compare, dict(denoise=den, noise=noi)),
        "compare_estimate": (ap.compare_estimate, dict(estimate=est, exact=noi)),
        "check": (ap.check, dict(result=noi)),
        "diff_of_means": (ap.subspaces.diff_of_means, dict(model=m, prompts=ps, site=site)),
        "subspace_check": (ap.subspaces.subspace_check, dict(model=m, prompts=ps, site=ap.Site("resid_pre", 1, pos=5),
                                                            subspace=torch.eye(64)[:1])),
        "faithfulness": (ap.circuits.faithfulness, dict(model=m, prompts=ps, edges=edges, sizes=[5])),
        "validate_edges": (ap.circuits.validate_edges, dict(model=m, prompts=ps, edges=edges, exhaustive=False)),
        "from_pairs": (ap.PromptSet.from_pairs, dict(model=m, pairs=[("a b", "a c", " x", " y")])),
        "ioi": (ap.prompts.ioi, dict(model=m, n=2)),
    }


def test_every_parameter_of_every_entry_point_refuses_the_wrong_kind(calls):
    tried = 0
    for name, (fn, base) in calls.items():
        for p, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            for wrong in (object(), 3.5j):
                with pytest.raises(ap.ActpatchError):
                    fn(**{**base, p: wrong})
                tried += 1
    assert tried >= 270  # every parameter of 16 entry points, twice


def test_the_wrong_kind_is_named_and_close_kinds_are_accepted(calls):
    fn, base = calls["sweep"]
    with pytest.raises(ap.errors.ArgumentError, match=r"sweep\(progress=\.\.\.\) takes bool, not str 'yes'"):
        fn(**{**base, "progress": "yes"})
    with pytest.raises(ap.errors.ArgumentError, match=r"sweep\(seed=\.\.\.\) takes int, not float 1\.5"):
        fn(**{**base, "seed": 1.5})
    with pytest.raises(ap.errors.ArgumentError, match=r"sweep\(model=\.\.\.\) takes Model, not object"):
        fn(**{**base, "model": object()})
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer'"):  # still a TypeError, and ours
        fn(**base, layer=[0])
    res = fn(**{**base, "seed": np.int64(0), "layers": (0,)})  # numpy ints and tuples are fine
    assert res.shape == (1, 4)
