"""Fused linear cross-entropy: the op, and the routing of causal-LM losses through it.

The op is checked against a float64 torch reference; the routing on tiny random models
against the same model's original forward (lm_head computes real logits and our
``ForCausalLMLoss`` takes the ordinary path) and, once, against a subprocess run with
``LIGER_DISABLE=1``. The Triton cross-entropy runs under ``TRITON_INTERPRET=1``; the chunk
size is made small so that every case spans several chunks.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from liger_autopatch._registry import original_of
from liger_autopatch.ops import fused_linear_cross_entropy as flce_op
from liger_autopatch.ops.cross_entropy import cross_entropy, supports
from liger_autopatch.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_autopatch.targets import fused_linear
from liger_autopatch.targets.fused_linear import DeferredLogits
from tests._subprocess import run_python

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """For this module only, without CUDA: the Triton interpreter runs the kernels."""
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setenv("TRITON_INTERPRET", "1")
        yield


RTOL = 1e-5
VOCAB, HIDDEN = 256, 32


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 16 rows at V=256 in float32, so that every case spans several chunks."""
    monkeypatch.setattr(flce_op, "CHUNK_BYTES", 16 * VOCAB * 4)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Within ``rtol`` of the largest entry of ``expected`` (NaN where it has NaN)."""
    assert actual.shape == expected.shape, what
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN in different places"
    if nan.all():
        return
    scale = expected[~nan].double().abs().max().item()
    difference = (actual[~nan].double() - expected[~nan].double()).abs().max().item()
    assert difference <= rtol * max(scale, 1e-30), (
        f"{what}: off by {difference:.3g} (scale {scale:.3g})"
    )


# ---------------------------------------------------------------------------------------
# The op


def _inputs(
    n_rows: int = 70,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    seed: int = 0,
    vocab: int = VOCAB,
):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, HIDDEN, generator=generator).to(dtype).requires_grad_()
    weight = (
        (torch.randn(vocab, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype).requires_grad_()
    )
    bias_ = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, (n_rows,), generator=generator)
    target[::7] = -100
    return hidden, weight, bias_, target


def _reference(
    hidden,
    weight,
    bias,
    target,
    *,
    num_items_in_batch=None,
    reduction="mean",
    softcap=None,
    logit_scale=None,
):
    """Loss and gradients in float64 with plain torch ops."""
    leaves = [
        t.detach().double().requires_grad_()
        for t in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    logits = F.linear(*leaves)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items_in_batch is None:
        loss = F.cross_entropy(logits, target, reduction=reduction)
    else:
        loss = F.cross_entropy(logits, target, reduction="sum") / float(num_items_in_batch)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


OP_CASES = {
    "mean": {},
    "sum": {"reduction": "sum"},
    "num_items_int": {"num_items_in_batch": 97},
    "num_items_tensor": {"num_items_in_batch": torch.tensor(97)},
    "softcap": {"softcap": 2.0},
    "logit_scale": {"logit_scale": 0.37},
    "softcap_and_scale": {"softcap": 3.0, "logit_scale": 1.7},
}


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("case", OP_CASES)
def test_op_matches_float64_reference(case: str, bias: bool) -> None:
    hidden, weight, bias_, target = _inputs(bias=bias)
    options = OP_CASES[case]
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias_, **options)
    assert loss.dtype == torch.float32
    loss.backward()
    expected_loss, expected_grads = _reference(hidden, weight, bias_, target, **options)
    _close(loss.detach(), expected_loss, "loss")
    for name, leaf, expected in zip(
        ("hidden", "weight", "bias"), (hidden, weight, bias_), expected_grads
    ):
        _close(leaf.grad, expected, f"grad of {name}")


@pytest.mark.parametrize("vocab, row_stride", [(131, 192), (40, 64)])
def test_op_pads_the_rows_of_odd_vocabularies(
    monkeypatch: pytest.MonkeyPatch, vocab: int, row_stride: int
) -> None:
    """The chunk buffer's rows start every multiple of ROW_ALIGN elements, so that cuBLAS
    and the kernel see aligned rows (V = 131: the vocabulary in two parts; V = 40: one);
    the padding is never part of the result."""
    strides = []
    run_forward_kernel = flce_op.ce.run_forward_kernel

    def recording(logits, *args, **kwargs):
        strides.append(logits.stride())
        return run_forward_kernel(logits, *args, **kwargs)

    monkeypatch.setattr(flce_op.ce, "run_forward_kernel", recording)
    hidden, weight, bias, target = _inputs(bias=True, vocab=vocab)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias)
    loss.backward()
    assert len(strides) > 1 and set(strides) == {(row_stride, 1)}
    expected_loss, expected_grads = _reference(hidden, weight, bias, target)
    _close(loss.detach(), expected_loss, "loss")
    for name, leaf, expected in zip(("hidden", "weight", "bias"), (hidden, weight, bias), expected_grads):
        _close(leaf.grad, expected, f"grad of {name}")


def test_op_backward_scales_by_grad_output() -> None:
    hidden, weight, _, target = _inputs()
    (fused_linear_cross_entropy(hidden, weight, target) * 2.5).backward()
    _, (grad_hidden, grad_weight) = _reference(hidden, weight, None, target)
    _close(hidden.grad, 2.5 * grad_hidden, "grad of hidden")
    _close(weight.grad, 2.5 * grad_weight, "grad of weight")


def test_op_second_backward_raises_clearly() -> None:
    hidden, weight, _, target = _inputs()
    loss = fused_linear_cross_entropy(hidden, weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_op_has_no_second_derivative() -> None:
    hidden, weight, _, target = _inputs()
    loss = fused_linear_cross_entropy(hidden, weight, target)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, weight, create_graph=True)


def test_op_float16_weight_gradient_at_a_loss_scale_that_halves() -> None:
    # GradScaler backing off: at the first scale the weight gradient overflows float16, at
    # the second it does not, in torch as here (though the forward predicts the first).
    hidden, weight, _, target = _inputs(n_rows=8, dtype=torch.float16)
    hidden = (hidden.detach() * 8).requires_grad_()  # largest weight gradient 4.5
    overflowed = []
    for scale in (2.0**14, 2.0**13):
        weight.grad = None
        (fused_linear_cross_entropy(hidden, weight, target) * scale).backward()
        expected_weight = weight.detach().clone().requires_grad_()
        logits = F.linear(hidden.detach(), expected_weight).float()
        (F.cross_entropy(logits, target) * scale).backward()
        finite = expected_weight.grad.isfinite()
        assert torch.equal(weight.grad.isfinite(), finite), scale
        torch.testing.assert_close(
            weight.grad[finite], expected_weight.grad[finite], rtol=4e-3, atol=1.0
        )
        overflowed.append(not finite.all())
    assert overflowed == [True, False]


def test_op_argument_errors() -> None:
    hidden, weight, _, target = _inputs()
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear_cross_entropy(hidden, weight, target, bias=torch.zeros(VOCAB + 1))
    with pytest.raises(ValueError, match="one number"):
        fused_linear_cross_entropy(hidden, weight, target, num_items_in_batch=torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError):
        fused_linear_cross_entropy(hidden, weight, target, ignore_index=1.5)


def test_op_with_no_hidden_features() -> None:
    hidden = torch.zeros(6, 0, requires_grad=True)
    weight = torch.zeros(VOCAB, 0, requires_grad=True)
    target = torch.randint(0, VOCAB, (6,))
    fused_linear_cross_entropy(hidden, weight, target).backward()
    assert hidden.grad.shape == (6, 0) and weight.grad.shape == (VOCAB, 0)


def test_op_all_ignored() -> None:
    hidden, weight, _, target = _inputs()
    target.fill_(-100)
    loss = fused_linear_cross_entropy(hidden, weight, target)
    loss.backward()
    assert loss.isnan()  # torch's mean over no rows
    assert not hidden.grad.any() and not weight.grad.any()
    summed = fused_linear_cross_entropy(hidden, weight, target, num_items_in_batch=5)
    assert summed.item() == 0.0


def test_op_does_no_gradient_work_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gradient_work(*args, **kwargs):
        raise AssertionError("gradient computed")

    hidden, weight, _, target = _inputs()
    expected, _ = _reference(hidden, weight, None, target)
    monkeypatch.setattr(flce_op._FusedLinearCrossEntropy, "apply", no_gradient_work)
    with torch.no_grad():
        _close(fused_linear_cross_entropy(hidden, weight, target), expected, "loss under no_grad")
    _close(
        fused_linear_cross_entropy(hidden.detach(), weight.detach(), target),
        expected,
        "loss of constants",
    )


class _Outputs(TorchDispatchMode):
    """Records every op's tensor outputs: the most memory (bytes of storage) any has, and
    (dtype, shape) of those that own memory of that size (not the expanded stand-ins the
    op makes for the logits' shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[torch.dtype, tuple[int, ...]]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                nbytes = t.untyped_storage().nbytes()
                self.largest = max(self.largest, nbytes)
                if nbytes >= t.numel() * t.element_size():
                    self.shapes.add((t.dtype, tuple(t.shape)))
        return out


def test_op_never_makes_all_the_logits() -> None:
    hidden, weight, bias, target = _inputs(n_rows=200, bias=True)
    with _Outputs() as mode:
        fused_linear_cross_entropy(hidden, weight, target, bias=bias).backward()
    assert mode.largest < hidden.shape[0] * VOCAB * 4 / 4  # a quarter of the float32 logits


def test_op_without_triton_is_the_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    hidden, weight, bias, target = _inputs(bias=True)
    assert not flce_op._triton_serves(hidden, weight, bias, target)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, softcap=2.0)
    loss.backward()
    expected_loss, expected_grads = _reference(hidden, weight, bias, target, softcap=2.0)
    _close(loss.detach(), expected_loss, "loss")
    for leaf, expected in zip((hidden, weight, bias), expected_grads):
        _close(leaf.grad, expected, "grad")


