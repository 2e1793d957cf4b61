"""Direct vs total effects: exact where nothing is downstream, self-repair flagged on a
hand-built model with a backup neuron."""

from __future__ import annotations

import pytest

import actpatch as ap
from actpatch.testing import backup_head_model, backup_model, random_pairs, tiny_model


def test_backup_neuron_hides_the_first_one_and_is_flagged():
    m, ps = backup_model()
    dt = ap.circuits.direct_vs_total(m, ps)
    assert dt.effects("L0.MLP") == (-1.0, 0.0)  # derived in backup_model's docstring
    assert dt.effects("L1.MLP") == (0.0, 0.0)
    flagged = [f for f in dt.findings if f.code == "self_repair"]
    assert len(flagged) == 1 and flagged[0].message.startswith("L0.MLP:")
    assert dt.disagreements(1)[0][0] == "L0.MLP"
    assert dt.compensators == {"L0.MLP": [("L1.MLP", pytest.approx(1.0, abs=1e-5))]}


def test_backup_head_takes_over_and_is_flagged():
    m, ps = backup_head_model()
    dt = ap.circuits.direct_vs_total(m, ps)
    assert dt.effects("L0.H0") == (-1.0, 0.0)  # derived in backup_head_model's docstring
    assert dt.effects("L1.H0") == (0.0, 0.0)
    assert [f.message.split(":")[0] for f in dt.findings if f.code == "self_repair"] == ["L0.H0"]
    assert dt.compensators == {"L0.H0": [("L1.H0", pytest.approx(1.0, abs=1e-5))]}  # B writes +1 when A is noised
    assert "Compensating, by the change of their direct effect when it is noised: L1.H0 (+1.000)" in dt.findings[0].message
    # the mechanism: with head A noised, head B moves its attention from the query to the input
    g = ps.groups()[0]
    with ap.capture(m, [ap.Site("z", 0), ap.Site("pattern", 1)]) as corrupted:
        m.logits(g.corrupted)
    with ap.intervene(m, {ap.Site("z", 0): corrupted[ap.Site("z", 0)]}), ap.capture(m, [ap.Site("pattern", 1)]) as a:
        m.logits(g.clean)
    assert float(a[ap.Site("pattern", 1)][0, 0, 1, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gpt_neox"])
def test_direct_equals_total_where_nothing_is_downstream(family):
    """The last layer's MLP writes straight into the final norm: its direct and total effects
    are the same patch."""
    m = tiny_model(family, n_layers=2)
    ps = random_pairs(n=3, T=5, diff=(1, 3))
    dt = ap.circuits.direct_vs_total(m, ps)
    de, te = dt.effects("L1.MLP")
    assert abs(te) > 1e-3 and de == pytest.approx(te, abs=1e-4)
    assert len(dt.components) == 2 * m.n_heads + 2 and dt.direct.shape == dt.total.shape


def test_direct_effects_need_one_corrupted_run():
    m = tiny_model("llama", n_layers=2)
    with pytest.raises(ap.errors.CorruptionError, match="needs a corrupted run per prompt"):
        ap.circuits.direct_vs_total(m, random_pairs(n=2, T=5, diff=(1,)), corruption="mean")
    with pytest.raises(ap.errors.MethodError, match="one head's write to the residual stream is not defined"):
        ap.circuits.direct_vs_total(tiny_model("gemma2", n_layers=2), random_pairs(n=2, T=5, diff=(1,)))
    with pytest.raises(ap.errors.MethodError, match="one corrupted run per prompt"):
        ap.circuits.direct_vs_total(m, random_pairs(n=2, T=5, diff=(1,)), corruption=ap.corruption.GaussianNoise(n_draws=3))
