"""The two target families: what they patch, what they leave alone, and why.

In-process tests on the real ``transformers.loss.loss_utils`` (patched, as installed) and
on fresh, unpatched copies of it, executed from its source into a module object of their
own so that gates, skips and unpatch can be tried without disturbing the real one. The
Triton path runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import liger_autopatch
from liger_autopatch import _registry
from liger_autopatch.targets import _dispatch, loss_functions, model_modules
from liger_autopatch.targets.model_modules import AutopatchCrossEntropyLoss
from tests._subprocess import run_python

liger_autopatch.install()  # what the .pth did already where the package is installed

try:
    from transformers.loss import loss_utils
except ImportError:  # transformers < 4.46: only the model modules have targets
    loss_utils = None

# The Triton path: the GPU where there is one, else the CPU under the Triton interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")
needs_loss_utils = pytest.mark.skipif(
    loss_utils is None, reason="this transformers has no loss_utils"
)
LOSS_FUNCTIONS = (
    "fixed_cross_entropy",
    "ForCausalLMLoss",
    "ForMaskedLMLoss",
    "ForTokenClassification",
)
TORCH_CROSS_ENTROPY = torch.nn.functional.cross_entropy


def _liger_kernel_cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for liger-kernel's functional cross-entropy: counts calls, computes torch's."""
    _liger_kernel_cross_entropy.calls += 1
    return TORCH_CROSS_ENTROPY(*args, **kwargs)


_liger_kernel_cross_entropy.__module__ = "liger_kernel.transformers.functional"
_liger_kernel_cross_entropy.calls = 0


