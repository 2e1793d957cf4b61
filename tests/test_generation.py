"""ap.generate (a key / value cache under patches) against a token-by-token loop of full forward
passes, and ap.patchscope against generate / capture by hand."""

import pytest
import torch

import actpatch as ap
from actpatch.errors import PromptError, SiteError
from actpatch.testing import tiny_model

IDS = torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])


def reference_loop(model, ids, prompt_patches, step_patches, n):
    """Greedy decoding with no cache: each step runs prompt + generated tokens in full, the
    prompt patches at their positions (< T), the step patches at positions >= T."""
    T = ids.shape[1]
    seq, logits = ids.clone(), []

    def only(value, span):
        def fn(x):
            out = x.clone()
            out[:, span] = value(x[:, span]) if callable(value) else value
            return out
        return fn

    for _ in range(n):  # a site without a position covers the prompt only
        patches = {site: v if site.pos is not None else only(v, slice(0, T)) for site, v in prompt_patches.items()}
        patches.update({site: only(v, slice(T, None)) for site, v in step_patches.items()})
        with model.attention_fn(), ap.intervene(model, patches):
            last = model.logits(seq)[:, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax(-1)[:, None]], 1)
    return seq[:, T:], torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text", "mistral", "gpt_neox"])
def test_generate_equals_a_loop_without_cache(family):
    model = tiny_model(family)
    prompt = {ap.Site("v", 1, pos=2): 0.0, ap.Site("resid_pre", 1, pos=4): lambda x: 2 * x,
              ap.Site("z", 0, head=1): 0.0}
    steps = {ap.Site("mlp_out", 0): lambda x: x + 1.0}
    n = 6  # past the 4-token sliding window of the gemma3 / mistral configs
    out = ap.generate(model, IDS, prompt, every_step=steps, max_new_tokens=n)
    tokens, logits = reference_loop(model, IDS, prompt, steps, n)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() < 1e-5
    base_tokens, base_logits = reference_loop(model, IDS, {}, {}, n)
    assert torch.equal(out.baseline_tokens, base_tokens)
    assert (out.baseline_logits - base_logits).abs().max() < 1e-5
    assert out.changed.any()  # the patches matter on these random models


def test_unpatched_generation_equals_transformers_greedy():
    model = tiny_model("llama")
    out = ap.generate(model, IDS, max_new_tokens=5, baseline=False)
    hf = model.hf.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(out.tokens, hf[:, IDS.shape[1]:])


def test_negative_positions_count_from_the_prompt_end_and_sampling_is_seeded():
    model = tiny_model("llama")
    a = ap.generate(model, IDS, {ap.Site("resid_pre", 1, pos=-1): 0.0}, max_new_tokens=4, baseline=False)
    b = ap.generate(model, IDS, {ap.Site("resid_pre", 1, pos=4): 0.0}, max_new_tokens=4, baseline=False)
    assert torch.equal(a.logits, b.logits)
    s1 = ap.generate(model, IDS, max_new_tokens=6, greedy=False, seed=3, baseline=False)
    s2 = ap.generate(model, IDS, max_new_tokens=6, greedy=False, seed=3, baseline=False)
    assert torch.equal(s1.tokens, s2.tokens)
    assert "patched" in repr(a) and "<table>" in a._repr_html_()


@pytest.mark.parametrize("kwargs, error, text", [
    ({"max_new_tokens": 0}, PromptError, "max_new_tokens >= 1"),
    ({"patches": {ap.Site("resid_pre", 0, pos=7): 0.0}}, SiteError, "outside the prompt"),
    ({"every_step": {ap.Site("resid_pre", 0, pos=1): 0.0}}, SiteError, "drop pos"),
    ({"max_new_tokens": 500}, PromptError, "context"),
    ({"greedy": False, "temperature": 0.0}, PromptError, "temperature"),
])
def test_generate_refuses_bad_input(kwargs, error, text):
    model = tiny_model("llama")
    with pytest.raises(error, match=text):
        ap.generate(model, IDS, **kwargs)


def test_patchscope_equals_generate_by_hand_and_the_logit_lens_ends_at_the_model():
    model = tiny_model("llama", n_layers=3)
    sources = [[5, 6, 7, 8], [9, 10, 11]]
    target = [1, 2, 1, 2, 9]
    scope = ap.patchscope(model, sources, "resid_post", target_prompt=target, positions=[-1, 0], max_new_tokens=3)
    assert tuple(scope.tokens.shape) == (3, 2, 2, 3)
    for li, layer in enumerate(scope.layers):
        for s, ids in enumerate(sources):
            for j, p in enumerate([-1, 0]):
                with model.attention_fn(), ap.capture(model, [ap.Site("resid_post", layer)]) as acts:
                    model.logits(torch.tensor([ids]))
                value = acts[ap.Site("resid_post", layer)][0, p]
                ref = ap.generate(model, target, {ap.Site("resid_post", layer, pos=4): value}, max_new_tokens=3,
                                  baseline=False)
                assert torch.equal(scope.tokens[li, s, j], ref.tokens[0])
    # a fixed target layer: every source layer written at layer 0
    fixed = ap.patchscope(model, sources, "resid_post", target_prompt=target, target_layer=0, max_new_tokens=2)
    assert fixed.target_layers == (0, 0, 0)
    lens = ap.patchscope(model, sources, "resid_post", target_prompt=None)
    final = [int(model.logits(torch.tensor([ids]))[0, -1].argmax()) for ids in sources]
    assert lens.tokens[-1, :, 0, 0].tolist() == final  # the last layer's lens is the model's own prediction


def test_patchscope_refuses_bad_input():
    model = tiny_model("llama")
    with pytest.raises(SiteError, match="target_position"):
        ap.patchscope(model, [[1, 2]], target_prompt=[3, 4], target_position=5)
    with pytest.raises(SiteError, match="residual-width"):
        ap.patchscope(model, [[1, 2]], "z")
    with pytest.raises(PromptError, match="max_new_tokens"):
        ap.patchscope(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(SiteError, match="outside source prompt"):
        ap.patchscope(model, [[1, 2]], positions=[4])


@pytest.mark.slow
def test_identity_patchscope_decodes_the_source_token_on_the_bundled_model(bundled):
    sources = ["The city of Paris", "I met Barack Obama", "She works at Microsoft", "A glass of water",
               "The river Thames", "He plays the guitar", "A photo of a dog", "The planet Jupiter"]
    scope = ap.patchscope(bundled, sources, "resid_post", max_new_tokens=4)
    share = scope.share_by_layer()
    # the token's identity is legible in the first half of the stack and gone from the last third
    assert share[:10].mean() >= 0.75, share
    assert share[20:].mean() <= 0.15, share
    assert scope.text[0][0][0].strip().startswith("-> Paris")
