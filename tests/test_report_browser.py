"""The HTML report in a real headless Chromium (Debian's, driven by Playwright; no browser
download): every plot rendered its SVG, no JavaScript errors, user text stays text."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import actpatch as ap
from actpatch.report import write_report
from actpatch.testing import tiny_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    m = tiny_model("llama")
    ps = ap.PromptSet.from_ids([[2, 3, 4, 5, 6], [2, 7, 4, 8, 6]], [[2, 9, 4, 5, 6], [2, 10, 4, 8, 6]], [11, 11], [12, 12],
                               texts=[[f"{EVIL} clean", "corrupted", " a", " b"]] * 2)
    results = {}
    for target in ("resid_pre", "z"):
        for d in ("denoise", "noise"):
            res = ap.sweep(m, ps, target, direction=d, metric=["logit_diff", "prob"], progress=False)
            assert res.info.prompt_texts == ps.texts  # recorded by the experiment core
            res.coords = {**res.coords}
            if "pos" in res.coords:
                res.coords["pos"] = [EVIL if i == 1 else c for i, c in enumerate(res.coords["pos"])]
            results[f"{target}_{d}"] = res
    curve = ap.circuits.faithfulness(m, ps, ap.edge_attribution(m, ps), sizes=[0, 10, 100])
    return write_report(results, tmp_path_factory.mktemp("report"), title=f"report {EVIL}", curves={"EAP": curve})


def test_report_is_self_contained_and_escaped(report):
    page = report.read_text()
    assert re.search(r"<(script|link|img)[^>]*\s(src|href)=", page) is None  # nothing loaded from elsewhere
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js inlined
    assert EVIL not in page  # never raw: escaped in HTML, unicode-escaped in figure JSON
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_report_renders_in_headless_chromium(report):
    from playwright import sync_api as pw

    assert Path(CHROMIUM).exists(), "Debian chromium is installed by `make test` (apt-get install chromium)"
    errors, dialogs = [], []
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(report.as_uri())
            page.wait_for_function("document.querySelectorAll('.plot').length > 0 && "
                                   "[...document.querySelectorAll('.plot')].every(d => d.querySelector('svg.main-svg'))",
                                   timeout=30_000)
            n_plots = page.evaluate("document.querySelectorAll('.plot').length")
            n_svg = page.evaluate("[...document.querySelectorAll('.plot')].filter(d => d.querySelector('svg.main-svg')).length")
            body = page.inner_text("body")
        finally:
            browser.close()
    assert n_plots == 11 and n_svg == n_plots  # 2 targets x 2 directions x 2 metrics + 2 comparisons + 1 curve
    assert not errors, errors
    assert not dialogs
    assert EVIL in body  # shown as text


def test_results_are_placed_by_their_own_direction_not_their_name(tmp_path):
    """A noising result whose name does not end in _noise is shown as noising (it was shown as
    denoising, with the sufficiency label); named halves still pair up."""
    from actpatch.report.html import _pairs

    m = tiny_model("llama")
    ps = ap.PromptSet.from_ids([[2, 3, 4, 5]], [[2, 9, 4, 5]], [11], [12])
    noi = ap.sweep(m, ps, "resid_pre", direction="noise", progress=False)
    den = ap.sweep(m, ps, "resid_pre", direction="denoise", progress=False)
    assert _pairs({"heads": noi}) == [("heads", None, noi)]
    assert _pairs({"r_denoise": den, "r_noise": noi}) == [("r", den, noi)]
    text = write_report({"heads": noi}, tmp_path).read_text()
    assert "noising: 1 = no damage" in text and "denoising: sufficiency" not in text
