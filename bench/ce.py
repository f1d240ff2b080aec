"""Cross-entropy forward + backward on one GPU, side by side with the peers.

    python bench/ce.py [--sweep] [--vocab 65024,151936] [--rounds 3] [--out bench/results]

Rows: N = 8192 tokens, V in {32000, 128256, 262144} (or the ``--vocab`` list), bf16 logits, 10% of labels ignored,
grad_output 1 and 1/8. Columns: ms (forward + backward: the median over the rounds of
triton.testing.do_bench's median), the GPU's busy time per call (kernels and copies, from
torch.profiler: where ms is well above it, the row waited for the host), peak memory
beyond the inputs, and the ratio of ms to the floor = 2*N*V*2 bytes (read the logits
once, write the gradient once) over the device copy bandwidth measured in the same run.

Each (V, grad_output) times its implementations ``--rounds`` times, each round in an
order rotated by one: where the host bounds a row, its time depends on what ran just
before it (bench/NOTES-ce.md, v32), and the rotation gives every implementation each
place once. Implementations:

* liger_autopatch, logits held by the caller (gradient into a fresh buffer);
* liger_autopatch, logits a temporary nobody else holds (gradient may reuse its buffer);
* transformers' path: ``F.cross_entropy(logits.float(), ...)``;
* torch eager on the bf16 logits; torch.compile of the upcast path;
* liger-kernel ``LigerCrossEntropyLoss`` (if importable; it writes into the logits).

``--sweep`` first times the gradient-writing pass at each V under the launch
configuration the package ships and under that one with each switch flipped, then
builds the table with the fastest. The JSON goes to
``<out>/ce-<gpu>-<date>.json`` (``-vocab-<V>-...`` appended for a ``--vocab`` list).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from liger_autopatch.ops import cross_entropy as ce

N_TOKENS = 8192
VOCABS = (32000, 128256, 262144)
GRAD_OUTPUTS = (1.0, 0.125)
IGNORED_FRACTION = 0.1


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


class _Recycle(torch.autograd.Function):
    """Hands out one logits buffer as a fresh non-leaf tensor that nobody else holds, and
    takes back whatever gradient arrives (the same buffer when the op worked in place)."""

    pool: list[torch.Tensor] = []

    @staticmethod
    def forward(ctx, anchor: torch.Tensor) -> torch.Tensor:
        return _Recycle.pool.pop()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> None:
        _Recycle.pool.append(grad)
        return None


def candidates(
    logits: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor, paths: dict[str, tuple]
) -> dict[str, Callable[[], None]]:
    """name -> one forward + backward, each writing the logits' gradient once. Our two
    runs leave in ``paths`` their last call's autograd node and whether it worked in place."""
    held = logits.detach().clone().requires_grad_()
    anchor = torch.zeros((), device="cuda", requires_grad=True)
    _Recycle.pool[:] = [logits.detach().clone()]

    def ours_held() -> None:
        loss = ce.cross_entropy(held, target)
        node = loss.grad_fn
        (grad,) = torch.autograd.grad(loss, held, grad_output)
        paths["liger_autopatch (held)"] = (node, grad.data_ptr() == held.data_ptr())

    def ours_temporary() -> None:
        buffer_pointer = _Recycle.pool[-1].data_ptr()
        loss = ce.cross_entropy(_Recycle.apply(anchor), target)
        node = loss.grad_fn
        # autograd.grad like the other rows: loss.backward would also launch an add into
        # anchor.grad each call, host and GPU work that is the harness's, not the op's.
        torch.autograd.grad(loss, anchor, grad_output, allow_unused=True)
        paths["liger_autopatch (temporary)"] = (node, _Recycle.pool[-1].data_ptr() == buffer_pointer)

    def transformers_path() -> None:
        loss = F.cross_entropy(held.float(), target, ignore_index=-100)
        torch.autograd.grad(loss, held, grad_output)

    def torch_bf16() -> None:
        loss = F.cross_entropy(held, target, ignore_index=-100)
        torch.autograd.grad(loss, held, grad_output)

    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-100))

    def torch_compile() -> None:
        torch.autograd.grad(compiled(held, target), held, grad_output)

    runs = {
        "liger_autopatch (held)": ours_held,
        "liger_autopatch (temporary)": ours_temporary,
        "transformers (.float())": transformers_path,
        "torch eager bf16": torch_bf16,
        "torch.compile": torch_compile,
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return runs
    liger_loss = LigerCrossEntropyLoss(ignore_index=-100)

    def liger_kernel() -> None:
        torch.autograd.grad(liger_loss(held, target), held, grad_output)

    runs["liger-kernel 0.8.5"] = liger_kernel
    return runs


def measure(fn: Callable[[], None], rep: int = 100) -> float:
    """Median ms of do_bench."""
    fn()  # compile / warm up, and let our call site settle on its gradient path
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_extra_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gpu_busy_ms(fn: Callable[[], None], calls: int = 10) -> float:
    """GPU time per call: the summed durations of the kernels, copies and fills it ran."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_events = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in device_events) / calls / 1e3


def describe(node: object, in_place: bool) -> str:
    """Which gradient path our op's autograd node took, and where the gradient went."""
    mode = f"grad-in-forward x{node.prediction.item():g}" if node.grad_in_forward else "grad-in-backward"
    return mode + (", in place" if in_place else ", fresh buffer")


def make_inputs(v: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(v)
    logits = torch.randn(N_TOKENS, v, device="cuda", dtype=torch.bfloat16, generator=generator) * 2
    target = torch.randint(0, v, (N_TOKENS,), device="cuda", generator=generator)
    target[torch.rand(N_TOKENS, device="cuda", generator=generator) < IGNORED_FRACTION] = -100
    return logits, target


# The switches of the gradient-writing pass, each flipped alone in a sweep.
SWITCHES = ("reverse", "prefetch", "l2_prefetch")


def sweep_configs(v: int) -> list[ce.LaunchConfig]:
    """The configuration the package ships for the gradient-writing pass at V on this GPU,
    then that one with each switch flipped: the switches were chosen on one GPU model
    (bench/NOTES-ce.md), and another may want them the other way."""
    shipped = ce.launch_config(v, torch.device("cuda"), "loss_and_gradient")
    # The L2 fetch is a Hopper instruction: elsewhere it cannot be switched on. The early
    # loads take the first block of each pass, so the kernel refuses them on a backward walk.
    switches = [name for name in SWITCHES if name != "l2_prefetch" or torch.cuda.get_device_capability()[0] == 9]
    if shipped.reverse:
        switches.remove("prefetch")
    return [shipped] + [dataclasses.replace(shipped, **{name: not getattr(shipped, name)}) for name in switches]


def time_config(run: Callable[[], None], config: ce.LaunchConfig, device: torch.device) -> float | str:
    """Median ms of ``run`` with ``config`` for the gradient-writing pass, or why its
    kernel failed. A failure turns the package's Triton path off on ``device`` (every later
    timing would be torch's), so the sweep, which tries configurations the package does
    not ship, turns it back on."""
    default = ce.launch_config
    ce.launch_config = lambda n_cols, device, kernel_pass: (
        config if kernel_pass == "loss_and_gradient" else default(n_cols, device, kernel_pass)
    )
    try:
        ms = measure(run, rep=80)
    finally:
        ce.launch_config = default
    reason = ce.unusable_reason(device)
    if reason is not None:
        del ce._unusable_devices[device]
        return reason
    return ms


def sweep(vocabs: tuple[int, ...], bandwidth: float) -> tuple[list[dict], dict[int, ce.LaunchConfig]]:
    """Our fwd+bwd (temporary logits, grad_output 1) under the configurations of
    :func:`sweep_configs`; returns the timings and the fastest configuration per V."""
    results = []
    best: dict[int, tuple[float, ce.LaunchConfig]] = {}
    one = torch.ones((), device="cuda")
    for v in vocabs:
        logits, target = make_inputs(v)
        floor_ms = 2 * N_TOKENS * v * 2 / bandwidth * 1e3
        run = candidates(logits, target, one, {})["liger_autopatch (temporary)"]
        for config in sweep_configs(v):
            outcome = time_config(run, config, logits.device)
            if isinstance(outcome, str):
                results.append({"V": v, **dataclasses.asdict(config), "failed": outcome})
                print(f"sweep V={v:>6} {config}: the kernel failed ({outcome})", flush=True)
                continue
            results.append({"V": v, **dataclasses.asdict(config), "ms": outcome, "x_floor": outcome / floor_ms})
            print(f"sweep V={v:>6} {config}: {outcome:.3f} ms, {outcome / floor_ms:.2f}x floor", flush=True)
            if v not in best or outcome < best[v][0]:
                best[v] = (outcome, config)
        del logits, target, run
        torch.cuda.empty_cache()
    return results, {v: config for v, (_, config) in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="first time the shipped launch configuration, switches flipped")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON")
    parser.add_argument("--vocab", help="comma-separated vocabulary sizes instead of the issue's three")
    parser.add_argument("--rounds", type=int, default=3, help="timings per row, in rotated orders")
    args = parser.parse_args()
    vocabs = tuple(int(v) for v in args.vocab.split(",")) if args.vocab else VOCABS

    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{gpu}; torch {torch.__version__}, triton {triton.__version__}; copy {bandwidth / 1e12:.2f} TB/s")
    sweep_results, best = sweep(vocabs, bandwidth) if args.sweep else ([], {})
    default_config = ce.launch_config
    # With --sweep the table uses the fastest configuration found for each V.
    ce.launch_config = lambda n_cols, device, kernel_pass: (
        best[n_cols] if kernel_pass == "loss_and_gradient" and n_cols in best else default_config(n_cols, device, kernel_pass)
    )

    rows = []
    for v in vocabs:
        logits, target = make_inputs(v)
        floor_ms = 2 * N_TOKENS * v * 2 / bandwidth * 1e3
        for g in GRAD_OUTPUTS:
            grad_output = torch.tensor(g, device="cuda")
            paths: dict[str, tuple] = {}
            runs = candidates(logits, target, grad_output, paths)
            names = list(runs)
            timings: dict[str, list[float]] = {name: [] for name in names}
            for round_index in range(args.rounds):
                for name in names[round_index % len(names):] + names[: round_index % len(names)]:
                    timings[name].append(measure(runs[name]))
            for name in names:
                ms = statistics.median(timings[name])
                rows.append(
                    {"V": v, "grad_output": g, "impl": name, "ms": ms, "ms_rounds": timings[name],
                     "gpu_ms": gpu_busy_ms(runs[name]), "extra_bytes": peak_extra_bytes(runs[name]),
                     "floor_ms": floor_ms, "x_floor": ms / floor_ms,
                     "path": describe(*paths[name]) if name in paths else ""}
                )  # fmt: skip
            del runs
            torch.cuda.empty_cache()
        del logits, target
        torch.cuda.empty_cache()

    header = "| V | grad_output | implementation | ms | rounds (ms) | GPU ms | extra memory | x floor | path |"
    print(f"\n{gpu}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, N = {N_TOKENS}, bf16, 10% ignored\n")
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['V']} | {r['grad_output']:g} | {r['impl']} | {r['ms']:.3f} | "
            f"{' / '.join(f'{t:.3f}' for t in r['ms_rounds'])} | {r['gpu_ms']:.3f} | "
            f"{r['extra_bytes'] / 2**30:.2f} GiB | {r['x_floor']:.2f} | {r['path']} |"
        )
    for v in vocabs:
        print(f"launch config V={v}: {ce.launch_config(v, torch.device('cuda'), 'loss_and_gradient')}")
    print("\nfloors (ms): " + ", ".join(f"V={v}: {2 * N_TOKENS * v * 2 / bandwidth * 1e3:.3f}" for v in vocabs))

    date = datetime.date.today().isoformat()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "".join(f"-vocab-{v}" for v in vocabs) if args.vocab else ""
    path = out / f"ce-{gpu.replace(' ', '_')}{suffix}-{date}.json"
    configs = {
        v: {p: dataclasses.asdict(ce.launch_config(v, torch.device("cuda"), p)) for p in ("loss_and_gradient", "loss", "gradient")}
        for v in vocabs
    }
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": date,
            "copy_bandwidth_bytes_per_s": bandwidth, "n_tokens": N_TOKENS, "rounds": args.rounds,
            "launch_configs": configs}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep_results}, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
