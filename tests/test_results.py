"""Typed results: 0.1.0 results still load, every broken result directory is one ResultError,
subset / concat, and the bad inputs every entry point must refuse with a specific error."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import actpatch as ap
from actpatch.engine.batched import free_memory, memory_budget
from actpatch.testing import random_pairs, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


def _pairs():
    return ap.PromptSet.from_ids([[2, 3, 4, 5], [2, 6, 4, 5]], [[2, 9, 4, 5], [2, 8, 4, 5]], [7, 7], [8, 8],
                                 attributes=[{"template": 0}, {"template": 1}])


def test_results_saved_by_0_1_0_load_with_typed_info():
    """The fixtures were written by actpatch 0.1.0 (format 1); recomputing them today gives the
    same numbers, and their free-form meta becomes typed info."""
    old = ap.PatchResult.load(FIXTURES / "result_v0.1.0")
    assert old.info.direction is ap.Direction.DENOISE and old.info.method is ap.types.Method.EXACT
    assert old.info.engine is ap.Engine.BATCHED and old.info.provenance.family == "llama"
    assert old.info.diagnostics.clean_correct is not None and len(old.info.diagnostics.clean_correct) == 2
    assert old.info.prompt_attributes == ({"template": 0}, {"template": 1})
    now = ap.sweep(tiny_model("llama", n_layers=2), _pairs(), "resid_pre", metric=["logit_diff", "prob"],
                   direction="denoise", progress=False)
    for m in now.metrics:
        torch.testing.assert_close(old.raw[m], now.raw[m], atol=1e-6, rtol=0)
    assert old.info.provenance.weight_hash == now.info.provenance.weight_hash
    gd = ap.PatchResult.load(FIXTURES / "attribution_v0.1.0")
    assert gd.info.method is ap.types.Method.ATP and gd.info.grad_drop and gd.info.label == "atp+graddrop"
    assert gd.info.estimate is ap.types.Estimate.MAGNITUDE and gd.info.direction is ap.Direction.NOISE


@pytest.mark.parametrize("make", [
    lambda m: ap.attribute(m, _pairs(), "q", qk_fix=True, heads=[0, 2]),
    lambda m: ap.sweep(m, _pairs(), "resid_pre", window=2, direction="denoise", progress=False),
    lambda m: ap.path_patch(m, _pairs(), senders=[ap.Site("z", 0, head=1)], receivers=[ap.Site("resid_final")]),
    lambda m: ap.patch(m, _pairs(), [ap.Site("resid_pre", 1, pos=1)], subspace=torch.eye(m.d_model)[:2]),
], ids=["atp", "sweep", "path", "subspace"])
def test_format_3_roundtrip_keeps_every_typed_field(tmp_path, make):
    res = make(tiny_model("llama", n_layers=2))
    res = res.replace(info=res.info.replace(extra={"note": [1, "two"]}))
    back = ap.PatchResult.load(res.save(tmp_path / "r"))
    assert back.info == res.info and back.findings == res.findings
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["format_version"] == 3


def test_results_saved_by_0_2_0_load_with_the_same_numbers_and_typed_parts():
    """The fixtures were written by actpatch 0.2.0 (format 2: one flat info, prompt texts and the
    subspace check in ``extra``); they load into the typed parts, and today's runs give the same
    numbers."""
    m = tiny_model("llama", n_layers=2)
    sweep = ap.PatchResult.load(FIXTURES / "sweep_v0.2.0")
    assert isinstance(sweep.info.technique, ap.results.ExactInfo) and sweep.info.engine is ap.Engine.BATCHED
    assert sweep.info.window == 2 and sweep.info.grid["window"] == 2
    assert sweep.info.prompt_texts == (("a", "b", " c", " d"), ("e", "f", " g", " h"))
    assert sweep.info.extra == {"note": 1}  # prompt texts moved out of the user's notes
    now = ap.sweep(m, _pairs(), "resid_pre", metric=["logit_diff", "prob"], direction="denoise", window=2,
                   progress=False)
    for metric in now.metrics:
        torch.testing.assert_close(sweep.raw[metric], now.raw[metric], atol=1e-6, rtol=0)
    atp = ap.PatchResult.load(FIXTURES / "attribution_v0.2.0")
    assert atp.info.technique == ap.results.AtpInfo(estimate=ap.types.Estimate.SIGNED, qk_fix=True, grad_drop=False)
    assert atp.info.label == "atp+qk_fix" and atp.info.grid["heads"] == [0, 2]
    again = ap.attribute(m, _pairs(), "q", qk_fix=True, heads=[0, 2])
    torch.testing.assert_close(atp.raw["logit_diff"].double(), again.raw["logit_diff"], atol=1e-6, rtol=0)
    path = ap.PatchResult.load(FIXTURES / "path_v0.2.0")
    assert path.info.technique == ap.results.PathInfo(senders=("z.L0.H1",), receivers=("resid_final",))
    sub = ap.PatchResult.load(FIXTURES / "subspace_v0.2.0")
    check = sub.info.subspace_check
    assert check is not None and check.effects["component"] == pytest.approx(0.0, abs=1e-6)
    assert {"subspace_illusion", "subspace_exceeds_component"} <= {f.code for f in check.findings}
    assert check.verdict is None and "saved before verdicts" in check.summary()  # not invented after the fact
    # findings saved without an origin: the illusion warning is the technique's, so it survives a subset
    kept = ap.PatchResult.concat([sub, sub]).subset([0])
    assert "subspace_illusion" in {f.code for f in kept.findings}


def _saved(tmp_path: Path) -> Path:
    dest = tmp_path / "r"
    shutil.copytree(FIXTURES / "result_v0.1.0", dest)
    return dest


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: shutil.rmtree(d), "no such directory"),
    (lambda d: (d / "tensors.safetensors").unlink(), "needs meta.json and tensors.safetensors"),
    (lambda d: (d / "meta.json").write_text((d / "meta.json").read_text()[:100]), "not valid JSON"),
    (lambda d: (d / "tensors.safetensors").write_bytes((d / "tensors.safetensors").read_bytes()[:50]),
     "not a readable safetensors file"),
    (lambda d: (d / "tensors.safetensors").write_bytes(b"\x80\x04\x95 a pickle, never unpickled"),
     "not a readable safetensors file"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"hello": "world"})), "not an actpatch result"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                         "format_version": 99})), "format version 99"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                         "metrics": ["logit_diff", "kl"]})), "do not fit together"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                         "coords": {"layer": [0], "pos": [0, 1]}})), "have shape"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                         "meta": {"direction": "sideways"}})), "do not fit together"),
])
def test_broken_result_directories_are_one_clear_error(tmp_path, damage, fragment):
    d = _saved(tmp_path)
    damage(d)
    with pytest.raises(ap.errors.ResultError, match=fragment):
        ap.PatchResult.load(d)


def test_a_file_is_not_a_result(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ap.errors.ResultError, match="is a file"):
        ap.PatchResult.load(tmp_path / "f")


def test_subset_and_concat_invert_each_other():
    m = tiny_model("gpt2")
    res = ap.sweep(m, random_pairs(n=4), "resid_pre", metric=["logit_diff", "prob"], progress=False)
    a, b = res.subset([0, 1]), res.subset([2, 3])
    assert a.info.diagnostics.clean_correct == res.info.diagnostics.clean_correct[:2]
    back = ap.PatchResult.concat([a, b])
    for metric in res.metrics:
        assert torch.equal(back.raw[metric], res.raw[metric]) and torch.equal(back.clean[metric], res.clean[metric])
    assert back.info == res.info and [f.code for f in back.findings] == [f.code for f in res.findings]
    with pytest.raises(ap.errors.ResultError, match="out of range"):
        res.subset([4])
    other = ap.sweep(m, random_pairs(n=4), "mlp_out", progress=False)
    with pytest.raises(ap.errors.ResultError, match="Cannot concatenate"):
        ap.PatchResult.concat([res, other])


def test_prompts_longer_than_the_context_are_refused_before_any_computation():
    m = tiny_model("gpt2")  # n_positions=128
    long = random_pairs(n=1, T=130, diff=(5,))
    for call in (lambda: ap.sweep(m, long, "resid_pre", progress=False), lambda: ap.attribute(m, long, "z"),
                 lambda: ap.edge_attribution(m, long), lambda: ap.path_sweep(m, long, [ap.Site("resid_final")]),
                 lambda: ap.subspaces.diff_of_means(m, long, ap.Site("resid_pre", 0), position="end"),
                 lambda: ap.subspaces.das(m, long, ap.Site("resid_pre", 0, pos=129), progress=False)):
        with pytest.raises(ap.errors.ContextLengthError, match="Prompt 0 has 130 tokens; tiny-gpt2 reads at most 128"):
            call()


@pytest.mark.parametrize("call, err, fragment", [
    (lambda m, ps: ap.path_sweep(m, ps, [ap.Site("resid_final")], layers=[9]), ap.errors.SiteError, r"layers=\[9\]"),
    (lambda m, ps: ap.path_sweep(m, ps, [ap.Site("resid_final")], heads=[4]), ap.errors.SiteError, r"heads=\[4\]"),
    (lambda m, ps: ap.path_sweep(m, ps, [ap.Site("resid_final")], sender="attn"), ap.errors.SiteError, "sender='attn'"),
    (lambda m, ps: ap.attribute(m, ps, "mlp_post", neurons=[10_000]), ap.errors.SiteError, r"neurons=\[10000\]"),
    (lambda m, ps: ap.attribute(m, ps, "resid_pre", positions=[6]), ap.errors.SiteError, r"positions=\[6\]"),
    (lambda m, ps: ap.sweep(m, ps, "z", heads=["a"]), ap.errors.SiteError, "'a' is not an index"),
    (lambda m, ps: ap.sweep(m, ps, "resid_pre", heads=[0]), ap.errors.SiteError, "heads=... applies to head targets"),
    (lambda m, ps: ap.sweep(m, ps, "z", engine="turbo"), ap.errors.EngineError, "Unknown engine 'turbo'"),
    (lambda m, ps: ap.sweep(m, ps, "resid_final", engine="batched"), ap.errors.EngineError, "batched engine does not"),
    (lambda m, ps: ap.sweep(m, ps, "z", direction="up"), ap.errors.DirectionError, "Unknown direction 'up'"),
    (lambda m, ps: ap.attribute(m, ps, "z", qk_fix=True), ap.errors.MethodError, "qk_fix applies to q and k"),
    (lambda m, ps: ap.attribute(m, ps, "resid_pre", grad_drop=True), ap.errors.MethodError, "grad_drop scores components"),
    (lambda m, ps: ap.edge_attribution(m, ps, ig_steps=-1), ap.errors.MethodError, "ig_steps=-1"),
    (lambda m, ps: ap.edge_attribution(m, ps, corruption="zero"), ap.errors.CorruptionError, "needs a corrupted run"),
    (lambda m, ps: ap.patch(m, ps, []), ap.errors.SiteError, "at least one Site"),
    (lambda m, ps: ap.patch(m, ps, ["z.L0.H1"]), ap.errors.SiteError, "takes Site objects"),
    (lambda m, ps: ap.patch(m, ps, "z.L0.H1"), ap.errors.SiteError, r"ap\.Site\.parse\('z\.L0\.H1'\)"),
    (lambda m, ps: ap.patch(m, ps, 3), ap.errors.SiteError, "takes a Site or a list of Sites"),
    (lambda m, ps: ap.path_patch(m, ps, ap.Site("z", 0, head=1), 7), ap.errors.SiteError, "receivers= takes a Site"),
    (lambda m, ps: ap.patch(m, ps, ap.Site("resid_pre", 0), subspace=torch.eye(64)[:3].T),
     ap.errors.SubspaceError, r"transpose it \(basis\.T\)"),
    (lambda m, ps: ap.capture(m, [ap.Site("z", 0, head=9)]).__enter__(), ap.errors.SiteError, "head 9 is out of range"),
    (lambda m, ps: ap.sweep(m, [("a", "b", "c", "d")], "z"), ap.errors.PromptError, "takes a PromptSet"),
])
def test_bad_arguments_get_specific_errors(call, err, fragment):
    with pytest.raises(err, match=fragment):
        call(tiny_model("gpt2"), random_pairs(n=2))


@pytest.mark.parametrize("pairs, fragment", [
    ([("When Mary", "When John", 7, " John")], "answer is 7, not text"),
    ([("When Mary", None, " Mary", " John")], "corrupted is None, not text"),
    (["When Mary and John"], "has 1 fields"),
    ([("When Mary", "When John", " Mary")], "has 3 fields"),
    ("When Mary", "a list of"),
])
def test_malformed_prompt_pairs_are_refused(pairs, fragment):
    with pytest.raises(ap.errors.PromptError, match=fragment):
        ap.PromptSet.from_pairs(tiny_model("gpt2"), pairs)


def test_unknown_config_attributes_are_refused_by_name():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg.new_fancy_scaling = 2.0  # an attribute no adapter has verified
    with pytest.raises(ap.errors.UnsupportedArchitectureError, match="new_fancy_scaling=2.0"):
        ap.Model(AutoModelForCausalLM.from_config(cfg))
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                       "original_max_position_embeddings": 64})
    with pytest.raises(ap.errors.UnsupportedArchitectureError, match="rope_parameters="):
        ap.Model(AutoModelForCausalLM.from_config(cfg))


def _public_functions():
    """Every public function of the top level and of its namespaces, found, not listed by hand."""
    import inspect

    for space in (ap, ap.circuits, ap.subspaces, ap.prompts, ap.experiment, ap.features):
        for name in space.__all__:
            fn = getattr(space, name)
            if inspect.isfunction(fn):
                yield f"{space.__name__}.{name}", fn


def test_one_default_direction_everywhere():
    import inspect

    with_direction = {name for name, fn in _public_functions() if "direction" in inspect.signature(fn).parameters}
    assert {"actpatch.sweep", "actpatch.patch", "actpatch.attribute", "actpatch.path_patch", "actpatch.path_sweep",
            "actpatch.edge_attribution", "actpatch.subspaces.subspace_check"} <= with_direction
    for name, fn in _public_functions():
        if name in with_direction:
            assert inspect.signature(fn).parameters["direction"].default is ap.DEFAULT_DIRECTION, name
    assert ap.DEFAULT_DIRECTION is ap.Direction.NOISE


def test_the_public_surface_is_small_and_pinned():
    assert len(ap.__all__) <= 42  # 40 until the feature dictionaries (ap.load_dictionary, ap.features)
    assert sorted(ap.__all__) == sorted([
        "load_dictionary", "features", "load_model", "Model", "DEFAULT_MODEL", "Site", "SiteKind", "capture", "intervene", "PromptSet", "Direction",
        "DEFAULT_DIRECTION", "Metric", "Engine", "sweep", "patch", "attribute", "validate_attribution", "path_patch",
        "path_sweep", "edge_attribution", "generate", "patchscope", "interchange", "PatchResult", "Finding", "Level", "check", "compare", "Comparison",
        "compare_estimate", "doctor",
        "plot_attention", "write_report", "ActpatchError", "prompts", "errors", "corruption", "circuits", "subspaces", "experiment",
        "__version__"])
    for space in (ap, ap.circuits, ap.subspaces, ap.experiment, ap.errors, ap.corruption, ap.features):
        for name in space.__all__:
            assert getattr(space, name) is not None, f"{space.__name__}.{name}"
    # what left the top level stays importable from its namespace
    assert ap.circuits.Graph and ap.errors.SiteError and ap.types.Method and ap.results.ResultInfo


def test_corruptions_are_never_changed_by_an_experiment():
    m = tiny_model("llama", n_layers=2)
    noise = ap.corruption.GaussianNoise(n_draws=2)
    res = ap.sweep(m, random_pairs(n=2), "resid_pre", corruption=noise, progress=False)
    assert noise.sigma is None and res.info.corruption.sigma > 0


def test_the_corruption_is_a_frozen_value_that_survives_a_save(tmp_path):
    m = tiny_model("llama", n_layers=2)
    noise = ap.corruption.GaussianNoise(scale=2.0, n_draws=2, positions=(1, 2))
    res = ap.sweep(m, random_pairs(n=2), "resid_pre", corruption=noise, progress=False)
    spec = res.info.corruption
    assert isinstance(spec, ap.corruption.CorruptionSpec) and spec.name is ap.corruption.CorruptionKind.GAUSSIAN
    assert (spec.scale, spec.n_draws, spec.positions) == (2.0, 2, (1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.scale = 1.0  # type: ignore[misc]
    res.save(tmp_path / "r")
    back = ap.PatchResult.load(tmp_path / "r")
    assert back.info.corruption == spec
    rebuilt = spec.build()  # the same corruption, its sigma measured again where it runs
    assert (rebuilt.scale, rebuilt.n_draws, tuple(rebuilt.positions), rebuilt.sigma) == (2.0, 2, (1, 2), None)
    # the JSON shape older files hold: positions "diff" is the default, names are plain strings
    assert ap.corruption.CorruptionSpec.from_json({"name": "gaussian", "scale": 3.0, "n_draws": 10,
                                                   "positions": "diff"}).positions is None
    with pytest.raises(ap.errors.CorruptionError, match="Unknown corruption 'blur'"):
        ap.corruption.CorruptionSpec.from_json({"name": "blur"})


def test_memory_budget_reads_the_device_it_will_use(monkeypatch):
    monkeypatch.delenv("ACTPATCH_MEMORY_BUDGET", raising=False)
    assert 0 < memory_budget("cpu") <= 2 << 30
    assert memory_budget("cpu") <= free_memory("cpu") // 4 + 1
    if torch.cuda.is_available():  # on a GPU machine: the accelerator's free memory, not the host's
        free, _ = torch.cuda.mem_get_info()
        assert free_memory("cuda") == pytest.approx(free, rel=0.05)
    monkeypatch.setenv("ACTPATCH_MEMORY_BUDGET", "12345")
    assert memory_budget("cpu") == 12345


def test_reprs_summarise_and_never_print_tensors():
    m, ps = tiny_model("gpt2"), random_pairs(n=3)
    named = ap.PromptSet.from_pairs(m, [("When Mary and John went", "When Mary and Bob went", " Mary", " John")])
    den = ap.sweep(m, ps, "z", direction="denoise", progress=False)
    noi = ap.sweep(m, ps, "z", progress=False)
    edges = ap.edge_attribution(m, ps)
    sub = ap.subspaces.diff_of_means(m, ps, ap.Site("resid_pre", 1), position="end")
    shown = {
        "prompts": (repr(ps), ["3 pairs", "length 6"]),
        "named": (repr(named), ["'When Mary and John went' -> ' Mary' vs ' John'"]),
        "edges": (repr(edges), ["eap, noise, logit_diff", "reachable edges of 297", "3 prompts", "strongest: "]),
        "subspace": (repr(sub), ["k=1, d=64, shared, diff_of_means"]),
        "comparison": (repr(ap.compare(den, noi)), ["layer 2 x head 4", "decided on 95% intervals"]),
    }
    for what, (text, fragments) in shown.items():
        assert "tensor(" not in text and len(text) < 400, (what, text)
        for fragment in fragments:
            assert fragment in text, (what, text)
    top = noi.top(3)
    assert len(top) == 3 and all(c.low is not None and c.low <= c.high for c in top)
    dev = [abs(c.value - 1) for c in top]
    assert dev == sorted(dev, reverse=True) and top[0].label.startswith("layer=")
