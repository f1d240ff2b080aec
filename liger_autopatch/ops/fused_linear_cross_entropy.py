"""Linear layer + cross-entropy in one op, without an (N, V) logits tensor.

``fused_linear_cross_entropy(hidden, weight, target)`` is
``cross_entropy(hidden @ weight.T + bias, target)``, computed row chunk by row chunk into
one reused (chunk, V) buffer:

1. ``buffer = hidden[chunk] @ weight.T + bias`` (cuBLAS; the buffer's rows padded to a
   multiple of 64 elements, and a vocabulary that is not such a multiple taken by the
   matmuls in two parts, see ROW_ALIGN);
2. the Triton cross-entropy forward kernel on ``buffer``: each row's loss, and the
   gradient of the loss with respect to the row's logits, written over the logits in
   place (the buffer is ours alone);
3. ``grad_hidden[chunk] = buffer @ weight`` and ``grad_weight += buffer.T @ hidden[chunk]``
   (cuBLAS; the first chunk writes ``grad_weight``, the others add to it).

The targets are checked once for the whole call (one device-to-host sync, read after
every chunk is queued). The gradients exist only when autograd will ask for them: under
``torch.no_grad()`` (an evaluation loss) steps 1 and 2 run without a gradient.

The gradients are made in the forward, multiplied by a prediction of ``grad_output``:
the one the previous backward of the same call site saw (1 at first), read on the device
as :mod:`liger_autopatch.ops.cross_entropy` does. The backward checks the prediction on
the device and rescales only when it was wrong, so a steady ``grad_output`` (1, a loss
scale) costs no pass over the gradients.

Precision and memory. The loss is accumulated in float32, and each chunk's logit
gradient is rounded to the logits' dtype, as unfused autograd rounds it. ``grad_hidden``
rows are one matmul each, rounded once. ``grad_weight`` is a sum over all rows: for 16-bit
weights and several chunks it is accumulated in float32 (cuBLAS, 16-bit inputs) and
rounded once at the end, so its error is unfused autograd's. Accumulated in bfloat16
instead it would be rounded once per chunk: on an H100 that measured 5-24% further from
float64 than unfused autograd (bench/NOTES-flce.md). The price is memory: while the op
runs it holds the float32 accumulator and then the rounded gradient, about three times
the weight gradient, and the chunk buffer is sized to fit under that peak. When the
logits of all rows take no more memory than that float32 accumulator (at most two rows
per hidden unit for 16-bit weights: large models, short batches), the op runs one chunk
instead: ``grad_weight`` is then one matmul over all rows, rounded once, with no
accumulator, no rounding pass and no larger peak (bench/NOTES-flce.md).

Where the Triton cross-entropy does not run (see
:func:`~liger_autopatch.ops.cross_entropy.supports`: CPU without ``TRITON_INTERPRET=1``,
float64, ...) the op is the plain torch reference, matmul + ``F.cross_entropy``, with the
same semantics.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from liger_autopatch.ops import cross_entropy as ce

__all__ = ["CHUNK_BYTES", "fused_linear_cross_entropy"]

# Upper bound on the bytes of the (chunk, V) logits buffer. Fewer, larger chunks mean
# fewer passes over the float32 weight-gradient accumulator (bench/NOTES-flce.md).
CHUNK_BYTES = 2**30

# The buffer's rows start every ROW_ALIGN elements (128 bytes of 16-bit logits), and the
# matmuls take the vocabulary in a part of a multiple of ROW_ALIGN rows and the rest. At
# V = 50257, 32001 or 128257, cuBLAS runs the matmuls that have V as a dimension 4-7
# times slower than at 50304, 32000 or 128256 (padded rows alone bring only the weight
# gradient's back, to 1.5 times), and the cross-entropy kernel would have to realign
# unpadded rows (H200; bench/NOTES-flce.md).
ROW_ALIGN = 64

_REDUCTIONS = ("mean", "sum")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, as float32.

    ``hidden`` is (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``target`` (N,) class
    indices. The logits go through the same transforms as in
    :func:`~liger_autopatch.ops.cross_entropy.cross_entropy`: multiplied by ``logit_scale``,
    then ``softcap * tanh(logits / softcap)``. ``reduction`` is "mean" (over the rows whose
    target is not ``ignore_index``; NaN when there are none, as torch) or "sum";
    ``num_items_in_batch`` (int or 0-d tensor) makes it the sum divided by that count, as
    transformers' ``fixed_cross_entropy`` does. A target outside [0, V) that is not
    ``ignore_index`` raises ``ValueError`` (also an ``IndexError``, as torch's).

    No (N, V) tensor is allocated where the Triton cross-entropy runs; elsewhere this is
    the plain torch computation.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,) = {tuple(weight.shape[:1])}; got {tuple(bias.shape)}")
    ignore_index, softcap, logit_scale = ce.check_arguments(
        ignore_index, reduction, num_items_in_batch, softcap, logit_scale
    )
    if _triton_serves(hidden, weight, bias, target):
        try:
            return _triton_fused(hidden, weight, bias, target, ignore_index, reduction, num_items_in_batch, softcap, logit_scale)
        except ce.KernelFailure:
            pass  # nothing of the caller's was written: the plain computation below
    # The plain computation: all the logits at once, in float32, then torch's loss.
    return ce.torch_cross_entropy(
        F.linear(hidden, weight, bias).float(), target, ignore_index, reduction, 0.0,
        num_items_in_batch, softcap, logit_scale,
    )  # fmt: skip


def _triton_fused(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    softcap: float | None,
    logit_scale: float | None,
) -> Tensor:
    """The chunked Triton path of :func:`fused_linear_cross_entropy`."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    logits_like = _logits_like(hidden, weight)
    options = ce.Options(ignore_index, 0.0, softcap, logit_scale)
    site = ce.call_site(sys._getframe(2), hidden.device) if needs_grad else None
    check = ce.check_targets(logits_like, target, options, site)
    denominator = ce.loss_denominator(check.status[2], reduction, num_items_in_batch, hidden.device)
    if needs_grad:
        loss = _FusedLinearCrossEntropy.apply(
            hidden, weight, bias, target, denominator, options, check.prediction, site
        )
    else:
        step = chunk_rows(hidden, weight, weight_grad=False)
        loss = _chunks(hidden, weight, bias, target, step, denominator, options, None, None)
    ce.read_check(check, logits_like, options, site)
    return loss


