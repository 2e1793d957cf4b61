"""AND / OR micro-models with hand-set weights: the direction comparison must label each
component as derived on paper (see actpatch.testing.micro_model for the weights).

Clean prompt a = b = 1, corrupted a = b = 0; logit difference LD = 2C - 1 (clean +1,
corrupted -1), so normalised = (LD + 1) / 2 = C after patching.

AND, C = relu(A + B - 1):
  denoise A alone: A=1, B=0 -> C = 0 -> sufficiency 0;  noise A alone: A=0, B=1 -> C = 0 -> necessity 1
  => A, B: necessary_not_sufficient (AND-like). C itself: denoise -> 1, noise -> 0: both.
OR, C = min(A + B, 1):
  denoise A alone: C = 1 -> sufficiency 1;  noise A alone: C = 1 -> necessity 0
  => A, B: sufficient_not_necessary (OR-like). C: both.
The constant neuron (index 2) is the same in every run: neither, in both models.
"""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch import Site
from actpatch.compare import Role
from actpatch.testing import micro_model

EXPECTED = {
    "and": {"A": (0.0, 1.0, Role.NECESSARY_NOT_SUFFICIENT), "B": (0.0, 1.0, Role.NECESSARY_NOT_SUFFICIENT)},
    "or": {"A": (1.0, 0.0, Role.SUFFICIENT_NOT_NECESSARY), "B": (1.0, 0.0, Role.SUFFICIENT_NOT_NECESSARY)},
}


@pytest.mark.parametrize("gate", ["and", "or"])
def test_micro_model_truth_table(gate):
    model, _ = micro_model(gate)
    for t in range(4):
        a, b = t >> 1, t & 1
        c = (a and b) if gate == "and" else (a or b)
        lg = model.logits(torch.tensor([[t]]), last_only=True)[0]
        assert abs((lg[4] - lg[5]).item() - (2 * c - 1)) < 1e-5


@pytest.mark.parametrize("gate", ["and", "or"])
def test_compare_labels_and_or_components(gate):
    model, prompts = micro_model(gate)
    kw = dict(target="mlp_post", layers=[0], neurons=[0, 1, 2], progress=False)
    den = ap.sweep(model, prompts, direction="denoise", **kw)
    noi = ap.sweep(model, prompts, direction="noise", **kw)
    cmp = ap.compare(den, noi)
    for name, neuron in (("A", 0), ("B", 1)):
        suff, nec, role = EXPECTED[gate][name]
        assert abs(float(cmp.sufficiency[0, neuron]) - suff) < 1e-5
        assert abs(float(cmp.necessity[0, neuron]) - nec) < 1e-5
        assert cmp.role_at(0, neuron) is role
    assert cmp.role_at(0, 2) is Role.NEITHER
    assert abs(float(cmp.sufficiency[0, 2])) < 1e-6 and abs(float(cmp.necessity[0, 2])) < 1e-6
    # C is a bottleneck in both gates
    cd = ap.patch(model, prompts, [Site("mlp_out", 1)], direction="denoise")
    cn = ap.patch(model, prompts, [Site("mlp_out", 1)], direction="noise")
    c_cmp = ap.compare(cd, cn)
    assert c_cmp.roles == [Role.SUFFICIENT_AND_NECESSARY]
    # compare() changes neither input; mark_compared() returns copies without the single-direction advice
    assert [f.code for f in den.findings + noi.findings].count("single_direction") == 2
    from actpatch.compare import mark_compared

    marked = [mark_compared(r) for r in (den, noi)]
    assert "single_direction" not in [f.code for r in marked for f in r.findings]
    assert all(r.info.compared for r in marked) and not den.info.compared and not noi.info.compared
    df = cmp.to_pandas()
    assert list(df.role) == [EXPECTED[gate]["A"][2].value, EXPECTED[gate]["B"][2].value, "neither"]
    scatter = cmp.scatter_data()
    assert scatter["x"][0] == pytest.approx(EXPECTED[gate]["A"][0], abs=1e-5) and len(scatter["label"]) == 3


def test_thresholds_are_configurable():
    model, prompts = micro_model("or")
    kw = dict(target="mlp_post", layers=[0], neurons=[0], progress=False)
    den, noi = (ap.sweep(model, prompts, direction=d, **kw) for d in ("denoise", "noise"))
    assert ap.compare(den, noi, sufficient=1.5).roles == [Role.NEITHER]
    assert ap.compare(den, noi, necessary=-0.5).roles == [Role.SUFFICIENT_AND_NECESSARY]


def test_compare_refuses_mismatched_inputs():
    model, prompts = micro_model("and")
    den = ap.sweep(model, prompts, "mlp_post", layers=[0], neurons=[0, 1], direction="denoise", progress=False)
    noi = ap.sweep(model, prompts, "mlp_post", layers=[0], neurons=[0], direction="noise", progress=False)
    with pytest.raises(ap.errors.ResultError, match="different grids"):
        ap.compare(den, noi)
    with pytest.raises(ap.errors.ResultError, match="pass the denoising result first"):
        ap.compare(noi, den)


