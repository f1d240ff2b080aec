"""Time and peak memory of ``model.loss_function(...)``, forward + backward, patched vs unpatched.

The call is the one a transformers causal LM makes in its forward,
``self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)``,
on a Llama-3.2-1B-shaped model (V = 128256, H = 2048; the model is built on the meta
device: only its ``loss_function`` is used) with bf16 logits of 16k tokens. Each variant
runs in a fresh interpreter: patched as installed, and unpatched with ``LIGER_DISABLE=1``.
Rows: the plain mean, and ``num_items_in_batch`` as the Trainer passes it.

    python bench/hf_loss.py            # on the GPU; prints a table, saves bench/results/hf_loss-<gpu>-<date>.json
    python bench/hf_loss.py --small    # tiny shapes on the CPU under TRITON_INTERPRET=1, to debug the script

Peak memory is what the call allocates beyond the logits and labels that exist before it.
Expected on an H100: at least 8 GiB less peak and at least 5x faster than unpatched (the
unpatched path makes float32 copies of the logits: 4 x N x V bytes each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

# Llama-3.2-1B, and tiny shapes for the Triton interpreter on the CPU.
FULL_SHAPE = {"vocab_size": 128256, "hidden_size": 2048, "batch": 4, "seq": 4096}
SMALL_SHAPE = {"vocab_size": 1000, "hidden_size": 64, "batch": 2, "seq": 32}
ROWS = ("mean", "num_items_in_batch")


def measure(mode: str, shape: dict[str, int], repeats: int) -> dict[str, Any]:
    """In this interpreter: time and peak memory of every row (``mode`` says how it was started)."""
    import torch
    import transformers

    if mode == "patched":
        import liger_autopatch

        liger_autopatch.install()  # a no-op where the .pth did it already
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=4 * shape["hidden_size"],
        num_hidden_layers=1,
        num_attention_heads=32 if shape["hidden_size"] >= 2048 else 4,
        num_key_value_heads=8 if shape["hidden_size"] >= 2048 else 2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    if not hasattr(model, "loss_function"):
        raise SystemExit(
            f"transformers {transformers.__version__} has no model.loss_function (needs >= 4.46)"
        )

    generator = torch.Generator(device=device).manual_seed(0)
    size = (shape["batch"], shape["seq"], shape["vocab_size"])
    logits = torch.randn(
        size, device=device, dtype=torch.bfloat16, generator=generator
    ).requires_grad_()
    labels = torch.randint(0, shape["vocab_size"], size[:2], device=device, generator=generator)
    labels[:, : shape["seq"] // 10] = -100  # a prompt the loss ignores: 10% of the labels
    num_items = (labels[:, 1:] != -100).sum()

    def step(kwargs: dict[str, Any]) -> torch.Tensor:
        loss = model.loss_function(
            logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs
        )
        loss.backward()
        logits.grad = None
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for row in ROWS:
        kwargs = {"num_items_in_batch": num_items} if row == "num_items_in_batch" else {}
        step(kwargs)  # warm-up: compilation, and the kernel settles on its gradient path
        synchronize()
        peak_gib = None
        if device.type == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(kwargs)
            synchronize()
            peak_gib = (torch.cuda.max_memory_allocated() - before) / GIB
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            loss = step(kwargs)
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        rows.append(
            {"row": row, "ms": statistics.median(times), "peak_gib": peak_gib, "loss": loss.item()}
        )

    patched = mode == "patched" and _is_patched(model.loss_function)
    return {"mode": mode, "device": _device_name(device), "kernel_in_use": patched, "rows": rows}


def _is_patched(function: Any) -> bool:
    from liger_autopatch import _registry

    return _registry.is_ours(function)


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_child(mode: str, small: bool, repeats: int) -> dict[str, Any]:
    """``measure`` in a fresh interpreter; unpatched means ``LIGER_DISABLE=1``."""
    env = {k: v for k, v in os.environ.items() if k != "LIGER_DISABLE"}
    if mode == "unpatched":
        env["LIGER_DISABLE"] = "1"
    if small:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, __file__, "--child", mode, "--repeats", str(repeats)]
    result = subprocess.run(
        [*command, *(["--small"] if small else [])],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"the {mode} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on, as this interpreter sees them."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "transformers", "liger-autopatch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def report(
    shape: dict[str, int], patched: dict[str, Any], unpatched: dict[str, Any], small: bool
) -> dict[str, Any]:
    """Print the table and the verdict; return what goes into the JSON file."""
    tokens = shape["batch"] * shape["seq"]
    print(
        f"model.loss_function forward + backward, {patched['device']}, {tokens} tokens x V={shape['vocab_size']}, bf16 logits"
    )
    print(f"kernel in use in the patched run: {patched['kernel_in_use']}\n")
    print("| row | variant | ms (median) | peak extra GiB | loss |")
    print("|---|---|---|---|---|")
    comparison = []
    for plain, ours in zip(unpatched["rows"], patched["rows"]):
        for name, row in (("unpatched", plain), ("patched", ours)):
            peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            print(f"| {row['row']} | {name} | {row['ms']:.2f} | {peak} | {row['loss']:.6f} |")
        saved = None if plain["peak_gib"] is None else plain["peak_gib"] - ours["peak_gib"]
        comparison.append({
            "row": plain["row"],
            "speedup": plain["ms"] / ours["ms"],
            "peak_saved_gib": saved,
            "loss_relative_difference": abs(ours["loss"] - plain["loss"]) / abs(plain["loss"]),
        })  # fmt: skip
    print()
    for row in comparison:
        saved = "n/a" if row["peak_saved_gib"] is None else f"{row['peak_saved_gib']:.2f} GiB"
        verdict = ""
        if not small and row["peak_saved_gib"] is not None:
            met = row["speedup"] >= 5 and row["peak_saved_gib"] >= 8
            verdict = "  (expected >= 5x and >= 8 GiB: " + ("met)" if met else "NOT met)")
        print(
            f"{row['row']}: {row['speedup']:.1f}x faster, peak {saved} lower, "
            f"loss differs by {row['loss_relative_difference']:.1e} relative{verdict}"
        )
    return {
        "shape": {**shape, "tokens": tokens},
        "patched": patched,
        "unpatched": unpatched,
        "comparison": comparison,
    }


def main() -> None:
    """Command line: run both variants, print the table, save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per row (default 20, 3 with --small)"
    )
    parser.add_argument("--child", choices=("patched", "unpatched"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    repeats = args.repeats or (3 if args.small else 20)
    if args.child:
        print(json.dumps(measure(args.child, shape, repeats)))
        return

    unpatched = run_child("unpatched", args.small, repeats)
    patched = run_child("patched", args.small, repeats)
    result = report(shape, patched, unpatched, args.small)
    result.update(date=datetime.date.today().isoformat(), small=args.small, versions=versions())
    slug = re.sub(r"[^a-z0-9]+", "-", patched["device"].lower()).strip("-") + (
        "-small" if args.small else ""
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hf_loss-{slug}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
