"""Feature dictionaries on the bundled model: trained on first use (a quick recipe here; the
default's figures are in docs/features.md), a feature circuit for IOI with its curves and its
AtP-vs-exact check. The docs page uses the same quick recipe, so the two share the cache."""

import math

import pytest

import actpatch as ap

pytestmark = pytest.mark.slow

QUICK = ap.features.Recipe(steps=100, text_windows=160, prompts_per_builder=100, quality_prompts=16)


@pytest.fixture(scope="module")
def dictionaries(bundled):
    return ap.features.bundled(bundled, recipe=QUICK, progress=False)


def test_bundled_dictionaries_reconstruct_and_are_cached(bundled, dictionaries):
    assert [str(d.site) for d in dictionaries] == ["resid_post.L6", "resid_post.L15"]
    for d in dictionaries:
        q = d.meta["quality"]
        print(f"\n{d.site}: {q}")
        assert (d.n_features, d.k, d.d_in) == (2048, 32, 576)
        assert q["fvu"] < 0.15 and q["dead"] < 0.2 and 30 <= q["l0"] <= 32
        assert q["logit_diff"] > 3.0  # the held-out IOI prompts are solved by the model itself
        assert "fvu" in d.summary()
    again = ap.features.bundled(bundled, recipe=QUICK, progress=False)  # from the cache: same weights
    assert all(bool((a.W_dec == b.W_dec).all()) for a, b in zip(again, dictionaries))


def test_ioi_feature_circuit_on_the_bundled_model(bundled, dictionaries):
    ps = ap.prompts.ioi(bundled, n=8, templates=[0], seed=3)
    with ap.features.attach(bundled, *dictionaries):
        fc = ap.features.feature_circuit(bundled, ps, sizes=[10, 100, 1000], validate=5, max_edge_nodes=16)
    print("\n" + fc.table(5))
    print({"faithfulness": fc.faithfulness, "completeness": fc.completeness, "validation": fc.validation})
    assert fc.clean > 3.0 and fc.corrupted < -3.0  # the model prefers the indirect object, the corruption flips it
    assert fc.faithfulness[-1] > 0.9 and abs(fc.completeness[-1]) < 0.1  # 1,000 nodes carry the behaviour
    assert fc.faithfulness[0] < fc.faithfulness[-1] and fc.completeness[0] > fc.completeness[-1]
    assert set(fc.validation) == {"resid_post.L6", "resid_post.L15"}
    for v in fc.validation.values():
        assert v["cells"] >= 10 and math.isfinite(v["rank_correlation"])
    codes = {f.code for f in fc.findings}
    moved = abs(fc.reconstruction - fc.clean) > 0.1 * abs(fc.clean - fc.corrupted)
    assert ("feature_reconstruction_changes_metric" in codes) == moved
    assert fc.edges and all(math.isfinite(e.score) for e in fc.edges)
