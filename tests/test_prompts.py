"""PromptSet validation and the builders."""

from __future__ import annotations

import pytest
import torch

import actpatch as ap
from actpatch.testing import tiny_model


@pytest.fixture(scope="module")
def m():
    return tiny_model("gpt2")


def test_from_pairs_records_first_diff(m):
    ps = ap.PromptSet.from_pairs(m, [
        ("When Mary and John went to the store , John gave a drink to",
         "When Mary and John went to the store , Mary gave a drink to", " Mary", " John"),
        ("When Tom and Anna went to the park , Tom gave a ball to",
         "When Bob and Lucy went to the park , Paul gave a ball to", " Anna", " Tom"),
    ])
    assert ps.first_diff.tolist() == [9, 1]
    assert ps.answers.tolist() == [m.to_tokens("Mary")[0], m.to_tokens("Anna")[0]]
    assert ps.seq_len == 14
    assert ps.name == "custom"  # the default name, not a loop variable's last value
    assert ap.PromptSet.from_pairs(m, [("Mary went", "John went", " to", " the")], name="walks").name == "walks"


def test_pairs_of_different_lengths_are_unaligned_and_patched_by_name(m):
    ps = ap.PromptSet.from_pairs(m, [("When Mary went to the store", "When Mary and John went to the store", " Mary", " John")])
    assert not ps.aligned and ps.unaligned_pairs() == [0] and ps.describe()["unaligned_pairs"] == 1
    from actpatch.techniques.positions import named_positions
    # the differing span: 'went' against 'and John went' (common prefix 'When Mary', suffix 'went to the store')
    clean, corrupted = named_positions(ps, 0, "clean"), named_positions(ps, 0, "corrupted")
    assert corrupted["first_diff"] == 2 and corrupted["last_diff"] == 3 and corrupted["end"] == 7
    assert "first_diff" not in clean and clean["end"] == 5  # the clean prompt's span is empty: nothing inserted there
    with pytest.raises(ap.errors.PromptError, match=r"pair 0: 6 vs 8"):
        ap.sweep(m, ps, "resid_pre", progress=False)


def test_multi_token_answers_keep_every_token(m):
    ps = ap.PromptSet.from_pairs(m, [("When Mary", "When John", " Mary John", " John"), ("When Mary", "When John", " Mary", " John")])
    assert ps.multi_token and ps.answer_ids(0).tolist() == m.to_tokens(" Mary John") and ps.answer_ids(1).numel() == 1
    assert ps.continuation_lengths.tolist() == [2, 1] and ps.describe()["answer_tokens"] == [1, 2]
    assert ps.subset([0]).answer_ids(0).tolist() == ps.answer_ids(0).tolist()


def test_equal_answers_and_empty_sets(m):
    with pytest.raises(ap.errors.PromptError, match="answer ' Mary' and alternative ' Mary' are the same tokens"):
        ap.PromptSet.from_pairs(m, [("When Mary", "When John", " Mary", " Mary")])
    with pytest.raises(ap.errors.PromptError, match="answer and alternative are the same token 7"):
        ap.PromptSet.from_ids([[1, 2]], [[1, 3]], [7], [7])
    with pytest.raises(ap.errors.PromptError, match="No prompt pairs given"):
        ap.PromptSet.from_pairs(m, [])
    with pytest.raises(ap.errors.PromptError, match="empty"):
        ap.PromptSet.from_ids([], [], [], [])
    assert not ap.PromptSet.from_ids([[1, 2, 3]], [[1, 2]], [4], [5]).aligned  # unaligned: patched by name
    with pytest.raises(ap.errors.PromptError, match="corrupted ids must be a non-empty 1-D tensor"):
        ap.PromptSet.from_ids([[1, 2, 3]], [[]], [4], [5])


