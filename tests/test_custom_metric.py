"""A metric you write, usable wherever a metric name goes: a re-implementation of the logit
difference gives the built-in's numbers in every entry point; bad metrics get clear errors."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.metrics import CustomMetric, custom_metric
from actpatch.testing import random_pairs, tiny_model


def my_logit_diff(logits, answers, alternatives):
    rows = torch.arange(len(answers))
    return logits[rows, answers] - logits[rows, alternatives]


def _same(a, b, metric="my_logit_diff"):
    torch.testing.assert_close(a.raw[metric].double(), b.raw["logit_diff"].double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.clean[metric].double(), b.clean["logit_diff"].double(), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama_gqa", n_layers=2), random_pairs(n=3, T=6, diff=(1, 4))


def test_a_function_is_a_metric_in_every_entry_point(setup):
    m, ps = setup
    for direction in ("denoise", "noise"):
        _same(ap.sweep(m, ps, "z", metric=my_logit_diff, direction=direction, progress=False),
              ap.sweep(m, ps, "z", direction=direction, progress=False))
    s = ap.Site("resid_pre", 1)
    _same(ap.patch(m, ps, s, metric=[my_logit_diff]), ap.patch(m, ps, s))
    _same(ap.attribute(m, ps, "z", metric=my_logit_diff), ap.attribute(m, ps, "z"))
    _same(ap.path_patch(m, ps, ap.Site("z", 0, head=1), ap.Site("resid_final"), metric=my_logit_diff),
          ap.path_patch(m, ps, ap.Site("z", 0, head=1), ap.Site("resid_final")))
    mine, theirs = ap.edge_attribution(m, ps, metric=my_logit_diff), ap.edge_attribution(m, ps)
    torch.testing.assert_close(mine.scores, theirs.scores, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert mine.metric == "my_logit_diff"
    both = ap.sweep(m, ps, "resid_pre", metric=["logit_diff", my_logit_diff], progress=False)
    assert both.metrics == ["logit_diff", "my_logit_diff"]
    torch.testing.assert_close(both.raw["my_logit_diff"], both.raw["logit_diff"], atol=1e-6, rtol=0)


def test_results_name_the_metric_and_the_name_resolves_back(setup, tmp_path):
    m, ps = setup
    est = ap.attribute(m, ps, "mlp_out", metric=my_logit_diff)
    check = ap.validate_attribution(m, ps, est, k=2)  # re-runs exact patching with the metric, found by name
    ref = ap.validate_attribution(m, ps, ap.attribute(m, ps, "mlp_out"), k=2)
    torch.testing.assert_close(check.exact, ref.exact, atol=1e-6, rtol=0)
    back = ap.PatchResult.load(est.save(tmp_path / "r"))
    assert back.metrics == ["my_logit_diff"]


def test_discrete_custom_metrics_and_bad_ones_are_refused_clearly(setup):
    m, ps = setup

    def top_is_answer(logits, answers, alternatives):
        return (logits.argmax(-1) == answers).float()

    discrete = custom_metric(top_is_answer, differentiable=False)
    assert isinstance(discrete, CustomMetric)
    res = ap.sweep(m, ps, "resid_pre", metric=discrete, progress=False)
    assert res.metrics == ["top_is_answer"]
    with pytest.raises(ap.errors.MetricError, match=r"needs differentiable metrics; \['top_is_answer'\]"):
        ap.attribute(m, ps, "z", metric=discrete)
    with pytest.raises(ap.errors.MetricError, match="needs a name"):
        ap.sweep(m, ps, "z", metric=lambda lg, a, b: lg[:, 0], progress=False)
    with pytest.raises(ap.errors.MetricError, match=r"must return a tensor of one value per prompt, shape \(3,\)"):
        ap.sweep(m, ps, "z", metric=custom_metric(lambda lg, a, b: lg, name="whole_logits"), progress=False)
    with pytest.raises(ap.errors.MetricError, match="is a built-in metric"):
        custom_metric(my_logit_diff, name="logit_diff")
    with pytest.raises(ap.errors.MetricError, match="neither a metric name"):
        ap.sweep(m, ps, "z", metric=3, progress=False)
    with pytest.raises(ap.errors.MetricError, match="Unknown metric 'logit_dif'"):
        ap.sweep(m, ps, "z", metric="logit_dif", progress=False)
