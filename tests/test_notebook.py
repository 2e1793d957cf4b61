"""The example notebook runs end to end (executed with nbclient, so it cannot rot) and its
cells show what they promise: the result's HTML summary and plotly figures."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "examples" / "ioi_notebook.ipynb"


@pytest.mark.slow
def test_example_notebook_executes_and_renders(bundled):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = {i: [o for o in c.get("outputs", []) if o.get("output_type") in ("execute_result", "display_data")]
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    source = {i: nb.cells[i].source for i in outputs}
    by_line = {s.strip().splitlines()[-1]: outputs[i] for i, s in source.items()}
    def shown(line: str, mime: str) -> list:
        return [o["data"][mime] for o in by_line[line] if mime in o["data"]]

    assert "PatchResult" in shown("den", "text/html")[0] and "Top cells" in shown("den", "text/html")[0]
    figures = {line: shown(line, "application/vnd.plotly.v1+json")
               for line in ("den.plot()", "cmp.plot()", "ap.plot_attention(model, prompts.clean[0], heads=heads)")}
    assert all(len(f) == 1 for f in figures.values()), {k: len(v) for k, v in figures.items()}
    heat = figures["den.plot()"][0]["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 30 and "95% CI" in heat["text"][0][0]
    assert "Comparison" in shown("cmp", "text/html")[0]
    assert "<code>" in shown("den.findings[0]", "text/html")[0]