class _LigerKernelCrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Stands in for ``liger_kernel.transformers.cross_entropy.LigerCrossEntropyLoss``."""


_LigerKernelCrossEntropyLoss.__module__ = "liger_kernel.transformers.cross_entropy"


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter() -> Iterator[None]:
    """TRITON_INTERPRET=1 for this module's tests, only without CUDA.

    Only there: triton.jit reads it when the kernels are first defined, and a GPU run must
    compile them. Tests that need the CPU without the interpreter remove it themselves.
    """
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE.type != "cuda":
            patch.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that reach our kernel through the dispatcher."""
    calls = [0]
    kernel = _dispatch.cross_entropy

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(_dispatch, "cross_entropy", counted)
    return calls


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty registry, and a meta path that unpatch() may change, both put back after."""
    monkeypatch.setattr(_registry, "_records", {})
    monkeypatch.setattr(_registry, "_applied", [])
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    yield


def _unpatched_copy() -> types.ModuleType:
    """A new module object executed from transformers' loss_utils source, never patched."""
    if loss_utils is None:
        pytest.skip("this transformers has no loss_utils")
    spec = importlib.util.spec_from_file_location(loss_utils.__name__, loss_utils.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unpatched() -> types.ModuleType:
    """transformers' own loss functions: the reference (their fixed_cross_entropy is theirs too)."""
    return _unpatched_copy()


@pytest.fixture
def fresh_loss_utils(fresh_registry: None) -> types.ModuleType:
    """An unpatched copy of loss_utils for a test to patch, with a registry of its own."""
    return _unpatched_copy()


def _states(family: str) -> dict[str, tuple[str, str]]:
    return {
        row.target: (row.state, row.detail) for row in _registry.status() if row.family == family
    }


def _loss_and_grad(
    function: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    *args: Any,
    device: torch.device = DEVICE,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient of the logits, every tensor argument moved to ``device`` first."""

    def moved(value: Any) -> Any:
        return value.to(device) if isinstance(value, (torch.Tensor, torch.nn.Module)) else value

    logits = logits.detach().to(device).requires_grad_()
    args = tuple(moved(value) for value in args)
    kwargs = {key: moved(value) for key, value in kwargs.items()}
    loss = moved(function)(logits, *args, **kwargs)
    loss.sum().backward()
    return loss.detach(), logits.grad


def _causal_batch(
    dtype: torch.dtype = torch.float32, vocab: int = 37
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, vocab, generator=generator).to(dtype)
    labels = torch.randint(0, vocab, (2, 6), generator=generator)
    labels[0, :2] = -100
    return logits, labels


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Same dtype and shape; within ``rtol`` of the largest entry of ``expected``."""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(), equal_nan=True
    )


# --- what gets patched ------------------------------------------------------------------


@needs_loss_utils
def test_loss_functions_replaced_with_names_and_signatures_kept() -> None:
    states = _states("loss")
    for name in LOSS_FUNCTIONS:
        if not hasattr(loss_utils, name):
            assert states[f"loss_utils.{name}"] == (
                "skipped",
                f"this transformers has no loss_utils.{name}",
            )
            continue
        replacement = getattr(loss_utils, name)
        original = _registry.original_of(replacement)
        assert states[f"loss_utils.{name}"] == ("patched", "")
        assert _registry.is_ours(replacement) and original is not replacement
        assert replacement.__wrapped__ is original
        assert (replacement.__name__, replacement.__qualname__) == (name, name)
        assert replacement.__module__ == "transformers.loss.loss_utils"
        assert inspect.signature(replacement) == inspect.signature(original)


@needs_loss_utils
def test_every_loss_mapping_entry_of_an_original_is_the_module_attribute() -> None:
    originals = {
        _registry.original_of(getattr(loss_utils, name))
        for name in LOSS_FUNCTIONS
        if hasattr(loss_utils, name)
    }
    assert not originals & set(loss_utils.LOSS_MAPPING.values()), "an original left in LOSS_MAPPING"
    expected = {"ForCausalLM": "ForCausalLMLoss", "ForConditionalGeneration": "ForCausalLMLoss",
                "CsmForConditionalGeneration": "ForCausalLMLoss", "ForMaskedLM": "ForMaskedLMLoss",
                "ForTokenClassification": "ForTokenClassification"}  # fmt: skip
    for key, name in expected.items():
        if key in loss_utils.LOSS_MAPPING and hasattr(loss_utils, name):
            assert loss_utils.LOSS_MAPPING[key] is getattr(loss_utils, name), key


def _trainer_module_checking_identity() -> types.ModuleType:
    from transformers import trainer

    if not hasattr(trainer, "ForCausalLMLoss"):
        pytest.skip("this transformers' Trainer makes no identity check on ForCausalLMLoss")
    return trainer


@needs_loss_utils
def test_trainer_counts_tokens_as_for_a_causal_lm(tmp_path: Any) -> None:
    # transformers 5.24's Trainer: `LOSS_MAPPING.get(loss_type) is ForCausalLMLoss`; a
    # mismatch would make it count labels[..., :] instead of labels[..., 1:].
    import transformers

    trainer_module = _trainer_module_checking_identity()
    assert (
        trainer_module.ForCausalLMLoss
        is loss_utils.LOSS_MAPPING["ForCausalLM"]
        is loss_utils.ForCausalLMLoss
    )
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    try:
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path), report_to=[], use_cpu=True
        )
        trainer = transformers.Trainer(model=transformers.LlamaForCausalLM(config), args=arguments)
    except ImportError as missing:  # older Trainers need accelerate
        pytest.skip(f"Trainer cannot be built here: {missing}")
    assert trainer._loss_shifts_labels is True


@needs_loss_utils
def test_install_after_the_trainer_import_rebinds_the_trainer_too() -> None:
    _trainer_module_checking_identity()
    code = """
    import json, os
    from transformers import trainer
    from transformers.loss import loss_utils
    del os.environ["LIGER_DISABLE"]
    import liger_autopatch
    liger_autopatch.install()
    first = loss_utils.ForCausalLMLoss
    patched = trainer.ForCausalLMLoss is first is loss_utils.LOSS_MAPPING["ForCausalLM"]
    liger_autopatch.unpatch()
    restored = trainer.ForCausalLMLoss is loss_utils.ForCausalLMLoss is first.__wrapped__
    liger_autopatch.install()
    again = trainer.ForCausalLMLoss is loss_utils.ForCausalLMLoss is first
    print(json.dumps([patched, restored, again]))
    """
    assert run_python(code, env={"LIGER_DISABLE": "1"}) == [True, True, True]


