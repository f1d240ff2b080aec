"""Family "modules": the ``CrossEntropyLoss`` global of each ``transformers.models.*.modeling_*``.

transformers < 4.46 builds ``CrossEntropyLoss()`` inside every model's forward, and many
heads of 5.x still do. Those modules bind the name with ``from torch.nn import
CrossEntropyLoss``; the patch rebinds that module global to
:class:`AutopatchCrossEntropyLoss`, a subclass, and never touches ``torch.nn`` itself.
"""

from __future__ import annotations

import copy
import copyreg
import functools
from types import ModuleType
from typing import Any

import torch

from liger_autopatch import _bootstrap
from liger_autopatch._registry import ORIGINAL_ATTR, TargetPatch, apply_target
from liger_autopatch.targets._dispatch import (
    is_liger_kernel,
    kernel_loss,
    kernel_serves,
    liger_kernel_owns_cross_entropy,
    torch_loss_dtype,
)
from liger_autopatch.targets.fused_linear import DeferredLogits, fused_cross_entropy_loss

FAMILY = "modules"


class AutopatchCrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` that runs our kernel where it serves the call.

    Class-index targets on (N, C) inputs without class weights go to the kernel (the loss
    comes back in the dtype torch gives it); class weights, probability targets, N-d
    inputs and devices without the Triton path go to torch's own forward, and so does
    every call once :func:`liger_autopatch.unpatch` ran or ``LIGER_DISABLE`` names the
    family (instances outlive the patch: some models build theirs in ``__init__``). It
    pickles and scripts as ``torch.nn.CrossEntropyLoss``, so that a saved model loads
    where this package is not installed.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``input`` (N, C) logits against ``target`` (N,) class indices."""
        if isinstance(input, DeferredLogits):
            # lm_head's output, not computed (family "flce"): the loss from its input.
            loss = None
            if self.weight is None:
                loss = fused_cross_entropy_loss(
                    input,
                    target,
                    ignore_index=self.ignore_index,
                    reduction=self.reduction,
                    label_smoothing=self.label_smoothing,
                )
            if loss is not None:
                return loss.to(torch_loss_dtype(input))
            input = input.materialize()
        if self.weight is None and _patching() and kernel_serves(input, target):
            loss = kernel_loss(
                input,
                target,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )
            return loss.to(torch_loss_dtype(input))
        return super().forward(input, target)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Rebuilt as torch's class: copyreg's generic reconstruction, then nn.Module's
        # __setstate__ with this object's state.
        return (copyreg._reconstructor, (torch.nn.CrossEntropyLoss, object, None), self.__getstate__())

    def __prepare_scriptable__(self) -> torch.nn.CrossEntropyLoss:
        return copy.copy(self)  # torch's class, by __reduce_ex__


def _patching() -> bool:
    """Whether this family is on: not after unpatch(), not named by LIGER_DISABLE."""
    return _bootstrap.installed_finder() is not None and not (_bootstrap.disabled_names() & {"all", FAMILY})


setattr(AutopatchCrossEntropyLoss, ORIGINAL_ATTR, torch.nn.CrossEntropyLoss)


def apply(module: ModuleType) -> None:
    """Rebind ``module.CrossEntropyLoss`` where it is torch's.

    Modules without that global get no status row: most model modules have none.
    """
    if "CrossEntropyLoss" not in vars(module):
        return
    target = f"{module.__name__.rsplit('.', 1)[-1]}.CrossEntropyLoss"
    apply_target(target, FAMILY, functools.partial(_stage, module))


def _stage(module: ModuleType, patch: TargetPatch) -> None:
    current = module.CrossEntropyLoss
    if is_liger_kernel(current):
        patch.skip(f"liger-kernel replaced it ({current.__module__}); left to liger-kernel")
    if liger_kernel_owns_cross_entropy():
        patch.skip("liger-kernel replaced torch.nn.functional.cross_entropy; left to liger-kernel")
    if current is not torch.nn.CrossEntropyLoss and current is not AutopatchCrossEntropyLoss:
        patch.skip(f"CrossEntropyLoss here is {current!r}, not torch.nn.CrossEntropyLoss")
    patch.set_attr(module, "CrossEntropyLoss", AutopatchCrossEntropyLoss)
