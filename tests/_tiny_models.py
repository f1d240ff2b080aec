"""Tiny randomly initialised transformers models and the loss cases the parity tests compare.

Imported by the tests for :data:`CASES` (no torch or transformers at import), and run as
a script in a subprocess to compute every case in one interpreter::

    python tests/_tiny_models.py --mode patched --device cpu --dtype float32 --out FILE

``--mode patched`` calls ``liger_autopatch.install()`` (idempotent: the ``.pth`` has usually
done it) and counts the calls that reach our kernel; ``--mode unpatched`` never imports
liger_autopatch and is meant to run with ``LIGER_DISABLE=1``. The result, saved with
``torch.save``, maps each case name to ``{"loss", "grads", "kernel_calls"}`` or to
``{"unavailable": reason}`` where this transformers lacks the model or the argument, and
lists the transformers globals that are liger_autopatch's replacements.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

VOCAB_SIZE = 384
BATCH, SEQ = 2, 12
NUM_LABELS = 3

# (case name, model, variant). Variants: "base" labels with a few ignored; "num_items" and
# "num_items_int" pass num_items_in_batch as a tensor (as the Trainer does) or an int,
# counting the labels of two micro-batches (gradient accumulation) so that it differs
# from what a mean would divide by;
# "shift_labels" passes pre-shifted labels; "all_ignored" ignores every label.
_CAUSAL_MODELS = ("llama", "mistral", "qwen2", "gemma2", "gpt2")
CASES: tuple[tuple[str, str, str], ...] = (
    *(
        (f"{model}-{variant}", model, variant)
        for model in _CAUSAL_MODELS
        for variant in ("base", "num_items", "shift_labels", "all_ignored")
    ),
    ("llama-num_items_int", "llama", "num_items_int"),
    ("bert_mlm-base", "bert_mlm", "base"),
    ("bert_mlm-num_items", "bert_mlm", "num_items"),
    ("bert_mlm-all_ignored", "bert_mlm", "all_ignored"),
    ("bert_sequence_classification-base", "bert_sequence_classification", "base"),
    ("llama_token_classification-base", "llama_token_classification", "base"),
    ("llama_question_answering-base", "llama_question_answering", "base"),
)
CASE_NAMES = tuple(name for name, _, _ in CASES)


class Unavailable(Exception):
    """This transformers has no such model, or its forward takes no such argument."""


def llama_like_config(config_class: str, **extra: Any) -> Any:
    """A tiny config of a Llama-shaped family (also tests/_distributed_worker.py's model)."""
    import transformers

    return getattr(transformers, config_class)(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        pad_token_id=0,
        attn_implementation="eager",
        **extra,
    )


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers

    return {
        "llama": lambda: llama_like_config("LlamaConfig"),
        "mistral": lambda: llama_like_config("MistralConfig"),
        "qwen2": lambda: llama_like_config("Qwen2Config"),
        "gemma2": lambda: llama_like_config(
            "Gemma2Config", head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=3.0
        ),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "bert": lambda: transformers.BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=NUM_LABELS,
        ),
    }


# model name -> (config name, model class name)
_MODELS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
    "bert_mlm": ("bert", "BertForMaskedLM"),
    "bert_sequence_classification": ("bert", "BertForSequenceClassification"),
    "llama_token_classification": ("llama", "LlamaForTokenClassification"),
    "llama_question_answering": ("llama", "LlamaForQuestionAnswering"),
}


def build_model(model: str, device: str, dtype: Any, weights_dtype: Any = None) -> Any:
    """The tiny model, with the same random weights in every process (seeded); with
    ``weights_dtype``, the weights are first rounded to it (a float32 reference for a
    bfloat16 run starts from the same bfloat16 weights)."""
    import torch
    import transformers

    config_name, class_name = _MODELS[model]
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise Unavailable(f"transformers {transformers.__version__} has no {class_name}")
    config = _configs()[config_name]()
    torch.manual_seed(0)
    model = model_class(config)
    if weights_dtype is not None:
        model = model.to(weights_dtype)
    return model.to(device=device, dtype=dtype).eval()


def _accepts_loss_kwargs(model: Any) -> bool:
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _causal_lm_takes_shift_labels() -> bool:
    try:
        from transformers.loss import loss_utils
    except ImportError:
        return False
    return "shift_labels" in inspect.signature(loss_utils.ForCausalLMLoss).parameters


