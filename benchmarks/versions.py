"""Two versions of actpatch timed side by side on the same sweeps, alternating runs so that both
see the same machine state: ``python benchmarks/versions.py OLD_REV [NEW_REV]`` (NEW_REV: the
working tree). Each version runs in its own subprocess with its ``src/`` first on the path; the
bundled model and IOI prompts (8, template 0) are the same for both.

Prints, per sweep, the best of ``--repeats`` wall times for each version and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import actpatch as ap
print(ap.__file__, file=sys.stderr)
m = ap.load_model()
ps = ap.prompts.ioi(m, n=8, templates=[0])
out = {}
for target in ("resid_pre", "z"):
    ap.sweep(m, ps, target, progress=False)  # warm-up
    t0 = time.perf_counter()
    ap.sweep(m, ps, target, progress=False)
    out[target] = time.perf_counter() - t0
print(json.dumps(out))
"""


def _src(rev: str | None, tmp: Path) -> Path:
    if rev is None:
        return ROOT / "src"
    dest = tmp / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(dest), rev], check=True)
    return dest / "src"


def _time(src: Path) -> dict[str, float]:
    import os

    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"})
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__)
    ap_.add_argument("old")
    ap_.add_argument("new", nargs="?", default=None)
    ap_.add_argument("--repeats", type=int, default=3)
    args = ap_.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        srcs = {"old": _src(args.old, t), "new": _src(args.new, t)}
        try:
            best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
            for _ in range(args.repeats):
                for which in ("old", "new"):
                    for k, v in _time(srcs[which]).items():
                        best[which][k] = min(best[which].get(k, v), v)
        finally:
            for which, rev in (("old", args.old), ("new", args.new)):
                if rev is not None:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(srcs[which].parent)], check=False)
    print(f"best of {args.repeats}, bundled model, IOI 8 prompts (template 0), seconds per sweep")
    print(f"  {'sweep':<10} {args.old[:12]:>12} {(args.new or 'working tree')[:12]:>12}   new / old")
    for k in best["old"]:
        print(f"  {k:<10} {best['old'][k]:>12.2f} {best['new'][k]:>12.2f}   {best['new'][k] / best['old'][k]:.3f}")


if __name__ == "__main__":
    main()
