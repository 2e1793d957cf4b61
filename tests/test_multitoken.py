"""Answers of several tokens, teacher-forced: sweeps equal an independent oracle.

The oracle is written without the engines or actpatch's hooks: plain torch hooks on the
adapter's hook modules, one forward pass per (prompt, patch, branch) over ``prompt + answer[:-1]``
(and ``prompt + alternative[:-1]``), the patch written at prompt positions only, the metric
summed from ``log_softmax`` by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch

import actpatch as ap
from actpatch.errors import ContextLengthError, PromptError
from actpatch.metrics import Metric, compute_metrics
from actpatch.prompts.continuation import Continuation
from actpatch.testing import branch_logprob, tiny_model

PAIRS = [
    ("When Mary and John went to the store", "When Alice and John went to the store", " Mary gave", " John"),
    ("When Paul and Sara went to the school", "When Paul and Lucy went to the school", " Sara is", " Rome city of"),
    ("When Tom and Anna went to the park", "When Tom and Bob went to the park", " Anna", " Tom had fun"),
]
TOL = 1e-5
FAMILIES = ("gpt2", "llama_gqa", "gemma3_text", "gpt_neox", "olmo2")


def _grab(module: torch.nn.Module, side: str, model_fn) -> torch.Tensor:
    got: dict[str, torch.Tensor] = {}
    if side == "input":
        def pre(m, args, kwargs):
            got["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        h = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(m, args, out):
            got["x"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        h = module.register_forward_hook(post)
    try:
        model_fn()
    finally:
        h.remove()
    return got["x"]


def _with_write(module: torch.nn.Module, side: str, write, model_fn):
    if side == "input":
        def pre(m, args, kwargs):
            if args:
                return (write(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}
        h = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(m, args, out):
            return (write(out[0]), *out[1:]) if isinstance(out, tuple) else write(out)
        h = module.register_forward_hook(post)
    try:
        return model_fn()
    finally:
        h.remove()


def oracle(model: ap.Model, ps: ap.PromptSet, kind: str, layer: int, *, pos: int | None = None,
           head: int | None = None, direction: str = "denoise") -> dict[str, torch.Tensor]:
    """Teacher-forced logit difference and log-probability per prompt for one patch."""
    hf = model.hf
    module, side = model.adapter.hook_point(ap.Site(kind, layer))
    D = model.d_head
    ld, lp = [], []
    for i in range(len(ps)):
        clean, corr = ps.clean[i], ps.corrupted[i]
        base, src = (corr, clean) if direction == "denoise" else (clean, corr)
        T = base.numel()
        with torch.no_grad():
            srcx = _grab(module, side, lambda: hf(input_ids=src[None]))

        def write(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            where = slice(0, T) if pos is None else pos  # prompt positions only
            cols = slice(None) if head is None else slice(head * D, (head + 1) * D)
            x[:, where, cols] = srcx[:, where, cols]
            return x

        def logprob(target: torch.Tensor) -> float:
            seq = torch.cat([base, target[:-1]])[None]
            with torch.no_grad():
                logits = _with_write(module, side, write, lambda: hf(input_ids=seq).logits[0].double())
            lps = torch.log_softmax(logits, -1)
            return sum(float(lps[T - 1 + j, target[j]]) for j in range(target.numel()))

        la, lb = logprob(ps.answer_ids(i)), logprob(ps.alternative_ids(i))
        ld.append(la - lb)
        lp.append(la)
    return {"logit_diff": torch.tensor(ld), "logprob": torch.tensor(lp)}


def _check_against_oracle(model: ap.Model, ps: ap.PromptSet, kinds=("resid_pre", "z", "mlp_out"),
                          engines=("batched", "reference"), positions=None, layers=None) -> float:
    worst = 0.0
    T = ps.seq_len
    for kind in kinds:
        for direction in ("denoise", "noise"):
            for engine in engines:
                res = ap.sweep(model, ps, target=kind, direction=direction, metric=["logit_diff", "logprob"],
                               engine=engine, progress=False, layers=layers,
                               positions=None if kind == "z" else positions)
                for li, layer in enumerate(layers or range(model.n_layers)):
                    cells = ([{"head": h} for h in range(model.n_heads)] if kind == "z" else
                             [{"pos": p} for p in (positions or range(T))])
                    for ci, cell in enumerate(cells):
                        want = oracle(model, ps, kind, layer, direction=direction, **cell)
                        index = (slice(None), li, ci)
                        for m in ("logit_diff", "logprob"):
                            err = float((res.raw[m][index].double() - want[m]).abs().max())
                            assert err < TOL, (kind, direction, engine, layer, cell, m, err)
                            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_token_sweeps_equal_the_teacher_forced_oracle(family):
    model = tiny_model(family)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    assert ps.multi_token and ps.groups()[0].continuation.n_tokens == 1 + 2  # " Sara is" / " Rome city of"
    _check_against_oracle(model, ps)


def test_single_token_answers_are_the_one_token_case():
    """The logit difference of single tokens is exactly the logit difference (no second path):
    compute_metrics on one readout equals logit(a) - logit(b) bit for bit, and logprob
    differences give the same number within float rounding."""
    torch.manual_seed(0)
    logits = torch.randn(5, 1, 50) * 4
    a, b = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10])
    got = compute_metrics([Metric.LOGIT_DIFF, Metric.LOGPROB], logits, a, b)
    idx = torch.arange(5)
    assert torch.equal(got[Metric.LOGIT_DIFF], logits[idx, 0, a] - logits[idx, 0, b])
    lps = torch.log_softmax(logits[:, 0], -1)
    assert torch.allclose(got[Metric.LOGPROB], lps[idx, a])
    assert torch.allclose(got[Metric.LOGIT_DIFF], lps[idx, a] - lps[idx, b], atol=1e-5)
    # a set given as one-token sequences is stored as single tokens: the classic experiment
    ps = ap.PromptSet.from_ids([[1, 2, 3]], [[1, 5, 3]], [[7]], [[9]])
    assert not ps.multi_token and ps.groups()[0].continuation is None


def test_teacher_forced_metrics_by_hand():
    """Readouts laid out as the module says: answer token j at readout j, alternative token j
    at 0 (j = 0) or A - 1 + j; padding ignored; rank is the worst step; KL averaged."""
    cont = Continuation.of([torch.tensor([3, 4]), torch.tensor([5])], [torch.tensor([6, 7, 8]), torch.tensor([9])])
    assert cont.n_tokens == 1 + 2 and cont.tokens.tolist() == [[3, 6, 7], [5, 9, 9]]
    assert cont.alternative_readouts().tolist() == [0, 2, 3]
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 12)
    lp = torch.log_softmax(logits, -1)
    out = compute_metrics(list(Metric)[:4], logits, cont.answer[:, 0], cont.alternative[:, 0],
                          clean_logprobs=torch.log_softmax(torch.randn(2, 4, 12), -1), continuation=cont)
    want_a = torch.stack([lp[0, 0, 3] + lp[0, 1, 4], lp[1, 0, 5]])
    want_b = torch.stack([lp[0, 0, 6] + lp[0, 2, 7] + lp[0, 3, 8], lp[1, 0, 9]])
    assert torch.allclose(out[Metric.LOGPROB], want_a, atol=1e-6)
    assert torch.allclose(out[Metric.LOGIT_DIFF], want_a - want_b, atol=1e-5)
    assert torch.allclose(out[Metric.PROB], want_a.exp(), atol=1e-6)
    rank = compute_metrics([Metric.RANK, Metric.ACCURACY], logits, cont.answer[:, 0], cont.alternative[:, 0],
                           continuation=cont)
    r0 = max(int((logits[0, 0] > logits[0, 0, 3]).sum()), int((logits[0, 1] > logits[0, 1, 4]).sum()))
    assert int(rank[Metric.RANK][0]) == r0 and float(rank[Metric.ACCURACY][0]) == float(r0 == 0)


def test_bad_answers_are_refused_by_pair_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(PromptError, match=r"Pair 1: the answer '' has no tokens"):
        ap.PromptSet.from_pairs(model, [PAIRS[0], ("When Mary went", "When John went", "", " Mary")])
    with pytest.raises(PromptError, match=r"Pair 0: answer ' Mary gave' and alternative ' Mary gave' are the same"):
        ap.PromptSet.from_pairs(model, [("When Mary went", "When John went", " Mary gave", " Mary gave")])
    # answers sharing their first token are fine (the difference lives later)
    ps = ap.PromptSet.from_pairs(model, [("When Mary went", "When John went", " Mary gave", " Mary had")])
    assert int(ps.answers[0]) == int(ps.alternatives[0])


def test_an_answer_past_the_context_is_refused_naming_both_lengths():
    model = tiny_model("gpt2")
    limit = model.context_length
    ps = ap.PromptSet.from_ids([[2] * (limit - 1)], [[3] * (limit - 1)], [[4, 5, 6]], [[7]])
    with pytest.raises(ContextLengthError, match=r"with its answer \(3 tokens, .* in the prompt\)"):
        ap.sweep(model, ps, target="resid_pre", progress=False)


@pytest.mark.slow
def test_bundled_multi_token_sweep_equals_the_oracle(bundled):
    """The bundled model (Llama, GQA), real multi-token answers (2 and 3 tokens): resid_pre and
    mlp_out at the first and last layers at the subject's last token and the last position, both directions,
    within 1e-5 of the oracle. In float64: in float32 thirty layers of rounding alone differ by
    up to 3e-5 in log-probabilities of -10 between two attention implementations (the engines
    and plain transformers' sdpa), which would hide what this test checks."""
    model = ap.Model(copy.deepcopy(bundled.hf).double(), bundled.tokenizer, name="smollm2-float64")
    ps = ap.PromptSet.from_pairs(model, [
        ("The Statue of Liberty is in the city of", "The Golden Gate Bridge is in the city of", " New York",
         " San Francisco"),
        ("The Eiffel Tower is in the city of", "The Colosseum is in the city of", " Paris, France", " Rome, Italy"),
    ])
    assert ps.multi_token and ps.seq_len == 9
    assert ps.continuation_lengths.tolist() == [2, 3]
    _check_against_oracle(model, ps, kinds=("resid_pre", "mlp_out"), engines=("batched",), positions=[3, 8],
                          layers=[0, 29])


def _atp_oracle(model: ap.Model, ps: ap.PromptSet, layer: int, direction: str) -> torch.Tensor:
    """(N, T) AtP of resid_pre ``layer`` at each prompt position, by hand: one zero added at the
    prompt positions of both teacher-forced sequences, the gradient of logprob(answer) -
    logprob(alternative) at it, dotted with (source - base)."""
    module, side = model.adapter.hook_point(ap.Site("resid_pre", layer))
    assert side == "input"
    out = []
    for i in range(len(ps)):
        base, src = (ps.corrupted[i], ps.clean[i]) if direction == "denoise" else (ps.clean[i], ps.corrupted[i])
        T = base.numel()
        with torch.no_grad():
            xs = _grab(module, side, lambda: model.hf(input_ids=src[None]))
            xb = _grab(module, side, lambda: model.hf(input_ids=base[None]))
        zero = torch.zeros(1, T, model.d_model, requires_grad=True)

        def add(x: torch.Tensor) -> torch.Tensor:
            pad = torch.zeros(1, x.shape[1] - T, x.shape[2])
            return x + torch.cat([zero, pad], 1)

        total = 0.0
        for sign, target in ((1.0, ps.answer_ids(i)), (-1.0, ps.alternative_ids(i))):
            seq = torch.cat([base, target[:-1]])[None]
            logits = _with_write(module, side, add, lambda: model.hf(input_ids=seq).logits[0])
            lps = torch.log_softmax(logits.double(), -1)
            total = total + sign * sum(lps[T - 1 + j, target[j]] for j in range(target.numel()))
        (grad,) = torch.autograd.grad(total, [zero])
        out.append(((xs - xb) * grad).sum(-1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_attribution_through_the_continuation_equals_autograd_by_hand(direction):
    model = tiny_model("llama")
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    atp = ap.attribute(model, ps, "resid_pre", direction=direction)
    base = (atp.corrupted if direction == "denoise" else atp.clean)["logit_diff"]
    for layer in range(model.n_layers):
        got = atp.raw["logit_diff"][:, layer] - base[:, None].double()
        want = _atp_oracle(model, ps, layer, direction)
        assert float((got - want).abs().max()) < TOL, (layer, got, want)
        assert float(want.abs().max()) > 0.1  # something to estimate


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_eap_ig_is_complete_through_the_continuation(direction):
    """Integrated gradients' completeness with teacher-forced answers: the edges out of the
    embeddings add up to m(other run) - m(base run), so no path through the continuation is
    lost (its tokens read the prompt through the key / value ports at prompt positions)."""
    model = tiny_model("llama")
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    res = ap.sweep(model, ps, "resid_pre", layers=[0], positions=[0], progress=False)  # baselines only
    base, other = ("clean", "corrupted") if direction == "noise" else ("corrupted", "clean")
    total = (getattr(res, other)["logit_diff"] - getattr(res, base)["logit_diff"]).double()
    e = ap.edge_attribution(model, ps, direction=direction, ig_steps=32)
    miss = float((e.per_prompt[:, e.upstream.index("embed"), :].nansum(-1) - total).abs().max())
    assert float(total.abs().max()) > 1.0 and miss < 0.02  # raw logit-diff units


def test_techniques_without_continuations_refuse_multi_token_answers_by_name():
    model = tiny_model("llama")
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    with pytest.raises(PromptError, match=r"Direct effects scores single-token answers only; .* up to 3 tokens"):
        ap.circuits.direct_vs_total(model, ps)
    clean = ap.sweep(model, ps, "resid_pre", layers=[0], positions=[0], progress=False).clean["logit_diff"]
    assert ap.prompts.correct_mask(model, ps).tolist() == (clean > 0).tolist()  # teacher-forced, as the sweeps


def test_answers_sharing_their_first_token_are_named_in_a_finding():
    model = tiny_model("llama")
    ps = ap.PromptSet.from_pairs(model, [PAIRS[0], ("When Tom and Anna went to the park", "When Tom and Bob went to the park",
                                                    " Anna had fun", " Anna had a")])
    res = ap.sweep(model, ps, "resid_pre", progress=False)
    found = [f for f in res.findings if f.code == "answers_share_first_token"]
    assert len(found) == 1 and "1 of 2 prompts (1)" in found[0].message
    assert not [f for f in ap.sweep(model, ap.PromptSet.from_pairs(model, PAIRS), "resid_pre", progress=False).findings
                if f.code == "answers_share_first_token"]


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("receiver", ["resid_final", "q"])
def test_path_patching_with_multi_token_answers_equals_two_steps_by_hand(family, receiver):
    model = tiny_model(family)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    senders = [ap.Site("z", 0, head=1)]
    receivers = [ap.Site("resid_final")] if receiver == "resid_final" else [ap.Site("q", 1, head=2)]
    res = ap.path_patch(model, ps, senders=senders, receivers=receivers, direction="noise")
    for i in range(len(ps)):
        clean, corrupted = ps.clean[i][None], ps.corrupted[i][None]
        z_all = [ap.Site("z", l) for l in range(model.n_layers)]
        with model.attention_fn(), ap.capture(model, z_all) as frozen:
            model.logits(clean)
        with model.attention_fn(), ap.capture(model, [ap.Site("z", 0)]) as src:
            model.logits(corrupted)
        writes = {z: frozen[z].clone() for z in z_all}
        writes[ap.Site("z", 0)][:, :, 1] = src[ap.Site("z", 0)][:, :, 1]
        with model.attention_fn(), ap.intervene(model, writes), ap.capture(model, [r.full() for r in receivers]) as rec:
            model.logits(clean)
        recorded = {r.full(): rec[r.full()] for r in receivers}
        if receiver == "q":  # only head 2's query changes
            with model.attention_fn(), ap.capture(model, [ap.Site("q", 1)]) as base_q:
                model.logits(clean)
            q = base_q[ap.Site("q", 1)].clone()
            q[:, :, 2] = recorded[ap.Site("q", 1)][:, :, 2]
            recorded = {ap.Site("q", 1): q}
        want = (branch_logprob(model, ps.clean[i], ps.answer_ids(i), recorded)
                - branch_logprob(model, ps.clean[i], ps.alternative_ids(i), recorded))
        assert abs(float(res.raw["logit_diff"][i]) - want) < TOL, (family, receiver, i)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_logit_difference_alone_reads_two_logits_at_the_first_readout(family):
    """With the logit difference alone the batched engine unembeds readout 0 at the first answer
    tokens only (Measurer.first_tokens); the values equal the teacher-forced oracle (gemma2:
    final soft-capping on the compact rows too)."""
    model = tiny_model(family)
    ps = ap.PromptSet.from_pairs(model, PAIRS)
    res = ap.sweep(model, ps, target="resid_pre", direction="noise", metric="logit_diff", engine="batched",
                   progress=False, layers=[0, 1], positions=[2, ps.seq_len - 1])
    for li, layer in enumerate([0, 1]):
        for ci, pos in enumerate([2, ps.seq_len - 1]):
            want = oracle(model, ps, "resid_pre", layer, pos=pos, direction="noise")["logit_diff"]
            assert float((res.raw["logit_diff"][:, li, ci].double() - want).abs().max()) < TOL, (layer, pos)
    assert float(res.raw["logit_diff"].std()) > 1e-2  # the cells differ
