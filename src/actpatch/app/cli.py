"""The ``actpatch`` command line: ``demo``, ``run CONFIG.yaml``, ``report DIR``, ``runs [DIR]``,
``show RUN``, ``models``.

Errors print one line and exit with status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console

app = typer.Typer(help="Activation patching on Hugging Face causal LMs.", no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors into one line and exit status 1 (tracebacks with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import ActpatchError

        try:
            return fn(*args, **kwargs)
        except (ActpatchError, OSError) as e:
            if _state["debug"]:
                raise
            msg = str(e).strip().splitlines()
            err_console.print(f"[bold red]error:[/bold red] {msg[0] if msg else type(e).__name__}", markup=True, highlight=False)
            for line in msg[1:]:
                err_console.print(f"  {line}", markup=False, highlight=False)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_friendly
def models() -> None:
    """List the supported model families and the bundled models (loaded offline by name)."""
    from ..models.adapters import supported_families
    from ..models.loading import BUNDLED

    console.print("[bold]Supported families[/bold]")
    console.print(supported_families(), markup=False)
    console.print("[bold]Bundled[/bold]")
    for name, desc in BUNDLED.items():
        console.print(f"  {name}: {desc}", markup=False)


def _finish(results: dict, out: Path, title: str, t0: float) -> None:
    from ..techniques.circuit import load_curves
    from ..report import write_report

    from ..techniques.mib import load_mib
    from .subspaces import load_das

    from ..techniques.self_repair import load_direct_total

    from .extras import load_extras

    path = write_report(results, out, title=title, curves=load_curves(out / "circuits.json"), das=load_das(out),
                        mib=load_mib(out / "mib.json"), direct_total=load_direct_total(out / "direct_total.json"),
                        extras=load_extras(out))
    n_find = sum(len(r.findings) for r in results.values())
    console.print(f"{len(results)} results and {n_find} findings in {time.perf_counter() - t0:.1f} s")
    console.print(f"Report: [bold]{path.resolve()}[/bold]  (figures as SVG in {(out / 'figures').resolve()})")


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Output directory (results, report.html, figures/)."),
    n_prompts: int = typer.Option(8, help="IOI prompts to use."),
) -> None:
    """IOI on the bundled model: residual stream, attention and MLP outputs per (layer, position)
    and every head, both directions, logit difference and probability, findings, report."""
    from .demo import run_demo

    t0 = time.perf_counter()
    results = run_demo(console, n_prompts=n_prompts, out=out)
    _finish(results, out, "actpatch demo: IOI on SmolLM2-135M-Instruct", t0)


@app.command()
@_friendly
def run(
    config: Path = typer.Argument(..., help="Experiment YAML (see examples/)."),
    out: Path = typer.Option(None, help="Output directory (default: out/<config name>)."),
    executor: str = typer.Option("local", help="Where sweeps run: local, or ray (a Ray cluster)."),
    address: str = typer.Option(None, help="With --executor ray: the cluster (host:6379, ray://host:10001 or auto); "
                                           "default: the one RAY_ADDRESS names, else a new local one."),
    workers: int = typer.Option(None, help="With --executor ray: actors to start (default: one per GPU, else per CPU)."),
) -> None:
    """Run an experiment from a config; resumes an interrupted run in the same directory."""
    from ..errors import ConfigError
    from ..experiment.executor import EXECUTORS
    from .config import load_config
    from .runner import run_experiment

    t0 = time.perf_counter()
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor}: use {' or '.join(EXECUTORS)}.")
    if executor == "local" and (address or workers):
        raise ConfigError("--address and --workers go with --executor ray.")
    cfg = load_config(config)
    out = out or Path("out") / config.stem
    chosen: Any = executor
    if executor == "ray":
        from ..experiment.ray_executor import RayExecutor

        chosen = RayExecutor(address, workers=workers)
    try:
        results = run_experiment(cfg, out, log=lambda s: console.print(s, markup=False), executor=chosen)
    finally:
        if executor == "ray":
            chosen.close()
    _finish(results, out, f"actpatch: {config.name}", t0)


@app.command()
@_friendly
def report(directory: Path = typer.Argument(..., help="A run directory, a result saved with res.save, or a folder of them.")) -> None:
    """Rebuild report.html and figures from saved results."""
    from ..report import write_report
    from .runner import load_experiment

    from ..techniques.circuit import load_curves

    _, results = load_experiment(directory)
    from ..techniques.mib import load_mib
    from .subspaces import load_das

    from ..techniques.self_repair import load_direct_total
    from .extras import load_extras

    path = write_report(results, directory, title=f"actpatch: {directory.name}",
                        curves=load_curves(directory / "circuits.json"), das=load_das(directory),
                        mib=load_mib(directory / "mib.json"),
                        direct_total=load_direct_total(directory / "direct_total.json"),
                        extras=load_extras(directory))
    console.print(f"Report: [bold]{path.resolve()}[/bold]")


@app.command()
@_friendly
def doctor(model: str = typer.Argument("smollm2-135m", help="A model name, HF id / directory, or tiny:<family>.")) -> None:
    """Check that actpatch computes the right thing on a model: each invariant, pass or fail, with
    the measured error; exit status 1 when one fails."""
    from rich.table import Table

    from ..doctor import doctor as run_doctor
    from .runner import resolve_model

    with console.status(f"Loading {model}"):
        m = resolve_model(model)
    report = run_doctor(m)
    table = Table(title=f"doctor: {report.model} ({report.family})", title_justify="left")
    for col in ("check", "result", "max error", "tolerance", "what was compared"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.name, "[green]pass[/green]" if c.passed else "[bold red]FAIL[/bold red]", f"{c.error:.2e}",
                      f"{c.tolerance:.0e}", c.detail)
    console.print(table)
    for what, secs in report.estimates.items():
        console.print(f"estimated {what}: {secs:.1f} s on these 2 random 12-token prompts", markup=False)
    console.print(f"{'all checks pass' if report.passed else 'FAILED: ' + ', '.join(c.name for c in report.failed)} "
                  f"({report.seconds:.1f} s)", markup=False)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@_friendly
def runs(directory: Path = typer.Argument(Path("out"), help="Folder to search for experiment directories.")) -> None:
    """List the experiments under a folder: model, prompts, targets, date, status (from the saved files)."""
    from rich.table import Table

    from .catalogue import find_experiments

    entries = find_experiments(directory)
    if not entries:
        console.print(f"No experiments under {directory} (directories with run.json, or results saved with "
                      f"res.save).", markup=False)
        return
    table = Table(title=f"Experiments under {directory}", title_justify="left")
    for col in ("run", "model", "prompts", "targets", "date", "status", "done"):  # names and dates never split
        table.add_column(col, overflow="fold", no_wrap=col in ("model", "date", "status", "done"))
    colours = {"complete": "green", "partial": "yellow", "failed": "red", "saved": "cyan"}
    for e in entries:
        name = str(e.path.relative_to(directory)) if e.path != directory else "."
        table.add_row(name, e.model, e.prompts, ", ".join(e.targets), e.date, f"[{colours[e.status]}]{e.status}[/]",
                      f"{e.done}/{e.expected}")
    console.print(table)


@app.command()
@_friendly
def show(run_dir: Path = typer.Argument(..., metavar="RUN", help="An experiment directory, a result saved with res.save, or a folder of them.")) -> None:
    """Summarise one experiment from its saved files: status, then each result's top cells and findings."""
    from ..report.summary import result_renderables
    from ..techniques.circuit import load_curves
    from .catalogue import describe
    from .runner import load_experiment

    e = describe(run_dir)
    console.print(f"[bold]{e.path}[/bold]", highlight=False)
    console.print(f"{e.status} ({e.done}/{e.expected}); model {e.model}; prompts {e.prompts}; {e.date}", highlight=False)
    if e.error:
        console.print(f"[red]error:[/red] {e.error}", highlight=False)
    _, results = load_experiment(run_dir)
    for name, res in results.items():
        for part in result_renderables(res, console.width, k=8, title=f"{name}: top cells ({res.metric})",
                                       colour=console.color_system):
            console.print(part)
        for f in res.findings:
            if f.level.value != "info":
                console.print(f"  {f}", markup=False)
    for name, curve in load_curves(Path(run_dir) / "circuits.json").items():
        console.print(f"circuit faithfulness, {name}: " + ", ".join(
            f"{n} edges {v:+.2f}" for n, v in zip(curve.sizes, curve.values.tolist())), markup=False)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
