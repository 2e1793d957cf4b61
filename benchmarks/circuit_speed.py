"""Circuit evaluation cost on the bundled model (IOI): MIB's CPR / CMD with every circuit of the
evaluation batched (the default) against one circuit per forward pass, side by side.

Both runs score the same EAP edges at MIB's ten fractions, signed and absolute (22 circuit runs
with the empty and full graphs); the printed CPR / CMD must agree (batching only changes the
batch size of each matmul). Run:  python benchmarks/circuit_speed.py [--n-prompts 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import actpatch as ap  # noqa: E402
from actpatch.techniques.circuit import CIRCUIT_ROWS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="*", default=None,
                        help="rows per pass to try besides one circuit per pass (default: 64 and CIRCUIT_ROWS)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    model = ap.load_model(device=args.device)
    ps = ap.prompts.ioi(model, n=args.n_prompts, templates=[0, 2, 6])
    t = time.perf_counter()
    edges = ap.edge_attribution(model, ps)
    print(f"{model!r}\n{len(ps)} IOI prompts; EAP over {int((~edges.scores.isnan()).sum())} edges: "
          f"{time.perf_counter() - t:.1f} s")
    one = max(len(g.indices) for g in ps.groups())  # one circuit per pass: rows = the largest group
    timings = {}
    for rows in [one] + (args.rows or [64, CIRCUIT_ROWS]):
        s = ap.circuits.circuit_scores(model, ps, edges, rows=rows)
        timings[rows] = s.seconds
        label = "one circuit per pass" if rows == one else f"{rows} rows per pass"
        print(f"{label:>22}: {s.seconds:6.1f} s   CPR {s.cpr:.4f}  CMD {s.cmd:.4f}")
    for rows, sec in timings.items():
        if rows != one:
            print(f"speed-up of {rows} rows per pass over one circuit per pass: {timings[one] / sec:.2f}x")


if __name__ == "__main__":
    main()
