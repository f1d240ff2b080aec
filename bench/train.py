"""One training step of a Llama-3.2-1B-shaped model, side by side (issue 6, part 1).

Each variant trains in its own process: transformers as is (LIGER_DISABLE=1); this
package as installed (defaults); liger-kernel 0.8.5 with only its fused linear
cross-entropy; liger-kernel with only its cross-entropy. Random init, bf16 weights,
fused AdamW, sdpa attention, batch 4 x 4096 tokens, the same data for every variant.

    python bench/train.py            # GPU; prints the table, writes bench/results/train-*.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP, TIMED = 3, 5
BATCH, SEQ = 4, 4096
VARIANTS = {
    "transformers": {"LIGER_DISABLE": "1"},
    "liger_autopatch": {},
    "liger-kernel FLCE": {"LIGER_DISABLE": "1", "BENCH_LIGER": "flce"},
    "liger-kernel CE": {"LIGER_DISABLE": "1", "BENCH_LIGER": "ce"},
}


def _child() -> dict:
    import torch
    import transformers

    liger = os.environ.get("BENCH_LIGER")
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=False, rms_norm=False, swiglu=False,
            cross_entropy=liger == "ce", fused_linear_cross_entropy=liger == "flce",
        )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=SEQ,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator(device="cuda").manual_seed(1)
    batches = torch.randint(0, config.vocab_size, (WARMUP + TIMED, BATCH, SEQ), device="cuda", generator=generator)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for tokens in batches:
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    timed = sorted(times[WARMUP:])
    import liger_autopatch

    return {
        "losses": losses,
        "step_ms": timed[len(timed) // 2],
        "tokens_per_s": BATCH * SEQ / (timed[len(timed) // 2] / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "patched": [row.target for row in liger_autopatch.status() if row.state == "patched"],
    }


def main() -> None:
    import torch

    results = {}
    for name, extra_env in VARIANTS.items():
        env = {k: v for k, v in os.environ.items() if k != "LIGER_DISABLE"} | extra_env
        run = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            results[name] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    gpu = torch.cuda.get_device_name()
    print(f"Llama-3.2-1B shape, batch {BATCH} x {SEQ}, bf16, fused AdamW; {gpu}, torch {torch.__version__}")
    print(f"  {'variant':<20} {'step ms':>8} {'tokens/s':>9} {'peak GiB':>9}  losses")
    for name, row in results.items():
        if "error" in row:
            print(f"  {name:<20} error: {row['error']}")
            continue
        losses = " ".join(f"{loss:.4f}" for loss in row["losses"])
        print(f"  {name:<20} {row['step_ms']:>8.1f} {row['tokens_per_s'] / 1e3:>8.1f}k {row['peak_gib']:>9.2f}  {losses}")
    import transformers

    record = {"date": date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
              "transformers": transformers.__version__, "batch": BATCH, "seq": SEQ, "results": results}
    out = REPO / "bench" / "results" / f"train-{gpu.replace(' ', '_')}-{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("saved", out.relative_to(REPO))


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(_child()))
    else:
        main()