def test_negative_components_get_their_own_role():
    def res(direction, values):
        v = torch.tensor([values])
        info = ap.results.ResultInfo(target="z", direction=ap.Direction(direction),
                             metrics=("logit_diff",), corruption=ap.corruption.CorruptionSpec(), seed=0,
                             provenance=ap.types.Provenance(model="hand-made", family="none", weight_hash="-"))
        return ap.PatchResult(dims=("head",), coords={"head": [0, 1, 2]}, raw={"logit_diff": v},
                              clean={"logit_diff": torch.tensor([1.0])}, corrupted={"logit_diff": torch.tensor([0.0])},
                              info=info)
    # head 0: restoring it hurts (-0.3), corrupting it helps (noised 1.3 -> necessity -0.3): negative
    # head 1: slightly negative (-0.05): neither;  head 2: a bottleneck
    cmp = ap.compare(res("denoise", [-0.3, -0.05, 0.9]), res("noise", [1.3, 1.05, 0.1]))
    assert [r.value for r in cmp.roles] == ["negative", "neither", "sufficient_and_necessary"]
    assert cmp.counts() == {"sufficient_and_necessary": 1, "negative": 1, "neither": 1}


def _per_prompt(direction: str, rows: list[list[float]]) -> "ap.PatchResult":
    """A hand-made result: one row of normalised values per prompt (clean 1, corrupted 0)."""
    info = ap.results.ResultInfo(target="z", direction=ap.Direction(direction), metrics=("logit_diff",),
                                 corruption=ap.corruption.CorruptionSpec(), seed=0,
                                 provenance=ap.types.Provenance(model="hand-made", family="none", weight_hash="-"))
    n = len(rows)
    return ap.PatchResult(dims=("head",), coords={"head": list(range(len(rows[0])))},
                          raw={"logit_diff": torch.tensor(rows)}, clean={"logit_diff": torch.ones(n)},
                          corrupted={"logit_diff": torch.zeros(n)}, info=info)


def test_roles_need_intervals_that_clear_the_thresholds():
    # head 0: sufficiency spread over [0.26, 0.77] around 0.515, necessity solidly 0.9  -> uncertain
    # head 1: about the same mean but tight (0.52 +- 0.01), necessity solidly 0.9               -> sufficient and necessary
    # head 2: tight 0.485, necessity 0.9: a 0.035 difference from head 1 decides the role  -> necessary, not sufficient
    # head 3: noise around zero in both readings, one prompt -0.3                         -> neither or uncertain, never negative
    den = _per_prompt("denoise", [[0.26, 0.51, 0.48, 0.05], [0.77, 0.53, 0.49, -0.05],
                                  [0.26, 0.51, 0.48, 0.02], [0.77, 0.53, 0.49, -0.02]])
    noi = _per_prompt("noise", [[0.1, 0.1, 0.1, 1.0]] * 4)
    cmp = ap.compare(den, noi)
    assert cmp.intervals and cmp.level == 0.95
    assert cmp.roles[:3] == [Role.UNCERTAIN, Role.SUFFICIENT_AND_NECESSARY, Role.NECESSARY_NOT_SUFFICIENT]
    assert cmp.roles[3] is Role.NEITHER
    lo, hi = float(cmp.sufficiency_low[0]), float(cmp.sufficiency_high[0])
    assert lo < 0.5 < hi and lo == pytest.approx(0.26) and hi == pytest.approx(0.77)  # the interval is kept
    df = cmp.to_pandas()
    assert df.role.tolist()[0] == "uncertain" and df.sufficiency_low.tolist()[0] == pytest.approx(0.26)
    assert "sufficiency >= 0.5" in cmp.thresholds and "95% bootstrap intervals" in cmp.thresholds
    assert cmp.counts()["uncertain"] == 1
    # the same point values from one prompt: no interval, the roles follow the values
    one = ap.compare(_per_prompt("denoise", [[0.515, 0.51, 0.49, 0.0]]), _per_prompt("noise", [[0.1, 0.1, 0.1, 1.0]]))
    assert not one.intervals and one.roles[0] is Role.SUFFICIENT_AND_NECESSARY and "point values" in one.thresholds


def test_negative_needs_both_intervals_below_minus_the_threshold():
    # both readings clearly -0.3: negative; sufficiency's interval reaching -0.05: undecided
    den = _per_prompt("denoise", [[-0.3, -0.3], [-0.3, -0.05], [-0.3, -0.3], [-0.3, -0.05]])
    noi = _per_prompt("noise", [[1.3, 1.3]] * 4)
    assert ap.compare(den, noi).roles == [Role.NEGATIVE, Role.UNCERTAIN]
    with pytest.raises(ap.errors.ResultError, match="confidence level"):
        ap.compare(den, noi, level=95)


def test_undefined_cells_are_uncertain_not_neither_and_strongest_orders_by_either_reading():
    den = _per_prompt("denoise", [[0.9, float("nan"), 0.02, -0.6]] * 4)
    noi = _per_prompt("noise", [[0.1, 0.1, 0.99, 0.95]] * 4)
    cmp = ap.compare(den, noi)
    assert cmp.roles[1] is Role.UNCERTAIN  # an undefined effect is not evidence of no role
    assert cmp.roles[2] is Role.NEITHER
    assert list(cmp.strongest(3).index) == [0, 1, 3]  # max(|sufficiency|, |necessity|): 0.9, 0.9 (necessity), 0.6
