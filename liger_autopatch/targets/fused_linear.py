"""Family "flce": a causal LM's loss from its hidden states and lm_head, never its logits.

The model keeps running its own forward. Three pieces route the loss around the logits:

* each causal-LM class of a ``transformers.models.*.modeling_*`` module gets its
  ``forward`` wrapped (:func:`apply`). A call with ``labels`` or ``shift_labels``, on a model
  whose loss is our ``ForCausalLMLoss`` and whose ``get_output_embeddings()`` is a plain
  ``torch.nn.Linear``, registers a forward pre-hook on that lm_head for the duration of
  the call;
* the pre-hook hands lm_head its input as a :class:`_DeferredHidden`, so the
  ``F.linear`` inside ``nn.Linear.forward`` returns a :class:`DeferredLogits` (shape, dtype
  and device of the logits, no memory) instead of computing anything. It records the
  elementwise steps the forward applies (multiply or divide by a Python number, ``tanh``,
  upcast to float32: cohere's ``logit_scale``, granite's ``logits_scaling``, gemma's
  softcap) and computes the real logits on any other use (see
  :meth:`DeferredLogits.materialize`);
* our ``ForCausalLMLoss`` (:mod:`~liger_autopatch.targets.loss_functions`) hands a
  :class:`DeferredLogits` to :func:`fused_causal_lm_loss`, which runs
  :func:`~liger_autopatch.ops.fused_linear_cross_entropy.fused_linear_cross_entropy` on the
  hidden states and the weight, or declines (then the logits are materialized and the
  ordinary path runs: never a different loss). Models that call ``CrossEntropyLoss()``
  on ``logits.view(-1, V)`` themselves reach :func:`fused_cross_entropy_loss` through our
  ``CrossEntropyLoss`` global (:mod:`~liger_autopatch.targets.model_modules`).

Sharded weights. An lm_head that FSDP2's ``fully_shard`` made a unit of its own, or whose
parameters DeepSpeed ZeRO-3 partitions, has its gathered weight released when it returns,
before the loss: the loss (or reading the logits) gathers it again with the engine's own
gather (:meth:`_LinearSource.gathered`: FSDP's ``unshard``, DeepSpeed's
``GatheredParameters``). The fused op makes its gradients in the forward, so its backward
needs no weight; the weight gradient reaches the engine's reduction as lm_head's own
would. Under ZeRO-3, whose memory-efficient linear replaces ``torch.nn.functional.linear``,
lm_head's forward itself is deferred for the call (an instance attribute, removed after).

What falls back, and why, is counted per target in :func:`routing`; errors inside this
code are recorded as ``failed`` in ``status`` and the ordinary path runs.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_map_only

from liger_autopatch._registry import (
    ORIGINAL_ATTR,
    TargetPatch,
    apply_target,
    is_ours,
    original_of,
    record_failure,
)
from liger_autopatch.ops.cross_entropy import unusable_reason
from liger_autopatch.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from liger_autopatch.targets._dispatch import is_liger_kernel

FAMILY = "flce"

OPT_OUT = "set LIGER_DISABLE=flce to have the logits computed in the forward"

_NO_GRADIENT_THROUGH_LOGITS = (
    "liger_autopatch: the loss was computed from lm_head's input and weight (fused linear "
    f"cross-entropy), so no gradient flows through outputs.logits; {OPT_OUT}."
)


# ---------------------------------------------------------------------------------------
# Per-target record of what each call did.


@dataclass
class RoutingRecord:
    """How the calls of one wrapped forward went: fused, or the ordinary path and why."""

    fused: int = 0
    fell_back: int = 0
    last_reason: str = ""


_routing: dict[str, RoutingRecord] = {}
_routing_lock = threading.Lock()


def routing() -> dict[str, RoutingRecord]:
    """Per target (``flce.<ModelClass>``): calls fused, calls that fell back, last reason."""
    with _routing_lock:
        return {target: RoutingRecord(**vars(record)) for target, record in _routing.items()}


def _count(target: str, *, fused: bool, reason: str = "") -> None:
    with _routing_lock:
        record = _routing.setdefault(target, RoutingRecord())
        if fused:
            record.fused += 1
        else:
            record.fell_back += 1
            record.last_reason = reason


# ---------------------------------------------------------------------------------------
# The deferred logits.


def _storage_freed(tensors: tuple[Tensor, ...]) -> bool:
    return any(t.untyped_storage().size() == 0 and t.numel() > 0 for t in tensors)


# What reading deferred logits must come before, for the error message: whatever changes
# lm_head's weight (the optimizer step), or under ZeRO-3 the backward (_Zero3LmHead).
_BEFORE_OPTIMIZER_STEP = "the optimizer step"


class _OptimizerSteps:
    """Steps of any ``torch.optim.Optimizer`` in this process, counted from the first
    deferred logits on. Fused optimizers (``AdamW(fused=True)``, the Trainer's default
    on recent torch) update weights without moving their version counters, so the
    counters alone cannot tell logits that are stale (nor can anything tell writes
    through ``.data``). The count is torch's global step pre-hook, registered once: it
    changes nothing but the count."""

    count = 0
    _handle: torch.utils.hooks.RemovableHandle | None = None

    @classmethod
    def watched(cls) -> int:
        """Start counting (once); the count so far."""
        if cls._handle is None:
            cls._handle = register_optimizer_step_pre_hook(cls._counted)
        return cls.count

    @classmethod
    def _counted(cls, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        cls.count += 1


@dataclass(frozen=True)
class _FsdpUnit:
    """An lm_head that ``fully_shard`` made a unit of its own, seen before the forward:
    FSDP2 gathers its weight for its forward and releases it when lm_head returns, before
    the loss runs. ``params`` are its sharded parameters, ``versions`` their version
    counters then (an optimizer step changes them)."""

    module: torch.nn.Module
    params: tuple[Tensor, ...]
    versions: tuple[int, ...]

    deadline = _BEFORE_OPTIMIZER_STEP

    @classmethod
    def before_forward(cls, module: torch.nn.Module) -> _FsdpUnit:
        params = tuple(module.parameters())
        return cls(module, params, tuple(p._version for p in params))

    def released(self, tensors: tuple[Tensor, ...]) -> bool:
        return _storage_freed(tensors)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """FSDP's own ``unshard`` refills the same parameters; FSDP releases them again
        after lm_head's backward (or its next forward), as when it gathers them itself."""
        self.module.unshard()
        yield

    def changed(self) -> bool:
        return tuple(p._version for p in self.params) != self.versions

    def fused_loss_made(self, loss: Tensor) -> None:
        pass  # an optimizer step changes the version counters above


