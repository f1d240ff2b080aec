"""Registers and spills of the cross-entropy forward kernel, compiled for a GPU on a
machine without one.

    python bench/registers.py [--vocab 32000,50257] [--out bench/results]

The kernels run at register caps that leave nothing spare (NOTES-ce v14, v23). A new
Triton release or a kernel change can make them spill, which otherwise only a GPU run
would show, as time. For each V, with the gradient written and loss only (``no_grad``):

1. capture: a child process calls the op on CPU tensors under ``TRITON_INTERPRET=1``
   with the launch configurations the package chooses on an H100 (compute capability
   9.0, 132 SMs, 3.35 TB/s), and records the forward kernel's launch instead of running it;
2. specialize its arguments as Triton's launcher does on a GPU: integers equal to 1
   become constants, integers and pointers divisible by 16 are marked so;
3. compile for sm_90 with the launch's options;
4. read the registers and the stack bytes per thread (``cuobjdump -res-usage``; stack
   above 0 means spills), and count the spill loads and stores in the SASS and those
   inside the column loops (loops within the row loop: what runs once per block; the
   rest runs once per row).

Prints a table and writes ``<out>/registers-triton-<version>-sm90.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import types
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

VOCABS = (32000, 50257, 50304, 128256, 262144)
PASSES = ("loss_and_gradient", "loss")
N_ROWS = 8192
# What the H100 of BENCHMARKS.md reports to torch.
H100 = types.SimpleNamespace(
    major=9, minor=0, multi_processor_count=132, memory_clock_rate=2619000, memory_bus_width=5120
)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")
POINTER_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int64": "*i64", "int32": "*i32"}


class _HeldBack(BaseException):
    """Raised by the captured launch instead of running it: a BaseException, so that the
    op's launch guard (which turns the Triton path off on an Exception) lets it through."""


def capture_forward_launches(vocabs: list[int]) -> list[dict[str, Any]]:
    """The forward kernel's launch for (N_ROWS, V) bf16 logits, per V and pass, as the op
    makes it with the H100's launch configurations: the arguments by name (tensors as
    their dtype) and the launch options. Runs the op, so it needs ``TRITON_INTERPRET=1``
    (on a CPU tensor only the interpreter takes the Triton path), and patches it for
    good: it is the child process's whole job."""
    from liger_autopatch.ops import cross_entropy as ce

    gpu = torch.device("cuda", 0)
    ce._cuda_devices[gpu] = ce._CudaDevice(H100)
    kernels = ce._kernels()
    arg_names = kernels.cross_entropy_forward_kernel.arg_names
    launches: list[dict[str, Any]] = []

    class HeldBackKernel:
        """Stands in for the forward kernel: ``kernel[grid](*args, **kwargs)`` records."""

        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            return self.launch

        def launch(self, *args: Any, **kwargs: Any) -> None:
            values = dict(zip(arg_names, args), **kwargs)
            launches.append({
                "values": {
                    name: {"tensor": str(value.dtype).removeprefix("torch.")}
                    if isinstance(value, torch.Tensor) else value
                    for name, value in values.items() if name not in LAUNCH_OPTIONS
                },
                "options": {name: value for name, value in values.items() if name in LAUNCH_OPTIONS},
            })  # fmt: skip
            raise _HeldBack

    kernels.cross_entropy_forward_kernel = HeldBackKernel()
    real_grid = ce._grid
    ce.launch_config = lambda n_cols, device, kernel_pass: ce._choose_launch_config(n_cols, gpu, kernel_pass)
    ce._grid = lambda n_rows, device, config: real_grid(n_rows, gpu, config)
    for n_cols in vocabs:
        for kernel_pass in PASSES:
            with_grad = kernel_pass == "loss_and_gradient"
            logits = torch.empty(N_ROWS, n_cols, dtype=torch.bfloat16).requires_grad_(with_grad)
            target = torch.randint(0, n_cols, (N_ROWS,))
            launched_before = len(launches)
            try:
                with torch.set_grad_enabled(with_grad):
                    ce.cross_entropy(logits, target)
            except _HeldBack:
                pass
            if len(launches) == launched_before:
                raise RuntimeError(f"V={n_cols}, {kernel_pass}: the op did not launch the forward kernel")
            launches[-1].update(vocab=n_cols, kernel_pass=kernel_pass)
    return launches


