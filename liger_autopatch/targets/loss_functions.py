"""Family "loss": the cross-entropy functions of ``transformers.loss.loss_utils`` (>= 4.46).

* ``fixed_cross_entropy``, which every loss of that module calls, goes through the shared
  dispatcher: our kernel for (N, V) logits, the original for everything else (the 4-D
  segmentation logits of 5.x included).
* ``ForCausalLMLoss``, ``ForMaskedLMLoss`` and ``ForTokenClassification`` upcast the whole
  logits tensor to float32 before the loss (4 x N x V bytes). Their replacements hand the
  logits to the kernel as they are, which accumulates in float32 itself.

Each replacement is built once per original, keeps the original's name, qualname,
docstring and signature (``__wrapped__``), and is written to the module attribute, to
every ``LOSS_MAPPING`` entry that holds the original and to every other imported
transformers module that bound the original by name (``transformers.trainer`` imports
``ForCausalLMLoss``): identity checks such as the Trainer's
``LOSS_MAPPING.get(loss_type) is ForCausalLMLoss`` keep holding.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from liger_autopatch._registry import ORIGINAL_ATTR, TargetPatch, apply_target, original_of
from liger_autopatch.targets._dispatch import (
    is_liger_kernel,
    kernel_loss,
    kernel_serves,
    liger_kernel_owns_cross_entropy,
    torch_loss_dtype,
)
from liger_autopatch.targets.fused_linear import DeferredLogits, fused_causal_lm_loss

FAMILY = "loss"

# The signatures (annotations left out) whose behaviour the replacements reproduce.
_VOCABULARY_LOSS = (
    "(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs)"
)
_KNOWN_SIGNATURES: dict[str, tuple[str, ...]] = {
    "fixed_cross_entropy": (
        "(source, target, num_items_in_batch=None, ignore_index=-100, **kwargs)",
    ),
    "ForCausalLMLoss": (
        _VOCABULARY_LOSS,  # transformers < 4.50: no shift_labels
        "(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs)",
    ),
    "ForMaskedLMLoss": (_VOCABULARY_LOSS,),
    "ForTokenClassification": ("(logits, labels, config, **kwargs)",),
}

# One replacement per original, so that patching again after unpatch() hands out the
# object that other modules may still hold from the first time.
_replacements: dict[Callable[..., Any], Callable[..., Any]] = {}


def apply(module: ModuleType) -> None:
    """Replace the cross-entropy functions of ``transformers.loss.loss_utils`` in ``module``."""
    for name in _KNOWN_SIGNATURES:
        apply_target(f"loss_utils.{name}", FAMILY, functools.partial(_stage, module, name))


def _stage(module: ModuleType, name: str, patch: TargetPatch) -> None:
    current = getattr(module, name, None)
    if current is None:
        patch.skip(f"this transformers has no loss_utils.{name}")
    if is_liger_kernel(current):
        patch.skip(f"liger-kernel replaced it ({current.__module__}); left to liger-kernel")
    if liger_kernel_owns_cross_entropy():
        patch.skip("liger-kernel replaced torch.nn.functional.cross_entropy; left to liger-kernel")
    original = original_of(current)
    if not _is_defined_in(original, module, name):
        patch.skip(f"replaced by {_describe(original)}, not ours: left alone")
    signature = _signature_shape(original)
    if signature not in _KNOWN_SIGNATURES[name]:
        patch.skip(f"unexpected signature {name}{signature}")
    if name != "fixed_cross_entropy":
        # The replacements compute what the originals compute through fixed_cross_entropy.
        callee = original_of(getattr(module, "fixed_cross_entropy", None))
        if not _is_defined_in(callee, module, "fixed_cross_entropy"):
            patch.skip(
                f"loss_utils.fixed_cross_entropy is {_describe(callee)}; the original calls it"
            )
        if not isinstance(getattr(module, "LOSS_MAPPING", None), dict):
            patch.skip("loss_utils.LOSS_MAPPING is not a dict")

    replacement = _replacements.get(original)
    if replacement is None:
        replacement = _replacements[original] = _REPLACEMENT_FACTORIES[name](original)
    patch.set_attr(module, name, replacement)
    mapping = getattr(module, "LOSS_MAPPING", None)
    for key, value in mapping.items() if isinstance(mapping, dict) else ():
        if value is original:
            patch.set_item(mapping, key, replacement)
    for other in _transformers_modules_binding(original, name, besides=module):
        patch.set_attr(other, name, replacement)


def _is_defined_in(function: Any, module: ModuleType, name: str) -> bool:
    return (
        callable(function)
        and getattr(function, "__module__", None) == module.__name__
        and getattr(function, "__qualname__", None) == name
    )


def _describe(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"


def _signature_shape(function: Callable[..., Any]) -> str:
    """The signature without annotations: what callers may pass, and the defaults."""
    signature = inspect.signature(function)
    parameters = [
        p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()
    ]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def _transformers_modules_binding(
    original: Any, name: str, besides: ModuleType
) -> list[ModuleType]:
    """Imported transformers modules other than ``besides`` whose global ``name`` is ``original``.

    Only where liger_autopatch starts after they imported it; on a first import of
    loss_utils nothing else holds it yet.
    """
    return [
        module
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("transformers.")
        and module is not besides
        and isinstance(module, ModuleType)
        and vars(module).get(name) is original
    ]


def _keep_identity(
    replacement: Callable[..., Any], original: Callable[..., Any]
) -> Callable[..., Any]:
    functools.update_wrapper(replacement, original)
    setattr(replacement, ORIGINAL_ATTR, original)
    return replacement


def _replace_fixed_cross_entropy(original: Callable[..., Any]) -> Callable[..., Any]:
    def fixed_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100, **kwargs):
        if not kernel_serves(source, target, num_items_in_batch):
            return original(source, target, num_items_in_batch, ignore_index, **kwargs)
        loss = kernel_loss(source, target, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
        return loss.to(torch_loss_dtype(source, num_items_in_batch))

    return _keep_identity(fixed_cross_entropy, original)


def _kernel_loss_on_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, num_items_in_batch: Any
) -> torch.Tensor | None:
    """Our kernel's loss of ``logits`` (..., C) against ``labels`` (...) flattened to rows,
    as the originals compute it after their float32 upcast; None where the kernel does not
    serve the call (the caller then runs the original)."""
    rows = logits.reshape(-1, logits.shape[-1])
    row_labels = labels.reshape(-1).to(logits.device)
    if not kernel_serves(rows, row_labels, num_items_in_batch):
        return None
    return kernel_loss(rows, row_labels, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)


def _replace_causal_lm_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    # Where the original has no shift_labels parameter it lands in **kwargs, unused.
    takes_shift_labels = "shift_labels" in inspect.signature(original).parameters

    def ForCausalLMLoss(
        logits,
        labels,
        vocab_size,
        num_items_in_batch=None,
        ignore_index=-100,
        shift_labels=None,
        **kwargs,
    ):
        if isinstance(logits, DeferredLogits):
            # lm_head's output, not computed (family "flce"): the loss from its input.
            loss = fused_causal_lm_loss(
                logits,
                labels,
                vocab_size,
                num_items_in_batch,
                ignore_index,
                shift_labels if takes_shift_labels else None,
            )
            if loss is not None:
                return loss
            logits = logits.materialize()
        if logits.shape[-1] == vocab_size:
            if shift_labels is not None and takes_shift_labels:
                next_tokens = shift_labels
            else:
                # Pad the labels rather than slice the logits: a (B, T-1, V) slice needs a
                # copy to become 2-D; the padded position is ignored, the loss is the same.
                next_tokens = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            loss = _kernel_loss_on_rows(logits, next_tokens, ignore_index, num_items_in_batch)
            if loss is not None:
                return loss
        return original(
            logits,
            labels,
            vocab_size,
            num_items_in_batch,
            ignore_index,
            shift_labels=shift_labels,
            **kwargs,
        )

    return _keep_identity(ForCausalLMLoss, original)


def _replace_masked_lm_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    def ForMaskedLMLoss(
        logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs
    ):
        if logits.shape[-1] == vocab_size:
            loss = _kernel_loss_on_rows(logits, labels, ignore_index, num_items_in_batch)
            if loss is not None:
                return loss
        return original(logits, labels, vocab_size, num_items_in_batch, ignore_index, **kwargs)

    return _keep_identity(ForMaskedLMLoss, original)


def _replace_token_classification_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    def ForTokenClassification(logits, labels, config, **kwargs):
        if logits.shape[-1] == config.num_labels:
            # The original hands **kwargs to fixed_cross_entropy, which reads these two.
            loss = _kernel_loss_on_rows(
                logits, labels, kwargs.get("ignore_index", -100), kwargs.get("num_items_in_batch")
            )
            if loss is not None:
                return loss
        return original(logits, labels, config, **kwargs)

    return _keep_identity(ForTokenClassification, original)


_REPLACEMENT_FACTORIES: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "fixed_cross_entropy": _replace_fixed_cross_entropy,
    "ForCausalLMLoss": _replace_causal_lm_loss,
    "ForMaskedLMLoss": _replace_masked_lm_loss,
    "ForTokenClassification": _replace_token_classification_loss,
}