# The kernels launch on CPU tensors only under the interpreter (not where CUDA is present).
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")


@interpreter_only
def test_op_kernel_failure_gives_the_torch_reference(failing_kernel) -> None:
    launches = failing_kernel("cross_entropy_forward_kernel")
    hidden, weight, bias, target = _inputs(bias=True)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, softcap=2.0)
    loss.backward()
    assert launches == ["cross_entropy_forward_kernel"]
    assert not flce_op._triton_serves(hidden, weight, bias, target)
    expected_loss, expected_grads = _reference(hidden, weight, bias, target, softcap=2.0)
    _close(loss.detach(), expected_loss, "loss")
    for leaf, expected in zip((hidden, weight, bias), expected_grads):
        _close(leaf.grad, expected, "grad")


@pytest.mark.parametrize("vocab", [VOCAB, 131])
def test_op_bfloat16_gradients_are_as_precise_as_unfused(vocab: int) -> None:
    """Against float64: bf16 gradients no further off than unfused bf16 autograd's with the
    same cross-entropy op (matmul, then our cross_entropy on all the logits at once), which
    rounds one matmul over all rows once. The weight gradient sums 12 chunks here (V=256);
    at V=131 the matmuls take the vocabulary in two parts (ROW_ALIGN).

    (The cross-entropy op is the same on both sides on purpose: the Triton interpreter
    stores float32 to bfloat16 by truncation, twice the error of the round-to-nearest of
    torch and of GPUs, so its bf16 logit gradient is further from float64 than torch's;
    that is the interpreter's, not the chunking's.)
    """
    hidden, weight, _, target = _inputs(n_rows=384, dtype=torch.bfloat16, seed=1, vocab=vocab)
    _, (exact_hidden, exact_weight) = _reference(hidden, weight, None, target)
    fused_linear_cross_entropy(hidden, weight, target).backward()
    fused = (hidden.grad.double(), weight.grad.double())
    hidden.grad = weight.grad = None
    cross_entropy(F.linear(hidden, weight), target).backward()
    unfused = (hidden.grad.double(), weight.grad.double())
    for what, exact, ours, theirs in zip(
        ("hidden", "weight"), (exact_hidden, exact_weight), fused, unfused
    ):
        our_error = (ours - exact).norm() / exact.norm()
        their_error = (theirs - exact).norm() / exact.norm()
        assert our_error <= 1.05 * their_error, (
            f"grad of {what}: {our_error:.3g} vs unfused {their_error:.3g}"
        )


