"""MIB's CPR / CMD on the bundled model (IOI) in both graph layouts, side by side in one run.

SmolLM2-135M has grouped-query attention (9 heads, 3 KV heads), so MIB's layout (a key and value
input per query head, 123,211 edges) and actpatch's KV-head layout (70,651 edges) are different
graphs, and "0.1 % of the edges" different circuits. For each layout this scores EAP, EAP-IG and
random edges at MIB's ten fractions (22 exact circuit runs each) and prints CPR (higher is
better), CMD (lower is better) and the wall time of scoring plus evaluating. The numbers in the
MIB layout are the ones to set beside MIB's leaderboard (on another model: MIB has no SmolLM2).

Run:  python benchmarks/mib_layout.py [--n-prompts 8] [--ig-steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import actpatch as ap  # noqa: E402
from actpatch.circuits import Graph  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--layouts", nargs="*", default=["mib", "kv"])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    model = ap.load_model(device=args.device)
    ps = ap.prompts.ioi(model, n=args.n_prompts, templates=[0, 2, 6])
    print(f"{model!r}\n{len(ps)} IOI prompts, EAP-IG with {args.ig_steps} steps, MIB's ten fractions")
    for layout in args.layouts:
        n = Graph.of(model, layout).n_edges
        t = time.perf_counter()
        edges = ap.edge_attribution(model, ps, layout=layout)
        eap_s = time.perf_counter() - t
        t = time.perf_counter()
        ap.circuits.circuit_scores(model, ps, edges)
        runs_s = time.perf_counter() - t
        print(f"\n{layout} layout: {n} edges; one EAP pass {eap_s:.1f} s, one MIB evaluation (22 circuit runs) "
              f"{runs_s:.1f} s")
        scores = ap.circuits.compare_methods(model, ps, ("eap", "eap-ig", "random"), ig_steps=args.ig_steps,
                                             layout=layout)
        for name, s in scores.items():
            print(f"  {name:7s} CPR {s.cpr:.3f}  CMD {s.cmd:.3f}  {s.seconds:6.1f} s   "
                  f"f(signed) = {[round(v, 2) for v in s.signed.tolist()]}")


if __name__ == "__main__":
    main()
