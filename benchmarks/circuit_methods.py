"""Circuit discovery methods side by side on the bundled model (IOI), in MIB's graph layout:
EAP, EAP-IG, RelP, a learned edge mask and random edges, each scored by MIB's CPR (higher is
better) and CMD (lower is better) over the same ten edge fractions and the same exact circuit
runs, with the wall time of finding the edges and of scoring them, measured in one run.

Run:  python benchmarks/circuit_methods.py [--n-prompts 8] [--ig-steps 5] [--mask-steps 60]
          [--mask-lr 0.3] [--mask-density 0.05] [--methods eap eap-ig relp mask random]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import actpatch as ap  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--mask-steps", type=int, default=60)
    parser.add_argument("--mask-lr", type=float, default=0.3)
    parser.add_argument("--mask-density", type=float, default=0.05)
    parser.add_argument("--methods", nargs="*", default=["eap", "eap-ig", "relp", "mask", "random"])
    parser.add_argument("--checkpoint", default=None, help="resume the mask's training from / save it to this file")
    args = parser.parse_args()
    model = ap.load_model()
    ps = ap.prompts.ioi(model, n=args.n_prompts, templates=[0, 2, 6])
    print(f"{model!r}\n{len(ps)} IOI prompts, MIB's layout "
          f"({ap.circuits.Graph.of(model, 'mib').n_edges} edges) and ten fractions")
    for name in args.methods:
        if name != "mask":
            s = ap.circuits.compare_methods(model, ps, [name], ig_steps=args.ig_steps)[name]
            found = None
        else:
            t = time.perf_counter()
            mask = ap.circuits.learn_edge_mask(model, ps, density=args.mask_density, steps=args.mask_steps,
                                               lr=args.mask_lr, checkpoint=args.checkpoint)
            found = time.perf_counter() - t
            s = ap.circuits.circuit_scores(model, ps, mask)
            last = mask.extra["history"][-1]
            print(f"  mask: {args.mask_steps} steps in {found:.1f} s ({found / args.mask_steps:.1f} s a step), "
                  f"final expected density {last['density']:.4f}, faithfulness term {last['faithfulness_term']:.4f}")
            for w in mask.extra["warnings"]:
                print(f"  mask warning: {w}")
        total = s.seconds + (found or 0.0)
        print(f"  {name:7s} CPR {s.cpr:.3f}  CMD {s.cmd:.4f}  {total:7.1f} s   "
              f"f(signed) = {[round(v, 2) for v in s.signed.tolist()]}", flush=True)


if __name__ == "__main__":
    main()