@dataclass
class _Zero3LmHead:
    """An lm_head whose parameters DeepSpeed ZeRO-3 partitions. DeepSpeed's module hooks
    gather them for lm_head's forward and release them when it returns, before the loss.
    (Logits computed from them later train to unpatched losses with no gather for their
    backward, tests/test_distributed.py: what autograd saves of the weight is a view that
    keeps the gathered storage alive, as when lm_head runs.) DeepSpeed's
    optimizer writes the partitions through ``.data``, which leaves no version counter
    changed: logits left uncomputed can be computed until the fused loss's backward
    starts, and a forward without gradients (nothing to mark it) is not deferred."""

    module: torch.nn.Module
    params: tuple[Tensor, ...]
    backward_started: bool = False

    # What reading the logits must come before, for the error message.
    deadline = "the backward of the loss"

    @classmethod
    def before_forward(cls, module: torch.nn.Module) -> _Zero3LmHead:
        return cls(module, tuple(module.parameters()))

    def released(self, tensors: tuple[Tensor, ...]) -> bool:
        return any(p.ds_status.name != "AVAILABLE" for p in self.params)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """DeepSpeed's own ``GatheredParameters``: gathered inside, partitioned on exit."""
        import deepspeed

        released = [p for p in self.params if p.ds_status.name != "AVAILABLE"]
        with deepspeed.zero.GatheredParameters(released):
            yield

    def changed(self) -> bool:
        return self.backward_started

    def fused_loss_made(self, loss: Tensor) -> None:
        if loss.grad_fn is not None:
            loss.grad_fn.register_prehook(self._mark_backward_started)

    def _mark_backward_started(self, grad_outputs: tuple) -> None:
        self.backward_started = True