def test_model_modules_with_torch_cross_entropy_loss_get_the_subclass() -> None:
    from transformers.models.bert import modeling_bert
    from transformers.models.llama import modeling_llama

    assert modeling_bert.CrossEntropyLoss is AutopatchCrossEntropyLoss
    assert _states("modules")["modeling_bert.CrossEntropyLoss"] == ("patched", "")
    assert issubclass(AutopatchCrossEntropyLoss, torch.nn.CrossEntropyLoss)
    if "CrossEntropyLoss" not in vars(modeling_llama):  # transformers >= 4.46 dropped it there
        assert "modeling_llama.CrossEntropyLoss" not in _states("modules")


def test_torch_itself_is_never_modified() -> None:
    from transformers.models.bert import modeling_bert  # noqa: F401 - patched on import
    from transformers.models.gpt2 import modeling_gpt2  # noqa: F401

    assert torch.nn.functional.cross_entropy is TORCH_CROSS_ENTROPY
    assert TORCH_CROSS_ENTROPY.__module__ == "torch.nn.functional"
    assert torch.nn.CrossEntropyLoss is torch.nn.modules.loss.CrossEntropyLoss
    assert torch.nn.CrossEntropyLoss.__module__ == "torch.nn.modules.loss"
    assert torch.nn.CrossEntropyLoss.forward.__module__ == "torch.nn.modules.loss"
    assert _registry.ORIGINAL_ATTR not in vars(torch.nn.CrossEntropyLoss)


# --- the calls: kernel where it serves, the original everywhere else ----------------------


