"""Fused linear cross-entropy, side by side: time, peak extra memory and gradient error.

Implementations (each skipped with the reason where its package is missing):

* ``liger_autopatch``: :func:`liger_autopatch.ops.fused_linear_cross_entropy.fused_linear_cross_entropy`;
* ``torch_eager``: ``F.cross_entropy(F.linear(hidden, weight).float(), target)``, as
  transformers computes it;
* ``liger_kernel``: liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (0.8.5);
* ``cut_cross_entropy``: ``linear_cross_entropy(..., impl="cce")`` (25.1.1).

Shapes (N, H, V) = (8192, 4096, 128256) and (16384, 2304, 256000), the issue's, and
(16384, 2048, 128256), the lm_head of bench/train.py's step; bf16, 10% of the targets
ignored, ``loss.backward()`` with grad_output 1. Per row: median forward + backward time
(``triton.testing.do_bench``), peak memory allocated beyond the inputs (the gradients of
hidden and weight included: their size is given as ``grad_bytes``), the floor 6*N*H*V
FLOPs at the bf16 matmul rate measured in the same run (8192^3), and the time of the
three cuBLAS matmuls alone at the shape (``matmuls_alone_ms``). Numerics:
relative 2-norm error of the loss and of both gradients against float64 over all rows
(also for unfused bf16 autograd, the bar to meet).

``--shapes N,H,V ...`` runs other shapes (vocabularies that are not multiples of 64, for
example); ``--small`` runs tiny shapes, also on CPU (times by wall clock, no memory
figures), to debug the script. JSON goes to ``bench/results/flce-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from liger_autopatch.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

RESULTS = Path(__file__).resolve().parent / "results"
# The two shapes, and the lm_head of bench/train.py's Llama-3.2-1B step.
SHAPES = ((8192, 4096, 128256), (16384, 2304, 256000), (16384, 2048, 128256))
SMALL_SHAPES = ((256, 64, 1024), (512, 32, 2048))
IGNORED_FRACTION = 0.1

LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def implementations() -> tuple[dict[str, LossFunction], dict[str, str]]:
    """The loss functions ``(hidden, weight, target) -> loss`` that can run, and why the others cannot."""
    available: dict[str, LossFunction] = {
        "liger_autopatch": lambda h, w, t: fused_linear_cross_entropy(h, w, t),
        "torch_eager": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
    }
    missing: dict[str, str] = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss()
        available["liger_kernel"] = lambda h, w, t: liger_loss(w, h, t)
    except Exception as exc:
        missing["liger_kernel"] = f"{type(exc).__name__}: {exc}"
    try:
        from cut_cross_entropy import linear_cross_entropy

        available["cut_cross_entropy"] = lambda h, w, t: linear_cross_entropy(h, w, t, impl="cce")
    except Exception as exc:
        missing["cut_cross_entropy"] = f"{type(exc).__name__}: {exc}"
    return available, missing


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Hidden (N, H) and weight (V, H) requiring grad, targets with 10% ignored."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=generator).to(dtype).requires_grad_()
    weight = (
        (torch.randn(v, h, device=device, generator=generator) * h**-0.5).to(dtype).requires_grad_()
    )
    target = torch.randint(0, v, (n,), device=device, generator=generator)
    ignored = torch.rand(n, device=device, generator=generator) < IGNORED_FRACTION
    return hidden, weight, target.masked_fill(ignored, -100)


def median_ms(fn: Callable[[], None], grads_to_clear: list[torch.Tensor], device: str) -> float:
    """Median time of ``fn`` in ms (do_bench on CUDA, wall clock on CPU)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grads_to_clear, return_mode="median")
    times = []
    for _ in range(5):
        for t in grads_to_clear:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Measured bf16 matmul rate (8192^3 on CUDA, 1024^3 elsewhere), TFLOP/s."""
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), [], device)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def matmuls_alone_ms(hidden: torch.Tensor, weight: torch.Tensor, device: str) -> float:
    """The three matmuls of any unrecomputed design (logits, grad of hidden, grad of
    weight) by cuBLAS on the whole batch at once, with no loss in between: what this
    design cannot beat."""
    with torch.no_grad():
        logits = hidden @ weight.t()
        return median_ms(
            lambda: (hidden @ weight.t(), logits @ weight, logits.t() @ hidden), [], device
        )


def peak_extra_bytes(
    fn: Callable[[], None], hidden: torch.Tensor, weight: torch.Tensor
) -> int | None:
    """Peak bytes allocated by one forward + backward beyond what existed before it."""
    if not hidden.is_cuda:
        return None
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def errors_against_float64(
    loss_fn: LossFunction,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    exact: dict,
) -> dict[str, float]:
    """Relative errors (2-norm) of loss, grad of hidden and grad of weight."""
    hidden, weight = (
        hidden.detach().clone().requires_grad_(),
        weight.detach().clone().requires_grad_(),
    )
    loss = loss_fn(hidden, weight, target)
    loss.backward()
    return {
        "loss": abs(loss.item() - exact["loss"]) / abs(exact["loss"]),
        "grad_hidden": (
            (hidden.grad.double() - exact["hidden"]).norm() / exact["hidden"].norm()
        ).item(),
        "grad_weight": (
            (weight.grad.double() - exact["weight"]).norm() / exact["weight"].norm()
        ).item(),
    }


def float64_reference(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, rows: int = 1024
) -> dict:
    """Mean cross-entropy and both gradients in float64, over every row, ``rows`` at a time
    (all the float64 logits at once would not fit)."""
    w = weight.detach().double()
    grad_weight = torch.zeros_like(w)
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    valid = target != -100
    n_valid = int(valid.sum())
    total = 0.0
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows].detach().double()
        t, keep = target[start : start + rows], valid[start : start + rows]
        logits = h @ w.t()
        lse = torch.logsumexp(logits, 1)
        picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        total += (lse - picked)[keep].sum().item()
        grad = torch.exp(logits - lse[:, None])  # softmax, then minus the one-hot target
        grad[torch.arange(len(t), device=t.device), t.clamp(min=0)] -= 1
        grad[~keep] = 0
        grad /= n_valid
        grad_hidden[start : start + rows] = grad @ w
        grad_weight += grad.t() @ h
    return {"loss": total / n_valid, "hidden": grad_hidden, "weight": grad_weight}


def run_shape(
    shape: tuple[int, int, int],
    available: dict[str, LossFunction],
    device: str,
    dtype: torch.dtype,
    tflops: float,
) -> dict[str, Any]:
    n, h, v = shape
    hidden, weight, target = make_inputs(n, h, v, dtype, device)
    row: dict[str, Any] = {
        "N": n,
        "H": h,
        "V": v,
        "dtype": str(dtype).removeprefix("torch."),
        "floor_ms": 6 * n * h * v / (tflops * 1e12) * 1e3,
        "grad_bytes": (hidden.numel() + weight.numel()) * hidden.element_size(),
        "results": {},
    }
    row["matmuls_alone_ms"] = matmuls_alone_ms(hidden, weight, device)
    print(f"{shape} three cuBLAS matmuls alone: {row['matmuls_alone_ms']:.1f} ms", flush=True)
    exact = float64_reference(hidden, weight, target)
    row["unfused_bf16_error"] = errors_against_float64(
        lambda a, b, t: F.cross_entropy(F.linear(a, b).float(), t), hidden, weight, target, exact
    )
    for name, loss_fn in available.items():

        def step(loss_fn: LossFunction = loss_fn) -> None:
            loss_fn(hidden, weight, target).backward()

        try:
            step()  # warm-up: compilation, autotuning
            result = {
                "ms": median_ms(step, [hidden, weight], device),
                "peak_extra_bytes": peak_extra_bytes(step, hidden, weight),
            }
            result["error"] = errors_against_float64(loss_fn, hidden, weight, target, exact)
            result["vs_floor"] = result["ms"] / row["floor_ms"]
        except Exception as exc:  # one implementation failing must not lose the others
            result = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
        row["results"][name] = result
        print(f"{shape} {name:18s} {result}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="N,H,V",
        help="shapes to run instead of the default ones, e.g. 8192,1600,50257",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        raise SystemExit("no CUDA device: use --small to debug on the CPU")
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes]
    else:
        shapes = SMALL_SHAPES if args.small else SHAPES
    dtype = torch.bfloat16
    available, missing = implementations()
    tflops = matmul_tflops(device, dtype)
    print(f"bf16 matmul: {tflops:.1f} TFLOP/s on {device}", flush=True)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "matmul_tflops": tflops,
        "unavailable": missing,
        "rows": [
            run_shape(shape, available, device, dtype, tflops)
            for shape in shapes
        ],
    }
    name = report["device"].replace(" ", "_")
    tag = "-small" if args.small else ""
    if args.shapes:
        tag += "-" + "-".join("x".join(map(str, shape)) for shape in shapes)
    out = args.out or RESULTS / f"flce-{name}-{report['date']}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
