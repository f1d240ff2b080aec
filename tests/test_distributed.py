"""DDP, FSDP2 and DeepSpeed ZeRO-3 under torchrun, 2 ranks, no code change.

On the CPU (gloo, in CI) the kernels run through the Triton interpreter; the ``gpu``
instances run DDP and FSDP2 on two GPUs (NCCL) with the compiled kernels. Either way
every rank must be patched by the ``.pth`` start-up hook alone, route lm_head + loss
through the fused path where the weight stays gathered, and train to the same losses as
transformers as is. The GPU runs at the 1B shape are bench/multi_gpu.py's (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("_distributed_worker.py")


# NVLink multicast off, as the device machines' notes ask (bench/multi_gpu.py does the same).
_NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def _torchrun(
    out: Path, extra_env: dict[str, str], setups: tuple[str, ...] = (), device: str = "cpu"
) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("LIGER_DISABLE", "TRITON_INTERPRET")}
    if device == "cpu":
        env.update({"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    else:
        env.update(_NO_MULTICAST)
    env.update(extra_env)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        f"--device={device}",
        str(out),
        *setups,
    ]
    result = subprocess.run(
        command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict], list[dict]]:
    device = request.param
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    if device == "cpu" and not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed has no gloo")
    two_gpus = torch.cuda.device_count() >= 2 and torch.distributed.is_nccl_available()
    if device == "cuda" and not two_gpus:
        pytest.skip("needs two CUDA GPUs and NCCL")
    scratch = tmp_path_factory.mktemp(f"torchrun-{device}")
    patched = _torchrun(scratch / "patched.json", {}, device=device)
    plain = _torchrun(scratch / "plain.json", {"LIGER_DISABLE": "1"}, device=device)
    return patched, plain


def test_every_rank_is_patched_by_the_startup_hook(runs):
    patched, _ = runs
    for rank in patched:
        assert "loss_utils.ForCausalLMLoss" in rank["patched_targets"]
        assert "flce.LlamaForCausalLM" in rank["patched_targets"]


@pytest.mark.parametrize("setup", ["ddp", "fsdp2", "fsdp2_lm_head_unit", "fsdp2_lm_head_unit_kept"])
def test_fused_path_with_the_gathered_weight_matches_unpatched(runs, setup):
    # fsdp2_lm_head_unit: FSDP2 releases lm_head's gathered weight when lm_head returns,
    # before the loss; the loss gathers it again with FSDP's own unshard.
    patched, plain = runs
    for rank in patched:
        assert rank[setup]["fused"] == 3 and rank[setup]["fell_back"] == 0, rank[setup]
    assert patched[0][setup]["losses"] == pytest.approx(plain[0][setup]["losses"], rel=1e-5)


@pytest.mark.parametrize("setup", ["ddp", "fsdp2", "fsdp2_lm_head_unit", "fsdp2_lm_head_unit_kept"])
def test_outputs_logits_after_a_fused_loss(runs, setup):
    patched, plain = runs
    for ours, theirs in zip(patched, plain):
        # Computed on demand, they are the logits the forward would have made, or, once
        # the weight they came from has changed, an error that says so: never others.
        assert ours[setup]["logits_sum"] == pytest.approx(theirs[setup]["logits_sum"], rel=1e-5)
        late = ours[setup]["logits_after_step"]
        if isinstance(late, str):
            assert "before the optimizer step" in late
        else:
            assert late == pytest.approx(theirs[setup]["logits_after_step"], rel=1e-5)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    pytest.importorskip("deepspeed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    scratch = tmp_path_factory.mktemp("zero3")
    setups = ("zero3_logits_used", "zero3", "zero3_tied")  # see the worker for the order
    patched = _torchrun(scratch / "patched.json", {}, setups)
    plain = _torchrun(scratch / "plain.json", {"LIGER_DISABLE": "1"}, setups)
    return patched, plain


@pytest.mark.parametrize("setup", ["zero3", "zero3_tied"])
def test_zero3_fused_path_with_deepspeeds_gather_matches_unpatched(zero3_runs, setup):
    # DeepSpeed releases lm_head's weight when lm_head returns: the loss gathers it again
    # with DeepSpeed's GatheredParameters. The losses of later steps depend on the
    # gradients of earlier ones (SGD, lr 1).
    patched, plain = zero3_runs
    for ours, theirs in zip(patched, plain):
        record = ours[setup]
        assert record["fused"] == 3 and record["fell_back"] == 0, record
        # The evaluation forward after training is not deferred: no backward would ever
        # tell its logits stale, and DeepSpeed's optimizer moves no version counter.
        evaluation = record["eval_routing"]
        assert evaluation["fused"] == 0 and evaluation["fell_back"] == 1, evaluation
        assert "without gradients" in evaluation["last_reason"]
        for key in ("eval_loss", "eval_logits_sum"):
            assert record[key] == pytest.approx(theirs[setup][key], rel=1e-5), key
        # Read after the loss, through DeepSpeed's hook on the model's output.
        assert record["logits_sum"] == pytest.approx(theirs[setup]["logits_sum"], rel=1e-5)
        # DeepSpeed's optimizer leaves no version counter changed: past the backward the
        # logits cannot be told from stale ones, so reading them raises.
        late = record["logits_after_step"]
        assert isinstance(late, str) and "before the backward of the loss" in late, late
    assert patched[0][setup]["losses"] == pytest.approx(plain[0][setup]["losses"], rel=1e-5)


def test_zero3_logits_used_before_the_loss_fall_back_with_the_same_losses(zero3_runs):
    # Computed after DeepSpeed released lm_head's weight (gathered again for them), with
    # torch's own F.linear (this setup turns DeepSpeed's memory-efficient linear off).
    patched, plain = zero3_runs
    for ours, theirs in zip(patched, plain):
        record = ours["zero3_logits_used"]
        assert record["fused"] == 0 and record["fell_back"] == 3, record
        assert "(add) before the loss" in record["last_reason"], record
        assert record["logits_sum"] == pytest.approx(theirs["zero3_logits_used"]["logits_sum"], rel=1e-5)
    assert patched[0]["zero3_logits_used"]["losses"] == pytest.approx(
        plain[0]["zero3_logits_used"]["losses"], rel=1e-5
    )
