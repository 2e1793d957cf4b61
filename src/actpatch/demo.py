"""The demo job: IOI on the bundled model."""

from __future__ import annotations

import torch
from rich.console import Console

IOI = "When Mary and John went to the store, John gave a drink to"


def run_demo(console: Console, n_prompts: int = 8) -> None:
    from .models.loading import load_model

    with console.status("Loading the bundled model (first time: ~20 s to dequantise, then cached)"):
        model = load_model()
    console.print(repr(model))
    ids = torch.tensor([model.to_tokens(IOI)])
    logits = model.logits(ids, last_only=True)[0]
    (mary,), (john,) = model.to_tokens(" Mary"), model.to_tokens(" John")
    console.print(f"{IOI!r} -> logit(' Mary') - logit(' John') = {(logits[mary] - logits[john]).item():.3f}")
