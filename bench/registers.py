"""Registers and spills of the cross-entropy forward kernel, compiled for a GPU on a
machine without one.

    python bench/registers.py [--vocab 32000,50257] [--out bench/results]

The kernels were tuned at register caps that leave no room (NOTES-ce v14, v23): a new
Triton release or a kernel change can make them spill, which only a GPU run would show
as time. This script shows it without one. A child process calls the op on CPU tensors
under ``TRITON_INTERPRET=1`` with the launch configurations the package chooses on an
H100 (compute capability 9.0, 132 SMs, 3.35 TB/s) and holds back the forward kernel's
launch instead of running it; this process specializes its arguments as Triton's launcher
does on a GPU
(integers equal to 1 become constants, integers and pointers divisible by 16 are marked
so), compiles it for sm_90 with the launch's options, and reads the registers and the
stack bytes a thread from ``cuobjdump -res-usage`` (stack above 0: spills), and counts
the spill loads and stores in the SASS, and how many of them sit in the innermost loops
(the column loops, run once per block; the rest run once per row). Rows: each V
with the gradient written (the default), and loss only (under ``no_grad``). Prints a
table and writes ``<out>/registers-triton-<version>-sm90.json``.
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


def capture_forward_launch(n_cols: int, with_grad: bool) -> dict[str, Any]:
    """The forward kernel's launch for (N_ROWS, n_cols) bf16 logits, as the op makes it
    with the H100's launch configuration: its arguments by name (tensors as their dtype)
    and its launch options. Runs the op, so it needs ``TRITON_INTERPRET=1``: on a CPU
    tensor, only the interpreter takes the Triton path."""
    from liger_autopatch.ops import cross_entropy as ce

    gpu = torch.device("cuda", 0)
    ce._cuda_devices[gpu] = ce._CudaDevice(H100)
    kernels = ce._kernels()
    arg_names = kernels.cross_entropy_forward_kernel.arg_names
    captured: dict[str, Any] = {}

    class HeldBackKernel:
        """Stands in for the forward kernel: ``kernel[grid](*args, **kwargs)`` records."""

        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            return self.launch

        def launch(self, *args: Any, **kwargs: Any) -> None:
            values = dict(zip(arg_names, args), **kwargs)
            captured["values"] = {
                name: {"tensor": str(value.dtype).removeprefix("torch.")} if isinstance(value, torch.Tensor) else value
                for name, value in values.items()
                if name not in LAUNCH_OPTIONS
            }
            captured["options"] = {name: value for name, value in values.items() if name in LAUNCH_OPTIONS}
            raise _HeldBack

    # Patched for good: this runs in a child process that ends with the capture.
    real_grid = ce._grid
    kernels.cross_entropy_forward_kernel = HeldBackKernel()
    ce.launch_config = lambda n, device, kernel_pass: ce._choose_launch_config(n, gpu, kernel_pass)
    ce._grid = lambda n_rows, device, config: real_grid(n_rows, gpu, config)
    logits = torch.empty(N_ROWS, n_cols, dtype=torch.bfloat16).requires_grad_(with_grad)
    target = torch.randint(0, n_cols, (N_ROWS,))
    try:
        with torch.set_grad_enabled(with_grad):
            ce.cross_entropy(logits, target)
    except _HeldBack:
        pass
    if not captured:
        raise RuntimeError(f"V={n_cols}: the op did not launch the forward kernel")
    return captured


def captured_in_child(n_cols: int, with_grad: bool) -> dict[str, Any]:
    """capture_forward_launch in a child process under the interpreter (which patches
    triton.language while it runs, so this process compiles without it)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(
        [sys.executable, __file__, "--capture", f"{n_cols},{int(with_grad)}"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(child.stdout.splitlines()[-1])


def compile_for_sm90(kernel: Any, launch: dict[str, Any]) -> dict[str, int]:
    """Registers and stack bytes of ``kernel`` compiled for sm_90 with the arguments and
    options of a captured launch."""
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
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage, sass = (
            subprocess.run([str(cuobjdump), flag, cubin.name], capture_output=True, text=True, check=True).stdout
            for flag in ("-res-usage", "-sass")
        )
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[:300]}")
    return {"registers": int(found[1]), "stack_bytes": int(found[2]), **local_memory_accesses(sass)}


def local_memory_accesses(sass: str) -> dict[str, int]:
    """Spill loads and stores (LDL, STL) in the SASS: all of them, and those inside an
    innermost loop (a backward branch's range with no other inside it: the column loops,
    where an access costs once per block rather than once per row)."""
    address_of = re.compile(r"/\*([0-9a-f]{4,})\*/")
    loops, accesses = [], []
    for line in sass.splitlines():
        address = address_of.search(line)
        if address is None:
            continue
        at = int(address[1], 16)
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", line)
        if branch and int(branch[1], 16) < at:
            loops.append((int(branch[1], 16), at))
        if re.search(r"\b(LDL|STL)(\.\w+)*\s", line):
            accesses.append(at)
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return {
        "local_accesses": len(accesses),
        "in_innermost_loops": sum(any(a <= at <= b for a, b in innermost) for at in accesses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default=",".join(map(str, VOCABS)), help="comma-separated vocabulary sizes")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--capture", help=argparse.SUPPRESS)  # "V,with_grad": the child's job
    args = parser.parse_args()
    if args.capture:
        n_cols, with_grad = map(int, args.capture.split(","))
        print(json.dumps(capture_forward_launch(n_cols, bool(with_grad))))
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run it without TRITON_INTERPRET=1: it compiles the kernels")

    from liger_autopatch.ops import _cross_entropy_kernels

    kernel = _cross_entropy_kernels.cross_entropy_forward_kernel
    rows = []
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90, the H100's launch configurations\n")
    print("| V | pass | block | warps | register cap | read ahead | L2 fetch | registers | stack bytes "
          "| spill loads + stores | of them in column loops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n_cols in (int(v) for v in args.vocab.split(",")):
        for with_grad in (True, False):
            launch = captured_in_child(n_cols, with_grad)
            values, options = launch["values"], launch["options"]
            row = {
                "vocab": n_cols,
                "pass": "loss_and_gradient" if with_grad else "loss",
                "block": values["BLOCK"],
                "num_warps": options["num_warps"],
                "maxnreg": options.get("maxnreg"),
                "prefetch": values["PREFETCH"],
                "l2_prefetch": values["L2_PREFETCH"],
                **compile_for_sm90(kernel, launch),
            }
            rows.append(row)
            print(" | ".join(["", *map(str, row.values()), ""]).strip())

    out = pathlib.Path(args.out) / f"registers-triton-{triton.__version__}-sm90.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
