"""The ``actpatch`` command line (typer)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Activation patching on Hugging Face causal LMs.", no_args_is_help=True, add_completion=False)
console = Console()


@app.command()
def models() -> None:
    """List the supported model families and the bundled model."""
    from .models.adapters import supported_families
    from .models.loading import BUNDLED

    console.print("[bold]Supported families[/bold]")
    console.print(supported_families())
    console.print("[bold]Bundled[/bold]")
    for name, desc in BUNDLED.items():
        console.print(f"  {name}: {desc}")


@app.command()
def demo(
    n_prompts: int = typer.Option(8, help="IOI prompts to use."),
    out: Path = typer.Option(Path("out/demo"), help="Where to save the results."),
) -> None:
    """IOI on the bundled model: baselines and a residual-stream denoising sweep."""
    from .demo import run_demo

    run_demo(console, n_prompts=n_prompts, out=out)


if __name__ == "__main__":  # pragma: no cover
    app()