def _logits_like(hidden: Tensor, weight: Tensor) -> Tensor:
    """A stand-in with the logits' shape, dtype and device and no memory of its own."""
    return hidden.new_empty(()).expand(hidden.shape[0], weight.shape[0])


def _triton_serves(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> bool:
    """Whether the chunks' logits go to the Triton kernels."""
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return False
    return ce.supports(_logits_like(hidden, weight), target)


def _float32_accumulator_bytes(weight: Tensor, weight_grad: bool) -> int:
    """Bytes of the float32 accumulator a 16-bit weight gradient needs over several chunks
    (0 when there is no weight gradient or it is float32 already)."""
    return weight.numel() * 4 if weight_grad and weight.element_size() < 4 else 0


def chunk_rows(hidden: Tensor, weight: Tensor, *, weight_grad: bool) -> int:
    """Rows per chunk. All of them when their logits take no more memory than the float32
    weight-gradient accumulator that several chunks would need (one chunk needs none;
    N <= 2H for 16-bit weights: the rows' padding to ROW_ALIGN, under 64 elements, is
    left out of that comparison). Otherwise as many padded rows as fit in
    :data:`CHUNK_BYTES` and in the weight gradient's size (so the buffer stays under the
    peak the accumulator sets), rounded down to a multiple of 128 (the matmuls' tile) when
    that many fit; at least one."""
    n_rows, n_vocab, itemsize = hidden.shape[0], weight.shape[0], hidden.element_size()
    if n_rows * n_vocab * itemsize <= _float32_accumulator_bytes(weight, weight_grad):
        return n_rows
    buffer_bytes = min(CHUNK_BYTES, weight.numel() * weight.element_size())
    rows = buffer_bytes // (_row_stride(n_vocab) * itemsize)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n_rows, rows))


def _row_stride(n_vocab: int) -> int:
    """The chunk buffer's row stride: ``n_vocab`` rounded up to ROW_ALIGN elements."""
    return -(-n_vocab // ROW_ALIGN) * ROW_ALIGN


def _vocab_parts(n_vocab: int) -> tuple[slice, ...]:
    """The vocabulary as the matmuls take it (see ROW_ALIGN): the rest past the largest
    multiple of ROW_ALIGN first, then that multiple; all of it where it is one part."""
    aligned = n_vocab - n_vocab % ROW_ALIGN
    if aligned in (0, n_vocab):
        return (slice(0, n_vocab),)
    return (slice(aligned, n_vocab), slice(0, aligned))


def _chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    step: int,
    denominator: Tensor | None,
    options: ce.Options,
    prediction: Tensor | None,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None] | None,
) -> Tensor:
    """The loss, ``step`` rows at a time; with ``grads`` = (hidden, weight, bias) buffers,
    also ``prediction`` times the gradients, written into them (see the module docstring)."""
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    buffer = hidden.new_empty(step, _row_stride(n_vocab))[:, :n_vocab]
    parts = _vocab_parts(n_vocab)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden, grad_weight, grad_bias = grads if grads is not None else (None, None, None)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        hidden_chunk = hidden[rows]
        logits = buffer[: hidden_chunk.shape[0]]
        for part in parts:
            if bias is None:
                torch.mm(hidden_chunk, weight[part].t(), out=logits[:, part])
            else:
                torch.addmm(bias[part], hidden_chunk, weight[part].t(), out=logits[:, part])
        # With grads, the kernel overwrites the logits with their gradient.
        row_losses, _ = ce.run_forward_kernel(
            logits, target[rows], options, denominator, prediction,
            grad=logits if grads is not None else None, store_lse=False, summed_with=None,
        )  # fmt: skip
        total += row_losses.sum()
        if grad_hidden is not None:
            # A sum over the parts: the small rest first, so that rounding its product
            # to 16 bits before the large part is added costs next to nothing.
            for i, part in enumerate(parts):
                _accumulate(grad_hidden[rows], logits[:, part], weight[part], first=i == 0)
        if grad_weight is not None:
            for part in parts:
                _accumulate(grad_weight[part], logits[:, part].t(), hidden_chunk, first=start == 0)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
    # 0 / 0 is NaN, as torch's "mean" over no rows.
    return total if denominator is None else total / denominator


