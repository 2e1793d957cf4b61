"""Attribution patching cost, side by side with exact patching, on the bundled model (IOI).

Prints AtP's cost in forward-pass equivalents (target: <= 4 for all heads x positions), AtP with
GradDrop's (one backward pass per layer), the exact batched sweep's time for the same grid, and
how well they agree (Spearman; GradDrop scores magnitudes, so against |exact effect|).
Run:  python benchmarks/attribution_speed.py [--n-prompts 8]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actpatch as ap  # noqa: E402
from actpatch.stats import spearman  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    args = parser.parse_args()
    model = ap.load_model()
    model.weight_hash  # once, outside the timings
    ps = ap.prompts.ioi(model, n=args.n_prompts, templates=[0, 2, 6])
    ids = torch.stack(ps.clean)
    model.logits(ids, last_only=True)
    t = time.perf_counter()
    for _ in range(5):
        model.logits(ids, last_only=True)
    fwd = (time.perf_counter() - t) / 5
    print(f"{model!r}\n{len(ps)} IOI prompts of {ids.shape[1]} tokens; one forward pass: {fwd * 1000:.1f} ms")
    for per_position in (False, True):
        grid = "heads x positions" if per_position else "heads (all positions)"
        t = time.perf_counter()
        est = ap.attribute(model, ps, "z", direction="noise", per_position=per_position)
        t_atp = time.perf_counter() - t
        t = time.perf_counter()
        exact = ap.sweep(model, ps, "z", direction="noise", per_position=per_position, progress=False)
        t_exact = time.perf_counter() - t
        t = time.perf_counter()
        gd = ap.attribute(model, ps, "z", direction="noise", per_position=per_position, grad_drop=True)
        t_gd = time.perf_counter() - t
        rho = spearman(est.values.flatten(), exact.values.flatten())
        size = (exact.values - 1).abs().flatten()  # |exact effect|: what magnitudes are compared with
        rho_abs = spearman((est.values - 1).abs().flatten(), size)
        rho_gd = spearman((gd.values - 1).abs().flatten(), size)
        print(f"\nz, {grid}: {est.values.numel()} cells")
        print(f"  AtP            {t_atp:7.2f} s = {t_atp / fwd:5.1f} forward passes")
        print(f"  AtP+GradDrop   {t_gd:7.2f} s = {t_gd / fwd:5.1f} forward passes (1 + {model.n_layers - 1} partial backward passes)")
        print(f"  exact batched  {t_exact:7.2f} s = {t_exact / fwd:5.0f} forward passes ({t_exact / t_atp:.0f}x AtP)")
        print(f"  Spearman(AtP, exact) = {rho:.3f}; against |exact effect|: |AtP| {rho_abs:.3f}, GradDrop {rho_gd:.3f}")


if __name__ == "__main__":
    main()