@pytest.mark.parametrize("vocab", [VOCAB, 131])
@pytest.mark.parametrize("n_rows", [2 * HIDDEN, 2 * HIDDEN + 1])
def test_op_bfloat16_one_chunk_where_the_accumulator_would_be_larger(
    n_rows: int, vocab: int
) -> None:
    """bf16 logits of up to 2 rows per hidden unit take no more memory than a float32
    weight-gradient accumulator: then one chunk of all rows and no accumulator; one row
    more, and the op is chunked with the accumulator (also where the rows are padded, at
    V = 131). Gradients stay as precise as the unfused computation's either way."""
    hidden, weight, _, target = _inputs(n_rows=n_rows, dtype=torch.bfloat16, seed=2, vocab=vocab)
    _, (exact_hidden, exact_weight) = _reference(hidden, weight, None, target)
    with _Outputs() as outputs:
        fused_linear_cross_entropy(hidden, weight, target).backward()
    one_chunk = n_rows <= 2 * HIDDEN
    assert ((torch.bfloat16, (n_rows, vocab)) in outputs.shapes) == one_chunk
    assert ((torch.float32, (vocab, HIDDEN)) in outputs.shapes) == (not one_chunk)
    fused = (hidden.grad.double(), weight.grad.double())
    hidden.grad = weight.grad = None
    cross_entropy(F.linear(hidden, weight), target).backward()
    for what, exact, ours, theirs in zip(
        ("hidden", "weight"), (exact_hidden, exact_weight), fused, (hidden.grad.double(), weight.grad.double())
    ):
        our_error = (ours - exact).norm() / exact.norm()
        their_error = (theirs - exact).norm() / exact.norm()
        assert our_error <= 1.05 * their_error, f"grad of {what}: {our_error:.3g} vs unfused {their_error:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "vocab, with_bias", [(50304, False), (50257, False), (50257, True), (32001, False)]
)
def test_gpu_op_at_real_sizes(
    monkeypatch: pytest.MonkeyPatch, vocab: int, with_bias: bool
) -> None:
    """bf16 on the GPU, in several chunks with the float32 accumulator, the vocabulary
    whole (50304) or in two parts (ROW_ALIGN): loss within 5e-5 of float64 and gradients
    no further off than unfused bf16 autograd (torch's matmul and upcast cross-entropy,
    as transformers computes it)."""
    monkeypatch.setattr(flce_op, "CHUNK_BYTES", 2**30)
    generator = torch.Generator(device="cuda").manual_seed(vocab)
    n_rows, n_hidden = 4096, 1024
    hidden = torch.randn(n_rows, n_hidden, device="cuda", generator=generator)
    weight = torch.randn(vocab, n_hidden, device="cuda", generator=generator) / n_hidden**0.5
    bias = torch.randn(vocab, device="cuda", generator=generator) if with_bias else None
    hidden = hidden.bfloat16().requires_grad_()
    weight = weight.bfloat16().requires_grad_()
    bias = bias.bfloat16().requires_grad_() if bias is not None else None
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    target = torch.randint(0, vocab, (n_rows,), device="cuda", generator=generator)
    target[::10] = -100
    assert flce_op.chunk_rows(hidden, weight, weight_grad=True) < n_rows
    exact_loss, exact_grads = _reference(hidden, weight, bias, target)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias)
    loss.backward()
    assert abs(loss.item() - exact_loss.item()) <= 5e-5 * exact_loss.item()
    fused = [leaf.grad.double() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    F.cross_entropy(F.linear(hidden, weight, bias).float(), target).backward()
    unfused = [leaf.grad.double() for leaf in leaves]
    for what, exact, ours, theirs in zip(("hidden", "weight", "bias"), exact_grads, fused, unfused):
        our_error = (ours - exact).norm() / exact.norm()
        their_error = (theirs - exact).norm() / exact.norm()
        assert our_error <= 1.05 * their_error, (
            f"grad of {what}: {our_error:.3g} vs unfused {their_error:.3g}"
        )


# ---------------------------------------------------------------------------------------
# Routing on tiny models


def _config(name: str, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        attn_implementation="eager",
    )
    configs = {
        "llama": ("LlamaConfig", {}),
        "gemma2": (
            "Gemma2Config",
            {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 3.0},
        ),
        "cohere": ("CohereConfig", {"logit_scale": 0.37}),
        "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
        "mixtral": (
            "MixtralConfig",
            {
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "output_router_logits": True,
                "router_aux_loss_coef": 0.1,
            },
        ),
        "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    }
    if name == "opt":  # its forward calls .contiguous() on the logits
        return transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=64,
            num_hidden_layers=1, num_attention_heads=4, pad_token_id=0, dropout=0.0, **extra,
        )  # fmt: skip
    if name == "bart":  # BartForCausalLM: CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))
        return transformers.BartConfig(
            vocab_size=VOCAB, d_model=HIDDEN, decoder_layers=1, encoder_layers=1,
            decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=64,
            encoder_ffn_dim=64, pad_token_id=0, dropout=0.0, **extra,
        )  # fmt: skip
    config_class, specific = configs[name]
    return getattr(transformers, config_class)(**{**common, **specific, **extra})


def _model(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(name, **extra)).train()


def _batch(seq: int = 40, vocab: int = VOCAB):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, vocab, (2, seq), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100
    return input_ids, labels


def _loss_and_grads(model: torch.nn.Module, forward, **inputs):
    model.zero_grad()
    outputs = forward(model, **inputs)
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def _assert_routed_like_original(model: torch.nn.Module, **inputs) -> tuple:
    """Fused forward vs the original forward: same loss, same gradient of every parameter."""
    target = f"flce.{type(model).__name__}"
    before = fused_linear.routing().get(target, fused_linear.RoutingRecord()).fused
    fused_out, fused_grads = _loss_and_grads(model, type(model).__call__, **inputs)
    assert isinstance(fused_out.logits, DeferredLogits)
    assert fused_linear.routing()[target].fused == before + 1, fused_linear.routing()[target]
    original_out, original_grads = _loss_and_grads(
        model, original_of(type(model).forward), **inputs
    )
    assert not isinstance(original_out.logits, DeferredLogits)
    _close(fused_out.loss.detach(), original_out.loss.detach(), "loss")
    assert fused_grads.keys() == original_grads.keys()
    scale = max(g.abs().max() for g in original_grads.values())
    for name, grad in fused_grads.items():
        _close(grad / scale, original_grads[name] / scale, f"grad of {name}")
    return fused_out, original_out


@pytest.mark.parametrize(
    "name", ["llama", "gemma2", "cohere", "granite", "mixtral", "qwen2", "opt", "bart"]
)
def test_routing_matches_original_forward(name: str) -> None:
    input_ids, labels = _batch()
    fused_out, original_out = _assert_routed_like_original(
        _model(name), input_ids=input_ids, labels=labels
    )
    _close(
        fused_out.logits.detach(), original_out.logits.detach(), "logits read after the fused loss"
    )
    if name == "mixtral":
        assert fused_out.aux_loss is not None and fused_out.aux_loss.item() > 0


def _compiled_like_eager(model: torch.nn.Module, rtol: float = RTOL, **compile_options) -> None:
    """The compiled model's loss and gradients are the eager (fused) model's, and the fused
    routing stepped aside: dynamo traced the forward, so lm_head made real logits."""
    input_ids, labels = _batch()
    input_ids, labels = input_ids.to(model.device), labels.to(model.device)
    eager_out, eager_grads = _loss_and_grads(model, type(model).__call__, input_ids=input_ids, labels=labels)
    routed_before = fused_linear.routing()["flce.LlamaForCausalLM"]
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_options)
    outputs, grads = _loss_and_grads(compiled, type(compiled).__call__, input_ids=input_ids, labels=labels)
    assert fused_linear.routing()["flce.LlamaForCausalLM"] == routed_before
    assert not isinstance(outputs.logits, DeferredLogits)
    _close(outputs.loss.detach(), eager_out.loss.detach(), "loss", rtol)
    scale = max(g.abs().max() for g in eager_grads.values())
    assert grads.keys() == {f"_orig_mod.{name}" for name in eager_grads}
    for name, grad in eager_grads.items():
        _close(grads[f"_orig_mod.{name}"] / scale, grad / scale, f"grad of {name}", rtol)


