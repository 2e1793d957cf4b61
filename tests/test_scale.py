"""Every heatmap (report SVG, plotly `res.plot()`, terminal) is centred on the result's no-effect
value: 1 for noising, 0 for denoising. A negative component gets the opposite colour to a
positive one in both directions, the range grows with the data, and each terminal mode's legend
says what its marks stand for."""

from __future__ import annotations

import re

import pytest
import torch
from rich.text import Text

import actpatch as ap
from actpatch.report.scale import Scale
from actpatch.report.summary import block_heatmap
from actpatch.report.svg import heatmap_svg


def _result(direction: str, values: list[float]) -> ap.PatchResult:
    info = ap.results.ResultInfo(target="z", direction=ap.Direction(direction), metrics=("logit_diff",),
                                 corruption=ap.corruption.CorruptionSpec(), seed=0,
                                 provenance=ap.types.Provenance(model="hand-made", family="none", weight_hash="-"))
    return ap.PatchResult(dims=("layer", "head"), coords={"layer": [0], "head": list(range(len(values)))},
                          raw={"logit_diff": torch.tensor([[values]])}, clean={"logit_diff": torch.tensor([1.0])},
                          corrupted={"logit_diff": torch.tensor([0.0])}, info=info)


# (direction, values, the head that matters, the negative head, the head that does nothing)
CASES = [("noise", [0.0, 1.0, 1.32, 0.6], 0, 2, 1), ("denoise", [1.0, 0.0, -0.3, 0.4], 0, 2, 1)]


def _hue(rgb: tuple[int, int, int]) -> str:
    r, _, b = rgb
    return "white" if rgb == (255, 255, 255) else ("blue" if b > r else "red")


@pytest.mark.parametrize("direction,values,positive,negative,none", CASES)
def test_svg_heatmap_gives_a_negative_head_the_opposite_colour(direction, values, positive, negative, none):
    svg = heatmap_svg(_result(direction, values), "t")
    fills = [tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in re.findall(r'<rect [^>]*fill="#([0-9a-f]{6})"', svg)]
    assert len(fills) == len(values)
    hues = [_hue(f) for f in fills]
    assert hues[none] == "white"
    assert {hues[positive], hues[negative]} == {"red", "blue"}
    # noising damage lowers the metric (red); denoising restoration raises it (blue)
    assert hues[positive] == ("red" if direction == "noise" else "blue")
    assert f"white = {ap.Direction(direction).no_effect:g} (no effect)" in svg


@pytest.mark.parametrize("direction,values,positive,negative,none", CASES)
def test_plotly_heatmap_is_centred_on_no_effect(direction, values, positive, negative, none):
    trace = _result(direction, values).plot().data[0]
    centre = ap.Direction(direction).no_effect
    assert trace.zmid == centre and trace.zmin == pytest.approx(centre - 1) and trace.zmax == pytest.approx(centre + 1)
    where = lambda v: (v - trace.zmin) / (trace.zmax - trace.zmin)  # noqa: E731  position on the colour bar
    assert where(values[none]) == pytest.approx(0.5)
    assert (where(values[positive]) - 0.5) * (where(values[negative]) - 0.5) < 0  # opposite sides of white
    assert trace.colorscale[0][1] == "rgb(178,24,43)" and trace.colorscale[-1][1] == "rgb(33,102,172)"


def test_the_range_grows_to_the_data_so_overshoot_is_not_clipped():
    s = Scale.of(torch.tensor([0.2, 1.0, 2.5, float("nan")]), 0.0)
    assert s.span == pytest.approx(2.5) and s.position(2.5) == 1.0 and s.position(1.0) == pytest.approx(0.4)
    assert Scale.of(torch.tensor([0.9, 1.1]), 1.0).span == 1.0  # small effects stay pale: one full effect is full colour
    assert Scale.of(torch.tensor([0.9, 1.1]), 1.0).hex(float("nan")) == "#dddddd"
    trace = _result("noise", [1.0, -1.0, 1.5]).plot().data[0]
    assert (trace.zmin, trace.zmid, trace.zmax) == (pytest.approx(-1.0), 1.0, pytest.approx(3.0))


def _cells(text: Text, n: int) -> list[tuple[str, str]]:
    """(character, style) of the first row's n cells."""
    row = text.plain.splitlines()[1]
    start = len(row) - n
    offset = len(text.plain.splitlines()[0]) + 1 + start
    styles = []
    for i in range(n):
        hit = [str(s.style) for s in text.spans if s.start <= offset + i < s.end]
        styles.append(hit[-1] if hit else "")
    return list(zip(row[start:], styles))


@pytest.mark.parametrize("direction,values,positive,negative,none", CASES)
def test_terminal_heatmap_shades_in_256_colours_and_signs_in_8(direction, values, positive, negative, none):
    res = _result(direction, values)
    for mode in ("truecolor", "256"):
        text = block_heatmap(res, 80, colour=mode)
        cells = _cells(text, len(values))
        rgb = [tuple(int(x) for x in re.findall(r"\d+", style)) for _, style in cells]
        assert [c for c, _ in cells] == ["█"] * len(values)
        assert _hue(rgb[none]) == "white" and {_hue(rgb[positive]), _hue(rgb[negative])} == {"red", "blue"}
        assert f"white = {res.info.direction.no_effect:g} (no effect)" in text.plain
    text = block_heatmap(res, 80, colour="standard")
    chars = [c for c, _ in _cells(text, len(values))]
    assert chars[none] == "·" and chars[positive] == ("▼" if direction == "noise" else "▲")
    assert chars[negative] == ("+" if direction == "noise" else "-")
    centre = res.info.direction.no_effect
    assert f"▲ above {centre + 0.5:+.2f}" in text.plain and f"▼ below {centre - 0.5:+.2f}" in text.plain
    assert "█" not in text.plain
