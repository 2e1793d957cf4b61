"""The demo job: IOI on the bundled model, a residual-stream denoising sweep printed as a table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .results import PatchResult


def result_table(res: PatchResult, title: str, metric: str | None = None) -> Table:
    """A layer x position table of normalised effects (colour = strength)."""
    values = res.normalised(metric)
    table = Table(title=title, show_lines=False, pad_edge=False)
    table.add_column("layer", justify="right")
    for label in res.coords["pos"]:
        table.add_column(str(label).replace("\n", " "), justify="right")
    for i, layer in enumerate(res.coords["layer"]):
        cells = []
        for v in values[i].tolist():
            style = "bold green" if v > 0.5 else "green" if v > 0.2 else "red" if v < -0.1 else "dim"
            cells.append(f"[{style}]{v:+.2f}[/{style}]")
        table.add_row(str(layer), *cells)
    return table


def run_demo(console: Console, n_prompts: int = 8, out: Path | None = None) -> PatchResult:
    """Load the bundled model, build IOI prompts of one length, print baselines and the
    resid_pre denoising sweep, save the result under ``out``."""
    from .models.loading import load_model
    from .patching import sweep
    from .prompts import ioi, keep_correct

    with console.status("Loading the bundled model (first time: ~20 s to dequantise, then cached)"):
        model = load_model()
    console.print(repr(model))
    prompts = ioi(model, n=n_prompts, seed=0, templates=[0, 2, 6])  # three templates of 14 tokens
    prompts, share = keep_correct(model, prompts)
    console.print(f"IOI: {len(prompts)} prompts (model right on {share:.0%}), corruption: S2 -> IO name")
    for clean, corrupted, a, b in prompts.meta["texts"][:2]:
        console.print(f"  clean:     {clean!r} -> {a!r}\n  corrupted: {corrupted!r} -> {b!r}", markup=False)
    res = sweep(model, prompts, "resid_pre", direction="denoise", metric=["logit_diff", "prob"])
    for m, b in res.baselines.items():
        console.print(f"  {m:>10}: clean {b['clean']:+.3f}   corrupted {b['corrupted']:+.3f}")
    console.print(result_table(res, "resid_pre denoising, logit difference (1 = clean, 0 = corrupted)"))
    for f in res.findings:
        console.print(str(f), markup=False)
    if out is not None:
        path = res.save(out / "ioi_resid_pre_denoise")
        console.print(f"Saved the result to {path}")
    return res
