"""``python -m liger_autopatch demo``: the same tiny training run, patched and unpatched.

Each run is its own process (the unpatched one with ``LIGER_DISABLE=1``), so what the
demo shows is what a user's program gets with no code change. Nothing is downloaded: a
randomly initialised Llama-shaped model learns synthetic tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

STEPS = 8
SEED = 0
# A GPU run keeps a Llama-3 vocabulary, where the loss dominates memory; a CPU run stays tiny.
GPU_SHAPE = {"vocab_size": 128256, "hidden_size": 256, "batch": 4, "seq_len": 2048}
CPU_SHAPE = {"vocab_size": 2048, "hidden_size": 64, "batch": 2, "seq_len": 64}
# Relative gap between the loss curves that still counts as agreeing: bf16 training on a
# GPU drifts by rounding from step to step; fp32 on a CPU must agree much more closely.
AGREE_BF16 = 2e-2
AGREE_FP32 = 1e-4


def _train() -> dict[str, Any]:
    """One training run in this process; returns losses, timings and the patch record."""
    import torch
    import transformers

    import liger_autopatch
    from liger_autopatch import _bootstrap

    if not _bootstrap.booted:  # the .pth did not run (source checkout, python -S)
        liger_autopatch.install()
    on_gpu = torch.cuda.is_available()
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=4 * shape["hidden_size"],
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=shape["seq_len"],
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, shape["vocab_size"], (STEPS, shape["batch"], shape["seq_len"]), device=device)
    losses, step_ms = [], []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(STEPS):
        start = time.perf_counter()
        loss = model(input_ids=tokens[step], labels=tokens[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "losses": losses,
        "step_ms": sorted(step_ms[2:])[len(step_ms[2:]) // 2],  # median after warm-up
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "patched": [row.target for row in liger_autopatch.status() if row.state == "patched"],
    }


def _run_child(disable: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LIGER_DISABLE", None)
    if disable:
        env["LIGER_DISABLE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "liger_autopatch.demo"], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"the {'unpatched' if disable else 'patched'} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run() -> int:
    """Run both trainings and print the comparison; returns the exit status."""
    print("Training a tiny random Llama twice, each in its own process ...")
    patched = _run_child(disable=False)
    plain = _run_child(disable=True)
    shape = patched["shape"]
    print(f"device: {patched['device']} ({patched['dtype']}), vocab {shape['vocab_size']}, "
          f"{shape['batch']} x {shape['seq_len']} tokens per step, {STEPS} steps")
    if patched["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("No CUDA GPU here: the patched run used transformers' own loss code (the fallback),")
        print("so the two runs must agree exactly; speed and memory gains need a GPU.")
    print("patched:", ", ".join(patched["patched"]) or "nothing")
    print()
    print(f"  {'step':>4}  {'patched loss':>12}  {'unpatched loss':>14}")
    for step, (ours, theirs) in enumerate(zip(patched["losses"], plain["losses"])):
        print(f"  {step:>4}  {ours:>12.5f}  {theirs:>14.5f}")
    gap = max(abs(a - b) / abs(b) for a, b in zip(patched["losses"], plain["losses"]))
    tolerance = AGREE_FP32 if patched["dtype"] == "float32" else AGREE_BF16
    agree = gap <= tolerance
    print(f"loss curves {'agree' if agree else 'DIFFER'}: largest relative gap {gap:.1e} (tolerance {tolerance:.0e})")
    if patched["peak_gib"] is not None:
        print(f"step time: {patched['step_ms']:.1f} ms patched vs {plain['step_ms']:.1f} ms unpatched "
              f"({plain['step_ms'] / patched['step_ms']:.2f}x)")
        print(f"peak GPU memory: {patched['peak_gib']:.2f} GiB patched vs {plain['peak_gib']:.2f} GiB unpatched")
    return 0 if agree else 1


if __name__ == "__main__":
    print(json.dumps(_train()))