# torch >= 2.9: addmm(..., out_dtype=) multiplies 16-bit matrices into a float32 result.
_HAS_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def _accumulate(total: Tensor, a: Tensor, b: Tensor, *, first: bool) -> None:
    """``total = a @ b`` (``first``) or ``total += a @ b``; ``total`` may be float32
    while ``a`` and ``b`` are 16-bit."""
    beta = 0 if first else 1  # beta 0: the uninitialised total is not read
    if total.dtype == a.dtype:
        torch.addmm(total, a, b, beta=beta, out=total)
    elif total.is_cuda and _HAS_ADDMM_OUT_DTYPE:
        # cuBLAS: 16-bit inputs, float32 accumulation into the float32 total, no copies.
        torch.addmm(total, a, b, beta=beta, out_dtype=total.dtype, out=total)
    else:  # CPU, or a torch without mixed-dtype addmm: float32 copies of the chunk
        torch.addmm(total, a.to(total.dtype), b.to(total.dtype), beta=beta, out=total)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss in the forward together with the gradients; the backward checks the scale."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        denominator: Tensor | None,
        options: ce.Options,
        prediction: Tensor,
        site: ce.CallSite,
    ) -> Tensor:
        grad_hidden = hidden.new_empty(hidden.shape) if hidden.requires_grad else None
        # 16-bit weights over several chunks: a float32 accumulator, rounded once (see the
        # module docstring). Where it would be needed, one chunk may use its memory instead.
        step = chunk_rows(hidden, weight, weight_grad=weight.requires_grad)
        # float16 keeps it in float32 until the backward, which scales it by grad_output
        # before rounding: made at a predicted loss scale that turns out twice too large,
        # a float16 weight gradient could overflow where torch's does not.
        keep_float32 = weight.dtype == torch.float16
        several_chunks = step < hidden.shape[0]
        in_float32 = (several_chunks or keep_float32) and _float32_accumulator_bytes(weight, weight.requires_grad) > 0
        accumulator_dtype = torch.float32 if in_float32 else weight.dtype
        grad_weight = weight.new_empty(weight.shape, dtype=accumulator_dtype) if weight.requires_grad else None
        want_bias = bias is not None and bias.requires_grad
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if want_bias else None
        loss = _chunks(
            hidden, weight, bias, target, step, denominator, options, prediction, (grad_hidden, grad_weight, grad_bias)
        )
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None and not keep_float32 else grad_weight,
            grad_bias.to(bias.dtype) if grad_bias is not None and not keep_float32 else grad_bias,
        )
        ctx.dtype = weight.dtype
        ctx.prediction, ctx.site = prediction, site
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple:  # type: ignore[override]
        ce.refuse_second_derivative("fused_linear_cross_entropy")
        grads, ctx.grads = ctx.grads, None  # handed out once; compiled autograd cannot delete
        if grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: a second backward through the same loss is not "
                "supported (the gradients were made in the forward and handed out once); "
                "set LIGER_DISABLE=flce for models that need it"
            )
        for grad in grads:
            if grad is not None and grad.numel() > 0:
                # In place, on the device: nothing happens when the prediction was right.
                ce.correct_gradient(grad.view(-1, grad.shape[-1]), grad_output, ctx.prediction, ctx.site)
        grads = tuple(grad.to(ctx.dtype) if grad is not None else None for grad in grads)
        return (*grads, None, None, None, None, None)
