"""Feature dictionaries as sites: identity on attach, exact feature patching against an oracle
written with plain torch hooks (encode / patch / decode by hand), both engines, the SAELens
layout (fixtures written here from the documented layout), and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import actpatch as ap
from actpatch.features import Dictionary, attach, load_dictionary, save_dictionary, top_activations, top_features
from actpatch.testing import tiny_model

FAMILIES = ["llama", "gpt2", "gemma3_text"]


def _prompts():
    return ap.PromptSet.from_ids([[2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]],
                                 [[2, 9, 4, 5, 6, 7], [3, 8, 5, 6, 7, 8], [4, 10, 6, 7, 8, 9]], [7, 8, 9], [8, 9, 10])


def _block(model, layer):
    hf = model.hf
    return hf.transformer.h[layer] if model.family == "gpt2" else hf.model.layers[layer]


def _module(model, kind, layer):
    """The HF module whose output is ``kind`` (plain paths, written here, not the adapter's)."""
    block = _block(model, layer)
    return block if kind == "resid_post" else block.mlp


def _hand_encode(d, x):
    x = x.to(d.W_enc.dtype)
    pre = ((x - d.b_dec) if d.apply_b_dec_to_input and d.reads is None else x) @ d.W_enc + d.b_enc
    if d.activation.value == "topk":
        vals, idx = pre.topk(d.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
    if d.activation.value == "jumprelu":
        return torch.where(pre > d.threshold, pre.clamp_min(0), torch.zeros_like(pre))
    return pre.clamp_min(0)


def _hand_decode(d, f):
    return f @ d.W_dec + d.b_dec


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _oracle(model, d, kind, layer, base_ids, src_ids, answers, alts, edit):
    """Logit differences of the base run with the site's activation replaced by
    decode(edit(f_base, f_src)) + error, by plain forward hooks."""
    module = _module(model, kind, layer)
    seen = {}

    def grab(mod, args, out):
        seen["y"] = _first(out).detach()

    h = module.register_forward_hook(grab)
    with torch.no_grad():
        model.hf(input_ids=src_ids)
    h.remove()
    f_src = _hand_encode(d, seen["y"])

    def replace(mod, args, out):
        y = _first(out)
        f = _hand_encode(d, y)
        err = y - _hand_decode(d, f)
        new = _hand_decode(d, edit(f.clone(), f_src)) + err
        return (new, *out[1:]) if isinstance(out, tuple) else new

    h = module.register_forward_hook(replace)
    with torch.no_grad():
        logits = model.hf(input_ids=base_ids).logits[:, -1]
    h.remove()
    rows = torch.arange(len(answers))
    return logits[rows, answers] - logits[rows, alts]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    m = tiny_model(request.param)
    d = Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=24, seed=1)
    return m, d


def test_attaching_is_the_identity_and_a_self_write_changes_nothing(setup):
    m, d = setup
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    before = m.logits(ids)
    with attach(m, d):
        with ap.capture(m, [d.feature_site, d.error_site()]) as acts:
            read = m.logits(ids)
        with ap.intervene(m, {d.feature_site: lambda f: f, d.error_site(): lambda e: e}):
            rewritten = m.logits(ids)
    assert torch.equal(read, before)  # reading features: untouched
    assert (rewritten - before).abs().max() < 1e-5  # decode(f) + error: the identity up to float32 rounding
    assert acts[d.feature_site].shape == (1, 6, 24) and acts[d.error_site()].shape == (1, 6, m.d_model)
    assert m.dictionaries == {} and m.hook_points == {}  # detached, no hook left


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_feature_patches_equal_the_plain_hooks_oracle(setup, direction):
    m, d = setup
    ps = _prompts()
    clean, corrupted = torch.stack(ps.clean), torch.stack(ps.corrupted)
    base, src = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with attach(m, d):
        j = top_features(m, d, ps, 1)[0]
        cases = {
            "one feature at pos 1": ([d.feature(j, pos=1)], lambda f, s: _set(f, s, [j], 1)),
            "three features at the end": (d.features([0, 5, j], pos=-1), lambda f, s: _set(f, s, [0, 5, j], 5)),
        }
        for what, (sites, edit) in cases.items():
            want = _oracle(m, d, "resid_post", 0, base, src, ps.answers, ps.alternatives, edit)
            for engine in ("reference", "batched"):
                got = ap.patch(m, ps, sites, direction=direction, engine=engine).raw["logit_diff"]
                assert (got - want).abs().max() < 1e-5, (what, engine)


def _set(f, s, features, pos):
    f[:, pos, features] = s[:, pos, features]
    return f


def test_the_error_term_patch_equals_the_oracle_and_everything_together_is_the_site(setup):
    m, d = setup
    ps = _prompts()
    corrupted, clean = torch.stack(ps.corrupted), torch.stack(ps.clean)
    with attach(m, d):
        err = ap.patch(m, ps, [d.error_site(pos=1)], direction="denoise").raw["logit_diff"]
        both = ap.patch(m, ps, [d.feature_site.at(1), d.error_site(pos=1)], direction="denoise").raw["logit_diff"]
    site = ap.patch(m, ps, [ap.Site("resid_post", 0, pos=1)], direction="denoise").raw["logit_diff"]

    def err_edit(f, s):  # keep the base features, take the source's error: y_src - decode(f_base)
        return f

    # by hand: the base run's features, the source's error at pos 1
    module = _module(m, "resid_post", 0)
    seen = {}
    h = module.register_forward_hook(lambda mod, a, out: seen.__setitem__("y", _first(out).detach()))
    with torch.no_grad():
        m.hf(input_ids=clean)
    h.remove()
    src_err = seen["y"] - _hand_decode(d, _hand_encode(d, seen["y"]))

    def replace(mod, args, out):
        y = _first(out)
        new = y.clone()
        f = _hand_encode(d, y)
        new[:, 1] = _hand_decode(d, f)[:, 1] + src_err[:, 1]
        return (new, *out[1:]) if isinstance(out, tuple) else new

    h = module.register_forward_hook(replace)
    with torch.no_grad():
        logits = m.hf(input_ids=corrupted).logits[:, -1]
    h.remove()
    rows = torch.arange(3)
    want = logits[rows, ps.answers] - logits[rows, ps.alternatives]
    assert (err - want).abs().max() < 1e-5
    assert (both - site).abs().max() < 1e-5  # every feature and the error: the whole activation


def test_feature_sweeps_batched_equal_reference(setup):
    m, d = setup
    ps = _prompts()
    with attach(m, d):
        kw = dict(features=[0, 3, 7, 11, "error"], progress=False)
        ref = ap.sweep(m, ps, d, direction="denoise", engine="reference", **kw)
        bat = ap.sweep(m, ps, d, direction="denoise", engine="batched", **kw)
        top = ap.sweep(m, ps, d, direction="noise", features=4, positions=["end"], progress=False)
    assert bat.dims == ("feature", "pos") and bat.coords["feature"] == [0, 3, 7, 11, "error"]
    assert (bat.raw["logit_diff"] - ref.raw["logit_diff"]).abs().max() < 1e-5
    assert bat.info.technique.dictionary["n_features"] == 24
    assert top.coords["feature"][-1] == "error" and len(top.coords["feature"]) <= 5 and top.coords["pos"] == ["end"]
    # positions before the first difference are no-ops: the batched engine skips them, the
    # reference engine's decode(f) + error rounds back to the corrupted run (raw units)
    assert (bat.raw["logit_diff"][:, :, 0] - ref.corrupted["logit_diff"][:, None]).abs().max() < 1e-6
    assert (ref.raw["logit_diff"][:, :, 0] - ref.corrupted["logit_diff"][:, None]).abs().max() < 1e-5


def test_mlp_out_dictionary_and_a_transcoder_equal_the_oracle():
    m = tiny_model("llama")
    ps = _prompts()
    corrupted, clean = torch.stack(ps.corrupted), torch.stack(ps.clean)
    sae = Dictionary.random(ap.Site("mlp_out", 1), d_in=m.d_model, n_features=16, seed=2, activation="topk", k=3)
    with attach(m, sae):
        got = ap.patch(m, ps, [sae.feature(2, pos=1), sae.feature(9, pos=1)], direction="denoise").raw["logit_diff"]
    want = _oracle(m, sae, "mlp_out", 1, corrupted, clean, ps.answers, ps.alternatives,
                   lambda f, s: _set(f, s, [2, 9], 1))
    assert (got - want).abs().max() < 1e-5
    # a transcoder: reads the MLP's input (before its norm), writes the MLP's output
    tc = Dictionary.random(ap.Site("mlp_out", 0), d_in=m.d_model, n_features=16, seed=3, reads=ap.Site("mlp_in", 0))
    assert tc.is_transcoder
    with attach(m, tc):
        got = ap.patch(m, ps, [tc.feature(4, pos=1)], direction="denoise", engine="batched").raw["logit_diff"]
        ref = ap.patch(m, ps, [tc.feature(4, pos=1)], direction="denoise", engine="reference").raw["logit_diff"]
    block = m.hf.model.layers[0]
    seen = {}
    grab_in = block.post_attention_layernorm.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    grab = block.mlp.register_forward_hook(lambda mod, a, out: seen.__setitem__("f", _hand_encode(tc, seen["x"])))
    with torch.no_grad():
        m.hf(input_ids=clean)
    f_src = seen["f"]

    def replace(mod, args, out):
        f = _hand_encode(tc, seen["x"])
        err = out - _hand_decode(tc, f)
        f = f.clone()
        f[:, 1, 4] = f_src[:, 1, 4]
        return _hand_decode(tc, f) + err

    grab.remove()
    h = block.mlp.register_forward_hook(replace)
    with torch.no_grad():
        logits = m.hf(input_ids=corrupted).logits[:, -1]
    h.remove()
    grab_in.remove()
    rows = torch.arange(3)
    want = logits[rows, ps.answers] - logits[rows, ps.alternatives]
    assert (got - want).abs().max() < 1e-5 and (ref - want).abs().max() < 1e-5


def test_a_coordinate_dictionary_gives_the_derived_effects():
    """W_enc = W_dec = I, no biases, relu: feature j is relu(x_j), the error min(x, 0). Zeroing
    feature j moves the activation by exactly -relu(x_j) along e_j; features + error at one
    position are the site itself."""
    m = tiny_model("llama")
    D = m.d_model
    eye = torch.eye(D)
    d = Dictionary(eye.clone(), torch.zeros(D), eye.clone(), torch.zeros(D), ap.Site("resid_pre", 1),
                   apply_b_dec_to_input=False)
    ids = torch.tensor([[3, 4, 5, 6]])
    site = ap.Site("resid_pre", 1)
    with ap.capture(m, [site]) as plain:
        m.logits(ids)
    x = plain[site]
    j = int(x[0, 2].argmax())
    with attach(m, d):
        with ap.capture(m, [site, d.feature_site, d.error_site()]) as acts, ap.intervene(m, {d.feature(j, pos=2): 0.0}):
            m.logits(ids)
    moved = acts[site] - x
    assert moved[0, 2, j] == pytest.approx(-float(x[0, 2, j]), abs=1e-6)
    moved[0, 2, j] = 0
    assert moved.abs().max() < 1e-6  # nothing else moved
    assert torch.allclose(acts[d.error_site()], x.clamp_max(0), atol=1e-6)
    assert float(acts[d.feature_site][0, 2, j]) == 0.0  # the read sees the write


def test_top_activations_list_where_a_feature_is_most_active():
    m = tiny_model("llama")
    d = Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=24, seed=1)
    ps = _prompts()
    feats = top_features(m, d, ps, 3)
    ex = top_activations(m, d, ps, feats[0], n=4)
    assert len(ex) == 4 and all(a.activation >= b.activation for a, b in zip(ex, ex[1:]))
    with attach(m, d), ap.capture(m, [d.feature_site]) as acts:
        m.logits(torch.stack(ps.clean if ex[0].side == "clean" else ps.corrupted))
    assert float(acts[d.feature_site][ex[0].prompt, ex[0].pos, feats[0]]) == pytest.approx(ex[0].activation, abs=1e-6)
    assert ex[0].context.endswith(f"[{ex[0].token}]")