def model_inputs(model_name: str, model: Any, variant: str, device: str) -> dict[str, Any]:
    """The keyword arguments of the forward call of one case."""
    import torch

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB_SIZE, (BATCH, SEQ), generator=generator)
    inputs: dict[str, Any] = {"input_ids": input_ids}
    if model_name == "bert_sequence_classification":
        inputs["labels"] = torch.randint(0, NUM_LABELS, (BATCH,), generator=generator)
    elif model_name == "llama_token_classification":
        labels = torch.randint(0, NUM_LABELS, (BATCH, SEQ), generator=generator)
        labels[:, :2] = -100
        inputs["labels"] = labels
    elif model_name == "llama_question_answering":
        # The second start lies past the sequence: clamped to SEQ, which the loss ignores.
        inputs["start_positions"] = torch.tensor([3, SEQ + 5])
        inputs["end_positions"] = torch.tensor([7, SEQ - 1])
    else:
        labels = input_ids.clone()
        labels[:, :3] = -100
        if variant == "all_ignored":
            labels[:] = -100
        inputs["labels"] = labels
        causal = model_name in _CAUSAL_MODELS
        counted = labels[:, 1:] if causal else labels
        if variant in ("num_items", "num_items_int", "shift_labels") and not _accepts_loss_kwargs(
            model
        ):
            raise Unavailable(f"{type(model).__name__}.forward takes no loss keyword arguments")
        if variant == "num_items":
            inputs["num_items_in_batch"] = 2 * (counted != -100).sum()
        elif variant == "num_items_int":
            inputs["num_items_in_batch"] = 2 * int((counted != -100).sum())
        elif variant == "shift_labels":
            if not _causal_lm_takes_shift_labels():
                raise Unavailable("this transformers' ForCausalLMLoss takes no shift_labels")
            shift_labels = torch.randint(0, VOCAB_SIZE, (BATCH, SEQ), generator=generator)
            shift_labels[:, -2:] = -100
            inputs["shift_labels"] = shift_labels
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }


def run_case(
    model_name: str, variant: str, device: str, dtype: Any, weights_dtype: Any = None
) -> dict[str, Any]:
    """Loss and parameter gradients of one forward and backward."""
    model = build_model(model_name, device, dtype, weights_dtype)
    inputs = model_inputs(model_name, model, variant, device)
    loss = model(**inputs).loss
    loss.backward()
    grads = {
        name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None
    }
    return {"loss": loss.detach().cpu(), "grads": grads}


def _count_kernel_calls() -> list[int]:
    """Wrap the kernel entry points (the dispatcher's cross-entropy, and the fused linear
    cross-entropy that causal LMs reach when flce is on) so that each call is counted."""
    from liger_autopatch.targets import _dispatch, fused_linear

    calls = [0]
    for module, name in ((_dispatch, "cross_entropy"), (fused_linear, "fused_linear_cross_entropy")):
        kernel = getattr(module, name)

        def counted(*args: Any, _kernel: Any = kernel, **kwargs: Any) -> Any:
            calls[0] += 1
            return _kernel(*args, **kwargs)

        setattr(module, name, counted)
    return calls


def patched_globals() -> list[str]:
    """The loss globals of imported transformers modules that liger_autopatch replaced.

    Read from the replacements' own mark, without importing liger_autopatch.
    """
    names = ("fixed_cross_entropy", "ForCausalLMLoss", "ForMaskedLMLoss", "ForTokenClassification")
    return sorted(
        f"{module_name}.{name}"
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("transformers.") and isinstance(module, types.ModuleType)
        for name in (*names, "CrossEntropyLoss")
        if hasattr(vars(module).get(name), "__liger_autopatch_original__")
    )


def run_all(
    mode: str, device: str, dtype_name: str, weights_dtype_name: str | None = None
) -> dict[str, Any]:
    """Every case of :data:`CASES`, patched (counting kernel calls) or as transformers has it.

    ``{"cases": {name: result}, "patched": patched_globals()}``.
    """
    import torch

    calls = None
    if mode == "patched":
        import liger_autopatch

        liger_autopatch.install()
        calls = _count_kernel_calls()
    dtype = getattr(torch, dtype_name)
    weights_dtype = getattr(torch, weights_dtype_name) if weights_dtype_name else None
    results: dict[str, dict[str, Any]] = {}
    for name, model_name, variant in CASES:
        before = calls[0] if calls else 0
        try:
            results[name] = run_case(model_name, variant, device, dtype, weights_dtype)
        except Unavailable as reason:
            results[name] = {"unavailable": str(reason)}
            continue
        results[name]["kernel_calls"] = calls[0] - before if calls else None
    return {"cases": results, "patched": patched_globals()}


def main() -> None:
    """Command line: compute every case and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("patched", "unpatched"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--weights-dtype", default=None, help="round the weights to this dtype first")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch

    torch.save(run_all(args.mode, args.device, args.dtype, args.weights_dtype), args.out)


if __name__ == "__main__":
    main()
