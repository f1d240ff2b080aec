"""Run by ``torchrun --nproc_per_node 2`` for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/_distributed_worker.py \
        [--device cuda] OUT.json [SETUP ...]

On the CPU (the default) the ranks talk over gloo; with ``--device cuda`` each rank takes
the GPU of its local rank and NCCL.

Each rank trains the same tiny Llama under each setup: by default DDP, FSDP2 with
``fully_shard`` per decoder layer then the root, and FSDP2 with lm_head in a unit of its
own, released after its forward or kept gathered; ``zero3`` is DeepSpeed ZeRO stage 3,
``zero3_tied`` the same with lm_head's weight tied to the embedding, and
``zero3_logits_used`` the same with lm_head's output used before the loss (a forward
hook adds 0), which the fused path does not model.
Each runs a few SGD steps on the rank's own slice of the same random tokens (the same
slice every step, so that the loss falls and a wrong gradient would show in the next
step's loss), and reads ``outputs.logits`` after the first step's loss and after the
second step's optimizer step. Rank 0 writes, per setup, the losses averaged over the
ranks and, from every rank, how the fused linear cross-entropy routed its calls and what
``liger_autopatch.status()`` shows patched. Nothing here installs the package: with
``LIGER_DISABLE`` unset the ``.pth`` start-up hook has done it in every rank; with
``LIGER_DISABLE=1`` liger_autopatch is never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from _tiny_models import VOCAB_SIZE, llama_like_config  # this script's folder is on sys.path

SETUPS = ("ddp", "fsdp2", "fsdp2_lm_head_unit", "fsdp2_lm_head_unit_kept")
ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
    "zero_allow_untested_optimizer": True,
}
STEPS = 3
BATCH, SEQ = 2, 16


def _model(device: torch.device, tied: bool = False) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    # An lm_head unit of its own cannot share its weight with the embedding.
    config = llama_like_config("LlamaConfig", tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).to(device)


def _wrap(setup: str, model: torch.nn.Module) -> torch.nn.Module:
    if setup == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if setup == "fsdp2_lm_head_unit":
        fully_shard(model.lm_head)
    elif setup == "fsdp2_lm_head_unit_kept":  # gathered from lm_head's forward to its backward
        fully_shard(model.lm_head, reshard_after_forward=False)
    return fully_shard(model)


def _flce_routing() -> dict[str, Any]:
    from liger_autopatch.targets.fused_linear import routing

    record = routing().get("flce.LlamaForCausalLM")
    return (
        dict(vars(record))
        if record is not None
        else {"fused": 0, "fell_back": 0, "last_reason": ""}
    )


def _train(setup: str, tokens: torch.Tensor, patched: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    before = _flce_routing() if patched else None
    if setup.startswith("zero3"):
        import deepspeed

        model = _model(tokens.device, tied=setup == "zero3_tied")
        config = ZERO3
        if setup == "zero3_logits_used":
            # torch's own F.linear, not DeepSpeed's memory-efficient one, which gathers the
            # weight in its backward itself. Once a setup has turned that on, it stays on in
            # the process: this setup runs first.
            zero = {**ZERO3["zero_optimization"], "memory_efficient_linear": False}
            config = {**ZERO3, "zero_optimization": zero}
        trained, *_ = deepspeed.initialize(
            model=model, config=config, model_parameters=model.parameters()
        )
        if setup == "zero3_logits_used":
            # After DeepSpeed's hooks, which have released lm_head's weight: the logits are
            # used before the loss in a way the fused path does not model.
            model.lm_head.register_forward_hook(lambda module, args, output: output + 0.0)
        backward, step_optimizer = trained.backward, trained.step
    else:
        trained = _wrap(setup, _model(tokens.device))
        optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

        def step_optimizer() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    losses = []
    result: dict[str, Any] = {}
    for step in range(STEPS):
        batch = tokens[rank]
        outputs = trained(input_ids=batch, labels=batch)
        loss = outputs.loss
        if step == 0:  # read after the loss, as TRL's token accuracy does
            result["logits_sum"] = outputs.logits.float().sum().item()
        backward(loss)
        step_optimizer()
        if step == 1:  # read after the optimizer step: too late where the forward deferred them
            try:
                result["logits_after_step"] = outputs.logits.float().sum().item()
            except RuntimeError as exc:
                result["logits_after_step"] = str(exc)
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        losses.append(mean.item() / dist.get_world_size())
    result["losses"] = losses
    if patched:
        result.update(_routing_since(before))
    if setup.startswith("zero3"):  # an evaluation forward
        before_eval = _flce_routing() if patched else None
        with torch.no_grad():
            evaluated = trained(input_ids=tokens[rank], labels=tokens[rank])
        result["eval_loss"] = evaluated.loss.item()
        result["eval_logits_sum"] = evaluated.logits.float().sum().item()
        if patched:
            result["eval_routing"] = _routing_since(before_eval)
    return result


def _routing_since(before: dict[str, Any]) -> dict[str, Any]:
    after = _flce_routing()
    return {
        "fused": after["fused"] - before["fused"],
        "fell_back": after["fell_back"] - before["fell_back"],
        "last_reason": after["last_reason"],
    }


def main(out: str, setups: tuple[str, ...], device_type: str) -> None:
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    patched = os.environ.get("LIGER_DISABLE") != "1"
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB_SIZE, (dist.get_world_size(), BATCH, SEQ), generator=generator)
    tokens = tokens.to(device)
    report: dict[str, Any] = {setup: _train(setup, tokens, patched) for setup in setups}
    if patched:
        import liger_autopatch

        report["patched_targets"] = sorted(
            row.target for row in liger_autopatch.status() if row.state == "patched"
        )
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, report)
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(per_rank, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("out")
    parser.add_argument("setups", nargs="*", default=SETUPS)
    args = parser.parse_args()
    main(args.out, tuple(args.setups), args.device)
    # The interpreter's teardown after gloo sometimes aborts ("terminate called without
    # an active exception"), in about one run in three under pytest, with or without
    # liger_autopatch (LIGER_DISABLE=1 too): torch's, not what this test checks. The
    # results are written by now, so leave without the C++ teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