# -- the SAELens layout --------------------------------------------------------------------------

def _write(folder, cfg, weights):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))


def _weights(d_in=8, F=16, d_out=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    return {"W_enc": torch.randn(d_in, F, generator=g), "b_enc": 0.1 * torch.randn(F, generator=g),
            "W_dec": torch.randn(F, d_out, generator=g), "b_dec": 0.1 * torch.randn(d_out, generator=g)}


def test_saelens_current_layout_loads_each_architecture(tmp_path):
    x = torch.randn(3, 5, 8)
    w = _weights()
    # standard (relu), b_dec subtracted from the input
    _write(tmp_path / "std", {"architecture": "standard", "d_in": 8, "d_sae": 16, "apply_b_dec_to_input": True,
                              "normalize_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_post",
                                                                            "model_name": "gpt2"}}, w)
    d = load_dictionary(tmp_path / "std")
    assert d.site == ap.Site("resid_post", 3) and d.activation.value == "relu" and d.meta["model_name"] == "gpt2"
    want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(d.encode(x), want, atol=1e-6)
    # topk
    _write(tmp_path / "topk", {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 3, "apply_b_dec_to_input": False,
                               "metadata": {"hook_name": "blocks.0.hook_mlp_out"}}, w)
    d = load_dictionary(tmp_path / "topk")
    f = d.encode(x)
    assert d.site == ap.Site("mlp_out", 0) and int((f > 0).sum(-1).max()) <= 3
    pre = x @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(f.max(-1).values, pre.max(-1).values.clamp_min(0), atol=1e-6)
    # jumprelu with a per-feature threshold
    thr = torch.full((16,), 0.5)
    _write(tmp_path / "jr", {"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "apply_b_dec_to_input": False,
                             "metadata": {"hook_name": "blocks.1.attn.hook_z"}}, {**w, "threshold": thr})
    d = load_dictionary(tmp_path / "jr")
    assert d.site == ap.Site("z", 1)
    assert torch.allclose(d.encode(x), torch.where(pre > 0.5, pre, torch.zeros_like(pre)), atol=1e-6)
    # BatchTopK training checkpoint: one global threshold
    _write(tmp_path / "btk", {"architecture": "batchtopk", "d_in": 8, "d_sae": 16, "k": 4.0,
                              "apply_b_dec_to_input": False, "metadata": {"hook_name": "blocks.2.hook_resid_pre"}},
           {**w, "topk_threshold": torch.tensor(0.25)})
    d = load_dictionary(tmp_path / "btk")
    assert torch.allclose(d.encode(x), torch.where(pre > 0.25, pre, torch.zeros_like(pre)), atol=1e-6)


