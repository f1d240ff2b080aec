"""The parity contract: patched transformers computes what unpatched transformers computes.

Every case of :mod:`tests._tiny_models` (tiny randomly initialised models, nothing
downloaded) runs twice, each time in a fresh interpreter of this environment: once
patched, counting the calls that reach our kernel, and once with ``LIGER_DISABLE=1``.
Loss and every parameter gradient must agree within the tolerance of the dtype, and the
patched run must have gone through the kernel. Cases that this transformers lacks (a
model, ``num_items_in_batch`` or ``shift_labels`` in the forward) are skipped.

Tolerance (``rtol``: 1e-5 in float32, 2e-3 in bfloat16): the relative error in the 2-norm
of the loss and of every parameter's gradient, NaN exactly where the unpatched run has
NaN; see :func:`check_case`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._tiny_models import CASE_NAMES

TINY_MODELS = Path(__file__).with_name("_tiny_models.py")


def run_both(out_dir: Path, device: str, dtype: str, env: dict[str, str]) -> tuple[dict, dict]:
    """Results of every case patched and unpatched, the two interpreters side by side."""
    children = {}
    for mode in ("patched", "unpatched"):
        child_env = {
            k: v for k, v in os.environ.items() if k not in ("LIGER_DISABLE", "TRITON_INTERPRET")
        }
        child_env.update(env)
        if mode == "unpatched":
            child_env["LIGER_DISABLE"] = "1"
        out = out_dir / f"{mode}.pt"
        command = [
            sys.executable,
            str(TINY_MODELS),
            "--mode",
            mode,
            "--device",
            device,
            "--dtype",
            dtype,
        ]
        # Run outside the checkout: the child sees liger_autopatch as it is installed.
        child = subprocess.Popen(
            [*command, "--out", str(out)],
            env=child_env,
            cwd=Path(sys.executable).parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children[mode] = (child, out)
    results = {}
    for mode, (child, out) in children.items():
        _, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, f"{mode} run failed:\n{stderr}"
        results[mode] = torch.load(out)
    return results["patched"], results["unpatched"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    """``||actual - expected|| / scale`` over the entries that are not NaN in ``expected``.

    NaN must sit in the same places in both (an all-ignored batch has a NaN mean).
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN in different places"
    difference = (actual[~nan].double() - expected[~nan].double()).norm().item()
    return difference / scale if scale else difference


def check_case(case: str, patched: dict, unpatched: dict, rtol: float) -> None:
    """Loss and gradients of one case agree, and the patched run used our kernel.

    Relative error in the 2-norm: of the loss, and of each parameter's gradient. A
    gradient 1000x smaller than the whole model's is judged at 1/1000 of the model's
    scale instead: some are zero in exact arithmetic (BERT's key bias under softmax)
    and hold nothing but rounding noise.
    """
    expected, actual = unpatched[case], patched[case]
    if "unavailable" in expected:
        pytest.skip(expected["unavailable"])
    assert actual["kernel_calls"] >= 1, "the patched run never reached our kernel"
    loss_scale = expected["loss"].nan_to_num(0.0).double().norm().item()
    assert relative_error(actual["loss"], expected["loss"], loss_scale) <= rtol, "loss"
    assert actual["grads"].keys() == expected["grads"].keys()
    norms = {
        name: grad.nan_to_num(0.0).double().norm().item()
        for name, grad in expected["grads"].items()
    }
    model_norm = sum(norm**2 for norm in norms.values()) ** 0.5
    for name, grad in expected["grads"].items():
        scale = max(norms[name], 1e-3 * model_norm)
        error = relative_error(actual["grads"][name], grad, scale)
        assert error <= rtol, f"gradient of {name}: relative error {error:.3g}"


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """float32 on the CPU, our kernels under the Triton interpreter."""
    return run_both(
        tmp_path_factory.mktemp("parity-cpu"), "cpu", "float32", {"TRITON_INTERPRET": "1"}
    )


@pytest.mark.parametrize("case", CASE_NAMES)
def test_fp32_parity_on_cpu(case: str, cpu_results: tuple[dict, dict]) -> None:
    check_case(case, *cpu_results, rtol=1e-5)


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """bfloat16 on the GPU: the model runs in bf16, the unpatched loss upcasts to fp32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return run_both(tmp_path_factory.mktemp("parity-gpu"), "cuda", "bfloat16", {})


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASE_NAMES)
def test_bf16_parity_on_gpu(case: str, gpu_results: tuple[dict, dict]) -> None:
    check_case(case, *gpu_results, rtol=2e-3)
