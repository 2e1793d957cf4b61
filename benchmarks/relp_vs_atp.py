"""RelP against AtP against exact patching on the bundled model (IOI): how well each estimate
tracks exact activation patching for MLP outputs (per layer and position) and attention heads,
side by side in one run, with wall times.

Correlations are over the cells (Pearson on the raw effect estimates, Spearman on ranks); the
"top-10 recall" is the share of the exact top 10 (by |effect|) that the estimate ranks in its
top 20.

Run:  python benchmarks/relp_vs_atp.py [--n-prompts 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actpatch as ap  # noqa: E402


def _rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    model = ap.load_model(device=args.device)
    ps = ap.prompts.ioi(model, n=args.n_prompts, seed=0, templates=[0, 2, 6])
    print(f"{model!r}\n{len(ps)} IOI prompts, noising, logit difference\n")
    print(f"{'target':22s} {'method':6s} {'seconds':>8s} {'pearson':>8s} {'spearman':>9s} {'top-10 recall':>14s}")
    for target, options in (("mlp_out", dict(per_position=True)), ("z", {})):
        t = time.perf_counter()
        exact = ap.sweep(model, ps, target, direction="noise", progress=False, **options)
        print(f"{target + ' ' + 'x'.join(map(str, exact.shape)):22s} {'exact':6s} {time.perf_counter() - t:8.1f}")
        x = exact.values.flatten().double() - 1.0  # noising: no effect is 1
        top = set(x.abs().argsort(descending=True)[:10].tolist())
        for method in ("atp", "relp"):
            t = time.perf_counter()
            est = ap.attribute(model, ps, target, direction="noise", method=method, **options)
            s = time.perf_counter() - t
            e = est.values.flatten().double() - 1.0
            recall = len(top & set(e.abs().argsort(descending=True)[:20].tolist())) / 10
            print(f"{'':22s} {method:6s} {s:8.1f} {_pearson(e, x):8.3f} {_pearson(_rank(e), _rank(x)):9.3f} "
                  f"{recall:14.1f}")


if __name__ == "__main__":
    main()