@needs_loss_utils
def test_causal_lm_loss_positional_keyword_and_unknown_arguments(
    unpatched: types.ModuleType, kernel_calls: list[int]
) -> None:
    logits, labels = _causal_batch()
    original = unpatched.ForCausalLMLoss

    def by_keyword(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return loss_utils.ForCausalLMLoss(logits=x, **kwargs)

    for num_items in (None, 11, torch.tensor(11)):
        expected = _loss_and_grad(original, logits, labels, 37, num_items)
        # gemma2/3 and mixtral call positionally, llama by keyword; models pass more kwargs.
        positional = _loss_and_grad(loss_utils.ForCausalLMLoss, logits, labels, 37, num_items, -100)
        keyword = _loss_and_grad(
            by_keyword,
            logits,
            labels=labels,
            vocab_size=37,
            num_items_in_batch=num_items,
            position_ids=None,
            foo=1,
        )
        for actual in (positional, keyword):
            assert_close(actual[0], expected[0])
            assert_close(actual[1], expected[1])
    assert kernel_calls[0] == 6


@needs_loss_utils
def test_causal_lm_loss_shift_labels_and_ignore_index(
    unpatched: types.ModuleType, kernel_calls: list[int]
) -> None:
    logits, labels = _causal_batch()
    original = unpatched.ForCausalLMLoss
    custom = labels.masked_fill(labels == -100, -1)
    shift_labels = torch.roll(labels, 1, dims=1)
    for kwargs in ({"ignore_index": -1}, {"shift_labels": shift_labels}):
        chosen = custom if "ignore_index" in kwargs else labels
        expected = _loss_and_grad(original, logits, chosen, 37, **kwargs)
        actual = _loss_and_grad(loss_utils.ForCausalLMLoss, logits, chosen, 37, **kwargs)
        assert_close(actual[0], expected[0])
        assert_close(actual[1], expected[1])
    assert kernel_calls[0] == 2


@needs_loss_utils
def test_masked_lm_token_classification_and_fixed_cross_entropy(
    unpatched: types.ModuleType, kernel_calls: list[int]
) -> None:
    logits, labels = _causal_batch()
    config = types.SimpleNamespace(num_labels=37)
    calls = [
        (
            "fixed_cross_entropy",
            (logits.view(-1, 37), labels.view(-1)),
            {"num_items_in_batch": torch.tensor(7)},
        ),
        (
            "fixed_cross_entropy",
            (logits.view(-1, 37), labels.view(-1).clamp(0, 37)),
            {"ignore_index": 37},
        ),
        (
            "ForTokenClassification",
            (logits, labels, config),
            {"num_items_in_batch": 9, "unknown": 1},
        ),
        ("ForMaskedLMLoss", (logits, labels, 37), {"num_items_in_batch": torch.tensor(9)}),
        ("ForMaskedLMLoss", (logits, labels, 37, None, -100), {}),
    ]
    served = 0
    for name, (x, *args), kwargs in calls:
        if not hasattr(loss_utils, name):
            continue
        served += 1
        expected = _loss_and_grad(getattr(unpatched, name), x, *args, **kwargs)
        actual = _loss_and_grad(getattr(loss_utils, name), x, *args, **kwargs)
        assert_close(actual[0], expected[0])
        assert_close(actual[1], expected[1])
    assert kernel_calls[0] == served


@needs_loss_utils
def test_loss_dtypes_follow_the_originals(
    unpatched: types.ModuleType, kernel_calls: list[int]
) -> None:
    # The model-level losses upcast, so they return float32; fixed_cross_entropy returns
    # the dtype of the logits it was given. Gradients come back in the logits' dtype.
    logits, labels = _causal_batch(torch.bfloat16)
    loss, grad = _loss_and_grad(loss_utils.ForCausalLMLoss, logits, labels, 37)
    expected_loss, expected_grad = _loss_and_grad(unpatched.ForCausalLMLoss, logits, labels, 37)
    assert (loss.dtype, grad.dtype) == (torch.float32, torch.bfloat16)
    assert_close(loss, expected_loss)
    assert_close(grad.float(), expected_grad.float(), rtol=1e-2)
    rows, row_labels = logits.view(-1, 37).to(DEVICE), labels.view(-1).to(DEVICE)
    assert loss_utils.fixed_cross_entropy(rows, row_labels).dtype == torch.bfloat16
    assert kernel_calls[0] == 2


@needs_loss_utils
def test_loss_dtypes_under_autocast_and_with_a_float_item_count(
    unpatched: types.ModuleType, kernel_calls: list[int]
) -> None:
    # torch's cross_entropy runs in float32 under autocast; dividing a bf16 loss by a
    # float32 item count (what the Trainer passes) promotes it to float32.
    logits, labels = _causal_batch(torch.bfloat16)
    rows, row_labels = logits.view(-1, 37).to(DEVICE), labels.view(-1).to(DEVICE)
    fixed = (loss_utils.fixed_cross_entropy, unpatched.fixed_cross_entropy)
    calls = [
        (*fixed, {"num_items_in_batch": torch.tensor(9.0)}),
        (*fixed, {"num_items_in_batch": 9}),
        (AutopatchCrossEntropyLoss(), torch.nn.CrossEntropyLoss(), {}),
    ]
    for autocast in (False, True):
        for patched, original, kwargs in calls:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                actual, expected = patched(rows, row_labels, **kwargs), original(rows, row_labels, **kwargs)
            assert actual.dtype == expected.dtype, (autocast, original, kwargs)
            assert_close(actual.float(), expected.float(), rtol=1e-2)
    assert kernel_calls[0] == 2 * len(calls)


def test_cross_entropy_loss_instances_outlive_the_patch_as_torchs() -> None:
    # Some models build theirs in __init__ (LXMERT): after unpatch() they run torch's
    # forward, and they pickle and script as torch's class.
    import copy
    import pickle

    instance = AutopatchCrossEntropyLoss(ignore_index=3, label_smoothing=0.1)
    for restored in (pickle.loads(pickle.dumps(instance)), copy.deepcopy(instance)):
        assert type(restored) is torch.nn.CrossEntropyLoss
        assert (restored.ignore_index, restored.label_smoothing) == (3, 0.1)
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    expected = torch.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1)(logits, labels)
    assert_close(torch.jit.script(instance)(logits, labels), expected)
    code = """
    import json, torch
    from liger_autopatch import unpatch
    from liger_autopatch.targets import _dispatch
    from liger_autopatch.targets.model_modules import AutopatchCrossEntropyLoss
    instance = AutopatchCrossEntropyLoss()
    calls = []
    _dispatch.cross_entropy = lambda *args, **kwargs: calls.append(1)
    unpatch()
    loss = instance(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    print(json.dumps([len(calls), loss.dtype == torch.float32]))
    """
    assert run_python(code, env={"TRITON_INTERPRET": "1"}) == [0, True]


