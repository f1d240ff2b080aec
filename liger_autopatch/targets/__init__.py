"""The catalogue of target families: which modules each one patches, and where its code is.

A family is a module of this package with a function ``apply(module)`` that stages its
replacements through :func:`liger_autopatch._registry.apply_target`. The catalogue itself
imports nothing heavy, so that ``status`` can list pending targets without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from liger_autopatch._bootstrap import LOSS_MODULE, is_target_module


@dataclass(frozen=True)
class Family:
    """A group of targets that ``LIGER_DISABLE=<name>`` switches off together."""

    name: str
    summary: str
    matches: Callable[[str], bool]
    implementation: str  # module with apply(module)
    declared: tuple[str, ...]  # targets listed as pending before their module is imported


def _is_model_module(name: str) -> bool:
    return name != LOSS_MODULE and is_target_module(name)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="loss",
        summary="transformers.loss.loss_utils (transformers >= 4.46)",
        matches=lambda name: name == LOSS_MODULE,
        implementation="liger_autopatch.targets.loss_functions",
        declared=(
            "loss_utils.fixed_cross_entropy",
            "loss_utils.ForCausalLMLoss",
            "loss_utils.ForMaskedLMLoss",
            "loss_utils.ForTokenClassification",
        ),
    ),
    Family(
        name="modules",
        summary="transformers.models.*.modeling_* (their CrossEntropyLoss global)",
        matches=_is_model_module,
        implementation="liger_autopatch.targets.model_modules",
        declared=(),
    ),
    Family(
        name="flce",
        summary="transformers.models.*.modeling_* (the forward of each causal-LM class)",
        matches=_is_model_module,
        implementation="liger_autopatch.targets.fused_linear",
        declared=(),
    ),
)


def families_for(module_name: str) -> list[Family]:
    """The families that patch the module called ``module_name``."""
    return [family for family in FAMILIES if family.matches(module_name)]
