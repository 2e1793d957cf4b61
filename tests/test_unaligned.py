"""Pairs of different token lengths, patched at named positions: sweeps equal a per-pair oracle
(plain hooks, one forward pass per patch, each prompt's own index for each name)."""

import pytest
import torch

import actpatch as ap
from actpatch.errors import CorruptionError, PromptError
from actpatch.metrics import compute_metrics
from actpatch.prompts.continuation import Continuation
from actpatch.testing import tiny_model

L = ap.Metric.LOGIT_DIFF


def pairs():
    """A one-token entity against a two-token one (both ways), a shorter corrupted prompt, and
    one aligned pair; multi-token answers on two of them."""
    return ap.PromptSet.from_ids(
        [[1, 2, 3, 4, 5], [6, 7, 8, 9], [1, 2, 3, 4, 5], [3, 4, 5, 6]],
        [[1, 2, 10, 11, 4, 5], [6, 12, 9], [1, 2, 10, 11, 4, 5], [3, 8, 5, 6]],
        [[6, 7], 11, 12, 13], [7, [12, 13], 11, 14])


def spans(c, k):
    """first_diff / last_diff / end of each side, computed here from scratch."""
    n = min(len(c), len(k))
    p = next((i for i in range(n) if c[i] != k[i]), n)
    s = next((i for i in range(n - p) if c[-1 - i] != k[-1 - i]), n - p)
    return ({"first_diff": p, "last_diff": len(c) - 1 - s, "end": len(c) - 1},
            {"first_diff": p, "last_diff": len(k) - 1 - s, "end": len(k) - 1})


def oracle(model, prompts, kind, layer, name, direction, head=None):
    out = []
    for i in range(len(prompts)):
        c, k = prompts.clean[i], prompts.corrupted[i]
        at_c, at_k = spans(c.tolist(), k.tolist())
        base, src, b, s = (k, c, at_k[name], at_c[name]) if direction == "denoise" else (c, k, at_c[name], at_k[name])
        full = ap.Site(kind, layer)
        with model.attention_fn(), ap.capture(model, [full]) as acts:
            model.logits(src[None])
        value = acts[full][0, s] if head is None else acts[full][0, s, head]
        site = ap.Site(kind, layer, pos=b, head=head)
        cont = Continuation.of([prompts.answer_ids(i)], [prompts.alternative_ids(i)])
        with model.attention_fn(), ap.intervene(model, {site: value}):
            logits = model.readout(base[None], cont)
        out.append(float(compute_metrics([L], logits, prompts.answers[i:i + 1], prompts.alternatives[i:i + 1],
                                         None, cont)[L]))
    return torch.tensor(out)


NAMES = ["first_diff", "last_diff", "end"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweeps_over_names_equal_the_per_pair_oracle(family, direction):
    model = tiny_model(family)
    prompts = pairs()
    for kind in ("resid_pre", "mlp_out"):
        res = ap.sweep(model, prompts, kind, positions=NAMES, direction=direction, progress=False)
        assert res.coords["pos"] == NAMES
        for layer in range(model.n_layers):
            for j, name in enumerate(NAMES):
                want = oracle(model, prompts, kind, layer, name, direction)
                assert torch.allclose(res.raw["logit_diff"][:, layer, j], want, atol=1e-5), (kind, layer, name)
    z = ap.sweep(model, prompts, "z", positions=["last_diff", "end"], direction=direction, progress=False)
    ref = ap.sweep(model, prompts, "z", positions=["last_diff", "end"], direction=direction, progress=False,
                   engine="reference")
    assert (z.raw["logit_diff"] - ref.raw["logit_diff"]).abs().max() < 1e-5
    for head in (0, 3):
        want = oracle(model, prompts, "z", 1, "last_diff", direction, head=head)
        assert torch.allclose(z.raw["logit_diff"][:, 1, head, 0], want, atol=1e-5)


def test_patch_at_names_and_explicit_alignments():
    model = tiny_model("llama")
    prompts = pairs()
    one = ap.patch(model, prompts, [ap.Site("resid_pre", 1, pos="last_diff")], direction="denoise")
    assert torch.allclose(one.raw["logit_diff"], oracle(model, prompts, "resid_pre", 1, "last_diff", "denoise"),
                          atol=1e-5)
    # an explicit (clean index, corrupted index) per pair, named: here the same as last_diff
    at = [(spans(c.tolist(), k.tolist())[0]["last_diff"], spans(c.tolist(), k.tolist())[1]["last_diff"])
          for c, k in zip(prompts.clean, prompts.corrupted)]
    named = prompts.with_positions("entity", at)
    res = ap.sweep(model, named, "resid_pre", positions=["entity"], direction="denoise", progress=False)
    ref = ap.sweep(model, prompts, "resid_pre", positions=["last_diff"], direction="denoise", progress=False)
    assert torch.equal(res.raw["logit_diff"], ref.raw["logit_diff"])


def test_aligned_pairs_keep_their_results():
    model = tiny_model("llama")
    aligned = ap.PromptSet.from_ids([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 9, 3, 4], [5, 6, 9, 8]], [6, 7], [7, 6])
    by_index = ap.sweep(model, aligned.subset([0]), "resid_pre", direction="denoise", progress=False)
    by_name = ap.sweep(model, aligned.subset([0]), "resid_pre", positions=["first_diff", "end"], direction="denoise",
                       progress=False)
    assert torch.equal(by_name.raw["logit_diff"][:, :, 0], by_index.raw["logit_diff"][:, :, 1])
    assert torch.equal(by_name.raw["logit_diff"][:, :, 1], by_index.raw["logit_diff"][:, :, 3])