@needs_loss_utils
def test_without_the_triton_path_the_originals_run(
    unpatched: types.ModuleType, monkeypatch: pytest.MonkeyPatch, kernel_calls: list[int]
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU, no interpreter: no Triton path
    logits, labels = _causal_batch()
    config = types.SimpleNamespace(num_labels=37)
    calls = [
        ("ForCausalLMLoss", (logits, labels, 37, torch.tensor(9))),
        ("ForMaskedLMLoss", (logits, labels, 37)),
        ("ForTokenClassification", (logits, labels, config)),
        ("fixed_cross_entropy", (logits.view(-1, 37), labels.view(-1))),
    ]
    for name, (x, *args) in calls:
        if hasattr(loss_utils, name):
            actual = _loss_and_grad(getattr(loss_utils, name), x, *args, device=CPU)
            expected = _loss_and_grad(getattr(unpatched, name), x, *args, device=CPU)
            assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1]), name
    assert kernel_calls[0] == 0


@needs_loss_utils
def test_segmentation_and_float64_logits_go_to_the_original(
    unpatched: types.ModuleType, kernel_calls: list[int]
) -> None:
    generator = torch.Generator().manual_seed(0)
    segmentation = torch.randn(2, 5, 4, 4, generator=generator)  # (batch, classes, height, width)
    masks = torch.randint(0, 5, (2, 4, 4), generator=generator)
    masks[0, 0] = 255
    rows, labels = (
        torch.randn(8, 5, generator=generator, dtype=torch.float64),
        torch.randint(0, 5, (8,)),
    )
    for x, target, kwargs in ((segmentation, masks, {"ignore_index": 255}), (rows, labels, {})):
        actual = _loss_and_grad(loss_utils.fixed_cross_entropy, x, target, **kwargs)
        expected = _loss_and_grad(unpatched.fixed_cross_entropy, x, target, **kwargs)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    assert kernel_calls[0] == 0


def test_cross_entropy_loss_subclass_uses_the_kernel_where_it_serves(
    kernel_calls: list[int],
) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=generator)
    labels = torch.randint(0, 7, (10,), generator=generator)
    labels[3] = -100
    settings = [
        {},
        {"reduction": "sum"},
        {"reduction": "none"},
        {"label_smoothing": 0.1},
        {"ignore_index": 2},
    ]
    for options in settings:
        actual = _loss_and_grad(AutopatchCrossEntropyLoss(**options), logits, labels.clamp_min(0))
        expected = _loss_and_grad(torch.nn.CrossEntropyLoss(**options), logits, labels.clamp_min(0))
        assert_close(actual[0], expected[0])
        assert_close(actual[1], expected[1])
    assert kernel_calls[0] == len(settings)
    half = AutopatchCrossEntropyLoss()(logits.to(DEVICE, torch.bfloat16), labels.to(DEVICE))
    assert half.dtype == torch.bfloat16  # torch returns the input's dtype; so do we


def test_cross_entropy_loss_subclass_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[int]
) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator)
    labels = torch.randint(0, 4, (6,), generator=generator)
    probabilities = torch.softmax(torch.randn(6, 4, generator=generator), dim=-1)
    images, masks = (
        torch.randn(2, 4, 3, 3, generator=generator),
        torch.randint(0, 4, (2, 3, 3), generator=generator),
    )
    cases = [
        ({"weight": torch.rand(4, generator=generator)}, logits, labels),
        ({}, logits, probabilities),  # soft targets
        ({}, images, masks),  # N-d input
        ({}, logits.double(), labels),
    ]
    for options, x, target in cases:
        actual = _loss_and_grad(AutopatchCrossEntropyLoss(**options), x, target)
        expected = _loss_and_grad(torch.nn.CrossEntropyLoss(**options), x, target)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    actual = _loss_and_grad(AutopatchCrossEntropyLoss(), logits, labels, device=CPU)
    assert torch.equal(actual[0], torch.nn.CrossEntropyLoss()(logits, labels))
    assert kernel_calls[0] == 0


