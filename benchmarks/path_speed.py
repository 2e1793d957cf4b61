"""Path patching on the bundled model (IOI): the reference path against the batched one, side by
side in one run, and the cost of one sender in forward-pass equivalents.

The reference path runs two full forward passes per sender set (what the receivers read, then the
measured run). The batched path runs many sender sets per pass and only the layers that can
change (from the sender's layer to the last receiver's, then from the first receiver's to the
output; for the final residual stream the unembedding alone). One forward-pass equivalent is a
plain forward pass of the same prompts, timed here (best of ten after three warm-ups).

Run:  python benchmarks/path_speed.py [--n-prompts 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import actpatch as ap  # noqa: E402
from actpatch import Site  # noqa: E402


def timed(fn):  # noqa: ANN001, ANN201 - a benchmark helper
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cases", nargs="*", type=int, default=[1, 2, 3, 4], help="which of the four to run")
    args = parser.parse_args()
    model = ap.load_model(device=args.device)
    ps = ap.prompts.ioi(model, n=args.n_prompts, seed=0, templates=[0, 2, 6])
    ids = ps.groups()[0].clean.to(model.device)
    for _ in range(3):
        model.logits(ids)  # warm-up
    fwd = min(timed(lambda: model.logits(ids))[1] for _ in range(10))
    print(f"{model!r}\n{len(ps)} IOI prompts x {ids.shape[1]} tokens; one forward pass {fwd * 1000:.0f} ms")
    cases = [
        ("36 heads (L20, 23, 24, 29) -> resid_final", dict(receivers=[Site("resid_final")], layers=[20, 23, 24, 29])),
        ("all 270 heads -> resid_final", dict(receivers=[Site("resid_final")])),
        ("heads of L0-23 -> queries of L24 at END", dict(receivers=[Site("q", 24, pos=ids.shape[1] - 1)],
                                                      layers=list(range(24)))),
    ]
    for i, (name, kw) in enumerate(cases, 1):
        if i not in args.cases:
            continue
        receivers = kw.pop("receivers")
        n = len(kw.get("layers", range(model.n_layers))) * model.n_heads
        ref, t_ref = timed(lambda: ap.path_sweep(model, ps, receivers, engine="reference", progress=False, **kw))
        fast, t_fast = timed(lambda: ap.path_sweep(model, ps, receivers, progress=False, **kw))
        err = float((fast.raw["logit_diff"] - ref.raw["logit_diff"]).abs().max())
        print(f"\n{name}: {n} senders\n  reference {t_ref:7.1f} s  ({t_ref / n / fwd:5.2f} forward passes per sender)"
              f"\n  batched   {t_fast:7.1f} s  ({t_fast / n / fwd:5.2f} forward passes per sender)   "
              f"speed-up {t_ref / t_fast:5.1f}x   largest difference {err:.1e} (logit diff)")
    if 4 not in args.cases:
        return
    senders = [Site("z", 23, head=h) for h in range(model.n_heads)]
    kw = dict(senders=senders, layers=list(range(24, model.n_layers)))
    ref, t_ref = timed(lambda: ap.path_sweep(model, ps, "q", engine="reference", progress=False, **kw))
    fast, t_fast = timed(lambda: ap.path_sweep(model, ps, "q", progress=False, **kw))
    n = 6 * model.n_heads
    err = float((fast.raw["logit_diff"] - ref.raw["logit_diff"]).abs().max())
    print(f"\nlayer 23's heads -> each query head of L24-29 (receiver sweep): {n} receivers\n"
          f"  reference {t_ref:7.1f} s  ({t_ref / n / fwd:5.2f} forward passes per receiver)\n"
          f"  batched   {t_fast:7.1f} s  ({t_fast / n / fwd:5.2f} forward passes per receiver)   "
          f"speed-up {t_ref / t_fast:5.1f}x   largest difference {err:.1e}")


if __name__ == "__main__":
    main()
