"""Several GPUs (issue 6, part 3): DDP, FSDP2 and ZeRO-3 training under torchrun, with no code change.

    python bench/multi_gpu.py [ddp|fsdp2|zero3 ...]   # on a host with 2+ GPUs; prints a table, writes bench/results/multi_gpu-*.json

Six runs (or those of the parallelisms named), each ``torchrun --nproc_per_node <GPUs>`` of this file in worker mode:
{DDP, FSDP2 (``fully_shard`` per decoder layer, then the root), DeepSpeed ZeRO-3 (bf16,
the same AdamW as its client optimizer; needs ``deepspeed``)} x {liger_autopatch as
installed, transformers as is (``LIGER_DISABLE=1``)}. The model is bench/train.py's
Llama-3.2-1B shape; each rank trains on its own slice of the same random tokens, batch 4
x 4096 per rank, fused AdamW (lr 1e-4), 3 warm-up steps and 5 timed. After training,
each rank reports what ``liger_autopatch.status()`` shows patched in its own interpreter
(the ``.pth`` start-up hook patched it: nothing here installs the package), the routing of
the fused linear cross-entropy, its peak memory and step time; the losses are averaged
over the ranks. NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` and friends), as the
device's rules ask.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from train import SEQ, llama_1b, save_record  # bench/ is this script's directory, first on sys.path

WARMUP, TIMED = 3, 5
BATCH = 4  # rows of SEQ tokens per rank
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
RUNS = {
    ("ddp", "liger_autopatch"): {},
    ("ddp", "transformers"): {"LIGER_DISABLE": "1"},
    ("fsdp2", "liger_autopatch"): {},
    ("fsdp2", "transformers"): {"LIGER_DISABLE": "1"},
    ("zero3", "liger_autopatch"): {},
    ("zero3", "transformers"): {"LIGER_DISABLE": "1"},
}
ZERO3 = {
    "train_micro_batch_size_per_gpu": BATCH,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
}


def _worker(parallelism: str, out: Path) -> None:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    model = llama_1b()
    config = model.config
    if parallelism == "zero3":
        import deepspeed

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        trained, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3)
        backward, step_optimizer = trained.backward, trained.step
    else:
        if parallelism == "ddp":
            trained = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            trained = fully_shard(model)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, fused=True)

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

        def step_optimizer() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    generator = torch.Generator(device="cuda").manual_seed(1)
    steps = WARMUP + TIMED
    tokens = torch.randint(
        0, config.vocab_size, (steps, world, BATCH, SEQ), device="cuda", generator=generator
    )
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        batch = tokens[step, rank]
        loss = trained(input_ids=batch, labels=batch).loss
        backward(loss)
        step_optimizer()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        losses.append(mean_loss.item())
    import liger_autopatch
    from liger_autopatch.targets.fused_linear import routing

    timed = sorted(times[WARMUP:])
    report = {
        "rank": rank,
        "losses": losses,
        "step_ms": timed[len(timed) // 2],
        "tokens_per_s": BATCH * SEQ / (timed[len(timed) // 2] / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "patched": sorted(row.target for row in liger_autopatch.status() if row.state == "patched"),
        "routing": {target: vars(record) for target, record in routing().items()},
    }
    out.with_name(f"{out.name}-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _launch(parallelism: str, extra_env: dict[str, str], gpus: int, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "LIGER_DISABLE"} | NO_MULTICAST | extra_env
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={gpus}",
        __file__,
        "--worker",
        parallelism,
        str(out),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return [{"error": (run.stderr.strip().splitlines() or ["failed"])[-1]}]
    return [
        json.loads(out.with_name(f"{out.name}-rank{rank}.json").read_text()) for rank in range(gpus)
    ]


def main(parallelisms: list[str]) -> None:
    import tempfile

    import torch
    import transformers

    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"needs at least 2 GPUs, found {gpus}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for (parallelism, variant), extra_env in RUNS.items():
            if parallelisms and parallelism not in parallelisms:
                continue
            ranks = _launch(
                parallelism, extra_env, gpus, Path(scratch) / f"{parallelism}-{variant}"
            )
            results[f"{parallelism}, {variant}"] = ranks
    gpu = torch.cuda.get_device_name()
    print(
        f"Llama-3.2-1B shape, {gpus} x {gpu}, batch {BATCH} x {SEQ} per rank, torch {torch.__version__}"
    )
    for name, ranks in results.items():
        if "error" in ranks[0]:
            print(f"  {name:<26} error: {ranks[0]['error']}")
            continue
        losses = " ".join(f"{loss:.4f}" for loss in ranks[0]["losses"])
        per_rank = "; ".join(
            f"rank {r['rank']}: {r['step_ms']:.1f} ms, {r['tokens_per_s'] / 1e3:.1f}k tokens/s, {r['peak_gib']:.2f} GiB, "
            f"{len(r['patched'])} patched"
            for r in ranks
        )
        print(
            f"  {name:<26} {per_rank}\n  {'':<26} losses {losses}\n  {'':<26} routing {ranks[0]['routing']}"
        )
    record = {
        "date": date.today().isoformat(),
        "gpu": gpu,
        "gpus": gpus,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_per_rank": BATCH,
        "seq": SEQ,
        "results": results,
    }
    subset = "-" + "+".join(parallelisms) if parallelisms else ""
    save_record(f"multi_gpu-{gpus}x{gpu.replace(' ', '_')}{subset}", record)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main(sys.argv[1:])