# --- gates and skips ----------------------------------------------------------------------


def test_fresh_loss_utils_is_patched_and_unpatch_restores(
    fresh_loss_utils: types.ModuleType,
) -> None:
    module = fresh_loss_utils
    originals = {name: getattr(module, name) for name in LOSS_FUNCTIONS if hasattr(module, name)}
    mapping_before = dict(module.LOSS_MAPPING)
    loss_functions.apply(module)
    replacements = {name: getattr(module, name) for name in originals}
    assert all(_registry.original_of(replacements[name]) is originals[name] for name in originals)
    for key, value in mapping_before.items():
        replaced = [name for name, original in originals.items() if original is value]
        assert module.LOSS_MAPPING[key] is (replacements[replaced[0]] if replaced else value), key
    loss_functions.apply(module)  # idempotent
    assert {name: getattr(module, name) for name in originals} == replacements
    _registry.unpatch()
    assert {name: getattr(module, name) for name in originals} == originals
    assert module.LOSS_MAPPING == mapping_before and all(
        module.LOSS_MAPPING[key] is value for key, value in mapping_before.items()
    )
    loss_functions.apply(module)  # patching again hands out the same objects
    assert all(getattr(module, name) is replacement for name, replacement in replacements.items())


def test_unexpected_signature_is_skipped_with_the_reason(
    fresh_loss_utils: types.ModuleType,
) -> None:
    module = fresh_loss_utils

    def ForCausalLMLoss(
        logits, labels, vocab_size, reduction="mean", **kwargs
    ):  # a future transformers
        raise AssertionError("not called")

    ForCausalLMLoss.__module__, ForCausalLMLoss.__qualname__ = module.__name__, "ForCausalLMLoss"
    changed = module.ForCausalLMLoss = ForCausalLMLoss
    loss_functions.apply(module)
    state, detail = _states("loss")["loss_utils.ForCausalLMLoss"]
    assert state == "skipped" and "unexpected signature" in detail and "reduction='mean'" in detail
    assert module.ForCausalLMLoss is changed
    assert _states("loss")["loss_utils.fixed_cross_entropy"] == ("patched", "")


def test_missing_function_or_mapping_is_skipped(fresh_loss_utils: types.ModuleType) -> None:
    module = fresh_loss_utils
    vars(module).pop("ForMaskedLMLoss", None)
    module.LOSS_MAPPING = list(module.LOSS_MAPPING.items())
    loss_functions.apply(module)
    states = _states("loss")
    assert states["loss_utils.ForMaskedLMLoss"] == (
        "skipped",
        "this transformers has no loss_utils.ForMaskedLMLoss",
    )
    assert states["loss_utils.ForCausalLMLoss"] == (
        "skipped",
        "loss_utils.LOSS_MAPPING is not a dict",
    )
    assert states["loss_utils.fixed_cross_entropy"] == ("patched", "")


def test_a_fixed_cross_entropy_from_somebody_else_is_left_with_its_callers(
    fresh_loss_utils: types.ModuleType,
) -> None:
    module = fresh_loss_utils
    causal = module.ForCausalLMLoss

    def their_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100, **kwargs):
        return TORCH_CROSS_ENTROPY(source, target)

    module.fixed_cross_entropy = their_cross_entropy
    loss_functions.apply(module)
    states = _states("loss")
    assert states["loss_utils.fixed_cross_entropy"][0] == "skipped"
    assert "their_cross_entropy" in states["loss_utils.fixed_cross_entropy"][1]
    assert states["loss_utils.ForCausalLMLoss"][0] == "skipped"
    assert module.fixed_cross_entropy is their_cross_entropy and module.ForCausalLMLoss is causal