def test_unaligned_pairs_refuse_what_cannot_match_them():
    model = tiny_model("llama")
    prompts = pairs()
    with pytest.raises(PromptError, match="Use named positions"):
        ap.sweep(model, prompts, "resid_pre", progress=False)
    with pytest.raises(PromptError, match="Use named positions"):
        ap.patch(model, prompts, [ap.Site("resid_pre", 0, pos=1)])
    with pytest.raises(CorruptionError, match="corruption='str'"):
        ap.sweep(model, prompts, "resid_pre", positions=["end"], corruption="zero", progress=False)
    with pytest.raises(PromptError, match="one token length"):
        ap.attribute(model, prompts, "resid_pre")
    with pytest.raises(PromptError, match="illusion check"):  # before the sweep, not after it
        ap.sweep(model, prompts, "resid_pre", positions=["end"], subspace=torch.eye(model.d_model)[:1], progress=False)
    with pytest.raises(PromptError, match="pair 1 gets"):
        prompts.with_positions("x", [(0, 0), (0, 9), (0, 0), (0, 0)])
    custom = prompts.subset([1]).with_positions("x", [(1, 1)])
    bad = ap.PromptSet.from_ids([[1, 2, 3]], [[1, 4, 5, 3]], [6], [7])
    bad = ap.PromptSet(clean=bad.clean, corrupted=bad.corrupted, answers=bad.answers, alternatives=bad.alternatives,
                       attributes=({"positions": {"x": 1}},))
    with pytest.raises(PromptError, match="no position named 'x' in its corrupted prompt"):
        ap.sweep(model, bad, "resid_pre", positions=["x"], progress=False)
    assert ap.sweep(model, custom, "resid_pre", positions=["x"], progress=False).values.shape == (2, 1)


def test_factual_builder_pairs_subjects_of_any_length_with_answers_of_any_length():
    model = tiny_model("gpt2")
    default = ap.prompts.factual(model, n=500)
    assert default.aligned and not default.multi_token  # unchanged unless asked
    both = ap.prompts.factual(model, n=500, multi_token=True, unaligned=True)
    assert not both.aligned and len(both) > len(default)
    for i in both.unaligned_pairs()[:5]:
        from actpatch.techniques.positions import named_positions
        assert {"subject_first", "subject_last"} <= set(named_positions(both, i, "corrupted"))


@pytest.mark.slow
def test_multi_token_factual_tracing_on_the_bundled_model(bundled):
    """ROME's picture with real entities of different lengths and answers of several tokens: the
    subject's last token carries the fact through the middle layers, the last position late."""
    from actpatch.app.runner import keep_correct

    ps, _ = keep_correct(bundled, ap.prompts.factual(bundled, n=200, multi_token=True, unaligned=True, seed=0))
    pick = [i for i in range(len(ps)) if ps.continuation_lengths[i] > 1 or ps.clean[i].numel() != ps.corrupted[i].numel()]
    ps = ps.subset(pick[:12])
    assert ps.multi_token and not ps.aligned
    res = ap.sweep(bundled, ps, "resid_pre", positions=["subject_last", "end"], layers=[6, 15, 27], direction="denoise",
                   progress=False)
    v = res.values  # (layer, pos)
    assert v[0, 0] > 0.4 and v[1, 0] > 0.4 and v[0, 1] < 0.1 and v[1, 1] < 0.1  # subject_last, not yet the end
    assert v[2, 1] > 0.6 and v[2, 0] < 0.1  # moved to the last position
