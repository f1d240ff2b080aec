"""Training steps of a Llama-3.2-1B-shaped model, side by side (issue 6, part 1).

Each variant trains in its own process: transformers as is (LIGER_DISABLE=1); this
package as installed (defaults), and with its fused linear cross-entropy turned off
(LIGER_DISABLE=flce: the cross-entropy kernel only); liger-kernel 0.8.5 with only its
fused linear cross-entropy; liger-kernel with only its cross-entropy. Random init, bf16
weights, fused AdamW (lr 3e-4), sdpa attention, batch 4 x 4096 tokens, 30 steps (median
time of the last 27), the same data for every variant: rows that repeat a random
256-token block, so that the loss falls as the model learns to copy. Optionally, per
variant, the largest batch of 4096-token rows that trains without running out of memory.

    python bench/train.py                  # GPU; prints the table, writes bench/results/train-*.json
    python bench/train.py --largest-batch  # also searches each variant's largest batch (minutes)
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
WARMUP, TIMED = 3, 27
PERIOD = 256  # each row repeats a random block of this many tokens: a copy task the model learns
BATCH, SEQ = 4, 4096  # the batch of the timed comparison; the search for the largest starts here
VARIANTS = {
    "transformers": {"LIGER_DISABLE": "1"},
    "liger_autopatch": {},
    "liger_autopatch, no flce": {"LIGER_DISABLE": "flce"},
    "liger-kernel FLCE": {"LIGER_DISABLE": "1", "BENCH_LIGER": "flce"},
    "liger-kernel CE": {"LIGER_DISABLE": "1", "BENCH_LIGER": "ce"},
}


def llama_1b():
    """The Llama-3.2-1B-shaped model, random (seed 0), bf16, on the GPU."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=SEQ,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    with torch.device("cuda"):  # initialised on the GPU: seconds instead of a minute on the CPU
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def _child(batch: int, steps: int) -> dict:
    import torch

    liger = os.environ.get("BENCH_LIGER")
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=False, rms_norm=False, swiglu=False,
            cross_entropy=liger == "ce", fused_linear_cross_entropy=liger == "flce",
        )
    model = llama_1b()
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    generator = torch.Generator(device="cuda").manual_seed(1)
    blocks = torch.randint(0, config.vocab_size, (steps, batch, PERIOD), device="cuda", generator=generator)
    batches = blocks.repeat(1, 1, SEQ // PERIOD)
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
    timed = sorted(times[WARMUP:] or times)
    import liger_autopatch

    return {
        "losses": losses,
        "step_ms": timed[len(timed) // 2],
        "tokens_per_s": batch * SEQ / (timed[len(timed) // 2] / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "patched": [row.target for row in liger_autopatch.status() if row.state == "patched"],
    }


def _run_variant(extra_env: dict[str, str], batch: int, steps: int = WARMUP + TIMED) -> dict:
    """One training run in a fresh process; {"error": last line of stderr} if it failed."""
    env = {k: v for k, v in os.environ.items() if k != "LIGER_DISABLE"} | extra_env
    run = subprocess.run([sys.executable, __file__, "--child", str(batch), str(steps)], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _largest_batch(extra_env: dict[str, str], fits: int) -> int:
    """The largest batch that trains, by doubling from one that fits, then bisecting.

    Two steps per try: the optimizer state exists from the first, so the second step
    reaches the peak that every later step repeats.
    """
    low, high = fits, fits * 2
    while "error" not in _run_variant(extra_env, high, steps=2):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if "error" in _run_variant(extra_env, middle, steps=2):
            high = middle
        else:
            low = middle
    return low


def main(search_largest: bool) -> None:
    import torch

    results = {name: _run_variant(extra_env, BATCH) for name, extra_env in VARIANTS.items()}
    for name, extra_env in VARIANTS.items():
        if search_largest and "error" not in results[name]:
            results[name]["largest_batch"] = _largest_batch(extra_env, BATCH)
    gpu = torch.cuda.get_device_name()
    print(f"Llama-3.2-1B shape, batch {BATCH} x {SEQ}, bf16, fused AdamW; {gpu}, torch {torch.__version__}")
    print(f"  {'variant':<24} {'step ms':>8} {'tokens/s':>9} {'peak GiB':>9} {'max batch':>9}  losses")
    for name, row in results.items():
        if "error" in row:
            print(f"  {name:<24} error: {row['error']}")
            continue
        losses = " ".join(f"{loss:.4f}" for loss in row["losses"])
        print(f"  {name:<24} {row['step_ms']:>8.1f} {row['tokens_per_s'] / 1e3:>8.1f}k {row['peak_gib']:>9.2f} "
              f"{row.get('largest_batch', '-'):>9}  {losses}")
    import transformers

    record = {"date": date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
              "transformers": transformers.__version__, "batch": BATCH, "seq": SEQ, "results": results}
    save_record(f"train-{gpu.replace(' ', '_')}", record)


def save_record(stem: str, record: dict) -> None:
    """Write ``record`` to bench/results/<stem>-<record's date>.json."""
    out = REPO / "bench" / "results" / f"{stem}-{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("saved", out.relative_to(REPO))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main(search_largest=sys.argv[1:] == ["--largest-batch"])