def test_liger_kernel_cross_entropy_is_left_to_run(
    fresh_loss_utils: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What liger-kernel's apply_liger_kernel_to_*(cross_entropy=True) does on transformers >= 4.46.
    module = fresh_loss_utils
    originals = {name: getattr(module, name) for name in LOSS_FUNCTIONS if hasattr(module, name)}
    modeling = types.ModuleType("transformers.models.tiny.modeling_tiny")
    modeling.CrossEntropyLoss = torch.nn.CrossEntropyLoss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", _liger_kernel_cross_entropy)
    loss_functions.apply(module)
    model_modules.apply(modeling)
    reason = "liger-kernel replaced torch.nn.functional.cross_entropy; left to liger-kernel"
    states = {**_states("loss"), **_states("modules")}
    assert {states[f"loss_utils.{name}"] for name in originals} == {("skipped", reason)}
    assert states["modeling_tiny.CrossEntropyLoss"] == ("skipped", reason)
    assert all(getattr(module, name) is original for name, original in originals.items())
    assert modeling.CrossEntropyLoss is torch.nn.CrossEntropyLoss


@needs_loss_utils
def test_liger_kernel_installed_after_us_still_runs(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[int]
) -> None:
    # Trainer(use_liger_kernel=True) patches after transformers (and we) loaded loss_utils.
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", _liger_kernel_cross_entropy)
    _liger_kernel_cross_entropy.calls = 0
    logits, labels = _causal_batch()
    loss_utils.ForCausalLMLoss(logits, labels, 37)
    AutopatchCrossEntropyLoss()(logits.view(-1, 37), labels.view(-1))
    assert (_liger_kernel_cross_entropy.calls, kernel_calls[0]) == (2, 0)


def test_values_liger_kernel_set_are_left_alone(fresh_loss_utils: types.ModuleType) -> None:
    module = fresh_loss_utils
    liger_causal = types.FunctionType(
        module.ForCausalLMLoss.__code__, module.__dict__, "ForCausalLMLoss"
    )
    liger_causal.__module__ = "liger_kernel.transformers.model.loss_utils"
    module.ForCausalLMLoss = liger_causal
    modeling = types.ModuleType("transformers.models.tiny.modeling_tiny")
    modeling.CrossEntropyLoss = _LigerKernelCrossEntropyLoss
    loss_functions.apply(module)
    model_modules.apply(modeling)
    states = {**_states("loss"), **_states("modules")}
    assert states["loss_utils.ForCausalLMLoss"][0] == "skipped"
    assert "liger-kernel replaced it" in states["loss_utils.ForCausalLMLoss"][1]
    assert states["modeling_tiny.CrossEntropyLoss"][0] == "skipped"
    assert (
        module.ForCausalLMLoss is liger_causal
        and modeling.CrossEntropyLoss is _LigerKernelCrossEntropyLoss
    )


def test_model_module_gates_and_unpatch(fresh_registry: None) -> None:
    plain = types.ModuleType("transformers.models.tiny.modeling_tiny")
    other = types.ModuleType("transformers.models.other.modeling_other")
    other.CrossEntropyLoss = torch.nn.NLLLoss
    without = types.ModuleType("transformers.models.bare.modeling_bare")
    plain.CrossEntropyLoss = torch.nn.CrossEntropyLoss
    for module in (plain, other, without):
        model_modules.apply(module)
    states = _states("modules")
    assert states["modeling_tiny.CrossEntropyLoss"] == ("patched", "")
    assert states["modeling_other.CrossEntropyLoss"][0] == "skipped"
    assert "not torch.nn.CrossEntropyLoss" in states["modeling_other.CrossEntropyLoss"][1]
    assert "modeling_bare.CrossEntropyLoss" not in states  # nothing to patch: no row
    assert (
        plain.CrossEntropyLoss is AutopatchCrossEntropyLoss
        and other.CrossEntropyLoss is torch.nn.NLLLoss
    )
    _registry.unpatch()
    assert plain.CrossEntropyLoss is torch.nn.CrossEntropyLoss