def test_every_bad_pair_is_reported_at_once(m):
    good = ("When Mary and John went", "When Mary and Bob went", " Mary", " John")
    with pytest.raises(ap.errors.PromptError) as e:
        ap.PromptSet.from_pairs(m, [("When Mary", "When John", " Mary John", " Mary John"), good,
                                    ("When Mary went to the store", "When Mary went to the store", " ", " John")])
    msg = str(e.value)
    assert msg.startswith("2 of 3 prompt pairs cannot be used") and "Pair 0: answer" in msg and "Pair 2: the answer" in msg
    assert "Pair 1" not in msg


def test_prompt_files_carry_positions_and_attributes_and_report_every_bad_line(m, tmp_path):
    import json

    rec = {"clean": "When Mary and John went", "corrupted": "When Mary and Bob went", "answer": " Mary",
           "alternative": " John"}
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join([json.dumps({**rec, "positions": {"S": 3}, "attributes": {"template": 7}}),
                             json.dumps(rec)]) + "\n")
    ps = ap.PromptSet.from_file(m, f)
    assert len(ps) == 2 and ps.name == "pairs" and ps.attributes[0] == {"template": 7, "positions": {"S": 3}}
    from actpatch.techniques.positions import named_positions

    assert named_positions(ps, 0)["S"] == 3 and "S" not in named_positions(ps, 1)
    f.write_text("\n".join([json.dumps(rec), json.dumps({**rec, "postions": {"S": 3}}), "",
                             json.dumps({k: v for k, v in rec.items() if k != "answer"}), "{not json",
                             json.dumps({**rec, "positions": {"S": "three"}})]) + "\n")
    with pytest.raises(ap.errors.PromptError) as e:
        ap.PromptSet.from_file(m, f)
    msg = str(e.value)
    assert "4 bad record(s)" in msg and "pairs.jsonl line 2: unknown key(s) ['postions']" in msg
    assert "line 4: missing ['answer']" in msg and "line 5: not valid JSON" in msg
    assert "line 6: position 'S' is 'three', not a token index" in msg and "line 1" not in msg
    f.write_text(json.dumps({**rec, "positions": {"S": 40}}) + "\n")
    with pytest.raises(ap.errors.PromptError, match=r"line 1: position 'S' = 40 is past the clean prompt's 5 tokens"):
        ap.PromptSet.from_file(m, f)
    # pairs of different lengths align by name through corrupted_positions
    f.write_text(json.dumps({**rec, "corrupted": "When Mary and John Smith went", "positions": {"S": 3},
                             "corrupted_positions": {"S": 4}}) + "\n")
    un = ap.PromptSet.from_file(m, f)
    assert not un.aligned and named_positions(un, 0, "corrupted")["S"] == 4 and named_positions(un, 0)["S"] == 3
    f.write_text(json.dumps({**rec, "corrupted_positions": {"S": 9}}) + "\n")
    with pytest.raises(ap.errors.PromptError, match=r"corrupted position 'S' = 9 is past the corrupted prompt's"):
        ap.PromptSet.from_file(m, f)
    # CSV: a positions column (name=index;...), lines counted with the header; unknown columns refused by name
    c = tmp_path / "pairs.csv"
    c.write_text("clean,corrupted,answer,alternative,positions\n"
                 "When Mary and John went,When Mary and Bob went, Mary, John,S=3;E=4\n")
    assert ap.PromptSet.from_file(m, c).attributes[0]["positions"] == {"S": 3, "E": 4}
    c.write_text("clean,corrupted,answer,alternative,note\nWhen Mary,When John, Mary, John,x\n")
    with pytest.raises(ap.errors.PromptError, match=r"unknown column\(s\) \['note'\]"):
        ap.PromptSet.from_file(m, c)
    c.write_text("clean,corrupted,answer,alternative\nWhen Mary,When John, Mary, John\nWhen Mary,When John, Mary John, Mary John\n")
    with pytest.raises(ap.errors.PromptError, match="pairs.csv line 3: answer ' Mary John' and alternative ' Mary John' are the same"):
        ap.PromptSet.from_file(m, c)
    c.write_text("clean,corrupted,answer,alternative\nWhen Mary,When John, Mary, John\nWhen Mary,When John, Mary John, John\n")
    assert ap.PromptSet.from_file(m, c).answer_ids(1).numel() == 2  # multi-token answers from a file


