"""Linear layer + cross-entropy in one op, without an (N, V) logits tensor.

``fused_linear_cross_entropy(hidden, weight, target)`` is
``cross_entropy(hidden @ weight.T + bias, target)``, computed row chunk by row chunk:

1. ``logits = hidden[chunk] @ weight.T + bias`` (torch / cuBLAS), at most about
   :data:`CHUNK_BYTES` bytes;
2. :func:`liger_autopatch.ops.cross_entropy.cross_entropy` on the chunk: the chunk's share
   of the loss and the gradient of the loss with respect to the chunk logits;
3. ``grad_hidden[chunk] = grad_logits @ weight`` (one matmul over the whole vocabulary,
   as unfused autograd computes it) and ``grad_weight += grad_logits.T @ hidden[chunk]``.

The gradients are computed in the forward, so they exist only when autograd will ask for
them: under ``torch.no_grad()`` (an evaluation loss) only steps 1 and 2 run, without a
gradient. The backward multiplies the stored gradients by ``grad_output``.

Precision. The loss is accumulated in float32. Each chunk's logit gradient is rounded to
the logits' dtype, as unfused autograd rounds it. ``grad_weight`` is a sum over every row:
accumulated in the weight's dtype it would be rounded once per chunk (in bfloat16, about
sqrt(chunks) times the error of the unfused gradient, which is rounded once), so for
16-bit weights it is accumulated in float32 (an extra V x H x 4 bytes while the op runs)
and rounded once at the end. ``grad_hidden`` rows are each one matmul, rounded once.

Where the Triton cross-entropy does not run (see
:func:`~liger_autopatch.ops.cross_entropy.supports`: CPU without ``TRITON_INTERPRET=1``,
float64, ...) the op is the plain torch reference, matmul + ``F.cross_entropy``, with the
same semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from liger_autopatch.ops.cross_entropy import cross_entropy, supports

__all__ = ["CHUNK_BYTES", "fused_linear_cross_entropy"]

# Upper bound on the bytes of one chunk of logits (its gradient takes as much again).
CHUNK_BYTES = 64 * 2**20

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
    transformers' ``fixed_cross_entropy`` does.

    No (N, V) tensor is allocated where the Triton cross-entropy runs; elsewhere this is
    the plain torch computation.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if not _triton_serves(hidden, weight, bias, target):
        return _torch_reference(
            hidden,
            weight,
            target,
            bias,
            ignore_index,
            reduction,
            num_items_in_batch,
            softcap,
            logit_scale,
        )
    denominator = _denominator(target, ignore_index, reduction, num_items_in_batch, hidden.device)
    transforms = {"softcap": softcap, "logit_scale": logit_scale, "ignore_index": ignore_index}
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not needs_grad:
        return _loss_only(hidden, weight, bias, target, denominator, transforms)
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, target, denominator, transforms)


def _triton_serves(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> bool:
    """Whether the chunks' logits go to the Triton kernels (asked of supports() with a
    stand-in of the logits' shape, dtype and device that has no memory of its own)."""
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return False
    logits_like = hidden.new_empty(()).expand(hidden.shape[0], weight.shape[0])
    return supports(logits_like, target)


def _denominator(
    target: Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """What the summed loss is divided by: ``num_items_in_batch``, the count of targets
    that are not ignored ("mean"), or nothing ("sum"). A 0-d float32 tensor, no sync."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return num_items_in_batch.to(device=device, dtype=torch.float32)
        return torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)
    if reduction == "mean":
        return (target != ignore_index).sum().to(torch.float32)
    return None


def chunk_rows(n_rows: int, n_cols: int, element_size: int) -> int:
    """Rows per chunk: as many as fit in :data:`CHUNK_BYTES` of logits, at least one."""
    return max(1, min(n_rows, CHUNK_BYTES // (n_cols * element_size)))


def _chunk_loss(
    logits: Tensor, target: Tensor, denominator: Tensor | None, transforms: dict
) -> Tensor:
    """This chunk's share of the loss: the sum of its rows over ``denominator``."""
    return cross_entropy(
        logits, target, reduction="sum", num_items_in_batch=denominator, **transforms
    )


def _loss_only(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    denominator: Tensor | None,
    transforms: dict,
) -> Tensor:
    """The loss alone, chunk by chunk, with no gradient work."""
    step = chunk_rows(hidden.shape[0], weight.shape[0], hidden.element_size())
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], step):
            logits = F.linear(hidden[start : start + step], weight, bias)
            loss += _chunk_loss(logits, target[start : start + step], denominator, transforms)
    return loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss in the forward together with the gradients; the backward scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        denominator: Tensor | None,
        transforms: dict,
    ) -> Tensor:
        want_hidden, want_weight = hidden.requires_grad, weight.requires_grad
        want_bias = bias is not None and bias.requires_grad
        n_rows, n_vocab = hidden.shape[0], weight.shape[0]
        step = chunk_rows(n_rows, n_vocab, hidden.element_size())
        grad_hidden = hidden.new_empty(hidden.shape) if want_hidden else None
        # 16-bit weights: accumulate in float32, round once (see the module docstring).
        accumulator_dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
        grad_weight = torch.zeros_like(weight, dtype=accumulator_dtype) if want_weight else None
        grad_bias = (
            torch.zeros(n_vocab, dtype=torch.float32, device=hidden.device) if want_bias else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            hidden_chunk = hidden[rows]
            logits = F.linear(hidden_chunk, weight, bias).requires_grad_()
            with torch.enable_grad():
                chunk_loss = _chunk_loss(logits, target[rows], denominator, transforms)
                (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
            loss += chunk_loss.detach()
            del logits, chunk_loss
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                _accumulate(grad_weight, grad_logits.t(), hidden_chunk)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple:  # type: ignore[override]
        grads = getattr(ctx, "grads", None)
        if grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: a second backward through the same loss is not "
                "supported (the gradients were made in the forward and handed out once); "
                "set LIGER_DISABLE=flce for models that need it"
            )
        del ctx.grads
        # Scaled in place: these buffers are ours alone. Multiplying by 1 is exact.
        scaled = tuple(g.mul_(grad_output) if g is not None else None for g in grads)
        return (*scaled, None, None, None)


def _accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """``total += a @ b``, with ``total`` float32 while ``a`` and ``b`` may be 16-bit."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    elif total.is_cuda:
        # cuBLAS: 16-bit inputs, float32 accumulation into the float32 total, no copies.
        torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
    else:  # CPU has no mixed-dtype addmm
        total.addmm_(a.to(total.dtype), b.to(total.dtype))


def _torch_reference(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    softcap: float | None,
    logit_scale: float | None,
) -> Tensor:
    """The same function in plain torch ops (all the logits at once), float32 loss."""
    logits = F.linear(hidden, weight, bias).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
