"""What each technique costs on the bundled model (IOI), in seconds and in forward-pass
equivalents, measured side by side in one run: the numbers behind the cost table in
docs/circuits.md.

One forward-pass equivalent is a plain forward pass of the same prompts (all of them at once,
best of ten after three warm-ups), timed in the same process. Each technique runs once on the same prompts.

Run:  python benchmarks/method_cost.py [--n-prompts 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import actpatch as ap  # noqa: E402
from actpatch import Site  # noqa: E402
from actpatch.circuits import Graph  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    model = ap.load_model(device=args.device)
    ps = ap.prompts.ioi(model, n=args.n_prompts, seed=0, templates=[0, 2, 6])
    ids = ps.groups()[0].clean.to(model.device)
    for _ in range(3):
        model.logits(ids)  # warm-up
    fwd = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        model.logits(ids)
        fwd = min(fwd, time.perf_counter() - t)
    print(f"{model!r}\n{len(ps)} IOI prompts x {ids.shape[1]} tokens; one forward pass {fwd * 1000:.0f} ms\n")
    print(f"{'technique':58s} {'seconds':>8s} {'fwd eq.':>8s} {'per unit':>14s}")
    edges: dict[str, object] = {}

    def row(name: str, fn, units: int | None = 1, unit: str = "") -> None:  # noqa: ANN001
        t = time.perf_counter()
        out = fn()
        s = time.perf_counter() - t
        if units is None:  # counted from the result
            units = len(out.edges)
            name = name.format(units)
        per = f"{s / units / fwd:7.2f} / {unit}" if unit else ""
        print(f"{name:58s} {s:8.1f} {s / fwd:8.1f} {per:>14s}", flush=True)
        return out

    L, H = model.n_layers, model.n_heads
    row("exact sweep, z (all 270 heads, batched engine)",
        lambda: ap.sweep(model, ps, "z", progress=False), L * H, "head")
    row("exact sweep, resid_pre (30 layers x all positions)",
        lambda: ap.sweep(model, ps, "resid_pre", progress=False), L * ids.shape[1], "cell")
    row("AtP, z (all heads)", lambda: ap.attribute(model, ps, "z"))
    row("AtP*, z (GradDrop)", lambda: ap.attribute(model, ps, "z", grad_drop=True))
    row("path patching, 36 heads -> resid_final (batched)",
        lambda: ap.path_sweep(model, ps, [Site("resid_final")], layers=[20, 23, 24, 29], progress=False), 36, "sender")
    row("path patching, 36 heads -> resid_final (reference)",
        lambda: ap.path_sweep(model, ps, [Site("resid_final")], layers=[20, 23, 24, 29], progress=False,
                              engine="reference"), 36, "sender")
    for layout in ("mib", "kv"):
        n = Graph.of(model, layout).n_edges
        edges[layout] = row(f"EAP, {layout} layout ({n} edges)", lambda: ap.edge_attribution(model, ps, layout=layout))
        row(f"EAP-IG (5 steps), {layout} layout",
            lambda: ap.edge_attribution(model, ps, ig_steps=5, layout=layout))
        keep = ap.circuits.top_edges(edges[layout], max(1, n // 100))  # type: ignore[arg-type]
        row(f"one exact circuit run (1 % of edges), {layout} layout",
            lambda: ap.circuits.run_circuit(model, ps, keep, layout=layout))
        row(f"exact edge cuts, {{}} edges one at a time ({layout} layout)",
            lambda: ap.circuits.validate_edges(model, ps, edges[layout], k=5, n_random=5, exhaustive=False),  # type: ignore[arg-type]
            None, "edge")


if __name__ == "__main__":
    main()
