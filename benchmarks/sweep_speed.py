"""Exact patching speed, side by side in one run, on the bundled SmolLM2-135M with IOI prompts.

Methods (each produces the normalised logit-difference grid; differences are reported against
actpatch's batched engine):

* actpatch batched engine (the default of ``ap.sweep``);
* actpatch reference engine (one forward pass per patch);
* a plain torch-hooks loop written here, without actpatch;
* TransformerLens 4.x ``patching.get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_all_pos``
  through ``TransformerBridge`` over the same HF weights (eager attention, as it requires);
* nnsight 0.8: a loop of traces, and one trace with one invoke per patch.

``--share`` prints only the engine against the machine (issue 28): for resid_pre and z sweeps at
1, 8 and 32 prompts, the *necessary* token-layers per second as a share of the decoder stack's own
throughput in a plain batched forward pass (best of several batch sizes, same process, no
unembedding). Necessary: a patch at (layer l, position p) changes layers >= l at positions >= p
(a head patch: layers >= l from the first clean / corrupted difference on), and patches before
the first difference are no-ops; plus the clean and corrupted baseline runs.

Peers come from the optional ``bench`` extra (``pip install -e '.[bench]'``); missing peers are
reported as skipped. Run:  python benchmarks/sweep_speed.py [--quick] [--skip-peers]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import actpatch as ap  # noqa: E402

torch.set_grad_enabled(False)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms (bytes)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
    return out, dt, mem.extra_mb


def ld(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean logit difference over prompts from last-position logits (N, vocab)."""
    i = torch.arange(len(a))
    return (logits[i, a] - logits[i, b]).mean()


class Case:
    def __init__(self, model: ap.Model, prompts: ap.PromptSet) -> None:
        self.model, self.prompts = model, prompts
        self.clean = torch.stack(prompts.clean)
        self.corr = torch.stack(prompts.corrupted)
        self.a, self.b = prompts.answers, prompts.alternatives
        self.ld_clean = float(ld(model.logits(self.clean, last_only=True), self.a, self.b))
        self.ld_corr = float(ld(model.logits(self.corr, last_only=True), self.a, self.b))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.ld_corr) / (self.ld_clean - self.ld_corr)


# -- methods ---------------------------------------------------------------------------------------

def actpatch_sweep(case: Case, target: str, engine: str) -> torch.Tensor:
    return ap.sweep(case.model, case.prompts, target, direction="denoise", engine=engine, progress=False).values


def hooks_loop_resid(case: Case) -> torch.Tensor:
    """Plain torch: capture every block input on the clean run, then one hooked forward per patch."""
    layers = case.model.hf.model.layers
    clean_in: list[torch.Tensor] = []
    hs = [l.register_forward_pre_hook(lambda m, a, k: clean_in.append(a[0].clone()) if a else clean_in.append(k["hidden_states"].clone()), with_kwargs=True) for l in layers]
    case.model.hf(case.clean)
    for h in hs:
        h.remove()
    L, T = len(layers), case.clean.shape[1]
    out = torch.empty(L, T)
    for l in range(L):
        for p in range(T):
            def patch(m, args, kwargs, l=l, p=p):
                x = (args[0] if args else kwargs["hidden_states"]).clone()
                x[:, p] = clean_in[l][:, p]
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            h = layers[l].register_forward_pre_hook(patch, with_kwargs=True)
            try:
                logits = case.model.hf(case.corr, logits_to_keep=1).logits[:, -1]
            finally:
                h.remove()
            out[l, p] = ld(logits, case.a, case.b)
    return case.norm(out)


def _bridge(case: Case):  # noqa: ANN202
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    path = str(ap.models.cache_dir() / "smollm2-135m-instruct-v1")
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=case.model.tokenizer, device="cpu")