@dataclass
class _LinearSource:
    """What lm_head was called with, and the version counters to tell if it changed."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    target: str
    versions: tuple[int, ...]
    n_vocab: int  # lm_head's outputs (an engine may release the weight after the call)
    optimizer_steps: int  # _OptimizerSteps.count at the forward
    sharded: _FsdpUnit | _Zero3LmHead | None = None
    loss_fused: bool = False
    regathered: bool = False
    # Inside lm_head's call (ZeRO-3): DeepSpeed's hook detaches lm_head's output and
    # passes it through an autograd function, which reconnects it.
    in_lm_head_call: bool = False

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.hidden, self.weight, self.bias) if t is not None)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """lm_head's weight (and bias) hold what its forward used, where an engine
        released them since (FSDP2 unit, ZeRO-3), by the engine's own gather."""
        if self.sharded is None or not self.sharded.released(self.tensors()):
            yield
            return
        with self.sharded.gathered():
            self.regathered = True
            yield

    def check_unchanged(self) -> None:
        """Raise if the logits can no longer be computed as the forward would have."""
        # Gathering again writes into the gathered weight (new versions); what an
        # optimizer step changes then is the sharded parameters.
        tensors = (self.hidden,) if self.regathered else self.tensors()
        changed = tuple(t._version for t in tensors) != self.versions[: len(tensors)]
        changed |= _OptimizerSteps.count != self.optimizer_steps
        if self.sharded is None:
            freed, deadline = _storage_freed(self.tensors()), _BEFORE_OPTIMIZER_STEP
        else:
            freed, deadline = self.sharded.released(self.tensors()), self.sharded.deadline
            changed |= self.sharded.changed()
        if changed or freed:
            raise RuntimeError(
                "liger_autopatch: these logits were left uncomputed by the forward (fused "
                "linear cross-entropy) and lm_head's weight or input has been "
                f"{'released' if freed else 'modified'} since, so they cannot be computed now. "
                f"Read outputs.logits before {deadline}, or {OPT_OUT}."
            )


_SELF = object()  # where the deferred tensor goes in a recorded step's arguments