def test_groups_and_subset():
    ps = ap.PromptSet.from_ids([[1, 2, 3], [4, 5], [6, 7, 8]], [[1, 9, 3], [4, 6], [6, 7, 9]], [1, 2, 3], [4, 5, 6],
                               attributes=[{"t": 0}, {"t": 1}, {"t": 0}])
    groups = ps.groups()
    assert [g.indices.tolist() for g in groups] == [[0, 2], [1]]
    assert groups[0].clean.tolist() == [[1, 2, 3], [6, 7, 8]]
    sub = ps.subset([2, 0])
    assert sub.answers.tolist() == [3, 1] and sub.attributes == ({"t": 0}, {"t": 0})
    assert [len(p) for p in ps.split_by_length()] == [2, 1]


# -- builders on the bundled model's tokenizer -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("corruption, n_diff", [("s2", 1), ("io_s1", 3), ("abc", 3)])
def test_ioi_builder(bundled, corruption, n_diff):
    ps = ap.prompts.ioi(bundled, n=24, seed=1, corruption=corruption)
    assert len(ps) == 24
    assert {a["order"] for a in ps.attributes} == {"ABBA", "BABA"}
    assert len({a["template"] for a in ps.attributes}) == 12
    for i in range(len(ps)):
        assert int(ps.diff_mask(i).sum()) == n_diff
    again = ap.prompts.ioi(bundled, n=24, seed=1, corruption=corruption)
    assert all(torch.equal(a, b) for a, b in zip(ps.clean, again.clean))
    assert not all(torch.equal(a, b) for a, b in zip(ps.clean, ap.prompts.ioi(bundled, n=24, seed=2).clean))


@pytest.mark.slow
def test_builders_produce_valid_sets_the_model_mostly_solves(bundled):
    from actpatch.metrics import Metric

    from actpatch.prompts import correct_mask, keep_correct

    sets = {
        "ioi": ap.prompts.ioi(bundled, n=16, templates=[0]),
        "factual": ap.prompts.factual(bundled, n=40),
        "greater_than": ap.prompts.greater_than(bundled, n=16),
        "induction": ap.prompts.induction(bundled, n=8),
    }
    assert len(ap.prompts.factual(bundled, n=1000)) >= 50
    assert len({a["subject"] for a in sets["factual"].attributes}) >= 20
    for name, ps in sets.items():
        share = float(correct_mask(bundled, ps).float().mean())
        print(f"\n{name}: {len(ps)} prompts, model right on {share:.0%}")
        assert share >= 0.6, name
        kept, s2 = keep_correct(bundled, ps)
        assert s2 == share and len(kept) == round(share * len(ps))
    assert Metric.LOGIT_DIFF.value == "logit_diff"


@pytest.mark.slow
def test_greater_than_answers(bundled):
    ps = ap.prompts.greater_than(bundled, n=4, seed=0)
    for a, (clean, corrupted, ans, alt) in zip(ps.attributes, ps.texts):
        assert clean.endswith("to the year 17") and f"17{a['yy']:02d}" in clean and "1701" in corrupted
        assert int(ans) == a["yy"] // 10 + 1 and int(alt) == a["yy"] // 10 - 1


def test_builders_refuse_more_prompts_than_they_can_make(m):
    from actpatch.prompts.greater_than import greater_than_capacity
    from actpatch.prompts.ioi import ioi_capacity

    assert ioi_capacity([0], order="ABBA") * 2 == ioi_capacity([0])
    with pytest.raises(ap.errors.PromptError, match=r"makes at most \d+ distinct prompts"):
        ap.prompts.ioi(m, n=ioi_capacity([0]) + 1, templates=[0])
    with pytest.raises(ap.errors.PromptError, match="distinct prompts"):
        ap.prompts.greater_than(m, n=greater_than_capacity() + 1)