def tl_sweep(case: Case, bridge, kind: str) -> torch.Tensor:  # noqa: ANN001
    from transformer_lens import patching

    metric = lambda logits: ld(logits[:, -1], case.a, case.b)  # noqa: E731
    _, cache = bridge.run_with_cache(case.clean)
    fn = patching.get_act_patch_resid_pre if kind == "resid_pre" else patching.get_act_patch_attn_head_out_all_pos
    return case.norm(fn(bridge, case.corr, cache, metric))


def _nnsight_clean(case: Case, lm):  # noqa: ANN001, ANN202
    import nnsight

    with lm.trace(case.clean):
        acts = nnsight.save([])
        for l in range(case.model.n_layers):
            acts.append(lm.model.layers[l].input)
    return acts


def nnsight_loop_resid(case: Case, lm) -> torch.Tensor:  # noqa: ANN001
    acts = _nnsight_clean(case, lm)
    L, T = case.model.n_layers, case.clean.shape[1]
    out = torch.empty(L, T)
    for l in range(L):
        for p in range(T):
            with lm.trace(case.corr):
                lm.model.layers[l].input[:, p] = acts[l][:, p]
                logits = lm.output.logits[:, -1].save()
            out[l, p] = ld(logits, case.a, case.b)
    return case.norm(out)


def nnsight_batched_resid(case: Case, lm) -> torch.Tensor:  # noqa: ANN001
    import nnsight

    acts = _nnsight_clean(case, lm)
    L, T = case.model.n_layers, case.clean.shape[1]
    with lm.trace() as tracer:
        outs = nnsight.save([])
        for l in range(L):
            for p in range(T):
                with tracer.invoke(case.corr):
                    lm.model.layers[l].input[:, p] = acts[l][:, p]
                    outs.append(lm.output.logits[:, -1])
    return case.norm(torch.stack([ld(o, case.a, case.b) for o in outs]).reshape(L, T))


# -- the run ---------------------------------------------------------------------------------------

def report(title: str, rows: list[tuple[str, torch.Tensor | None, float, float]]) -> None:
    ours = next(r for r in rows if r[0] == "actpatch")
    print(f"\n{title}")
    print(f"  {'method':<28}{'seconds':>9}{'actpatch x faster':>19}{'max |diff|':>12}{'peak MB':>9}")
    for name, vals, secs, mb in rows:
        if vals is None:
            print(f"  {name:<28}{'skipped':>9}")
            continue
        ratio = secs / ours[2]
        diff = (vals - ours[1]).abs().max().item()
        print(f"  {name:<28}{secs:>9.2f}{ratio:>19.1f}{diff:>12.2e}{mb:>9.0f}")


def prompts_of_length(model: ap.Model, n: int, length: int) -> ap.PromptSet:
    """IOI prompts (template 0) behind a neutral filler so that each has ``length`` tokens."""
    base = ap.prompts.ioi(model, n=n, templates=[0], seed=1)
    filler = model.to_tokens(" It was a quiet and ordinary day in the small town." * 40)
    pad = length - base.seq_len
    if pad < 0:
        raise SystemExit(f"length {length} is shorter than the IOI prompt ({base.seq_len})")
    ids = torch.tensor(filler[:pad], dtype=torch.long)
    return ap.PromptSet.from_ids([torch.cat([ids, c]) for c in base.clean], [torch.cat([ids, c]) for c in base.corrupted],
                                 base.answers, base.alternatives)


def first_differences(prompts: ap.PromptSet) -> list[int]:
    return [int((c != k).nonzero()[0]) for c, k in zip(prompts.clean, prompts.corrupted)]


def necessary_token_layers(model: ap.Model, prompts: ap.PromptSet, target: str) -> int:
    """Token-layers a sweep must compute (see the module docstring), summed over prompts."""
    L, T = model.n_layers, prompts.seq_len
    total = 0
    for d in first_differences(prompts):
        if target == "resid_pre":
            total += sum((L - l) * (T - p) for l in range(L) for p in range(d, T))
        else:  # every head of every layer, all positions
            total += sum(model.n_heads * (L - l) * (T - d) for l in range(L))
        total += 2 * L * T  # the clean and corrupted runs
    return total


