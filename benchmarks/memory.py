"""Memory budgets on the bundled model: AtP (every head), EAP-IG and an exact sweep of the
residual stream at named positions (S1, IO, S2, end) on IOI prompts behind a long distractor
prefix, at several budgets and unbounded. Each run is its own process: the peak
resident memory is read from /proc after the model is loaded (the peak is reset there, so
loading does not count) and set against the budget; the time against the unbounded run's.

The budget covers activations and buffers, not the weights, so "used" is the peak resident
memory above what the process held before the run (model, prompts, Python).

Goal (issue 28): used <= budget + 10 %, time at 4 GiB <= 1.5 x unbounded. "Unbounded" is the
--reference budget (default 16 GiB): 8 prompts of 1,024 tokens at once would need about 27 GB
for AtP alone, more than a 24 GiB machine has; at 16 GiB they run a few at a time without
recomputation, at the same cost per prompt.

Run:  PYTHONPATH=src python benchmarks/memory.py [--prompts 8] [--tokens 1024] [--steps 5]
      [--budgets 1GiB,2GiB,4GiB] [--techniques atp,eap-ig,sweep]
(with MALLOC_MMAP_THRESHOLD_=131072, so that freed buffers go back to the system at once)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def one(technique: str, budget: str, n: int, tokens: int, steps: int) -> dict:
    """One run in this process; returns what it measured."""

    import actpatch as ap

    model = ap.load_model()
    short = ap.prompts.ioi(model, n=n, seed=0, templates=[0, 2, 6])
    prompts = ap.prompts.long_context(model, short, tokens - short.seq_len)
    chunks: list[int] = []  # the sweep's chunks: prompt rows each (prompts of one layout share a plan)
    if technique == "sweep":
        from actpatch.techniques.exact import SweepJob

        prepare = SweepJob.prepare
        SweepJob.prepare = lambda job, runs, outcome=None: (chunks.append(runs.rows), prepare(job, runs, outcome))[1]
        plan = None
        run = lambda: ap.sweep(model, prompts, "resid_pre", positions=["S1", "IO", "S2", "end"],  # noqa: E731
                               direction="noise", progress=False, memory_budget=budget)
    elif technique == "atp":
        plan = ap.experiment.estimate(model, prompts, "atp", target="z", memory_budget=budget)
        run = lambda: ap.attribute(model, prompts, "z", direction="noise", memory_budget=budget)  # noqa: E731
    else:
        plan = ap.experiment.estimate(model, prompts, "eap-ig", ig_steps=steps, memory_budget=budget)
        run = lambda: ap.edge_attribution(model, prompts, ig_steps=steps, memory_budget=budget)  # noqa: E731
    # page the weights in (the bundled model's cache is memory-mapped: its pages join the resident
    # set on first use) and warm autograd up, on a short prompt, before the baseline is read
    ap.attribute(model, short.subset([0]), "z", direction="noise")
    chunks.clear()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    t = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t
    peak = _status("VmHWM")
    check = float(result.scores.nan_to_num().abs().sum()) if technique == "eap-ig" else float(result.values.abs().sum())
    return {"technique": technique, "budget": budget, "seconds": seconds, "used": peak - before,
            "estimate": plan.bytes if plan else 0, "rows": plan.rows if plan else max(chunks),
            "chunks": plan.chunks if plan else len(chunks),
            "recompute": plan.recompute if plan else False, "positions": plan.positions if plan else 0,
            "check": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--budgets", default="1GiB,2GiB,4GiB")
    parser.add_argument("--techniques", default="atp,eap-ig,sweep")
    parser.add_argument("--reference", default="16GiB", help="the budget the times are set against")
    parser.add_argument("--one", nargs=2, metavar=("TECHNIQUE", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.prompts, args.tokens, args.steps)))
        return
    from actpatch.memory import format_bytes, parse_budget

    print(f"{args.prompts} IOI prompts behind filler, {args.tokens} tokens each; bundled SmolLM2-135M; "
          f"EAP-IG with {args.steps} steps")
    print(f"{'technique':>9} {'budget':>9} {'rows':>4} {'chunks':>6} {'recomp':>6} {'span':>5} {'estimate':>10} {'used':>10} {'used/budget':>11} "
          f"{'s':>7} {'x ' + args.reference:>11}")
    for technique in args.techniques.split(","):
        rows = []
        for budget in [args.reference] + args.budgets.split(","):
            cmd = [sys.executable, __file__, "--one", technique, budget, "--prompts", str(args.prompts),
                   "--tokens", str(args.tokens), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
            if out.returncode:
                print(f"{technique:>9} {budget:>9} refused or failed: {out.stderr.strip().splitlines()[-1]}")
                if not rows:
                    break
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            base = rows[0]
            share = f"{r['used'] / parse_budget(budget):.2f}"
            same = abs(r["check"] - base["check"]) <= 1e-4 * abs(base["check"])
            print(f"{technique:>9} {budget:>9} {r['rows']:>4} {r['chunks']:>6} {str(r['recompute']):>6} {r['positions'] or '-':>5} "
                  f"{format_bytes(r['estimate']) if r['estimate'] else '-':>10} "
                  f"{format_bytes(r['used']):>10} {share:>11} {r['seconds']:>7.1f} "
                  f"{r['seconds'] / base['seconds']:>11.2f}{'' if same else '  VALUES DIFFER'}")


if __name__ == "__main__":
    main()
