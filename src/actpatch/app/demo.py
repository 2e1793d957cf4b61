"""The demo job: IOI on the bundled model through the same machinery as ``actpatch run``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .._io import read_json
from ..compare import Comparison, compare
from .config import CircuitsConfig, ExperimentConfig, PromptsConfig, TargetConfig
from ..report.summary import result_renderables
from ..results import PatchResult

DEMO_TEMPLATES = [0, 2, 6]
"""IOI templates of one token length (14 with the bundled tokenizer), so positions align."""


def demo_config(n_prompts: int = 8) -> ExperimentConfig:
    return ExperimentConfig(
        model="smollm2-135m",
        prompts=PromptsConfig(builder="ioi", n=n_prompts, seed=0, templates=DEMO_TEMPLATES),
        targets=[TargetConfig(target=t) for t in ("resid_pre", "attn_out", "mlp_out", "z")],
        directions=["denoise", "noise"],
        metrics=["logit_diff", "prob"],
        circuits=CircuitsConfig(methods=["eap", "eap-ig"], ig_steps=5, sizes=[10, 100, 1000, 10000]),
    )


def top_heads_table(cmp: Comparison, k: int = 10) -> Table:
    """Heads with the largest sufficiency or necessity, with the bootstrap CIs their roles were
    decided on (``uncertain`` where an interval straddles a threshold) and the rule as caption;
    narrow enough for 80 columns."""
    from ..agreement import cell_label

    shape = tuple(len(cmp.coords[d]) for d in cmp.dims)
    ci = f" [{cmp.level:.0%} CI]" if cmp.intervals else ""
    table = Table(title=f"Top {k} heads: sufficiency (denoising) vs necessity (noising)", title_justify="left",
                  caption=cmp.thresholds, caption_justify="left")
    table.add_column("head", justify="left", no_wrap=True)
    table.add_column("sufficiency" + ci, justify="right", overflow="fold")
    table.add_column("necessity" + ci, justify="right", overflow="fold")
    table.add_column("role", justify="left", overflow="fold")

    def reading(r: Any, name: str) -> str:
        if not cmp.intervals:
            return f"{r[name]:+.2f}"
        return f"{r[name]:+.2f} [{r[name + '_low']:+.2f}, {r[name + '_high']:+.2f}]"

    for i, r in cmp.strongest(k).iterrows():
        table.add_row(cell_label(cmp.dims, cmp.coords, int(i), shape), reading(r, "sufficiency"),
                      reading(r, "necessity"), r.role.replace("_", " "))
    return table


def clear_stale_demo(out: Path, cfg: ExperimentConfig) -> bool:
    """Delete ``out`` when it holds an earlier demo run (another version or prompt count) so the
    demo starts over; anything else there (another experiment, this demo's own run) is kept and
    resumed or refused by the runner. Returns whether it was deleted."""
    state = out / "run.json"
    if not state.is_file():
        return False
    old = read_json(state, "a demo directory")
    prompts = (old.get("config", {}) if isinstance(old, dict) else {}).get("prompts", {})
    if old.get("digest") != cfg.digest() and prompts.get("builder") == "ioi" and prompts.get("templates") == DEMO_TEMPLATES:
        shutil.rmtree(out)
        return True
    return False


def run_demo(console: Console, n_prompts: int = 8, out: Path = Path("out/demo")) -> dict[str, PatchResult]:
    """Run the demo experiment into ``out`` and print the highlights; circuits found by EAP and
    EAP-IG and their faithfulness go to ``out/circuits.json`` (the report plots them) and
    ``out/edges_*.csv``."""
    from .runner import resolve_model, run_experiment

    cfg = demo_config(n_prompts)
    if clear_stale_demo(out, cfg):
        console.print(f"{out} holds a demo run of another version or prompt count: starting over.", markup=False)
    with console.status("Loading the bundled model (first time: ~20 s to dequantise, then cached)"):
        model = resolve_model(cfg.model)
    console.print(repr(model), markup=False)
    results = run_experiment(cfg, out, model=model, log=lambda s: console.print(s, markup=False))
    den = results["resid_pre_denoise"]
    texts = den.info.prompt_texts
    for clean, corrupted, a, b in texts[:2]:
        console.print(f"  clean:     {clean!r} -> {a!r}\n  corrupted: {corrupted!r} -> {b!r}", markup=False)
    for m, b in den.baselines.items():
        console.print(f"  {m:>10}: clean {b['clean']:+.3f}   corrupted {b['corrupted']:+.3f}")
    for res, what in ((den, "denoising (sufficiency): 1 = restores clean"),
                      (results["resid_pre_noise"], "noising (necessity): 1 = no damage, 0 = broken")):
        console.print(f"resid_pre {what}, logit difference", markup=False)
        for part in result_renderables(res, console.width, k=8, colour=console.color_system):
            console.print(part)
    heads = compare(results["z_denoise"], results["z_noise"], sufficient=0.1, necessary=0.1)
    console.print(top_heads_table(heads))
    console.print(f"Head roles (thresholds 0.1): {heads.counts()}")
    seen = set()
    for name, res in results.items():
        for f in res.findings:
            if (f.code, f.message) not in seen:
                seen.add((f.code, f.message))
                console.print(f"{name}: {f}", markup=False)
    return results
