"""ap.interchange against one plain-hooks forward pass per (patch, prompt), written without it."""

import pytest
import torch

import actpatch as ap
from actpatch.errors import PromptError, SiteError
from actpatch.metrics import compute_metrics
from actpatch.prompts.continuation import Continuation
from actpatch.techniques.interchange import Interchange
from actpatch.testing import tiny_model

L = ap.Metric.LOGIT_DIFF

# base and source prompts of different lengths, pair by pair; multi-token answers in the base
BASE = dict(clean=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [3, 3, 4, 5]],
            corrupted=[[1, 9, 3, 4, 5], [6, 7, 2, 9, 10], [3, 9, 4, 5]],
            answers=[[6, 7], 11, 12], alternatives=[7, [12, 13], 11])
SOURCE = dict(clean=[[4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14]], corrupted=[[4, 1, 6], [7, 1, 9, 10, 11, 12], [13, 1]],
              answers=[1, 2, 3], alternatives=[2, 3, 4])


def sets():
    return ap.PromptSet.from_ids(**BASE), ap.PromptSet.from_ids(**SOURCE)


def position(prompts, site, i):
    names = {"end": prompts.clean[i].numel() - 1,
             "first_diff": int((prompts.clean[i] != prompts.corrupted[i]).nonzero()[0])}
    T = prompts.clean[i].numel()
    return names[site.pos] if isinstance(site.pos, str) else T + site.pos if site.pos < 0 else site.pos


def source_value(model, source, site, i):
    with model.attention_fn(), ap.capture(model, [site.full()]) as acts:
        model.logits(source.clean[i][None])
    return acts[site.full()][0][site.at(position(source, site, i)).selector()[1:]]


def oracle(model, base, patch, values):
    """Logit difference of each base prompt under ``patch`` (its writes' values per prompt)."""
    out = []
    for i in range(len(base)):
        writes = {w.base.at(position(base, w.base, i)): values[j][i] for j, w in enumerate(patch)}
        cont = Continuation.of([base.answer_ids(i)], [base.alternative_ids(i)])
        with model.attention_fn(), ap.intervene(model, writes):
            logits = model.readout(base.clean[i][None], cont)
        out.append(float(compute_metrics([L], logits, base.answers[i:i + 1], base.alternatives[i:i + 1], None, cont)[L]))
    return torch.tensor(out)


def patches(model):
    return [
        (ap.Site("resid_pre", 1, pos=-1), ap.Site("resid_pre", 1, pos="end")),
        [(ap.Site("z", 0, head=1, pos=0), ap.Site("z", 1, head=2, pos=1)),  # two writes together
         (ap.Site("mlp_out", 0, pos="first_diff"), ap.Site("mlp_out", 0, pos=2))],
        Interchange(ap.Site("resid_post", 0, pos=0), ap.Site("resid_post", 0, pos=-2)),
        (torch.linspace(-1, 1, model.d_model), ap.Site("attn_out", 0, pos=-2)),
    ]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
def test_interchange_equals_one_forward_per_patch_and_prompt(family):
    model = tiny_model(family)
    base, source = sets()
    plist = patches(model)
    res = ap.interchange(model, base, source, plist, metric=["logit_diff", "kl"])
    assert res.reduce == "pair" and res.values[L].shape == (len(plist), 3)
    for k, patch in enumerate(res.patches):
        values = [[w.tensor if w.source is None else source_value(model, source, w.source, i) for i in range(3)]
                  for w in patch]
        assert torch.allclose(res.values[L][k], oracle(model, base, patch, values), atol=1e-5), (family, k)
    assert torch.allclose(res.base[L], oracle(model, base, (), []), atol=1e-5)
    assert res.effect(L).abs().max() > 1e-3  # the patches matter on these random models
    assert res.base[ap.Metric.KL].abs().max() < 1e-6  # KL against the unpatched base run
    assert res.provenance.weight_hash == model.weight_hash and res.source_prompts["n_prompts"] == 3
    assert res.to_dict()["labels"] == res.labels


def test_mean_source_and_one_source_broadcast():
    model = tiny_model("llama")
    base, source = sets()
    write = Interchange(ap.Site("resid_pre", 1, pos="end"), ap.Site("resid_pre", 1, pos=1))
    res = ap.interchange(model, base, source, [write], reduce="mean")
    mean = torch.stack([source_value(model, source, write.source, i) for i in range(3)]).mean(0)
    assert res.reduce == "mean" and res.source is None
    assert torch.allclose(res.values[L][0], oracle(model, base, (write,), [[mean] * 3]), atol=1e-5)
    one = ap.interchange(model, base, source.subset([1]), [write])
    assert one.reduce == "broadcast"
    v = source_value(model, source, write.source, 1)
    assert torch.allclose(one.values[L][0], oracle(model, base, (write,), [[v] * 3]), atol=1e-5)


def test_a_patch_after_everything_that_reads_it_is_reported_as_no_effect():
    model = tiny_model("llama")  # two layers: layer 1's output at the second-to-last position reaches nothing
    base, source = sets()
    res = ap.interchange(model, base, None, [(torch.ones(model.d_model), ap.Site("attn_out", 1, pos=-2))])
    assert res.reduce == "value" and res.effect(L).abs().max() <= 1e-6
    assert "interchange_no_effect" in {f.code for f in res.findings}


@pytest.mark.parametrize("write, source_n, error, text", [
    (Interchange(ap.Site("resid_pre", 1, pos=0), ap.Site("mlp_out", 1, pos=0)), 3, SiteError, "same kind"),
    (Interchange(ap.Site("z", 1, pos=0), ap.Site("z", 1, head=0, pos=0)), 3, SiteError, "widths"),
    (Interchange(ap.Site("resid_pre", 1, pos=0), ap.Site("resid_pre", 1, pos=4)), 3, SiteError, "beyond base prompt 2"),
    (Interchange(ap.Site("resid_pre", 1, pos="S2"), ap.Site("resid_pre", 1, pos=0)), 3, PromptError, "named 'S2'"),
    (Interchange(ap.Site("resid_pre", 1, pos=0), ap.Site("resid_pre", 1)), 3, SiteError, "base position"),
    (Interchange(ap.Site("resid_pre", 1, pos=0), ap.Site("resid_pre", 1, pos=0)), 2, PromptError, "as many"),
])
def test_interchange_refuses_bad_input(write, source_n, error, text):
    model = tiny_model("llama")
    base, source = sets()
    with pytest.raises(error, match=text):
        ap.interchange(model, base, source.subset(list(range(source_n))), [write])
