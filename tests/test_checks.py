"""Every Finding: one case where it fires and one where it does not."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch import Level
from actpatch.testing import micro_model, tiny_model


def result(raw=((0.5, 0.2),), clean=(1.0,), corrupted=(0.0,), metric="logit_diff", direction="denoise",
           corruption=None, window=1, clean_correct=None, null_patch_max_abs=0.0, compared=False):
    """A hand-made PatchResult: raw is (n_prompts, cells)."""
    raw_t = torch.tensor(raw, dtype=torch.float)
    cc = tuple(clean_correct) if clean_correct is not None else (True,) * raw_t.shape[0]
    info = ap.results.ResultInfo(target="mlp_out", direction=ap.Direction(direction),
                         metrics=(metric,), corruption=ap.corruption.CorruptionSpec.from_json(corruption), seed=0,
                         provenance=ap.types.Provenance(model="hand-made", family="none", weight_hash="-"), grid={"window": window},
                         diagnostics=ap.types.Diagnostics(clean_correct=cc, null_patch_max_abs=null_patch_max_abs),
                         compared=compared)
    return ap.PatchResult(
        dims=("layer",), coords={"layer": list(range(raw_t.shape[1]))},
        raw={metric: raw_t}, clean={metric: torch.tensor(clean)}, corrupted={metric: torch.tensor(corrupted)},
        info=info,
    )


def codes(res):
    return [f.code for f in ap.check(res)]


def test_quiet_result_has_only_the_direction_note():
    assert codes(result()) == ["single_direction"]


@pytest.mark.parametrize("fires, quiet, code, level", [
    (result(clean=(1.0,), corrupted=(1.0,)), result(), "normalisation_undefined", Level.ERROR),
    (result(raw=((0.5,),) * 4, clean=(3.0, -2.0, 2.5, -3.0), corrupted=(-2.5, 3.0, -3.0, 2.0)),
     result(raw=((0.5,),) * 4, clean=(1.0, 1.1, 0.9, 1.0), corrupted=(0.0, 0.1, -0.1, 0.0)),
     "baselines_close", Level.WARNING),
    (result(clean_correct=[True, False]), result(clean_correct=[True, True]), "task_failure", Level.WARNING),
    (result(metric="prob", clean=(0.6,), corrupted=(0.02,)), result(metric="prob", clean=(0.6,), corrupted=(0.3,)),
     "probability_floor", Level.WARNING),
    (result(metric="prob", clean=(0.95,), corrupted=(0.3,)), result(metric="prob", clean=(0.8,), corrupted=(0.3,)),
     "saturation", Level.WARNING),
    (result(metric="logprob", clean=(-0.02,), corrupted=(-3.0,)), result(metric="logprob", clean=(-0.5,), corrupted=(-3.0,)),
     "saturation", Level.WARNING),
    (result(corruption={"name": "gaussian"}), result(corruption={"name": "str"}), "gaussian_noise", Level.WARNING),
    (result(corruption={"name": "zero"}), result(corruption={"name": "resample"}), "zero_ablation", Level.INFO),
    (result(corruption={"name": "mean"}), result(), "mean_ablation", Level.INFO),
    (result(window=3), result(window=1), "layer_window", Level.INFO),
    (result(raw=((1.5, 0.2),)), result(raw=((1.1, -0.1),)), "out_of_range", Level.WARNING),
    (result(null_patch_max_abs=0.3), result(null_patch_max_abs=1e-7), "null_patch_failed", Level.ERROR),
    (result(direction="noise"), result(direction="noise", compared=True), "single_direction", Level.INFO),
    (result(raw=((0.02, 0.01),), clean=(0.05,), corrupted=(0.0,)), result(), "small_gap", Level.WARNING),
    (result(metric="prob", raw=((0.5, 0.5),), clean=(0.504,), corrupted=(0.5,)),
     result(metric="prob", raw=((0.5, 0.5),), clean=(0.6,), corrupted=(0.5,)), "small_gap", Level.WARNING),
])
def test_each_finding_fires_and_stays_quiet(fires, quiet, code, level):
    found = {f.code: f for f in ap.check(fires)}
    assert code in found, codes(fires)
    assert found[code].level is level and found[code].message and found[code].advice
    assert code not in codes(quiet)


def test_messages_carry_numbers():
    f = {x.code: x for x in ap.check(result(metric="prob", clean=(0.6,), corrupted=(0.02,)))}["probability_floor"]
    assert "0.020" in f.message and "-0.034" in f.message  # floor = -0.02 / 0.58
    f = {x.code: x for x in ap.check(result(clean_correct=[True, False, False, True]))}["task_failure"]
    assert "2 of 4" in f.message and "[1, 2]" in f.message
    f = {x.code: x for x in ap.check(result(raw=((1.5, 0.2),)))}["out_of_range"]
    assert "layer=0 (+1.50)" in f.message


def test_small_gap_says_what_a_raw_change_reads_as():
    f = {x.code: x for x in ap.check(result(raw=((0.02, 0.01),), clean=(0.05,), corrupted=(0.0,)))}["small_gap"]
    assert "0.05 logits, below 0.1" in f.message and "reads as 0.2" in f.message
    assert "small_gap" not in codes(result(clean=(1e-7,), corrupted=(0.0,)))  # undefined: its own error instead


def test_single_patches_do_not_ask_for_the_other_direction():
    m, ps = tiny_model("gpt2"), ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [7], [8])
    one = ap.patch(m, ps, ap.Site("resid_pre", 0))  # a single Site, not a list
    assert "single_direction" not in {f.code for f in one.findings}
    assert float(one.values) == float(ap.patch(m, ps, [ap.Site("resid_pre", 0)]).values)
    assert "single_direction" in {f.code for f in ap.sweep(m, ps, "resid_pre", progress=False).findings}
    s, r = ap.Site("z", 0, head=1), ap.Site("q", 1, head=2)
    assert float(ap.path_patch(m, ps, s, r).values) == float(ap.path_patch(m, ps, [s], [r]).values)


def test_errors_come_first():
    found = ap.check(result(clean=(1.0,), corrupted=(1.0,), corruption={"name": "gaussian"}))
    assert [f.level for f in found] == sorted((f.level for f in found), key=[Level.ERROR, Level.WARNING, Level.INFO].index)


# -- the checks that need a model run ------------------------------------------------------------

@pytest.mark.parametrize("rows", [[0, 1], [0]])
def test_null_patch_fails_loudly_on_a_nondeterministic_model(rows):
    m = tiny_model("gpt2")
    ps = ap.PromptSet.from_ids([[2, 3, 4, 5], [3, 4, 5, 6]], [[2, 9, 4, 5], [3, 8, 5, 6]], [7, 7], [8, 8]).subset(rows)
    ok = ap.sweep(m, ps, "resid_pre", progress=False)
    assert "null_patch_failed" not in [f.code for f in ok.findings] and ok.info.diagnostics.null_patch_max_abs < 1e-5
    for mod in m.hf.modules():  # dropout on, as if someone forgot model.eval()
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.5
    m.hf.train()
    try:
        bad = ap.sweep(m, ps, "resid_pre", progress=False)
    finally:
        m.hf.eval()
    assert bad.findings[0].code == "null_patch_failed" and bad.findings[0].level is Level.ERROR


def test_task_failure_from_a_real_run():
    model, _ = micro_model("and")
    swapped = ap.PromptSet.from_ids([[3], [3]], [[0], [0]], [4, 5], [5, 4])  # second prompt: answer is wrong
    res = ap.sweep(model, swapped, "mlp_out", progress=False)
    assert res.info.diagnostics.clean_correct == (True, False)
    assert "task_failure" in [f.code for f in res.findings]


def test_findings_survive_save_load(tmp_path):
    res = result(corruption={"name": "gaussian"})
    res.findings = ap.check(res)
    back = ap.PatchResult.load(res.save(tmp_path / "r"))
    assert back.findings == res.findings


def test_a_finding_has_one_html_form_everywhere_it_is_shown(tmp_path):
    from actpatch.report.html import write_report
    from actpatch.report.summary import result_html

    res = result(corruption={"name": "gaussian"})
    res = res.replace(findings=ap.check(res))
    f = next(x for x in res.findings if x.code == "gaussian_noise")
    form = f.to_html()
    assert f._repr_html_() == form and "class='finding warning'" in form and "#e08214" in form
    assert ap.Finding(Level.INFO, "c", "a <b> & c").to_html().count("&lt;b&gt; &amp; c") == 1
    assert form in result_html(res)  # the notebook summary
    report = write_report({"mlp_out_denoise": res}, tmp_path / "r.html").read_text()
    assert f.to_html("mlp_out_denoise") in report  # the report, naming the result it is about