def test_compiled_model_takes_the_custom_op_in_one_graph() -> None:
    graphs: list[str] = []

    def backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module.code)
        return graph_module.forward

    _compiled_like_eager(_model("llama"), backend=backend)
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break"
    # CPU tensors take the Triton path under TRITON_INTERPRET=1, set here where CUDA is absent.
    if supports(torch.empty(1, VOCAB), torch.zeros(1, dtype=torch.long)):
        assert "torch.ops.liger_autopatch.cross_entropy_rows" in graphs[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_model_with_inductor() -> None:
    """As Trainer's ``torch_compile=True`` runs it: inductor, float32, one graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    _compiled_like_eager(_model("llama").cuda(), rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_routing_at_a_vocabulary_that_is_not_a_multiple_of_row_align() -> None:
    """V = 131 (the op's padded rows, two-part matmuls) with lm_head tied to the embedding."""
    input_ids, labels = _batch(vocab=131)
    _assert_routed_like_original(
        _model("qwen2", vocab_size=131), input_ids=input_ids, labels=labels
    )


@interpreter_only
def test_kernel_failure_leaves_the_model_to_transformers(failing_kernel) -> None:
    launches = failing_kernel("cross_entropy_forward_kernel")
    model = _model("llama")
    input_ids, labels = _batch()
    outputs, grads = _loss_and_grads(model, type(model).__call__, input_ids=input_ids, labels=labels)
    assert launches == ["cross_entropy_forward_kernel"]  # once: the path is off from then on
    original_out, original_grads = _loss_and_grads(
        model, original_of(type(model).forward), input_ids=input_ids, labels=labels
    )
    _close(outputs.loss.detach(), original_out.loss.detach(), "loss")
    for name, grad in grads.items():
        _close(grad, original_grads[name], f"grad of {name}")
    outputs, _ = _loss_and_grads(model, type(model).__call__, input_ids=input_ids, labels=labels)
    assert launches == ["cross_entropy_forward_kernel"]
    # Transformers' own code ran: real logits, and its loss to the last bit.
    assert not isinstance(outputs.logits, DeferredLogits)
    assert torch.equal(outputs.loss, original_out.loss)
    reason = fused_linear.routing()["flce.LlamaForCausalLM"].last_reason
    assert "Triton kernels are off on cpu" in reason, reason


def test_routing_tied_embeddings_share_one_gradient() -> None:
    model = _model("qwen2")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    _assert_routed_like_original(model, input_ids=_batch()[0], labels=_batch()[1])


def test_routing_logits_to_keep() -> None:
    input_ids, labels = _batch()
    fused_out, _ = _assert_routed_like_original(
        _model("llama"), input_ids=input_ids, labels=labels[:, -8:], logits_to_keep=8
    )
    assert fused_out.logits.shape == (2, 8, VOCAB)


def test_routing_shift_labels_and_num_items_in_batch() -> None:
    input_ids, labels = _batch()
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    model = _model("gemma2")
    shift_labels[1, -10:] = -100  # differs from the labels: the loss must follow shift_labels
    _assert_routed_like_original(
        model, input_ids=input_ids, labels=labels, shift_labels=shift_labels
    )
    _assert_routed_like_original(
        model, input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(150)
    )


def test_routing_under_no_grad_does_no_gradient_work(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama").eval()
    input_ids, labels = _batch()
    with torch.no_grad():
        expected = original_of(type(model).forward)(model, input_ids=input_ids, labels=labels).loss
        monkeypatch.setattr(flce_op._FusedLinearCrossEntropy, "apply", None)  # any use fails
        outputs = model(input_ids=input_ids, labels=labels)
    assert isinstance(outputs.logits, DeferredLogits)
    _close(outputs.loss, expected, "eval loss")


def test_routing_never_makes_all_the_logits() -> None:
    vocab = 1024  # the logits outweigh the attention scores and the embedding
    model = _model("llama", vocab_size=vocab)
    input_ids, labels = _batch(seq=64)
    logits_bytes = input_ids.numel() * vocab * 4
    assert max(p.nbytes for p in model.parameters()) < logits_bytes / 2
    with _Outputs() as mode:
        model(input_ids=input_ids, labels=labels).loss.backward()
    assert mode.largest < logits_bytes / 2


def test_unmodelled_use_of_the_logits_falls_back_with_the_same_loss() -> None:
    model = _model("llama")
    model.lm_head.register_forward_hook(lambda module, args, output: output + 0.5)
    input_ids, labels = _batch()
    target = "flce.LlamaForCausalLM"
    fell_back = fused_linear.routing().get(target, fused_linear.RoutingRecord()).fell_back
    fused_out, fused_grads = _loss_and_grads(
        model, type(model).__call__, input_ids=input_ids, labels=labels
    )
    record = fused_linear.routing()[target]
    assert record.fell_back == fell_back + 1 and "(add)" in record.last_reason, record
    original_out, original_grads = _loss_and_grads(
        model, original_of(type(model).forward), input_ids=input_ids, labels=labels
    )
    _close(fused_out.loss.detach(), original_out.loss.detach(), "loss")
    for name, grad in fused_grads.items():
        _close(grad, original_grads[name], f"grad of {name}")


def test_detached_logits_before_the_loss_fall_back_with_the_same_loss() -> None:
    # The original's loss then has no gradient at all: neither may ours.
    model = _model("llama")
    model.lm_head.register_forward_hook(lambda module, args, output: output.detach())
    input_ids, labels = _batch()
    fused = model(input_ids=input_ids, labels=labels)
    assert "(detach)" in fused_linear.routing()["flce.LlamaForCausalLM"].last_reason
    original = original_of(type(model).forward)(model, input_ids=input_ids, labels=labels)
    _close(fused.loss, original.loss, "loss")
    assert not fused.loss.requires_grad and not original.loss.requires_grad


def test_logits_detached_after_a_fused_loss_stay_uncomputed_until_read() -> None:
    # As Trainer's evaluation loop (nested_detach) and DeepSpeed's hook on the model's
    # output detach them.
    model = _model("llama")
    input_ids, labels = _batch()
    outputs = model(input_ids=input_ids, labels=labels)
    detached = outputs.logits.detach()
    assert isinstance(detached, DeferredLogits) and not detached.requires_grad
    assert outputs.logits._materialized is None and detached._materialized is None
    expected = original_of(type(model).forward)(model, input_ids=input_ids).logits
    values = detached.float()
    assert not values.requires_grad and outputs.logits._materialized is None
    _close(values, expected.detach(), "detached logits")


class _Fsdp2LikeState:
    """Stands for FSDP2's state, whose method is the hook it registers on outputs."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def pre_backward(self, grad: torch.Tensor) -> None:
        self.seen.append(tuple(grad.shape))


_Fsdp2LikeState.pre_backward.__module__ = "torch.distributed.fsdp._fully_shard._fsdp_state"


def _hook_outputs_like_fsdp2(model: torch.nn.Module, seen: list) -> None:
    """What FSDP2's post-forward does to a unit's outputs: look at ``_base`` and register
    a method of its state as gradient hook on each one that requires grad."""

    def post_forward(module, args, output):
        assert output._base is None
        output.register_hook(_Fsdp2LikeState(seen).pre_backward)

    model.lm_head.register_forward_hook(post_forward)


def test_gradient_hooks_on_lm_heads_output_keep_the_fused_path() -> None:
    model = _model("llama")
    seen: list = []
    _hook_outputs_like_fsdp2(model, seen)
    input_ids, labels = _batch()
    _assert_routed_like_original(model, input_ids=input_ids, labels=labels)
    # The fused loss sends no gradient through the logits; the original forward does.
    assert seen == [(*input_ids.shape, VOCAB)]


def test_gradient_hooks_on_lm_heads_output_fire_where_the_logits_are_made() -> None:
    model = _model("llama")
    seen: list = []
    _hook_outputs_like_fsdp2(model, seen)
    model.lm_head.register_forward_hook(lambda module, args, output: output + 0.5)
    fell_back = (
        fused_linear.routing().get("flce.LlamaForCausalLM", fused_linear.RoutingRecord()).fell_back
    )
    model(input_ids=_batch()[0], labels=_batch()[1]).loss.backward()
    assert fused_linear.routing()["flce.LlamaForCausalLM"].fell_back == fell_back + 1
    assert seen == [(*_batch()[0].shape, VOCAB)]


def test_a_users_gradient_hook_on_the_logits_keeps_the_loss_unfused() -> None:
    model = _model("llama")
    seen: list = []

    def hook_the_logits(module, args, output):
        output.register_hook(seen.append)

    model.lm_head.register_forward_hook(hook_the_logits)
    input_ids, labels = _batch()
    fused_out, fused_grads = _loss_and_grads(
        model, type(model).__call__, input_ids=input_ids, labels=labels
    )
    assert "gradient hook" in fused_linear.routing()["flce.LlamaForCausalLM"].last_reason
    (hooked,) = seen
    seen.clear()
    original_out, original_grads = _loss_and_grads(
        model, original_of(type(model).forward), input_ids=input_ids, labels=labels
    )
    _close(hooked, seen[0], "gradient the hook saw")
    _close(fused_out.loss.detach(), original_out.loss.detach(), "loss")
    for name, grad in fused_grads.items():
        _close(grad, original_grads[name], f"grad of {name}")


def test_hooks_and_retain_grad_on_logits_of_a_fused_loss_say_the_opt_out() -> None:
    model = _model("llama")
    outputs = model(input_ids=_batch()[0], labels=_batch()[1])
    assert outputs.logits._source.loss_fused
    with pytest.warns(UserWarning, match="LIGER_DISABLE=flce"):
        outputs.logits.register_hook(lambda grad: None)
    with pytest.raises(RuntimeError, match="LIGER_DISABLE=flce"):
        outputs.logits.retain_grad()
    # An engine's own hooks (FSDP2 and DeepSpeed hook the whole model's outputs): quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs.logits.register_hook(_Fsdp2LikeState([]).pre_backward)


def test_logits_read_later_keep_the_grad_mode_of_the_forward() -> None:
    model = _model("llama")
    input_ids, labels = _batch()
    with torch.no_grad():
        evaluated = model(input_ids=input_ids, labels=labels)
    assert not evaluated.logits.float().requires_grad  # read with grad on, made without
    trained = model(input_ids=input_ids, labels=labels)
    with torch.no_grad():
        logits = trained.logits.float()  # read under no_grad, made with grad
    assert logits.requires_grad
    logits.logsumexp(-1).square().mean().backward()  # a z-loss on them reaches lm_head
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_forward_with_labels_under_inference_mode_is_transformers_own() -> None:
    model = _model("llama").eval()
    input_ids, labels = _batch()
    with torch.inference_mode():
        outputs = model(input_ids=input_ids, labels=labels)
        expected = original_of(type(model).forward)(model, input_ids=input_ids, labels=labels)
    assert type(outputs.logits) is torch.Tensor
    assert "inference mode" in fused_linear.routing()["flce.LlamaForCausalLM"].last_reason
    _close(outputs.loss, expected.loss, "loss")
    _close(outputs.logits, expected.logits, "logits")


def test_adapted_lm_head_falls_back() -> None:
    class AdaptedLinear(torch.nn.Linear):
        pass

    model = _model("llama")
    adapted = AdaptedLinear(HIDDEN, VOCAB, bias=False)
    adapted.weight = model.lm_head.weight
    model.lm_head = adapted
    outputs = model(input_ids=_batch()[0], labels=_batch()[1])
    assert type(outputs.logits) is torch.Tensor
    assert "AdaptedLinear" in fused_linear.routing()["flce.LlamaForCausalLM"].last_reason


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.1),
        # Fused kernels write the weights without moving their version counters.
        lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
    ],
    ids=["sgd", "fused_adamw"],
)
def test_logits_after_an_optimizer_step_raise_with_the_opt_out(optimizer) -> None:
    model = _model("llama")
    outputs = model(input_ids=_batch()[0], labels=_batch()[1])
    outputs.loss.backward()
    optimizer(model.parameters()).step()
    with pytest.raises(RuntimeError, match="LIGER_DISABLE=flce"):
        outputs.logits.sum()


def test_parity_with_unpatched_transformers_in_a_subprocess(tmp_path) -> None:
    """Loss and lm_head gradient equal a LIGER_DISABLE=1 interpreter's, gemma2 (softcap)."""
    model = _model("gemma2")
    input_ids, labels = _batch()
    torch.save(
        {"state": model.state_dict(), "input_ids": input_ids, "labels": labels}, tmp_path / "in.pt"
    )
    outputs = model(input_ids=input_ids, labels=labels)
    outputs.loss.backward()
    expected = run_python(
        f"""
        import json, torch, transformers
        import tests.test_fused_linear as t
        saved = torch.load({str(tmp_path / "in.pt")!r})
        model = transformers.AutoModelForCausalLM.from_config(t._config("gemma2")).train()
        model.load_state_dict(saved["state"])
        outputs = model(input_ids=saved["input_ids"], labels=saved["labels"])
        outputs.loss.backward()
        torch.save(model.lm_head.weight.grad, {str(tmp_path / "grad.pt")!r})
        print(json.dumps({{"loss": outputs.loss.item(), "deferred": type(outputs.logits).__name__}}))
        """,
        env={
            "LIGER_DISABLE": "1",
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        },
    )
    assert expected["deferred"] == "Tensor"
    _close(outputs.loss.detach(), torch.tensor(expected["loss"], dtype=torch.float64), "loss")
    _close(model.lm_head.weight.grad, torch.load(tmp_path / "grad.pt"), "grad of lm_head")


def test_liger_disable_flce_turns_off_only_this_feature() -> None:
    result = run_python(
        """
        import json, liger_autopatch, torch, transformers
        liger_autopatch.install()
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        model = transformers.AutoModelForCausalLM.from_config(config)
        ids = torch.randint(0, 64, (1, 8))
        outputs = model(input_ids=ids, labels=ids)
        states = {row.target: row.state for row in liger_autopatch.status()}
        print(json.dumps({"logits": type(outputs.logits).__name__,
                          "flce": states.get("flce.LlamaForCausalLM"),
                          "loss": states.get("loss_utils.ForCausalLMLoss")}))
        """,
        env={
            "LIGER_DISABLE": "flce",
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        },
    )
    assert result == {"logits": "Tensor", "flce": "disabled", "loss": "patched"}


def test_routing_under_autocast_computes_in_autocast_dtype() -> None:
    """fp32 weights under bf16 autocast (the Trainer's bf16=True): the fused path computes
    the logits in bf16 as autocast does; bf16 tolerance, as the parity tests use."""
    model = _model("llama")
    input_ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_out, fused_grads = _loss_and_grads(
            model, type(model).__call__, input_ids=input_ids, labels=labels
        )
        original_out, original_grads = _loss_and_grads(
            model, original_of(type(model).forward), input_ids=input_ids, labels=labels
        )
    assert isinstance(fused_out.logits, DeferredLogits) and fused_out.logits.dtype == torch.bfloat16
    _close(fused_out.loss.detach(), original_out.loss.detach(), "loss", rtol=2e-3)
    scale = max(g.abs().max() for g in original_grads.values())
    for name, grad in fused_grads.items():
        _close(grad / scale, original_grads[name] / scale, f"grad of {name}", rtol=2e-2)


def test_peft_lora_keeps_the_fused_path_unless_lm_head_is_adapted() -> None:
    """A LoRA model whose lm_head is not adapted computes its loss on the fused path, with
    the gradients of the adapters equal to the original forward's; adapting lm_head makes
    it a PEFT layer, not an nn.Linear, and the ordinary path runs."""
    peft = pytest.importorskip("peft")
    input_ids, labels = _batch()
    target = "flce.LlamaForCausalLM"
    for adapted, expect_fused in ((["q_proj", "v_proj"], True), (["q_proj", "lm_head"], False)):
        config = peft.LoraConfig(r=4, target_modules=adapted, init_lora_weights=False)
        model = peft.get_peft_model(_model("llama"), config)
        base = model.get_base_model()
        before = fused_linear.routing().get(target, fused_linear.RoutingRecord())
        fused_out, fused_grads = _loss_and_grads(
            model, type(model).__call__, input_ids=input_ids, labels=labels
        )
        after = fused_linear.routing()[target]
        if expect_fused:
            assert isinstance(fused_out.logits, DeferredLogits)
            assert after.fused == before.fused + 1
        else:
            assert type(fused_out.logits) is torch.Tensor
            assert after.fell_back == before.fell_back + 1
            assert "not torch.nn.Linear" in after.last_reason, after
        original_out, original_grads = _loss_and_grads(
            base, original_of(type(base).forward), input_ids=input_ids, labels=labels
        )
        _close(fused_out.loss.detach(), original_out.loss.detach(), "loss")
        assert len(fused_grads) == len(original_grads) > 0
        for grad, expected in zip(fused_grads.values(), original_grads.values()):
            _close(grad, expected, "grad of an adapter")
