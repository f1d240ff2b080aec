"""The one decision every replacement makes per call: our kernel, or the code it replaced.

Both families (:mod:`~liger_autopatch.targets.loss_functions` and
:mod:`~liger_autopatch.targets.model_modules`) ask :func:`kernel_serves` before each call
and hand whatever it declines to the original untouched, so that those calls give
bit-identical results.
"""

from __future__ import annotations

from typing import Any

import torch

from liger_autopatch.ops.cross_entropy import cross_entropy, supports


def is_liger_kernel(value: Any) -> bool:
    """Whether ``value`` comes from liger-kernel (its functions and classes name their module)."""
    return str(getattr(value, "__module__", None) or "").startswith("liger_kernel")


def liger_kernel_owns_cross_entropy() -> bool:
    """Whether liger-kernel replaced ``torch.nn.functional.cross_entropy``: then its kernel runs."""
    return is_liger_kernel(torch.nn.functional.cross_entropy)


def kernel_serves(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None
) -> bool:
    """Whether our kernel computes ``cross_entropy(logits, labels)`` for this call.

    It does where the op runs its Triton kernels (see
    :func:`liger_autopatch.ops.cross_entropy.supports`: (N, V) bf16/fp16/fp32 logits and
    (N,) integer labels on CUDA, or on the CPU under ``TRITON_INTERPRET=1``), unless liger-kernel owns ``torch.nn.functional.cross_entropy``
    (it was installed after us: the original, which calls it, keeps running). Everything
    else (N-d logits, probability targets, float64, CPU without ``TRITON_INTERPRET=1``, a
    ``num_items_in_batch`` that is neither int nor tensor) belongs to the original.
    """
    return (
        isinstance(logits, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and (num_items_in_batch is None or isinstance(num_items_in_batch, (int, torch.Tensor)))
        and supports(logits, labels)
        and not liger_kernel_owns_cross_entropy()
    )


def kernel_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The cross-entropy of ``logits`` against ``labels`` on our kernel, as float32.

    Never an fp32 copy of the logits. With ``num_items_in_batch`` the loss is the sum
    divided by it, as transformers' ``fixed_cross_entropy`` computes it. Call only where
    :func:`kernel_serves` said yes.
    """
    return cross_entropy(
        logits,
        labels,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        num_items_in_batch=num_items_in_batch,
    )


def torch_loss_dtype(logits: torch.Tensor, num_items_in_batch: Any = None) -> torch.dtype:
    """The dtype of the loss torch's ``cross_entropy`` gives for ``logits`` (then divided by
    ``num_items_in_batch``, as transformers' ``fixed_cross_entropy`` does): float32 under
    autocast, whose float32 list has ``cross_entropy``; otherwise the logits' dtype, as the
    division by a tensor promotes it."""
    dtype = torch.float32 if torch.is_autocast_enabled(logits.device.type) else logits.dtype
    if isinstance(num_items_in_batch, torch.Tensor):
        dtype = torch.result_type(torch.empty((), dtype=dtype), num_items_in_batch)
    return dtype
