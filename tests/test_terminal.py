"""Terminal output that fits 80 and 120 columns without cutting a value, results that show
themselves in notebooks (HTML, plotly), and the experiment catalogue (`actpatch runs`, `show`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import actpatch as ap
from actpatch.app import cli
from actpatch.app.catalogue import describe
from actpatch.app.demo import top_heads_table
from actpatch.report.summary import result_renderables, top_cells
from actpatch.testing import random_pairs, tiny_model

from test_cli import TINY, write_config


def _render(renderables, width: int) -> str:
    console = Console(width=width, record=True, force_terminal=True, color_system="truecolor")
    for r in renderables:
        console.print(r)
    return console.export_text()


BORDERS = "│┃┐┓┘┛┤┫╇╈┩"


def _whole(text: str, width: int) -> bool:
    """No line wider than the terminal, no value cut with an ellipsis, and no table cropped at
    the right edge (a line that starts with a border ends with one)."""
    lines = text.splitlines()
    cropped = [l for l in lines if l[:1] in "│┃┏┡└┌├" and l.rstrip()[-1:] not in BORDERS]
    return not cropped and "…" not in text and max(len(l) for l in lines) <= width


@pytest.fixture(scope="module")
def results():
    m = tiny_model("llama_gqa", n_layers=3)
    ps = random_pairs(n=4, T=12, diff=(3, 8))
    out = {}
    for target in ("resid_pre", "z", "mlp_post"):
        kw = {"neurons": range(40)} if target == "mlp_post" else {}
        for d in ("denoise", "noise"):
            out[(target, d)] = ap.sweep(m, ps, target, direction=d, metric=["logit_diff", "prob"], progress=False, **kw)
    return out


@pytest.mark.parametrize("width", [80, 120])
def test_summaries_fit_the_terminal_and_cut_no_value(results, width):
    for (target, d), res in results.items():
        text = _render(result_renderables(res, width, k=10), width)
        assert _whole(text, width) and "..." not in text, (target, d)
        for cell in top_cells(res, 10):  # every top cell's value and interval are printed whole
            assert f"{cell.value:+.3f}" in text and f"{cell.low:+.3f}" in text
        assert "█" in text, (target, width)  # every grid here fits (40 neurons x 3 layers included)
    den, noi = results[("z", "denoise")], results[("z", "noise")]
    table = _render([top_heads_table(ap.compare(den, noi, sufficient=0.1, necessary=0.1))], width)
    assert _whole(table, width)


def test_block_heatmap_is_skipped_when_too_wide(results):
    res = results[("resid_pre", "denoise")]  # 12 positions
    assert "█" in _render(result_renderables(res, 80), 80)
    assert "█" not in _render(result_renderables(res, 12), 40)
    assert "█" not in _render(result_renderables(res, 80, colour=None), 80)  # blocks mean nothing without colour


def test_results_show_themselves_in_notebooks(results):
    res = results[("z", "noise")]
    page = res._repr_html_()
    assert "PatchResult" in page and "Top cells" in page and f"{top_cells(res, 1)[0].value:+.3f}" in page
    fig = res.plot()
    heat = fig.data[0]
    assert heat.type == "heatmap" and heat.zmid == 1.0 and "95% CI" in heat.text[0][0] and "layer=0" in heat.text[0][0]
    assert list(heat.z[0]) == pytest.approx(res.values[0].tolist(), abs=1e-6)
    cmp = ap.compare(results[("z", "denoise")], res)
    assert cmp.plot().data and "Comparison" in cmp._repr_html_()
    assert "<code>" in res.findings[0]._repr_html_()
    curve = ap.circuits.Faithfulness(sizes=[0, 10], values=torch.tensor([0.0, 1.0]), raw=torch.zeros(2, 1), clean=1.0, corrupted=0.0)
    assert list(curve.plot().data[0].y) == [0.0, 1.0]
    m = tiny_model("gpt2")
    fig = ap.plot_attention(m, "When Mary and John went to the store", heads=[(0, 1), (1, 2)])
    assert len(fig.data) == 2 and list(fig.data[0].x)[1] == "1|Mary"
    z = torch.tensor(fig.data[0].z)
    assert torch.allclose(z.sum(-1), torch.ones(z.shape[0]), atol=1e-5)  # each query's attention sums to 1
    with pytest.raises(ap.errors.SiteError, match="at least one"):
        ap.plot_attention(m, [2, 3], heads=[])


@pytest.mark.parametrize("width", [80, 120])
def test_runs_and_show_read_the_saved_files(tmp_path, monkeypatch, width):
    console = Console(width=width, record=True, force_terminal=True, color_system="truecolor")
    monkeypatch.setattr(cli, "console", console)
    cfg = write_config(tmp_path, TINY)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["run", str(cfg), "--out", str(tmp_path / "exps" / "a")]).exit_code == 0
    # a second experiment that stopped half-way, and a third that failed
    part = tmp_path / "exps" / "b"
    assert runner.invoke(cli.app, ["run", str(cfg), "--out", str(part)]).exit_code == 0
    for name in ("z_noise", "z_denoise"):
        for f in (part / name).iterdir():
            f.unlink()
        (part / name).rmdir()
    bad = write_config(tmp_path, TINY.replace("tiny:llama", "tiny:nosuchfamily"))
    assert runner.invoke(cli.app, ["run", str(bad), "--out", str(tmp_path / "exps" / "c")]).exit_code == 1
    console.export_text()  # drop what the runs printed
    r = runner.invoke(cli.app, ["runs", str(tmp_path / "exps")])
    assert r.exit_code == 0
    text = console.export_text()
    assert _whole(text, width)
    rows = {line.split("│")[1].strip(): re.sub(r"\s+", "", line) for line in text.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()}
    assert "complete│4/4" in rows["a"] and "partial│2/4" in rows["b"] and "failed│0/4" in rows["c"]
    lines = [line for line in text.splitlines() if line.startswith("│")]
    for name in ("tiny:llama", "tiny:nosuchfamily"):  # model names are never split across lines
        assert any(name in line for line in lines), (name, text)
    r = runner.invoke(cli.app, ["show", str(tmp_path / "exps" / "a")])
    assert r.exit_code == 0
    text = console.export_text()
    assert _whole(text, width) and "z_noise: top cells" in text and "complete (4/4)" in text
    after = text[text.index("z_noise: top cells"):]  # each result's title comes before its heatmap and table
    assert after.index("█") < after.index("┏") and "(head index)" in after.split("┏")[0]
    status = json.loads((tmp_path / "exps" / "c" / "status.json").read_text())
    assert status["status"] == "failed" and "nosuchfamily" in status["error"]
    r = runner.invoke(cli.app, ["show", str(tmp_path / "nothing")])
    assert r.exit_code == 1


def test_runs_counts_every_kind_of_target_as_the_runner_names_it(tmp_path):
    """The catalogue names results through the config's own sections: a subspace or AtP target
    of a finished run is complete, not partial forever."""
    body = TINY.replace("  - {target: z}\n", "  - {target: resid_pre, method: atp}\n"
                        "  - {target: mlp_out, layers: [0], subspace: {method: diff_of_means, check: false}}\n")
    out = tmp_path / "exps" / "s"
    r = CliRunner().invoke(cli.app, ["run", str(write_config(tmp_path, body)), "--out", str(out)])
    assert r.exit_code == 0, r.output
    entry = describe(out)
    assert sorted(entry.targets) == ["mlp_out_sub_diff_of_means", "resid_pre", "resid_pre_atp"]
    assert (entry.status, entry.done, entry.expected) == ("complete", 6, 6)


def test_the_demo_table_shows_uncertain_roles_with_their_intervals_and_the_rule():
    from test_compare import _per_prompt

    den = _per_prompt("denoise", [[0.26, 0.9], [0.77, 0.9], [0.26, 0.9], [0.77, 0.9]])
    noi = _per_prompt("noise", [[0.1, 0.1]] * 4)
    text = _render([top_heads_table(ap.compare(den, noi))], 120)
    row = next(line for line in text.splitlines() if "[+0.26, +0.77]" in line)
    assert "uncertain" in row
    assert "sufficient and necessary" in text and "uncertain' where one straddles" in text.replace("\n", " ")
    assert _whole(text, 120) and _whole(_render([top_heads_table(ap.compare(den, noi))], 80), 80)


def test_the_cli_reads_results_saved_from_python(tmp_path, monkeypatch):
    console = Console(width=100, record=True, force_terminal=True, color_system="truecolor")
    monkeypatch.setattr(cli, "console", console)
    m, ps = tiny_model("llama", n_layers=2), random_pairs(n=3, T=5, diff=(1, 3))
    single = tmp_path / "saved" / "one_z"
    ap.sweep(m, ps, "z", progress=False).save(single)
    folder = tmp_path / "saved" / "both"
    for direction in ("denoise", "noise"):
        ap.sweep(m, ps, "resid_pre", direction=direction, progress=False).save(folder / f"resid_pre_{direction}")
    runner = CliRunner()
    r = runner.invoke(cli.app, ["runs", str(tmp_path / "saved")])
    assert r.exit_code == 0, r.stdout
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    # the folder itself holds one saved result (one_z) and a folder of two
    assert "saved" in rows["."] and "1/1" in rows["."] and "one_z" in rows["."]
    assert "saved" in rows["both"] and "2/2" in rows["both"]
    assert m.name in rows["both"]
    for target in (single, folder):
        r = runner.invoke(cli.app, ["show", str(target)])
        assert r.exit_code == 0, r.stdout
        assert "top cells" in console.export_text()
        r = runner.invoke(cli.app, ["report", str(target)])
        assert r.exit_code == 0, r.stdout
        assert (target / "report.html").is_file()
    assert "Both directions compared" in (folder / "report.html").read_text()
    assert ap.PatchResult.load(single).shape == (2, 4)  # the report beside it leaves the result readable