def captured_in_child(vocabs: list[int]) -> list[dict[str, Any]]:
    """capture_forward_launches in a child process under the interpreter, which patches
    triton.language while it runs: this process compiles without it."""
    child = subprocess.run(
        [sys.executable, __file__, "--capture", ",".join(map(str, vocabs))],
        env=dict(os.environ, TRITON_INTERPRET="1"), stdout=subprocess.PIPE, text=True, check=True,
    )  # fmt: skip
    return json.loads(child.stdout.splitlines()[-1])


def compile_for_sm90(kernel: Any, launch: dict[str, Any]) -> dict[str, int]:
    """Registers, stack bytes and spill accesses of ``kernel`` compiled for sm_90 with
    the arguments and options of a captured launch."""
    values = launch["values"]
    signature, constants, divisible = {}, {}, []
    for index, param in enumerate(kernel.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr or value is None or (type(value) is int and value == 1):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, dict):
            signature[name] = POINTER_TYPES[value["tensor"]]
            divisible.append(index)  # the caching allocator's blocks start on 512 bytes
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(index)
        else:
            signature[name] = "fp32"
    attrs = {(index,): [["tt.divisibility", 16]] for index in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=launch["options"])  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage, sass = (
            subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, cubin.name], capture_output=True, text=True,
                           check=True).stdout
            for flag in ("-res-usage", "-sass")
        )  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[:300]}")
    return {"registers": int(found[1]), "stack_bytes": int(found[2]), **spill_accesses(sass)}


def spill_accesses(sass: str) -> dict[str, int]:
    """The local-memory loads and stores (LDL, STL) in the SASS, and those inside a
    column loop: a loop (a backward branch's range) within another, the row loop. Column
    loops that the compiler unrolled are not loops there, so their number is reported."""
    loops, accesses = [], []
    for line in sass.splitlines():
        address = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if address is None:
            continue
        at = int(address[1], 16)
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", line)
        if branch and int(branch[1], 16) < at:
            loops.append((int(branch[1], 16), at))
        if re.search(r"\b(LDL|STL)(\.\w+)*\s", line):
            accesses.append(at)
    column_loops = [
        (start, end) for start, end in loops
        if any(outer_start <= start and end <= outer_end and (outer_start, outer_end) != (start, end)
               for outer_start, outer_end in loops)
    ]  # fmt: skip
    return {
        "column_loops": len(column_loops),
        "spill_accesses": len(accesses),
        "in_column_loops": sum(any(start <= at <= end for start, end in column_loops) for at in accesses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default=",".join(map(str, VOCABS)), help="comma-separated vocabulary sizes")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--capture", help=argparse.SUPPRESS)  # the child's job: a --vocab list
    args = parser.parse_args()
    if args.capture:
        print(json.dumps(capture_forward_launches([int(v) for v in args.capture.split(",")])))
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run it without TRITON_INTERPRET=1: it compiles the kernels")

    from liger_autopatch.ops import _cross_entropy_kernels

    kernel = _cross_entropy_kernels.cross_entropy_forward_kernel
    columns = ("vocab", "kernel_pass", "block", "num_warps", "maxnreg", "align_rows", "prefetch", "l2_prefetch",
               "registers", "stack_bytes", "column_loops", "spill_accesses", "in_column_loops")  # fmt: skip
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90, the H100's launch configurations\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = []
    for launch in captured_in_child([int(v) for v in args.vocab.split(",")]):
        values, options = launch["values"], launch["options"]
        row = {
            "vocab": launch["vocab"],
            "kernel_pass": launch["kernel_pass"],
            "block": values["BLOCK"],
            "num_warps": options["num_warps"],
            "maxnreg": options.get("maxnreg"),
            "align_rows": values["ALIGN_ROWS"],
            "prefetch": values["PREFETCH"],
            "l2_prefetch": values["L2_PREFETCH"],
            **compile_for_sm90(kernel, launch),
        }
        rows.append(row)
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")

    out = pathlib.Path(args.out) / f"registers-triton-{triton.__version__}-sm90.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
