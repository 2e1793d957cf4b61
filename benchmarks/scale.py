"""Sweeps over Ray against the local executor, side by side on the same cores (bundled model, IOI).

Every run uses one torch thread per process and the same units, so all give identical values
(checked): local (the driver alone), Ray with 1 worker, Ray with 2 workers. Printed: wall time
with warm actors (model loaded), patches per second, Ray's overhead per unit (1 worker against
local) and the 2-worker speed-up; also what starting the actors costs (once per executor).

With ``--device cuda`` it runs the sweep benchmark on the GPU instead: the batched engine
against the reference engine and against the same sweep on the CPU.

Run:  python benchmarks/scale.py [--n-prompts 8] [--unit-size 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actpatch as ap  # noqa: E402


def _timed(fn):  # noqa: ANN001, ANN202
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def ray_vs_local(args: argparse.Namespace) -> None:
    import ray

    torch.set_num_threads(1)
    model = ap.load_model()
    ps = ap.prompts.ioi(model, n=args.n_prompts, seed=0, templates=[0])
    opts = dict(progress=False, unit_size=args.unit_size, direction="denoise")
    cells = model.n_layers * ps.seq_len
    n_units = -(-cells // args.unit_size)
    print(f"{model!r}\n{len(ps)} IOI prompts of {ps.seq_len} tokens; resid_pre sweep: {cells} patches in "
          f"{n_units} units of {args.unit_size}; one torch thread per process, {os.cpu_count()} cores")
    ap.sweep(model, ps, "resid_pre", executor="local", **opts)  # warm-up
    local, t_local = _timed(lambda: ap.sweep(model, ps, "resid_pre", executor="local", **opts))
    print(f"{'local executor':>16}: {t_local:6.2f} s  {cells / t_local:6.1f} patches/s")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    timings = {}
    for workers in (1, 2):
        with ap.experiment.RayExecutor(workers=workers) as ex:
            _, t_cold = _timed(lambda: ap.sweep(model, ps, "resid_pre", executor=ex, **opts))
            res, t = _timed(lambda: ap.sweep(model, ps, "resid_pre", executor=ex, **opts))
        same = all(torch.equal(res.raw[m], local.raw[m]) for m in res.raw)
        timings[workers] = t
        print(f"{f'Ray, {workers} worker' + ('s' if workers > 1 else ''):>16}: {t:6.2f} s  {cells / t:6.1f} patches/s  "
              f"(first call with actor start and model load: {t_cold:.2f} s; identical to local: {same})")
    ray.shutdown()
    print(f"Ray overhead per unit (1 worker vs local): {(timings[1] - t_local) / n_units * 1000:.0f} ms "
          f"({timings[1] / t_local:.2f}x local)")
    print(f"2 workers vs 1: {timings[1] / timings[2]:.2f}x; 2 workers vs local: {t_local / timings[2]:.2f}x")


def gpu_sweep(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    gpu = ap.load_model(device="cuda")
    cpu = ap.load_model()
    ps = ap.prompts.ioi(cpu, n=args.n_prompts, seed=0, templates=[0])
    print(f"{torch.cuda.get_device_name()}; {len(ps)} IOI prompts of {ps.seq_len} tokens")
    for target, kw in (("resid_pre", {}), ("z", {})):
        ap.sweep(gpu, ps, target, progress=False, **kw)  # warm-up
        torch.cuda.synchronize()
        b, t_b = _timed(lambda: (ap.sweep(gpu, ps, target, progress=False, **kw), torch.cuda.synchronize())[0])
        _, t_r = _timed(lambda: (ap.sweep(gpu, ps, target, engine="reference", progress=False, **kw),
                                 torch.cuda.synchronize())[0])
        c, t_c = _timed(lambda: ap.sweep(cpu, ps, target, progress=False, **kw))
        err = float((b.values - c.values).abs().max())
        print(f"{target:>10}: batched {t_b:6.2f} s, reference {t_r:6.2f} s ({t_r / t_b:.1f}x), CPU batched "
              f"{t_c:6.2f} s ({t_c / t_b:.1f}x); max |GPU - CPU| {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--unit-size", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    (gpu_sweep if args.device.startswith("cuda") else ray_vs_local)(args)


if __name__ == "__main__":
    main()
