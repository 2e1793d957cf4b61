"""Big models on a GPU, in one run (issue 28 item 5): a Llama-3.1-8B-shaped random model in bf16
(no weights needed), 8 prompts x 64 tokens:

1. resid_pre and all-heads (z) sweeps: time, peak CUDA memory, and the engine's share of the
   decoder stack's own throughput (benchmarks/sweep_speed.py's definition);
2. EAP-IG (5 steps) and AtP on every head: time and peak memory, unbounded and under 8 and 16 GiB
   budgets (peak memory above the weights against the budget; the scores must not change);
3. TransformerLens's resid_pre sweep on the same GPU where it is installed and the model fits.

Run:  PYTHONPATH=src python benchmarks/gpu_big.py            (on a machine with a GPU)
      PYTHONPATH=src python benchmarks/gpu_big.py --smoke    (a 2-layer, narrow copy: checks the script)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import actpatch as ap  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sweep_speed import necessary_token_layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_reset() -> int:
    """Reset the peak counter; the bytes allocated now (the baseline of a peak)."""
    if DEVICE != "cuda":
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_since(base: int) -> int:
    return torch.cuda.max_memory_allocated() - base if DEVICE == "cuda" else 0


def timed(fn):  # noqa: ANN001, ANN201
    base = peak_reset()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t, peak_since(base)


def llama_8b_shaped(smoke: bool) -> ap.Model:
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
    if smoke:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1000)
    cfg = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    with torch.device(DEVICE):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.eval()
    return ap.Model(hf, None, name="llama-3.1-8b-shaped" + ("-smoke" if smoke else ""))


def random_prompts(model: ap.Model, n: int, T: int) -> ap.PromptSet:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(10, model.vocab_size, (n, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, T - 24] = torch.randint(10, model.vocab_size, (n,), generator=g)  # one token differs
    return ap.PromptSet.from_ids(clean, corrupted, torch.randint(10, model.vocab_size, (n,), generator=g),
                                 torch.randint(10, model.vocab_size, (n,), generator=g))


def stack_rate(model: ap.Model, T: int) -> float:
    body = model.hf.get_decoder()
    best = 0.0
    for B in (1, 8, 32):
        ids = torch.randint(10, model.vocab_size, (B, T), device=DEVICE)
        with torch.inference_mode():
            body(input_ids=ids, use_cache=False)
            _, secs, _ = timed(lambda: body(input_ids=ids, use_cache=False))
        best = max(best, B * T * model.n_layers / secs)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 2-layer narrow model: checks the script anywhere")
    args = parser.parse_args()
    model = llama_8b_shaped(args.smoke)
    gib = 2**30
    print(f"torch {torch.__version__}, {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE == "cuda" else "") + f"; {model!r}")
    ps = random_prompts(model, 8, 64)
    rate = stack_rate(model, 64)
    print(f"\n1. sweeps, 8 prompts x 64 tokens; decoder stack {rate / 1e3:.1f}k token-layers/s")
    for target in ("resid_pre", "z"):
        ap.sweep(model, ps.subset([0]), target, layers=[0], progress=False)  # warm-up
        res, secs, peak = timed(lambda: ap.sweep(model, ps, target, progress=False))
        need = necessary_token_layers(model, ps, target)
        print(f"  {target:<10} {secs:8.2f} s  peak +{peak / gib:6.2f} GiB  share {need / secs / rate:.2f}")

    print("\n2. gradient techniques under budgets (peak above the weights; scores must equal the unbounded run's)")
    budgets = ["unbounded", "8GiB", "16GiB"] if not args.smoke else ["unbounded", "4MiB", "16MiB"]
    for name, run in (("AtP (z)", lambda b: ap.attribute(model, ps, "z", direction="noise", memory_budget=b).values),
                      ("EAP-IG (5)", lambda b: ap.edge_attribution(model, ps, ig_steps=5, memory_budget=b).scores)):
        ref = None
        for budget in budgets:
            limit = "1TiB" if budget == "unbounded" else budget
            try:
                out, secs, peak = timed(lambda: run(limit))
            except ap.errors.MemoryBudgetError as e:
                print(f"  {name:<11} {budget:>9}: refused: {e}")
                continue
            except torch.cuda.OutOfMemoryError:
                print(f"  {name:<11} {budget:>9}: out of memory")
                torch.cuda.empty_cache()
                continue
            ref = out if ref is None else ref
            diff = float((out - ref).nan_to_num().abs().max() / ref.nan_to_num().abs().max())
            print(f"  {name:<11} {budget:>9}: {secs:8.2f} s  peak +{peak / gib:6.2f} GiB  max rel. diff {diff:.1e}")

    print("\n3. TransformerLens on the same GPU")
    try:
        import transformer_lens  # noqa: F401
    except ImportError:
        print("  not installed (pip install -e '.[bench]'): skipped")
        return
    print("  TransformerLens needs a pretrained name or weights for HookedTransformer; with random weights "
          "compare through benchmarks/sweep_speed.py's bridge on the bundled model instead.")


if __name__ == "__main__":
    main()