def stack_throughput(model: ap.Model, T: int, batch_sizes: tuple[int, ...] = (1, 8, 32, 64), repeats: int = 3,
                     warm: bool = True) -> tuple[float, int]:
    """Token-layers per second of the model's own decoder stack (embeddings, blocks, final norm;
    no unembedding) in a plain batched forward pass: the best of ``batch_sizes`` (best of
    ``repeats`` each)."""
    body = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf.model
    best, best_b = 0.0, 0
    for B in batch_sizes:
        ids = torch.randint(100, 10000, (B, T))
        if warm:
            body(input_ids=ids, use_cache=False)
        secs = min(_timed_call(lambda: body(input_ids=ids, use_cache=False)) for _ in range(repeats))
        rate = B * T * model.n_layers / secs
        if rate > best:
            best, best_b = rate, B
    return best, best_b


def _timed_call(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def share_table(model: ap.Model) -> None:
    """The necessary token-layers per second of each sweep as a share of the plain decoder stack's.
    This machine's speed drifts by +-15 % within minutes, so each timed sweep is paired with the
    stack timed right before and right after it (best batch size, best of 2 each, averaged): a
    round's share is its sweep's rate over its own stack's; the table gives the medians over the
    rounds (3, or 2 at 32 prompts) and the range of the rounds' shares. The null-patch check (a
    one-row run and a one-row patched run, per group) is timed apart: it is not necessary work,
    and the last column is the share without its seconds."""
    ps = ap.prompts.ioi(model, n=32, templates=[0])
    T = ps.seq_len
    rate, B = stack_throughput(model, T)
    print(f"\nThe engine against the machine: plain decoder stack {rate / 1e3:.1f}k token-layers/s "
          f"(best batch {B} x {T} tokens; timed again before and after each sweep)")
    print(f"  {'sweep':<10}{'prompts':>8}{'necessary':>12}{'seconds':>9}{'token-layers/s':>16}{'stack':>8}"
          f"{'share':>7}{'rounds':>13}{'check s':>8}{'w/o check':>10}")
    stack = lambda: stack_throughput(model, T, (B,), repeats=2, warm=False)[0]  # noqa: E731
    from actpatch.techniques.exact import SweepJob

    check = [0.0]  # seconds in the null-patch check (two one-row forward passes), not necessary work
    null_patch = SweepJob.null_patch

    def timed_check(job, *args):  # noqa: ANN001, ANN002, ANN202
        t = time.perf_counter()
        try:
            return null_patch(job, *args)
        finally:
            check[0] += time.perf_counter() - t

    SweepJob.null_patch = timed_check  # type: ignore[method-assign]
    for target in ("resid_pre", "z"):
        for n in (1, 8, 32):
            sub = ps.subset(range(n))
            ap.sweep(model, sub, target, direction="denoise", progress=False)  # warm-up
            need = necessary_token_layers(model, sub, target)
            rounds = []  # (share, seconds, stack rate, share without the check, check seconds)
            for _ in range(3 if n < 32 else 2):
                before = stack()
                check[0] = 0.0
                secs = _timed_call(lambda: ap.sweep(model, sub, target, direction="denoise", progress=False))
                around = (before + stack()) / 2
                rounds.append((need / secs / around, secs, around, need / (secs - check[0]) / around, check[0]))
            share, secs, around, unchecked, checked = (statistics.median(column) for column in zip(*rounds))
            spread = f"{min(rounds)[0]:.2f}-{max(rounds)[0]:.2f}"
            print(f"  {target:<10}{n:>8}{need:>12,}{secs:>9.2f}{need / secs / 1e3:>15.1f}k{around / 1e3:>7.1f}k"
                  f"{share:>7.2f}{spread:>13}{checked:>8.2f}{unchecked:>10.2f}")


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap_.add_argument("--quick", action="store_true", help="one prompt count, fewer scaling points")
    ap_.add_argument("--skip-peers", action="store_true", help="actpatch only")
    ap_.add_argument("--share", action="store_true", help="only the engine's share of the machine's throughput")
    args = ap_.parse_args()
    torch.manual_seed(0)
    model, load_s = ap.models.loading.timed_load()
    model.weight_hash  # computed once, outside the timings
    print(f"{model!r}\nloaded in {load_s:.2f} s; torch threads: {torch.get_num_threads()}")
    if args.share:
        share_table(model)
        return
    bridge = lm = None
    if not args.skip_peers:
        try:
            bridge = _bridge(Case(model, ap.prompts.ioi(model, n=1, templates=[0])))
        except ImportError:
            print("TransformerLens not installed: skipped (pip install -e '.[bench]')")
        try:
            from nnsight import LanguageModel

            lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
        except ImportError:
            print("nnsight not installed: skipped (pip install -e '.[bench]')")

    for n in ([1] if args.quick else [1, 8]):
        case = Case(model, ap.prompts.ioi(model, n=n, templates=[0]))
        T = case.clean.shape[1]
        rows = []
        rows.append(("actpatch", *timed(lambda: actpatch_sweep(case, "resid_pre", "batched"))))
        rows.append(("actpatch reference engine", *timed(lambda: actpatch_sweep(case, "resid_pre", "reference"))))
        rows.append(("plain torch hooks loop", *timed(lambda: hooks_loop_resid(case))))
        rows.append(("TransformerLens 4 (bridge)", *timed(lambda: tl_sweep(case, bridge, "resid_pre"))) if bridge else ("TransformerLens 4 (bridge)", None, 0, 0))
        rows.append(("nnsight 0.8 loop", *timed(lambda: nnsight_loop_resid(case, lm))) if lm else ("nnsight 0.8 loop", None, 0, 0))
        rows.append(("nnsight 0.8 batched invokes", *timed(lambda: nnsight_batched_resid(case, lm))) if lm else ("nnsight 0.8 batched invokes", None, 0, 0))
        report(f"resid_pre sweep, {model.n_layers} layers x {T} positions, {n} prompt(s)", rows)

        rows = [("actpatch", *timed(lambda: actpatch_sweep(case, "z", "batched")))]
        if n == 1:
            rows.append(("actpatch reference engine", *timed(lambda: actpatch_sweep(case, "z", "reference"))))
        rows.append(("TransformerLens 4 (bridge)", *timed(lambda: tl_sweep(case, bridge, "z"))) if bridge else ("TransformerLens 4 (bridge)", None, 0, 0))
        report(f"all-heads sweep (z, all positions), {model.n_layers} x {model.n_heads} heads, {n} prompt(s)", rows)

    print("\nactpatch cost against prompt length (resid_pre sweep, 1 prompt; IOI after a filler, so the")
    print("clean/corrupted difference sits near the end) and against the number of prompts (14 tokens):")
    for length in ([16, 64] if args.quick else [16, 32, 64, 128]):
        case = Case(model, prompts_of_length(model, 1, length))
        _, secs, mb = timed(lambda: actpatch_sweep(case, "resid_pre", "batched"))
        print(f"  {length:>4} tokens: {secs:7.2f} s  ({model.n_layers * length} patches, peak +{mb:.0f} MB)")
    for n in ([1, 4] if args.quick else [1, 2, 4, 8, 16]):
        case = Case(model, ap.prompts.ioi(model, n=n, templates=[0]))
        _, secs, mb = timed(lambda: actpatch_sweep(case, "resid_pre", "batched"))
        print(f"  {n:>4} prompts: {secs:7.2f} s  (peak +{mb:.0f} MB)")
    share_table(model)


if __name__ == "__main__":
    main()
