"""What answers of several tokens cost: the same IOI prompts swept with single-token answers and
with the answers extended to 2 and 3 tokens (" Mary" -> " Mary and" -> " Mary and then", the
alternative likewise), side by side in one process, best of ``--repeats``.

``python benchmarks/multitoken.py [--n 8] [--repeats 3]``. Goal (issue 25): a multi-token sweep
costs at most 1.5x the single-token sweep of the same prompts. Also prints the metric's
baselines, so that the numbers are of a real experiment (the model still prefers the answer).

Next to each measured ratio stands the ratio of the *necessary* work (multiply-adds), what no
engine can avoid: a patch at layer l from position q recomputes layers >= l at positions q..T-1
and at the C continuation tokens (both branches of the teacher-forced tree), patches before the
first clean / corrupted difference are no-ops, and each patched row unembeds its readouts: two
vocabulary rows for the logit difference at the first readout (its normaliser cancels), but the
whole vocabulary at each of the C continuation readouts (log-probabilities of later tokens need
the softmax's normaliser). "overhead" is measured / necessary: what the engine spends beyond it.
"""

from __future__ import annotations

import argparse
import time

import actpatch as ap

SUFFIXES = {1: "", 2: " and", 3: " and then"}


def extended(model: ap.Model, prompts: ap.PromptSet, k: int) -> ap.PromptSet:
    """``prompts`` with each answer and alternative followed by the words of ``SUFFIXES[k]``."""
    pairs = [(c, x, a + SUFFIXES[k], b + SUFFIXES[k]) for c, x, a, b in prompts.texts]
    return ap.PromptSet.from_pairs(model, pairs, name=f"{prompts.name}-{k}tok")


def necessary(model: ap.Model, ps: ap.PromptSet, target: str) -> float:
    """Multiply-adds a sweep of ``target`` cannot avoid on ``ps`` (see the module docstring):
    decoder token-layers times the block's weights, plus the readouts' unembedding."""
    g = ps.groups()[0]
    B, T = g.clean.shape
    C = 0 if g.continuation is None else g.continuation.n_tokens
    L, d = model.n_layers, model.d_model
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    per_token_layer = sum(p.numel() for p in model.adapter.blocks[0].parameters())  # multiply-adds per token
    diff = int((g.clean != g.corrupted).any(0).nonzero()[0])
    if target == "z":
        cells = [(l, diff) for l in range(L) for _ in range(model.n_heads)]
    else:
        cells = [(l, p) for l in range(L) for p in range(diff, T)]
    token_layers = sum((L - l) * (T - q + C) for l, q in cells)
    unembed = len(cells) * (2 * d + C * vocab * d)
    return B * (token_layers * per_token_layer + unembed)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = ap.load_model()
    base = ap.prompts.ioi(model, n=args.n, templates=[0])
    sets = {k: extended(model, base, k) for k in SUFFIXES}
    for k, ps in sets.items():
        tokens = sorted(set(ps.continuation_lengths.tolist()))
        print(f"{k}-token answers: answer tokens {tokens}, prompt length {ps.seq_len}")
    print(f"\n{'target':<10} {'answers':>8} {'seconds':>9} {'vs 1 token':>11} {'necessary':>10} {'overhead':>9}"
          f"  logit_diff clean / corrupted")
    for target in ("resid_pre", "z"):
        single = None
        work = necessary(model, sets[1], target)
        for k, ps in sets.items():
            ap.sweep(model, ps, target, progress=False)  # warm-up
            seconds = best(lambda: ap.sweep(model, ps, target, progress=False), args.repeats)
            res = ap.sweep(model, ps, target, progress=False, layers=[0], positions=None if target == "z" else [0])
            b = res.baselines["logit_diff"]
            single = single or seconds
            need = necessary(model, ps, target) / work
            print(f"{target:<10} {k:>8} {seconds:>9.2f} {seconds / single:>10.2f}x {need:>9.2f}x "
                  f"{seconds / single / need:>8.2f}x  {b['clean']:.2f} / {b['corrupted']:.2f}")


if __name__ == "__main__":
    main()
