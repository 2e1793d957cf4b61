"""Every example config validates, and its prompts build on the bundled model with one token
length wherever a target has an indexed position axis (or with every named position)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actpatch.app.config import load_config
from actpatch.experiment.plan import default_per_position, parse_target
from actpatch.techniques.positions import is_named, named_positions as role_positions
from actpatch.app.runner import build_prompts

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples_for_each_builder():
    builders = {load_config(p).prompts.builder for p in EXAMPLES}
    assert {"ioi", "factual", "greater_than", "induction", None} <= builders


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_prompts_build(bundled, path):
    cfg = load_config(path)
    prompts, share = build_prompts(bundled, cfg)
    assert len(prompts) >= 3 and share is not None and share >= 0.6
    for t in cfg.targets:
        per_pos = t.per_position if t.per_position is not None else default_per_position(parse_target(t.target))
        if per_pos and not is_named(t.positions):
            assert prompts.seq_len > 0  # raises when lengths differ
        if is_named(t.positions):
            for i in range(len(prompts)):
                assert set(t.positions) <= set(role_positions(prompts, i))