def test_saelens_old_flat_layout_normalisations_and_transcoders(tmp_path):
    x = torch.randn(2, 4, 8) * 3
    w = _weights()
    _write(tmp_path / "old", {"d_in": 8, "d_sae": 16, "hook_name": "blocks.4.hook_resid_pre", "hook_layer": 4,
                              "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
                              "apply_b_dec_to_input": False, "normalize_activations": "constant_norm_rescale"}, w)
    d = load_dictionary(tmp_path / "old")
    assert d.site == ap.Site("resid_pre", 4) and d.activation.value == "topk" and d.k == 2
    coeff = 8 ** 0.5 / x.norm(dim=-1, keepdim=True)
    f = d.encode(x)
    pre = (x * coeff) @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(f.max(-1).values, pre.max(-1).values.clamp_min(0), atol=1e-5)
    assert torch.allclose(d.reconstruct(x), (f @ w["W_dec"] + w["b_dec"]) / coeff, atol=1e-5)
    assert torch.allclose(d.decode(f, x) + d.error(x), x, atol=1e-5)
    # expected_average_only_in needs its factor, then scales in and out
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "apply_b_dec_to_input": False,
           "normalize_activations": "expected_average_only_in", "hook_name": "blocks.0.hook_resid_post"}
    _write(tmp_path / "avg", cfg, w)
    with pytest.raises(ap.errors.DictionaryError, match="norm_scaling_factor"):
        load_dictionary(tmp_path / "avg")
    _write(tmp_path / "avg2", {**cfg, "norm_scaling_factor": 0.5}, w)
    d = load_dictionary(tmp_path / "avg2")
    want = (torch.relu((0.5 * x) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]) / 0.5
    assert torch.allclose(d.reconstruct(x), want, atol=1e-5)
    # a skip transcoder: reads mlp_in, writes mlp_out; b_dec is not subtracted from the input
    tw = {**_weights(d_out=8, seed=4), "W_skip": 0.1 * torch.randn(8, 8)}
    _write(tmp_path / "tc", {"architecture": "skip_transcoder", "d_in": 8, "d_sae": 16, "d_out": 8,
                             "hook_name_out": "blocks.2.hook_mlp_out", "metadata": {"hook_name": "blocks.2.hook_mlp_in"}},
           tw)
    d = load_dictionary(tmp_path / "tc")
    assert d.reads == ap.Site("mlp_in", 2) and d.site == ap.Site("mlp_out", 2) and d.W_skip is not None
    want = torch.relu(x @ tw["W_enc"] + tw["b_enc"]) @ tw["W_dec"] + tw["b_dec"] + x @ tw["W_skip"].T
    assert torch.allclose(d.reconstruct(x), want, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_round_trip_through_the_saelens_layout(tmp_path, activation):
    d = Dictionary.random(ap.Site("resid_mid", 1), d_in=8, n_features=16, seed=5, activation=activation,
                          k=4 if activation == "topk" else None)
    d.meta["quality"] = {"fvu": 0.12, "l0": 4.0}
    save_dictionary(d, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_mid" and cfg["d_sae"] == 16
    e = load_dictionary(tmp_path / "d")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(e, name), getattr(d, name))
    assert (e.site, e.activation, e.k, e.meta["quality"]) == (d.site, d.activation, d.k, {"fvu": 0.12, "l0": 4.0})
    x = torch.randn(2, 3, 8)
    assert torch.equal(e.encode(x), d.encode(x))
    t = Dictionary.random(ap.Site("mlp_out", 0), d_in=8, n_features=16, reads=ap.Site("resid_mid", 0))
    save_dictionary(t, tmp_path / "t")
    u = load_dictionary(tmp_path / "t")
    assert u.reads == ap.Site("resid_mid", 0) and u.site == ap.Site("mlp_out", 0)
    # SAELens itself reads the hook names, without actpatch's own block
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    del cfg["actpatch"]
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    u = load_dictionary(tmp_path / "t")
    assert u.reads == ap.Site("resid_mid", 0) and u.site == ap.Site("mlp_out", 0)


def test_an_sae_object_is_read_by_its_weights():
    class Cfg:
        def to_dict(self):
            return {"architecture": "standard", "d_in": 8, "d_sae": 16, "apply_b_dec_to_input": True,
                    "metadata": {"hook_name": "blocks.0.hook_resid_pre"}}

    class FakeSAE(torch.nn.Module):  # the attributes an sae_lens SAE has
        def __init__(self):
            super().__init__()
            for k, v in _weights().items():
                setattr(self, k, torch.nn.Parameter(v))
            self.cfg = Cfg()

    sae = FakeSAE()
    d = load_dictionary(sae)
    assert d.site == ap.Site("resid_pre", 0) and torch.equal(d.W_enc, sae.W_enc.detach())


def test_hugging_face_module_names_resolve_through_the_model():
    m = tiny_model("llama")
    w = _weights(d_in=m.d_model)
    from actpatch.features import site_of_hook

    assert site_of_hook("model.layers.1", m) == ap.Site("resid_post", 1)
    assert site_of_hook("layers.0.mlp", m) == ap.Site("mlp_out", 0)
    with pytest.raises(ap.errors.DictionaryError, match="needs the model"):
        site_of_hook("model.layers.1")
    with pytest.raises(ap.errors.DictionaryError, match="not one actpatch reads"):
        site_of_hook("model.layers.1.input_layernorm", m)
    assert w


def test_bad_dictionaries_are_refused_by_name(tmp_path):
    m = tiny_model("llama")
    E = ap.errors.DictionaryError
    w = _weights(d_in=8)
    with pytest.raises(E, match="reads 8 dimensions, but resid_post.L0 of this model has 64"):
        m.attach(Dictionary(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], ap.Site("resid_post", 0)))
    with pytest.raises(E, match="hook_fancy"):
        site_of_hook_text = "blocks.0.hook_fancy"
        _write(tmp_path / "h", {"architecture": "standard", "d_in": 8, "d_sae": 16, "hook_name": site_of_hook_text}, w)
        load_dictionary(tmp_path / "h")
    with pytest.raises(E, match="'gated' is not one actpatch reads"):
        _write(tmp_path / "g", {"architecture": "gated", "d_in": 8, "d_sae": 16, "hook_name": "blocks.0.hook_resid_pre"},
               w)
        load_dictionary(tmp_path / "g")
    d = Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=16)
    with pytest.raises(E, match="Feature 16 is out of range .* features 0..15"):
        d.feature(16)
    with attach(m, d):
        with pytest.raises(ap.errors.SiteError, match="index 99 is out of range for feature of size 16"):
            ap.patch(m, _prompts(), [ap.Site("feature", 0, pos=1, index=99, on="resid_post")])
    with pytest.raises(E, match="no dictionary is attached at resid_post.L0"):
        ap.patch(m, _prompts(), [d.feature(3, pos=1)])
    bad = dict(w, W_dec=w["W_dec"].clone())
    bad["W_dec"][0, 0] = float("nan")
    with pytest.raises(E, match="W_dec has 1 NaN"):
        _write(tmp_path / "n", {"architecture": "standard", "d_in": 8, "d_sae": 16, "hook_name": "blocks.0.hook_resid_pre"},
               bad)
        load_dictionary(tmp_path / "n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cfg.json").write_text("{}")
    with pytest.raises(E, match="lacks sae_weights.safetensors"):
        load_dictionary(tmp_path / "empty")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "sae.pt").write_bytes(b"not even a pickle")  # never opened
    with pytest.raises(E, match="pickled checkpoint; actpatch never unpickles"):
        load_dictionary(tmp_path / "pickled")
    with pytest.raises(E, match="pickled checkpoint"):
        load_dictionary(tmp_path / "pickled" / "sae.pt")
    with pytest.raises(E, match="hook_head_index"):
        _write(tmp_path / "hd", {"architecture": "standard", "d_in": 8, "d_sae": 16,
                                 "metadata": {"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 2}}, w)
        load_dictionary(tmp_path / "hd")
    with pytest.raises(E, match="ln2.hook_normalized"):
        _write(tmp_path / "ln", {"architecture": "transcoder", "d_in": 8, "d_sae": 16, "d_out": 8,
                                 "hook_name_out": "blocks.0.hook_mlp_out",
                                 "metadata": {"hook_name": "blocks.0.ln2.hook_normalized"}}, w)
        load_dictionary(tmp_path / "ln")
    with pytest.raises(E, match="already has a dictionary attached"):
        with attach(m, d):
            m.attach(Dictionary.random(ap.Site("resid_post", 0), d_in=m.d_model, n_features=8))
    with pytest.raises(E, match="reads resid_post.L0 and writes mlp_out.L0"):
        m.attach(Dictionary.random(ap.Site("mlp_out", 0), d_in=m.d_model, n_features=8, reads=ap.Site("resid_post", 0)))
    assert m.dictionaries == {}