@dataclass(frozen=True)
class _Step:
    """One elementwise op the forward applied to the logits."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kind: str  # "scale" (multiply by factor), "tanh", "upcast" (to float32), "rows" (view as (N, V)), "same"
    factor: float = 1.0

    def replay(self, logits: Tensor) -> Tensor:
        return self.func(*(logits if a is _SELF else a for a in self.args))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_MULTIPLY = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul}
_DIVIDE = {torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide}
_TANH = {torch.tanh, torch.Tensor.tanh}
_VIEW = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
# Answered from the wrapper's own metadata, without computing anything.
_METADATA = {
    *(
        getattr(torch.Tensor, name).__get__
        for name in (
            "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu",
            "layout", "is_leaf", "grad_fn", "is_meta", "is_sparse", "is_quantized", "is_nested",
            "_base",
        )
    ),
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.__len__, torch.Tensor.__hash__, torch.Tensor.get_device,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.element_size,
}  # fmt: skip


def _recordable(
    func: Callable[..., Any], args: tuple, kwargs: dict
) -> tuple[DeferredLogits, _Step] | None:
    """The deferred operand and the step, where ``func(*args)`` is a step we model."""
    if kwargs:
        return None
    if func in _MULTIPLY and len(args) == 2:
        first, second = args
        if isinstance(first, DeferredLogits) and _is_number(second):
            return first, _Step(func, (_SELF, second), "scale", float(second))
        if isinstance(second, DeferredLogits) and _is_number(first):
            return second, _Step(func, (first, _SELF), "scale", float(first))
    if func in _DIVIDE and len(args) == 2:
        first, second = args
        if isinstance(first, DeferredLogits) and _is_number(second) and second != 0:
            return first, _Step(func, (_SELF, second), "scale", 1.0 / second)
    if func in _TANH and len(args) == 1 and isinstance(args[0], DeferredLogits):
        return args[0], _Step(func, (_SELF,), "tanh")
    is_upcast = (func is torch.Tensor.float and len(args) == 1) or (
        func is torch.Tensor.to and len(args) == 2 and args[1] is torch.float32
    )
    if is_upcast and isinstance(args[0], DeferredLogits):
        return args[0], _Step(func, (_SELF, *args[1:]), "upcast")
    if func is torch.Tensor.contiguous and len(args) == 1 and isinstance(args[0], DeferredLogits):
        return args[0], _Step(func, (_SELF,), "same")
    if func in _VIEW and isinstance(args[0], DeferredLogits):
        # logits.view(-1, V), as the models that call CrossEntropyLoss themselves do.
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if tuple(shape) == (-1, args[0].shape[-1]):
            return args[0], _Step(func, (_SELF, *args[1:]), "rows")
    return None


class DeferredLogits(torch.Tensor):
    """The logits ``F.linear(hidden, weight, bias)`` followed by recorded steps, not computed.

    It has the shape, dtype, device and ``requires_grad`` of the real logits and no memory.
    Multiplying or dividing by a Python number, ``tanh`` and ``.float()`` give another
    :class:`DeferredLogits`; every other use computes the real logits first
    (:meth:`materialize`), with autograd, exactly as the forward would have computed them.
    """

    _source: _LinearSource
    _steps: tuple[_Step, ...]
    _rows_only: bool  # viewed as (N, V)
    _detached: bool  # made by .detach(): computed without autograd
    _materialized: Tensor | None
    _hooks: dict[int, Callable[[Tensor], Tensor | None]]  # gradient hooks, for the real logits

    @staticmethod
    def __new__(
        cls,
        source: _LinearSource,
        steps: tuple[_Step, ...],
        dtype: torch.dtype,
        rows_only: bool = False,
        detached: bool = False,
        requires_grad: bool | None = None,
    ) -> DeferredLogits:
        """``requires_grad``: None to take it from the grad mode now and the inputs."""
        hidden, n_vocab = source.hidden, source.n_vocab
        if requires_grad is None:
            requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in source.tensors())
        requires_grad = requires_grad and not detached
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            (hidden.numel() // hidden.shape[-1], n_vocab)
            if rows_only
            else (*hidden.shape[:-1], n_vocab),
            dtype=dtype,
            device=hidden.device,
            requires_grad=requires_grad,
        )
        self._source = source
        self._steps = steps
        self._rows_only = rows_only
        self._detached = detached
        self._materialized = None
        self._hooks = collections.OrderedDict()  # RemovableHandle holds it by weak reference
        return self

    def materialize(self) -> Tensor:
        """The real logits (computed once, then kept), as the forward would have made them.

        Raises ``RuntimeError`` when lm_head's weight or input changed or was released
        since the forward (an optimizer step, a sharded weight put back).
        """
        if self._materialized is None:
            source = self._source
            # Autograd as the forward had it (requires_grad was fixed then), whatever the
            # grad mode of the code reading them.
            with source.gathered(), torch.set_grad_enabled(self.requires_grad):
                source.check_unchanged()
                with torch.autocast(source.hidden.device.type, enabled=False):
                    logits = F.linear(source.hidden, source.weight, source.bias)
                for step in self._steps:
                    logits = step.replay(logits)
            if logits.requires_grad:
                for hook in self._hooks.values():
                    logits.register_hook(hook)
            self._materialized = logits
        return self._materialized

    def _register_hook(
        self, hook: Callable[[Tensor], Tensor | None]
    ) -> torch.utils.hooks.RemovableHandle:
        """``register_hook`` without computing the logits: the hook goes on the real
        logits if they are ever made (a fused loss sends no gradient through them).
        FSDP2 registers one on every output of a unit that requires grad, DeepSpeed on
        the model's outputs. Anyone else's hook keeps the loss from being fused; once it
        was, such a hook will never run, which a warning says (raising could stop an
        engine we do not know)."""
        if self._source.loss_fused and not _is_engine_hook(hook):
            warnings.warn(_NO_GRADIENT_THROUGH_LOGITS + " A gradient hook on them will not run.", stacklevel=3)
        if self._materialized is not None:
            return self._materialized.register_hook(hook)
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
        handle = torch.utils.hooks.RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def _check_gradient_reaches(self) -> None:
        """Raise where the loss was fused: no gradient flows through these logits, so
        ``retain_grad`` would leave ``.grad`` None where torch fills it."""
        if self._source.loss_fused:
            raise RuntimeError(_NO_GRADIENT_THROUGH_LOGITS)

    def fused_transforms(self) -> tuple[float | None, float | None] | str:
        """``(logit_scale, softcap)`` that reproduce the recorded steps in the fused op, or
        the reason they cannot. The steps must be ``c * tanh(a * logits)`` or ``a * logits``."""
        scale, outer, tanh = 1.0, 1.0, False
        for step in self._steps:
            if step.kind == "scale":
                if tanh:
                    outer *= step.factor
                else:
                    scale *= step.factor
            elif step.kind == "tanh":
                if tanh:
                    return "tanh applied twice to the logits"
                tanh = True
        if not tanh:
            return (scale if scale != 1.0 else None, None)
        if outer <= 0:
            return f"logits scaled by {outer} after tanh"
        # outer * tanh(scale * x) = softcap * tanh(logit_scale * x / softcap)
        return (scale * outer, outer)

    def _detach(self) -> DeferredLogits | None:
        """``.detach()`` without computing the logits, where it can wait: inside lm_head's
        call under ZeRO-3 (DeepSpeed's hook detaches lm_head's output and reconnects it
        to autograd through a function of its own, before the loss), and after a fused
        loss (nothing needs their gradient; DeepSpeed's hook on the model's output, or
        Trainer's evaluation loop, detach them). None: compute them now."""
        if self._materialized is not None:
            return None
        if self._source.in_lm_head_call:
            return DeferredLogits(self._source, self._steps, self.dtype, self._rows_only, self._detached)
        if self._source.loss_fused:
            return DeferredLogits(self._source, self._steps, self.dtype, self._rows_only, detached=True)
        return None

    def _then(self, step: _Step) -> Tensor:
        if self._materialized is not None:
            return step.replay(self._materialized)
        dtype = torch.float32 if step.kind == "upcast" else self.dtype
        rows_only = self._rows_only or step.kind == "rows"
        # As the forward made them, whatever the grad mode of this step.
        return DeferredLogits(
            self._source, (*self._steps, step), dtype, rows_only, self._detached, self.requires_grad
        )

    def _materialize_for(self, func: Callable[..., Any]) -> Tensor:
        source = self._source
        if self._materialized is None and not source.loss_fused:
            name = getattr(func, "__name__", repr(func))
            _count(
                source.target,
                fused=False,
                reason=f"the forward used the logits ({name}) before the loss",
            )
        return self.materialize()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.register_hook and len(args) == 2 and not kwargs:
            return args[0]._register_hook(args[1])
        if func is torch.Tensor.retain_grad:
            args[0]._check_gradient_reaches()
        if func is torch.Tensor.detach and len(args) == 1 and not kwargs:
            detached = args[0]._detach()
            if detached is not None:
                return detached
        recorded = _recordable(func, args, kwargs)
        if recorded is not None:
            deferred, step = recorded
            return deferred._then(step)
        args, kwargs = tree_map_only(
            DeferredLogits, lambda t: t._materialize_for(func), (args, kwargs)
        )
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by code that bypasses __torch_function__: values, no autograd.
        args, kwargs = tree_map_only(
            DeferredLogits, lambda t: t._materialize_for(func), (args, kwargs or {})
        )
        return func(*args, **kwargs)


def _is_engine_hook(hook: Callable[..., Any]) -> bool:
    """Whether a gradient hook on the logits is a training engine's own: FSDP2 registers a
    method of its state on every output of a unit, DeepSpeed a closure on every output of
    the model. They need no gradient through the logits (the loss's reaches their
    modules); anyone else's hook does."""
    return (getattr(hook, "__module__", None) or "").startswith(("torch.distributed.", "deepspeed."))


class _DeferredHidden(torch.Tensor):
    """lm_head's input inside a wrapped forward: ``F.linear`` on it is deferred."""

    _target: str
    _sharded: _FsdpUnit | _Zero3LmHead | None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            plain_args, plain_kwargs = tree_map_only(
                _DeferredHidden, lambda t: t.as_subclass(torch.Tensor), (args, kwargs)
            )
        if (
            func is F.linear
            and not kwargs
            and len(args) in (2, 3)
            and isinstance(args[0], _DeferredHidden)
        ):
            try:
                deferred = _defer_linear(*plain_args, target=args[0]._target, sharded=args[0]._sharded)
            except Exception as exc:  # lm_head then computes its logits as it would
                record_failure(args[0]._target, FAMILY, exc)
                deferred = None
            if deferred is not None:
                return deferred
        return func(*plain_args, **plain_kwargs)


def _defer_linear(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    target: str,
    sharded: _FsdpUnit | _Zero3LmHead | None,
) -> Tensor | None:
    """The deferred ``F.linear(hidden, weight, bias)``, in the dtype autocast would give."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return None  # F.linear itself raises on this
    tensors = tuple(t for t in (hidden, weight, bias) if t is not None)
    if any(t.is_inference() for t in tensors):
        return None  # no version counters to tell later whether the logits are stale
    source = _LinearSource(
        hidden, weight, bias, target, tuple(t._version for t in tensors), weight.shape[0],
        _OptimizerSteps.watched(), sharded, in_lm_head_call=isinstance(sharded, _Zero3LmHead),
    )
    return DeferredLogits(source, (), hidden.dtype)


# ---------------------------------------------------------------------------------------
# The loss: called by our ForCausalLMLoss.


def fused_causal_lm_loss(
    logits: DeferredLogits,
    labels: Tensor | None,
    vocab_size: int,
    num_items_in_batch: int | Tensor | None,
    ignore_index: int,
    shift_labels: Tensor | None,
) -> Tensor | None:
    """transformers' ``ForCausalLMLoss`` computed from lm_head's input and weight.

    None where the fused op cannot reproduce it (then the caller materializes the logits
    and runs the ordinary path); the reason is counted in :func:`routing`.
    """

    def targets() -> Tensor | str:
        if vocab_size != logits.shape[-1]:  # lm_head's outputs (its weight may be released now)
            return f"vocab_size {vocab_size} is not lm_head's {logits.shape[-1]} outputs"
        if shift_labels is not None:
            return shift_labels
        if labels is None:
            return "no labels"
        # As the original: the last position of each row predicts nothing.
        return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]

    return _fused_loss(logits, targets, ignore_index, "mean", num_items_in_batch)


def fused_cross_entropy_loss(
    logits: DeferredLogits,
    target: Tensor,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor | None:
    """``CrossEntropyLoss()(logits.view(-1, V), target)`` (no shift) from lm_head's input
    and weight, for the models that call the loss module themselves; None as above."""

    def targets() -> Tensor | str:
        if not logits._rows_only:
            return "CrossEntropyLoss on logits not viewed as (N, V)"
        if reduction not in ("mean", "sum") or label_smoothing != 0.0:
            return f"CrossEntropyLoss(reduction={reduction!r}, label_smoothing={label_smoothing})"
        return target

    return _fused_loss(logits, targets, ignore_index, reduction, None)


def _fused_loss(
    logits: DeferredLogits,
    targets: Callable[[], Tensor | str],
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
) -> Tensor | None:
    """The fused loss, or None with the reason counted. ``targets()`` gives the per-row
    targets or the reason the loss cannot be fused."""
    source = logits._source
    if logits._materialized is not None:
        return None  # already computed, and counted when it was
    try:
        loss_or_reason = _fused_or_reason(
            logits, targets, ignore_index, reduction, num_items_in_batch
        )
    except Exception as exc:
        record_failure(source.target, FAMILY, exc)
        loss_or_reason = f"failed: {type(exc).__name__}: {exc}"
    if isinstance(loss_or_reason, str):
        _count(source.target, fused=False, reason=loss_or_reason)
        return None
    if source.sharded is not None:
        source.sharded.fused_loss_made(loss_or_reason)
    source.loss_fused = True
    _count(source.target, fused=True)
    return loss_or_reason


def _fused_or_reason(
    logits: DeferredLogits,
    targets: Callable[[], Tensor | str],
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
) -> Tensor | str:
    source = logits._source
    if not all(_is_engine_hook(hook) for hook in logits._hooks.values()):
        return "a gradient hook is registered on the logits"
    transforms = logits.fused_transforms()
    if isinstance(transforms, str):
        return transforms
    logit_scale, softcap = transforms
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, (int, Tensor)):
        return f"num_items_in_batch is a {type(num_items_in_batch).__name__}"
    target = targets()
    if isinstance(target, str):
        return target
    hidden = source.hidden.reshape(-1, source.hidden.shape[-1])
    if target.numel() != hidden.shape[0]:
        return f"{target.numel()} labels for {hidden.shape[0]} rows of logits"
    # The op makes its gradients here, in the forward: the backward needs no weight.
    with source.gathered():
        return fused_linear_cross_entropy(
            hidden,
            source.weight,
            target.reshape(-1).to(hidden.device),
            bias=source.bias,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            softcap=softcap,
            logit_scale=logit_scale,
        )


# ---------------------------------------------------------------------------------------
# The forward wrappers.


def apply(module: ModuleType) -> None:
    """Wrap the ``forward`` of every causal-LM class defined in ``module``.

    Causal-LM classes: generation models (``GenerationMixin`` in the MRO) whose own
    ``forward`` takes ``labels``. Whether a call is fused is decided per call.
    """
    for cls in list(vars(module).values()):
        if (
            isinstance(cls, type)
            and issubclass(cls, torch.nn.Module)
            and cls.__module__ == module.__name__
            and "forward" in vars(cls)
            and any(base.__name__ == "GenerationMixin" for base in cls.__mro__)
            and _labels_position(original_of(vars(cls)["forward"])) is not None
        ):
            apply_target(f"flce.{cls.__name__}", FAMILY, functools.partial(_stage, cls))


def _labels_position(forward: Callable[..., Any]) -> int | None:
    """Index of ``labels`` among the positional arguments after ``self``; None if absent."""
    try:
        names = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("labels") - 1 if "labels" in names else None


_replacements: dict[Callable[..., Any], Callable[..., Any]] = {}


def _stage(cls: type, patch: TargetPatch) -> None:
    current = vars(cls)["forward"]
    if is_liger_kernel(current):
        patch.skip(f"liger-kernel replaced it ({current.__module__}); left to liger-kernel")
    original = original_of(current)
    replacement = _replacements.get(original)
    if replacement is None:
        replacement = _replacements[original] = _wrap_forward(original, f"flce.{cls.__name__}")
    patch.set_attr(cls, "forward", replacement)


def _wrap_forward(original: Callable[..., Any], target: str) -> Callable[..., Any]:
    labels_position = _labels_position(original)

    @functools.wraps(original)
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if labels is None and labels_position is not None and len(args) > labels_position:
            labels = args[labels_position]
        if (labels is None and kwargs.get("shift_labels") is None) or torch.compiler.is_compiling():
            return original(self, *args, **kwargs)
        hooks = _defer_lm_head(self, target)
        if not hooks:
            return original(self, *args, **kwargs)
        try:
            return original(self, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    setattr(forward, ORIGINAL_ATTR, original)
    return forward


def _defer_lm_head(model: torch.nn.Module, target: str) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks that defer lm_head's output for one call; none where this model
    cannot take the fused path (the reason is counted)."""
    try:
        lm_head = model.get_output_embeddings()
        reason = _cannot_defer(model, lm_head)
        if not reason and torch.is_inference_mode_enabled():
            reason = "inference mode (its tensors have no version counters to check the logits by)"
        if reason:
            _count(target, fused=False, reason=reason)
            return []
        if hasattr(lm_head.weight, "ds_id"):
            if not torch.is_grad_enabled():
                # No backward will mark the logits stale (see _Zero3LmHead), and DeepSpeed's
                # optimizer moves no version counter: computed now, they cannot be stale.
                _count(target, fused=False, reason="DeepSpeed ZeRO-3 without gradients (evaluation)")
                return []
            # DeepSpeed ZeRO-3 replaces torch.nn.functional.linear with an autograd function
            # of its own (its memory-efficient linear), so F.linear on a deferred input is
            # never seen: lm_head's forward itself is deferred for this call.
            zero3 = _Zero3LmHead.before_forward(lm_head)
            return [
                _InstanceForward(lm_head, functools.partial(_deferred_linear_forward, lm_head, target, zero3)),
                # Runs after DeepSpeed's forward hooks, which were registered before it.
                lm_head.register_forward_hook(_end_of_lm_head_call),
            ]
        fsdp_unit = _FsdpUnit.before_forward(lm_head) if _is_fsdp2_unit(lm_head) else None
        return [lm_head.register_forward_pre_hook(functools.partial(_defer_input, target, fsdp_unit))]
    except Exception as exc:
        record_failure(target, FAMILY, exc)
        return []


def _cannot_defer(model: torch.nn.Module, lm_head: Any) -> str:
    """Why this model's loss cannot take the fused path ("" if it can)."""
    loss_function = getattr(model, "loss_function", None)
    if not (is_ours(loss_function) and original_of(loss_function).__name__ == "ForCausalLMLoss"):
        return f"its loss is {getattr(original_of(loss_function), '__name__', loss_function)!r}, not our ForCausalLMLoss"
    weight = getattr(lm_head, "weight", None)
    unusable = unusable_reason(weight.device) if isinstance(weight, Tensor) else None
    if unusable:
        return f"the Triton kernels are off on {weight.device}: {unusable}"
    if _is_fsdp2_unit(lm_head):
        # fully_shard subclasses the module's class: FSDPLinear(FSDPModule, Linear).
        if type(lm_head).__bases__[1:] != (torch.nn.Linear,):
            return f"lm_head is {type(lm_head).__name__}, not a sharded torch.nn.Linear"
        return ""
    if type(lm_head) is not torch.nn.Linear:
        return f"lm_head is {type(lm_head).__name__}, not torch.nn.Linear (adapted, quantized or sharded)"
    if type(weight) is not torch.nn.Parameter:
        return f"lm_head's weight is a {type(weight).__name__} (sharded)"
    if hasattr(weight, "ds_id") and "forward" in vars(lm_head):
        return "lm_head (DeepSpeed ZeRO-3) has a forward of its own instance"
    return ""


def _is_fsdp2_unit(module: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` made ``module`` a unit of its own."""
    # Looked up, never imported: a process that has not imported it has no FSDP2 unit.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    return fsdp_module is not None and isinstance(module, fsdp_module)


def _defer_input(
    target: str, sharded: _FsdpUnit | _Zero3LmHead | None, module: torch.nn.Module, args: tuple
) -> tuple | None:
    if len(args) != 1 or type(args[0]) is not torch.Tensor:
        return None
    hidden = args[0].as_subclass(_DeferredHidden)
    hidden._target = target
    hidden._sharded = sharded
    return (hidden,)


class _InstanceForward:
    """``module.forward`` replaced on the instance until ``remove()``."""

    def __init__(self, module: torch.nn.Module, forward: Callable[..., Any]) -> None:
        self.module, self.forward = module, forward
        module.forward = forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.forward:
            del self.module.forward


def _deferred_linear_forward(
    lm_head: torch.nn.Linear, target: str, sharded: _Zero3LmHead, hidden: Tensor
) -> Tensor:
    deferred = _defer_linear(hidden, lm_head.weight, lm_head.bias, target=target, sharded=sharded)
    return deferred if deferred is not None else type(lm_head).forward(lm_head, hidden)


def _end_of_lm_head_call(module: torch.nn.Module, args: tuple, output: Any) -> None:
    if isinstance(output, DeferredLogits):
        output._source.in_lm_head_call = False
