"""Time `ap.doctor` on a 1B-parameter Llama-shaped random model on a GPU (fp32; no weights
needed). Run:  PYTHONPATH=src python benchmarks/doctor_gpu.py"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import actpatch as ap  # noqa: E402


def main() -> None:
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048)
    torch.manual_seed(0)
    t = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to("cuda").eval()
    model = ap.Model(hf, name="llama-1b-shaped-random")
    n = sum(p.numel() for p in hf.parameters())
    print(f"{n / 1e9:.2f}B parameters on {torch.cuda.get_device_name()}, built in {time.perf_counter() - t:.1f} s")
    for _ in range(2):  # the second call is warm (kernels compiled, allocator primed)
        t = time.perf_counter()
        report = ap.doctor(model)
        torch.cuda.synchronize()
        print(f"doctor: {time.perf_counter() - t:.1f} s, passed={report.passed}")
    for c in report.checks:
        print(f"  {c.name:22s} {'pass' if c.passed else 'FAIL'}  error {c.error:.2e}  tolerance {c.tolerance:.0e}  {c.detail}")
    for what, secs in report.estimates.items():
        print(f"  estimated {what}: {secs:.2f} s")


if __name__ == "__main__":
    main()
