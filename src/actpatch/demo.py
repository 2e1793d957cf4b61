"""The demo job: IOI on the bundled model, both directions, compared, with intervals and findings."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .compare import Comparison, compare
from .results import PatchResult


def grid_table(res: PatchResult, title: str, metric: str | None = None) -> Table:
    """A 2-D table of normalised effects (rows: first dim, columns: second), coloured by size."""
    values = res.normalised(metric)
    rows, cols = res.dims
    table = Table(title=title, pad_edge=False)
    table.add_column(rows, justify="right")
    for label in res.coords[cols]:
        table.add_column(str(label), justify="right")
    for i, r in enumerate(res.coords[rows]):
        cells = []
        for v in values[i].tolist():
            style = "bold green" if v > 0.5 else "green" if v > 0.2 else "red" if v < -0.1 else "dim"
            cells.append(f"[{style}]{v:+.2f}[/{style}]")
        table.add_row(str(r), *cells)
    return table


def top_components_table(cmp: Comparison, den: PatchResult, noi: PatchResult, k: int = 12) -> Table:
    """The components with the largest max(sufficiency, necessity), with 95% bootstrap CIs."""
    ci_d, ci_n = den.ci(n_boot=1000), noi.ci(n_boot=1000)
    df = cmp.to_pandas()
    df["ci_d"] = [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(ci_d.low.flatten().tolist(), ci_d.high.flatten().tolist())]
    # necessity = 1 - noised value: its interval is 1 - (high, low)
    df["ci_n"] = [f"[{1 - hi:+.2f}, {1 - lo:+.2f}]" for lo, hi in zip(ci_n.low.flatten().tolist(), ci_n.high.flatten().tolist())]
    df["score"] = df[["sufficiency", "necessity"]].abs().max(axis=1)
    table = Table(title=f"Top {k} heads: denoising (sufficiency) vs noising (necessity), 95% bootstrap CIs")
    for col in (*cmp.dims, "sufficiency", "95% CI", "necessity", "95% CI ", "role"):
        table.add_column(col, justify="right" if col != "role" else "left")
    for _, r in df.sort_values("score", ascending=False).head(k).iterrows():
        table.add_row(*(str(r[d]) for d in cmp.dims), f"{r.sufficiency:+.2f}", r.ci_d, f"{r.necessity:+.2f}", r.ci_n, r.role)
    return table


def run_demo(console: Console, n_prompts: int = 8, out: Path | None = None) -> dict[str, PatchResult]:
    """IOI on the bundled model: residual stream and per-head sweeps in both directions,
    compared, with confidence intervals and findings; results saved under ``out``."""
    from .models.loading import load_model
    from .patching import sweep
    from .prompts import ioi, keep_correct

    with console.status("Loading the bundled model (first time: ~20 s to dequantise, then cached)"):
        model = load_model()
    console.print(repr(model))
    prompts = ioi(model, n=n_prompts, seed=0, templates=[0, 2, 6])  # three templates of one token length
    prompts, share = keep_correct(model, prompts)
    console.print(f"IOI: {len(prompts)} prompts (model right on {share:.0%}), corruption: S2 -> IO name")
    for clean, corrupted, a, b in prompts.meta["texts"][:2]:
        console.print(f"  clean:     {clean!r} -> {a!r}\n  corrupted: {corrupted!r} -> {b!r}", markup=False)
    results: dict[str, PatchResult] = {}
    for target in ("resid_pre", "z"):
        for direction in ("denoise", "noise"):
            results[f"{target}_{direction}"] = sweep(model, prompts, target, direction=direction,
                                                     metric=["logit_diff", "prob"])
    base = results["resid_pre_denoise"]
    for m, b in base.baselines.items():
        console.print(f"  {m:>10}: clean {b['clean']:+.3f}   corrupted {b['corrupted']:+.3f}")
    compare(results["resid_pre_denoise"], results["resid_pre_noise"])
    console.print(grid_table(results["resid_pre_denoise"], "resid_pre denoising (sufficiency), logit difference"))
    console.print(grid_table(results["resid_pre_noise"], "resid_pre noising (1 = no damage), logit difference"))
    heads = compare(results["z_denoise"], results["z_noise"], sufficient=0.1, necessary=0.1)
    console.print(top_components_table(heads, results["z_denoise"], results["z_noise"]))
    console.print(f"Head roles (thresholds 0.1): {heads.counts()}")
    seen = set()
    for name, res in results.items():
        for f in res.findings:
            if (f.code, f.message) not in seen:
                seen.add((f.code, f.message))
                console.print(f"{name}: {f}", markup=False)
    if out is not None:
        for name, res in results.items():
            res.save(out / name)
        console.print(f"Saved {len(results)} results under {out}/")
    return results
