"""GPU checks in one run: correctness on CUDA (fp32 and bf16), the memory budget read from the
accelerator, the batched engine against the reference engine on a SmolLM2-sized random model,
the bundled model against TransformerLens on the same GPU (when installed: the `bench` extra),
and the bundled model split over two GPUs with a device map (over the GPU and the CPU when
there is one GPU). No weights are downloaded. Run:  PYTHONPATH=src python benchmarks/gpu_check.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import actpatch as ap  # noqa: E402
from actpatch.engine.batched import free_memory, memory_budget  # noqa: E402
from actpatch.testing import random_pairs, tiny_model  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script only
QUICK = "--quick" in sys.argv


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    out = fn()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync()
    return (time.perf_counter() - t) / repeat, out


def on_cuda(model: ap.Model, dtype: torch.dtype = torch.float32) -> ap.Model:
    return ap.Model(model.hf.to(DEVICE, dtype), model.tokenizer, name=f"{model.name}-{DEVICE}-{str(dtype)[6:]}")


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {DEVICE}")
    if DEVICE == "cuda":
        free, total = torch.cuda.mem_get_info()
        print(f"{torch.cuda.get_device_name()}: driver reports {free / 2**30:.1f} GiB free of {total / 2**30:.1f}; "
              f"free_memory('cuda') {free_memory('cuda') / 2**30:.1f} GiB; memory_budget('cuda') "
              f"{memory_budget('cuda') / 2**30:.2f} GiB; memory_budget('cpu') {memory_budget('cpu') / 2**30:.2f} GiB")

    ps = random_pairs(n=4, T=8, diff=(3, 6))
    print("\n1. CUDA fp32 against the same model on the CPU (max |raw difference|)")
    for family in ("gpt2", "llama_gqa", "gpt_neox", "gemma2"):
        cpu = tiny_model(family, n_layers=3)
        gpu = on_cuda(tiny_model(family, n_layers=3))
        errs = []
        for target in ("resid_pre", "z", "q", "mlp_post"):
            kw = {"neurons": range(16)} if target == "mlp_post" else {}
            for engine in ("batched", "reference"):
                a = ap.sweep(cpu, ps, target, engine=engine, progress=False, **kw)
                b = ap.sweep(gpu, ps, target, engine=engine, progress=False, **kw)
                errs.append(float((a.raw["logit_diff"] - b.raw["logit_diff"]).abs().max()))
        a, b = ap.attribute(cpu, ps, "z", grad_drop=True), ap.attribute(gpu, ps, "z", grad_drop=True)
        errs.append(float((a.raw["logit_diff"] - b.raw["logit_diff"]).abs().max()))
        if family != "gemma2":
            a, b = ap.edge_attribution(cpu, ps, ig_steps=2), ap.edge_attribution(gpu, ps, ig_steps=2)
            errs.append(float((a.scores - b.scores).nan_to_num(0).abs().max()))
        print(f"  {family:10s} sweeps (4 targets x 2 engines), AtP+GradDrop{', EAP-IG' if family != 'gemma2' else ''}: "
              f"max {max(errs):.2e}")

    print("\n2. bf16 on CUDA: batched == reference, and distance to fp32")
    m32 = on_cuda(tiny_model("llama_gqa", n_layers=3))
    m16 = on_cuda(tiny_model("llama_gqa", n_layers=3), torch.bfloat16)
    for target in ("resid_pre", "z"):
        r16 = ap.sweep(m16, ps, target, engine="reference", progress=False)
        b16 = ap.sweep(m16, ps, target, engine="batched", progress=False)
        b32 = ap.sweep(m32, ps, target, engine="batched", progress=False)
        print(f"  {target:9s} bf16 batched vs reference {float((b16.raw['logit_diff'] - r16.raw['logit_diff']).abs().max()):.3e}; "
              f"bf16 vs fp32 normalised {float((b16.values - b32.values).abs().max()):.3e}; findings "
              f"{[f.code for f in b16.findings if f.level is ap.Level.ERROR] or 'no errors'}")

    print("\n3. Speed on a SmolLM2-135M-shaped random Llama (30 layers, d 576, 9 heads, 3 KV heads), 8 prompts x 14 tokens")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=2 if QUICK else 30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(DEVICE).eval()
    big = ap.Model(hf, name="smollm2-shaped")
    ps8 = random_pairs(n=8, T=14, diff=(9,), vocab=40000)
    for dtype in (torch.float32, torch.bfloat16):
        model = big if dtype == torch.float32 else ap.Model(hf.to(dtype), name="smollm2-shaped-bf16")
        for target, reps in (("resid_pre", 3), ("z", 2)):
            tb, fast = timed(lambda: ap.sweep(model, ps8, target, engine="batched", progress=False), reps)
            tr, ref = timed(lambda: ap.sweep(model, ps8, target, engine="reference", progress=False), 1)
            err = float((fast.values - ref.values).abs().max())
            print(f"  {str(dtype)[6:]:8s} {target:9s} {len(fast.values.flatten()):4d} patches: batched {tb:6.3f} s, "
                  f"reference {tr:6.2f} s ({tr / tb:5.1f}x); max |normalised diff| {err:.1e}")
    t_atp, _ = timed(lambda: ap.attribute(model, ps8, "z"), 3)
    print(f"  bf16     AtP all heads: {t_atp:.3f} s")
    against_transformer_lens()
    split_over_devices()


def against_transformer_lens() -> None:
    print("\n4. Bundled SmolLM2-135M, 8 IOI prompts: actpatch against TransformerLens on this device")
    try:
        from transformer_lens import patching
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print("  TransformerLens is not installed (pip install -e '.[bench]'); skipped")
        return
    model = ap.load_model(device=DEVICE)
    ps = ap.prompts.ioi(model, n=8, seed=0, templates=[0])
    clean, corr = torch.stack(ps.clean).to(DEVICE), torch.stack(ps.corrupted).to(DEVICE)
    a, b, i = ps.answers.to(DEVICE), ps.alternatives.to(DEVICE), torch.arange(len(ps), device=DEVICE)
    path = str(ap.models.cache_dir() / "smollm2-135m-instruct-v1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").to(DEVICE)
    bridge = TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=model.tokenizer, device=DEVICE)
    metric = lambda logits: (logits[i, -1, a] - logits[i, -1, b]).mean()  # noqa: E731
    _, cache = bridge.run_with_cache(clean)
    t_tl, tl = timed(lambda: patching.get_act_patch_resid_pre(bridge, corr, cache, metric), 1)
    t_ap, res = timed(lambda: ap.sweep(model, ps, "resid_pre", direction="denoise", progress=False), 3)
    ours = res.raw["logit_diff"].mean(0)  # (layer, pos): mean logit difference, as TransformerLens measures
    err = float((ours - tl.float().cpu()).abs().max())
    print(f"  resid_pre, every layer x position: actpatch {t_ap:.3f} s, TransformerLens {t_tl:.2f} s "
          f"({t_tl / t_ap:.1f}x); max |difference| {err:.1e} logits")


def split_over_devices() -> None:
    n = torch.cuda.device_count() if DEVICE == "cuda" else 0
    second = "cuda:1" if n >= 2 else "cpu"
    print(f"\n5. Bundled model split by a device map: layers 0-14 on {'cuda:0' if n else 'cpu'}, 15-29 on {second}")
    first = "cuda:0" if n else "cpu"
    dm = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second,
          **{f"model.layers.{l}": first if l < 15 else second for l in range(30)}}
    whole = ap.load_model(device=first)
    split = ap.load_model(device_map=dm)
    ps = ap.prompts.ioi(whole, n=8, seed=0, templates=[0])
    for target, kw in (("resid_pre", {}), ("z", {}), ("mlp_post", {"layers": [14, 15], "neurons": range(64)})):
        t_w, a = timed(lambda: ap.sweep(whole, ps, target, progress=False, **kw), 1)
        t_s, b = timed(lambda: ap.sweep(split, ps, target, progress=False, **kw), 1)
        print(f"  {target:9s} one device {t_w:6.2f} s, split {t_s:6.2f} s; max |normalised diff| "
              f"{float((a.values - b.values).abs().max()):.1e}")


if __name__ == "__main__":
    main()
