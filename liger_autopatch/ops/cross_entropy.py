"""Cross-entropy on (N, V) logits: Triton kernels where they apply, torch everywhere else.

:func:`cross_entropy` computes what ``torch.nn.functional.cross_entropy`` computes (plus
the ``num_items_in_batch`` / ``softcap`` / ``logit_scale`` folds that transformers' models
use), in float32, without ever making a float32 copy of the logits.

How the gradient is made (eager mode, reduced loss) is chosen per call site (the line
that calls :func:`cross_entropy`), from what the backwards of that site saw:

* gradient in the forward (the usual case): the forward kernel writes
  ``prediction * d loss / d logits`` as it goes, each row read from DRAM once and re-read
  (mostly) from the SM's L1, where ``prediction`` is the ``grad_output`` of the site's last
  backward (1 at first), read on the device. The backward checks on the device, with no
  sync, that ``grad_output`` equals the prediction, and only if not rescales the
  gradient in one more pass. A steady ``grad_output`` (1, the 1/k of gradient
  accumulation, a loss scale) thus costs nothing.
* gradient in the backward: when the site's previous call found that ``grad_output``
  had just changed, the forward keeps one float per row (log-sum-exp) and the backward
  makes the gradient in one read + one write, already multiplied by ``grad_output``.
  Per-row losses (``reduction="none"``) and float16 logits (whose range cannot absorb a
  wrong prediction of a loss scale) always take this path.

The backward never syncs; the forward syncs once, on a small status copy queued before
the loss kernel (bad targets, the site's state), so the GPU does not wait for the host.

Either gradient goes into the logits buffer itself when nobody else can observe it (see
:func:`_unobservable`), otherwise into a fresh buffer of the logits' dtype. Under
``torch.compile`` the op is the ``liger_autopatch::cross_entropy_rows`` custom op
(gradient in the backward, fresh buffer), so graphs compile with no break.

A kernel that cannot be built or launched on a device (a GPU that Triton cannot compile
these kernels for, a Triton release that rejects them) turns the Triton path off on that
device for the rest of the process: the failure is logged and recorded
(:func:`liger_autopatch.status`), every later call gets torch's result, and the patched
transformers code hands those calls to its original. A launch fails before its kernel
runs, so when that happens in an eager forward, the failing call gets torch's result too.
In a backward or a compiled graph it raises :class:`KernelFailure`; the forward's kernels
are built first and share the backward's code.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import weakref
from dataclasses import dataclass, field
from types import FrameType, ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from liger_autopatch import _registry

__all__ = ["cross_entropy", "supports"]

_LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TARGET_DTYPES = (torch.int32, torch.int64)
_REDUCTIONS = ("none", "mean", "sum")

# Triton cannot build these kernels for older GPUs (ptxas rejects them for sm_60: Pascal).
MIN_CAPABILITY = (7, 0)

# Devices the Triton path is off on, with the reason: found too old, or a kernel that
# failed to build or launch there (see the module docstring).
_unusable_devices: dict[torch.device, str] = {}


def unusable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels do not run on ``device``, or None where they do."""
    reason = _unusable_devices.get(device)
    if reason is None and device.type == "cuda":
        capability = _capability(device)
        if capability < MIN_CAPABILITY:
            reason = _unusable_devices[device] = (
                f"compute capability {capability[0]}.{capability[1]}; the Triton kernels need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer"
            )
    return reason


class TargetOutOfRange(ValueError, IndexError):
    """A target outside [0, V) that is not ``ignore_index``. An ``IndexError`` too, which
    is what torch raises for one."""


class KernelFailure(RuntimeError):
    """A Triton kernel could not be built or launched; it did not run."""


def supports(input: Tensor, target: Tensor) -> bool:
    """True when :func:`cross_entropy` runs the Triton kernels on these tensors.

    That is: ``input`` is (N, V) with N, V >= 1 in bfloat16, float16 or float32;
    ``target`` is (N,) int32/int64 class indices on the same device; and the device is
    CUDA (compute capability 7.0 or newer), or the CPU while the environment has
    ``TRITON_INTERPRET=1``; and no kernel has failed on that device in this process. Any
    other call is served by ``torch.nn.functional.cross_entropy`` with the same semantics.
    """
    return (
        input.dim() == 2
        and target.dim() == 1
        and input.shape[0] == target.shape[0]
        and input.shape[0] > 0
        and input.shape[1] > 0
        and input.dtype in _LOGIT_DTYPES
        and target.dtype in _TARGET_DTYPES
        and input.device == target.device
        # torch.func's wrapped tensors (grad, vmap) have no storage a kernel can read.
        # (torch.compile sees plain tensors, and cannot trace the check.)
        and (
            torch.compiler.is_compiling()
            or not (
                torch._C._functorch.is_functorch_wrapped_tensor(input)
                or torch._C._functorch.is_functorch_wrapped_tensor(target)
            )
        )
        and (input.is_cuda or (input.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"))
        and unusable_reason(input.device) is None
    )


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> Tensor:
    """Cross-entropy of ``input`` (N, V) logits against ``target`` (N,) class indices.

    Semantics are ``torch.nn.functional.cross_entropy``'s (ignore_index, including values
    >= V; reductions; label_smoothing; an all-ignored batch gives NaN under "mean"), with:

    * ``logit_scale``: logits are multiplied by it first (Cohere; Granite passes 1/scale);
    * ``softcap``: then become ``softcap * tanh(logits / softcap)`` (Gemma 2/3);
    * ``num_items_in_batch`` (int or 0-d tensor): the loss is the sum divided by it, as
      transformers' ``fixed_cross_entropy`` does; the division is folded into the gradient
      kernel. It replaces "mean"/"sum" and cannot be combined with ``reduction="none"``.

    On the Triton path (see :func:`supports`) the loss is float32, accumulated in float32
    (in base 2: its error grows with the logits' magnitude, about 4e-5 at logits near 1e3,
    against 1e-7 for torch; logits beyond 2e38 overflow),
    and a target outside [0, V) that is not ``ignore_index`` raises
    :class:`TargetOutOfRange` (a ``ValueError`` and an ``IndexError``) naming it (one
    device-to-host sync per forward, none in the backward; while torch.compile traces or
    a CUDA graph is captured nothing is read back and such a row's loss is NaN instead).
    The gradient (in the logits' dtype) overwrites ``input`` only if nothing else can
    observe it: passed as a temporary, not a view, not a leaf, no other reference.
    Where the gradient is made in the backward (see the module docstring), ``input``
    modified in place between forward and backward raises there (torch keeps its own
    copy of the softmax instead); so does a second derivative, or a second backward.
    Under torch.compile the call is the ``liger_autopatch::cross_entropy_rows`` custom
    op. Elsewhere the result is exactly torch's, dtype included. A call whose kernel fails
    to build or launch gets torch's result on the logits in float32 (as transformers
    computes it), and turns the Triton path off on that device (see the module docstring).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ignore_index, softcap, logit_scale = check_arguments(ignore_index, reduction, num_items_in_batch, softcap, logit_scale)
    if not label_smoothing <= 1.0:  # as torch; torch also takes a negative one as 0
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    label_smoothing = max(float(label_smoothing), 0.0)
    if not supports(input, target):
        return torch_cross_entropy(
            input, target, ignore_index, reduction, label_smoothing, num_items_in_batch, softcap, logit_scale
        )
    options = Options(ignore_index, label_smoothing, softcap, logit_scale)
    if torch.compiler.is_compiling():
        rows, _ = torch.ops.liger_autopatch.cross_entropy_rows(
            input, target, options.ignore_index, options.label_smoothing, softcap, logit_scale
        )
        n_valid = (target != options.ignore_index).sum() if reduction == "mean" else None
        return _reduce(rows, reduction, loss_denominator(n_valid, reduction, num_items_in_batch, input.device))

    # Read before `input` is passed anywhere: references beyond a temporary argument's
    # mean the caller (or a wrapper) still holds the logits.
    only_our_reference = sys.getrefcount(input) <= _TEMPORARY_ARGUMENT_REFS
    try:
        return _triton_cross_entropy(input, target, reduction, num_items_in_batch, options, only_our_reference)
    except KernelFailure:
        return torch_cross_entropy(
            input.float(), target, ignore_index, reduction, label_smoothing, num_items_in_batch, softcap, logit_scale
        )


def check_arguments(
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    softcap: float | None,
    logit_scale: float | None,
) -> tuple[int, float | None, float | None]:
    """The arguments both ops take, checked before any kernel is launched (a launch that
    fails turns the Triton path off for the process): ``ignore_index`` as an int,
    ``softcap`` and ``logit_scale`` as floats a float32 kernel argument can hold."""
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("num_items_in_batch divides a summed loss; it cannot be used with reduction='none'")
    if isinstance(num_items_in_batch, Tensor) and num_items_in_batch.numel() != 1:
        raise ValueError(f"num_items_in_batch must be one number, got a tensor of shape {tuple(num_items_in_batch.shape)}")
    ignore_index = operator.index(ignore_index)  # a TypeError for 1.5, as torch's
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index {ignore_index} is outside int64")
    return ignore_index, _float32_number("softcap", softcap), _float32_number("logit_scale", logit_scale)


def _float32_number(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value) and abs(value) > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} {value} is outside float32")
    return value


def _triton_cross_entropy(
    input: Tensor,
    target: Tensor,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    options: Options,
    only_our_reference: bool,
) -> Tensor:
    """The eager Triton path of :func:`cross_entropy`."""
    site = call_site(sys._getframe(2), input.device)
    check = check_targets(input, target, options, site)
    denominator = loss_denominator(check.status[2], reduction, num_items_in_batch, input.device)
    summed_with = check if reduction != "none" else None
    if not (input.requires_grad and torch.is_grad_enabled()):
        loss, _ = run_forward_kernel(
            input, target, options, denominator, None, grad=None, store_lse=False, summed_with=summed_with
        )
    else:
        # grad_output_steady is what the site's previous call read back. float16 cannot
        # hold a gradient made at a prediction that turns out wrong (a loss scale that
        # halves overflows it, one that grows loses its small values): made in the
        # backward, at the real grad_output, it is rounded once, as torch's.
        grad_in_forward = reduction != "none" and site.grad_output_steady and input.dtype != torch.float16
        in_place = grad_in_forward and only_our_reference and _unobservable(input)
        loss = _CrossEntropy.apply(
            input, target, denominator, check.prediction, summed_with, options, site, grad_in_forward, in_place
        )
    read_check(check, input, options, site)
    return loss


# ---------------------------------------------------------------------------------------
# Building blocks. Names without a leading underscore are also used by the fused op
# (ops/fused_linear_cross_entropy.py); they are not part of the package's API (__all__).


@dataclass(frozen=True)
class Options:
    """The loss's settings, as the kernels take them."""

    ignore_index: int
    label_smoothing: float
    softcap: float | None
    logit_scale: float | None


@dataclass
class CallSite:
    """What the backwards of one call site saw.

    The kernels keep it on the device, per device: float32 [last grad_output, 1 if it
    differed from the one before]; ``grad_output_steady`` is the host's copy of the
    second, read with the forward's one sync.
    """

    grad_output_steady: bool = True
    states: dict[torch.device, Tensor] = field(default_factory=dict)

    def state(self, device: torch.device) -> Tensor:
        if device not in self.states:
            state = torch.zeros(2, dtype=torch.float32, device=device)
            state[0] = 1.0  # a fill on the device: no host copy, fine under graph capture
            self.states[device] = state
        return self.states[device]


_call_sites: dict[tuple[object, int], CallSite] = {}


def call_site(frame: FrameType, device: torch.device) -> CallSite:
    key = (frame.f_code, frame.f_lineno)
    site = _call_sites.get(key)
    if site is None:
        site = _call_sites[key] = CallSite()
    site.state(device)
    return site


def _refcount_of_argument(input: object) -> int:
    return sys.getrefcount(input)


# What sys.getrefcount reports inside a function for an argument nobody else holds
# (2 on CPython 3.11+: the parameter and getrefcount's own argument).
_TEMPORARY_ARGUMENT_REFS = _refcount_of_argument(object())


def _unobservable(t: Tensor) -> bool:
    """True when no other tensor, autograd node or weak reference can see ``t``'s memory.

    Checked: not a view and no views of it (its storage's only user is ``t``, plus the
    storage object made for the check), no C++ holder of the tensor (``_use_count``:
    saved-for-backward, AccumulateGrad), not a leaf, no weak references. The caller checks
    Python references with sys.getrefcount, which these cannot see.
    """
    return (
        t._base is None
        and not t.is_leaf
        and t._use_count() == 1
        and weakref.getweakrefcount(t) == 0
        and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2
    )


def loss_denominator(
    n_valid: Tensor | None, reduction: str, num_items_in_batch: int | Tensor | None, device: torch.device
) -> Tensor | None:
    """0-d tensor the summed loss is divided by (``n_valid``, the non-ignored count, for
    "mean"), or None for "sum"/"none"."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return num_items_in_batch.to(device=device, dtype=torch.float32)
        return torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)
    return n_valid if reduction == "mean" else None


def _reduce(rows: Tensor, reduction: str, denominator: Tensor | None) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    # An int64 count divides into float32; 0 / 0 is NaN, as torch's all-ignored "mean".
    return total if denominator is None else total / denominator


def torch_cross_entropy(
    input: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    num_items_in_batch: int | Tensor | None,
    softcap: float | None,
    logit_scale: float | None,
) -> Tensor:
    """The fallback: the same function, in torch ops (as transformers computes it)."""
    if logit_scale is not None:
        input = input * logit_scale
    if softcap is not None:
        input = softcap * torch.tanh(input / softcap)
    if num_items_in_batch is None:
        return F.cross_entropy(
            input, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    loss = F.cross_entropy(input, target, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# ---------------------------------------------------------------------------------------
# Kernel launches


# Multiply-adds fused, as every kernel was measured: Triton's default up to 3.9, where
# leaving it unsaid warns the user that 3.10 turns it off. A TRITON_DEFAULT_FP_FUSION the
# user set still decides.
_FP_FUSION = {} if "TRITON_DEFAULT_FP_FUSION" in os.environ else {"enable_fp_fusion": True}


def _launch(t: Tensor, kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` for ``t``'s device.

    Triton launches on the current device's stream, so ``t``'s device is made current
    first where it is not (the logits of a model spread over GPUs need not be on the
    current one; switching costs about 8 us of host time on an H200 machine). A launch
    that raises did not run its kernel (Triton builds and checks it first): the Triton
    path goes off on that device and the error comes back as KernelFailure, which the ops
    answer with torch's result. Running out of memory (for a launch argument) says nothing
    about the kernels: it propagates as it is, and the path stays on.
    """
    try:
        if t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                kernel[grid](*args, **_FP_FUSION, **kwargs)
        else:
            kernel[grid](*args, **_FP_FUSION, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
        _unusable_devices.setdefault(t.device, reason)
        _registry.record_failure(f"Triton kernels on {t.device}", "ops", exc)
        raise KernelFailure(
            f"liger_autopatch: a Triton kernel failed on {t.device} ({reason}); torch's cross-entropy runs there from now on"
        ) from exc


def _kernels() -> ModuleType:
    # Imported on first use: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from liger_autopatch.ops import _cross_entropy_kernels

    return _cross_entropy_kernels


@dataclass(frozen=True)
class LaunchConfig:
    """Block size (columns per step), warps per program, programs per SM, and for the
    gradient-writing forward kernel: whether its gradient pass walks rows from their end
    (the blocks read last by the max/sum pass are likeliest to be in L1), whether it loads
    the first block of each pass ahead into registers (before the reductions that end the
    max/sum pass, and during the previous row's gradient pass), and whether it has the
    TMA unit fetch each next block of the max/sum pass, and the next row's first block,
    into L2 (Hopper only; rows with contiguous columns)."""

    block: int
    num_warps: int
    programs_per_sm: int
    reverse: bool
    prefetch: bool = False
    l2_prefetch: bool = False

    @property
    def max_registers(self) -> int:
        """Registers per thread that let ``programs_per_sm`` programs share an SM's 64K."""
        return min(255, 65536 // (32 * self.num_warps * self.programs_per_sm))


KernelPass = Literal["loss_and_gradient", "loss", "gradient"]


# Interpreter: small blocks so that the tests cover multi-block rows.
_INTERPRETER_CONFIG = LaunchConfig(block=64, num_warps=1, programs_per_sm=1, reverse=False)


def launch_config(n_cols: int, device: torch.device, kernel_pass: KernelPass) -> LaunchConfig:
    """Launch parameters for rows of ``n_cols`` logits, per pass: the forward kernel
    writing the gradient (read twice, write once), the forward kernel alone (read once),
    and the gradient-only kernels (read once, write once). bench/ce.py sweeps these;
    bench/NOTES-ce.md has the measurements behind them (H100, then H200). Chosen once per
    device, vocabulary and pass."""
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    configs = _cuda_device(device).launch_configs
    config = configs.get((n_cols, kernel_pass))
    if config is None:
        config = configs[(n_cols, kernel_pass)] = _choose_launch_config(n_cols, device, kernel_pass)
    return config


def _choose_launch_config(n_cols: int, device: torch.device, kernel_pass: KernelPass) -> LaunchConfig:
    block = min(8192, 1 << (n_cols - 1).bit_length())
    if kernel_pass == "loss":
        # Read once, nothing to find in L2 again: many small programs keep the most loads
        # in flight, at every V (H200: 0.99x the read floor at V=128256, 1.16x at 32000;
        # NOTES-ce v16).
        block = min(block, 4096)
        return LaunchConfig(block=block, num_warps=8 if block >= 4096 else 4, programs_per_sm=4, reverse=False)
    if kernel_pass == "loss_and_gradient" and _one_program_per_sm(n_cols):
        # One program of 1024 threads per SM: one row per SM, so that the gradient pass
        # finds as much of it as fits still in the SM's L1, and enough loads to fill DRAM.
        # Its loads are what limits it, and its 64 registers a thread leave none to load
        # further ahead (see _fetches_into_l2). From rows of seven blocks (224 KB in bf16)
        # the gradient pass walks backwards, starting with what L1 still holds: H200,
        # kernel alone, up to 3% faster into a fresh buffer and 1-5% in place at V =
        # 114688-180224, 1% slower fresh at 131072 only (NOTES-ce v35).
        return LaunchConfig(
            block=16384,
            num_warps=32,
            programs_per_sm=1,
            reverse=n_cols >= 7 * 16384,
            l2_prefetch=_fetches_into_l2(n_cols, 16384, device),
        )
    if n_cols < 65536:
        num_warps = 8 if block >= 4096 else 4
        # The forward kernel takes about 128 registers a thread here: 2 programs of 8 warps
        # fit on an SM (the kernel is compiled to that limit, see run_forward_kernel).
        two_per_sm = kernel_pass == "loss_and_gradient" and num_warps == 8
        # Loading each pass's first block ahead: 6% faster at V=32000, 2% at 50304 (5% in
        # place) on an H200; the 32-warp grid above loses with it (NOTES-ce, v23). Not on
        # compute capability 7.0, where the registers it takes make the kernel spill.
        return LaunchConfig(
            block=block,
            num_warps=num_warps,
            programs_per_sm=2 if two_per_sm else 4,
            reverse=False,
            prefetch=two_per_sm and n_cols >= block and _capability(device) > (7, 0),
            l2_prefetch=two_per_sm and _fetches_into_l2(n_cols, block, device),
        )
    return LaunchConfig(block=8192, num_warps=16 if n_cols < 196608 else 8, programs_per_sm=2, reverse=True)


def _fetches_into_l2(n_cols: int, block: int, device: torch.device) -> bool:
    """Whether the gradient-writing pass has the TMA unit fetch each next block into L2:
    on NVIDIA Hopper (the PTX instruction needs compute capability 9.0, and that is where
    it was measured; ROCm reports a major version of 9 too), for rows of more than four
    8192-column blocks (the 8-warp grid) or of at least five 16384-column blocks (the
    32-warp grid). H200, kernel alone: 4-6% faster at V = 36864-57344 in the 8-warp grid
    and 1-9% at V = 81920-262144 in the 32-warp grid; 1-9% slower at four blocks or fewer
    (V = 32000, 65024, 65536), and in the 32-warp grid between four and five blocks up to
    7% slower in place (V = 66560-79872; 73728 alone gained; NOTES-ce, v24, v26, v29).
    On the H100's slower memory the fetch loses from ten blocks of 16384 (V = 163840-
    262144: 1-4% slower, the op; 151936 ties) and gains below (NOTES-ce, v39), so GPUs
    whose memory is slower than :data:`_FAST_MEMORY` stop fetching at ten blocks."""
    if torch.version.hip is not None or _capability(device)[0] != 9:
        return False
    if block < 16384:
        return n_cols > 4 * block
    slow_memory = 0 < _memory_bytes_per_s(device) < _FAST_MEMORY
    return n_cols >= 5 * block and not (slow_memory and n_cols >= 10 * block)


# Peak DRAM bandwidth (bytes/s) between the H100's 3.35 TB/s, where fetching long rows into
# L2 loses, and the H200's 4.8 TB/s (its specification), where it gains (_fetches_into_l2).
_FAST_MEMORY = 4e12


def _memory_bytes_per_s(device: torch.device) -> float:
    """Peak DRAM bandwidth from the device's memory clock and bus width (double data
    rate); 0 where torch does not report them."""
    properties = _cuda_device(device).properties
    clock_khz = getattr(properties, "memory_clock_rate", 0)
    bus_bits = getattr(properties, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8


def _one_program_per_sm(n_cols: int) -> bool:
    """Whether the gradient-writing pass runs one 32-warp program per SM on 16384-column
    blocks: from 65536 columns, and from 49152 where the row's last block is at least
    three quarters full. Below 65536 that grid loses where its last block is mostly
    masked (H200: 8% faster at V=65024 and 49152, 4% at 61440, 7-12% slower at 53248
    and 57344; bench/NOTES-ce.md, v19)."""
    tail = n_cols % 16384
    return n_cols >= 65536 or (n_cols >= 49152 and (tail == 0 or tail >= 12288))


@dataclass
class _CudaDevice:
    """What the launches need from one CUDA device: its properties (asked once: the
    driver call costs host time) and the launch configurations chosen for it so far."""

    properties: Any
    launch_configs: dict[tuple[int, KernelPass], LaunchConfig] = field(default_factory=dict)


_cuda_devices: dict[torch.device, _CudaDevice] = {}


def _cuda_device(device: torch.device) -> _CudaDevice:
    known = _cuda_devices.get(device)
    if known is None:
        known = _cuda_devices[device] = _CudaDevice(torch.cuda.get_device_properties(device))
    return known


def _capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (major, minor)."""
    properties = _cuda_device(device).properties
    return (properties.major, properties.minor)


def _grid(n_rows: int, device: torch.device, config: LaunchConfig) -> tuple[int]:
    if device.type != "cuda":
        return (min(n_rows, 3),)
    return (min(n_rows, _cuda_device(device).properties.multi_processor_count * config.programs_per_sm),)


def _realigned(rows: Tensor, written_in_step: Tensor | None = None) -> bool:
    """Whether the kernels realign ``rows`` to 128-byte lines (ALIGN_ROWS): rows with
    contiguous columns that Triton cannot prove 16-byte aligned, because the row stride is
    not a multiple of 16 elements (V = 50257, 32001, ...) or the data does not start on 16
    bytes. Triton would load and store them one element at a time (H200: 1.7-6x the
    floor; bench/NOTES-ce.md, v28). A tensor whose rows are ``written_in_step`` with them
    (the gradient) must sit in the same place modulo 128 bytes, row by row; where it does
    not, nothing is realigned."""
    if rows.stride(1) != 1 or (rows.stride(0) % 16 == 0 and rows.data_ptr() % 16 == 0):
        return False
    other = written_in_step
    if other is None or other is rows:
        return True
    return (
        other.stride(1) == 1
        and other.element_size() == rows.element_size()
        and (other.stride(0) - rows.stride(0)) * rows.element_size() % 128 == 0
        and (other.data_ptr() - rows.data_ptr()) % 128 == 0
    )


def _transform_args(options: Options) -> dict[str, object]:
    return {
        "ignore_index": options.ignore_index,
        "label_smoothing": options.label_smoothing,
        "softcap": options.softcap if options.softcap is not None else 1.0,
        "logit_scale": options.logit_scale if options.logit_scale is not None else 1.0,
        "HAS_SOFTCAP": options.softcap is not None,
        "HAS_LOGIT_SCALE": options.logit_scale is not None,
    }


@dataclass
class TargetCheck:
    """What check_targets_kernel left: int64 status [bad target, unsteady, non-ignored
    count, the loss kernel's ticket] and the float32 grad_output prediction on the device, plus (CUDA) a pinned
    host copy of the status and the event after which that copy is complete."""

    status: Tensor
    prediction: Tensor | None
    host_status: Tensor | None
    copied: torch.cuda.Event | None


# Pinned host buffers for the status copy, each with the event that marks its copy done,
# kept per device between calls: allocating them costs host time on every call. A call
# takes one and puts it back once it has read it, so no two calls share one (threads; a
# call that raised between the copy and the read does not put its pair back).
_spare_readbacks: dict[torch.device, list[tuple[Tensor, torch.cuda.Event]]] = {}


def check_targets(input: Tensor, target: Tensor, options: Options, site: CallSite | None) -> TargetCheck:
    """Launch the target check; its result is read by :func:`read_check` once the loss
    kernel is queued behind it, so that the GPU never waits for the host."""
    n_rows, n_cols = input.shape
    status = torch.empty(4, dtype=torch.int64, device=input.device)
    prediction = torch.empty((), dtype=torch.float32, device=input.device) if site is not None else None
    _launch(
        input, _kernels().check_targets_kernel, (1,),
        target, target.stride(0), status,
        site.state(input.device) if site is not None else status,
        prediction if prediction is not None else status,
        n_rows, n_cols, options.ignore_index,
        HAS_SITE=site is not None,
        BLOCK=4096 if input.is_cuda else 64,
        num_warps=8,
    )  # fmt: skip
    if not input.is_cuda or _no_host_reads(input):
        return TargetCheck(status, prediction, None, None)
    try:
        host_status, copied = _spare_readbacks[input.device].pop()  # one step: threads may race here
    except (KeyError, IndexError):
        host_status, copied = torch.empty(4, dtype=torch.int64, pin_memory=True), torch.cuda.Event()
    host_status.copy_(status, non_blocking=True)
    copied.record(torch.cuda.current_stream(input.device))
    return TargetCheck(status, prediction, host_status, copied)


def _no_host_reads(input: Tensor) -> bool:
    return torch.compiler.is_compiling() or (input.is_cuda and torch.cuda.is_current_stream_capturing())


def read_check(check: TargetCheck, input: Tensor, options: Options, site: CallSite | None) -> None:
    """The forward's one device-to-host sync: it waits for the status copy only, not for
    the loss kernel. Raises on a target outside [0, V) that is not ignore_index, and
    updates the site's ``grad_output_steady`` (used by the site's next call).

    While torch.compile traces or a CUDA graph is captured nothing is read back: the
    kernels then give a bad target's row a NaN loss.
    """
    if _no_host_reads(input):
        return
    if check.copied is not None:
        check.copied.synchronize()
        bad_target, unsteady, _, _ = check.host_status.tolist()
        _spare_readbacks.setdefault(input.device, []).append((check.host_status, check.copied))
    else:
        bad_target, unsteady, _, _ = check.status.tolist()
    if site is not None:
        site.grad_output_steady = not unsteady
    if bad_target != options.ignore_index:
        raise TargetOutOfRange(
            f"cross_entropy: target {bad_target} is outside [0, {input.shape[1]}) "
            f"and is not ignore_index ({options.ignore_index})"
        )


def run_forward_kernel(
    input: Tensor,
    target: Tensor,
    options: Options,
    denominator: Tensor | None,
    prediction: Tensor | None,
    *,
    grad: Tensor | None,
    store_lse: bool,
    summed_with: TargetCheck | None,
) -> tuple[Tensor, Tensor | None]:
    """Row losses (N,) float32, or with ``summed_with`` (the check of these rows) their
    sum divided by ``denominator`` (0-d: the kernel reduces, no more launches); and, if
    asked, row log-sum-exp (base 2). Writes the gradient of prediction * sum(rows) /
    denominator into ``grad`` when given."""
    n_rows, n_cols = input.shape
    config = launch_config(n_cols, input.device, "loss_and_gradient" if grad is not None else "loss")
    grid = _grid(n_rows, input.device, config)
    if summed_with is None:
        loss = partials = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    else:
        # The shape of sum / denominator in torch: that of a one-element num_items_in_batch.
        shape = denominator.shape if denominator is not None else ()
        loss = torch.empty(shape, dtype=torch.float32, device=input.device)
        partials = torch.empty(grid[0], dtype=torch.float32, device=input.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=input.device) if store_lse else None
    grad_buffer = grad if grad is not None else input
    align_rows = _realigned(input, grad)
    # A bulk prefetch covers a contiguous byte range.
    l2_prefetch = config.l2_prefetch and input.stride(1) == 1
    # Realigned rows that are fetched into L2 lose 2-11% with the register read-ahead on
    # top (H200, V = 40961-50280; with no L2 fetch, at 32001, it still gains 14%; NOTES-ce v28).
    prefetch = config.prefetch and not (align_rows and l2_prefetch)
    _launch(
        input, _kernels().cross_entropy_forward_kernel, grid,
        input, input.stride(0), input.stride(1),
        target, target.stride(0),
        loss, lse if lse is not None else loss,
        grad_buffer, grad_buffer.stride(0), grad_buffer.stride(1),
        denominator if denominator is not None else loss,
        prediction if prediction is not None else loss,
        partials, summed_with.status if summed_with is not None else partials,
        n_rows, N_COLS=n_cols, n_programs=grid[0],
        **_transform_args(options),
        HAS_SMOOTHING=options.label_smoothing != 0.0,
        SUM=summed_with is not None,
        STORE_LSE=store_lse,
        WRITE_GRAD=grad is not None,
        HAS_DENOMINATOR=denominator is not None,
        REVERSE=config.reverse,
        PREFETCH=prefetch,
        L2_PREFETCH=l2_prefetch,
        ALIGN_ROWS=align_rows,
        BLOCK=config.block,
        PROGRAMS_BLOCK=1 << (grid[0] - 1).bit_length() if summed_with is not None else 1,
        num_warps=config.num_warps,
        # Without the limit the compiler may use more registers than the grid's
        # programs per SM leave, and fewer programs run at once (NOTES-ce, v14).
        maxnreg=config.max_registers,
    )  # fmt: skip
    return loss, lse


def run_backward_kernel(
    grad_output: Tensor,
    input: Tensor,
    target: Tensor,
    lse: Tensor,
    options: Options,
    denominator: Tensor | None,
    site: CallSite | None,
    grad: Tensor,
) -> Tensor:
    """grad = grad_output[row] / denominator * d loss_row / d input, written into ``grad``.

    ``grad_output`` is 0-d (reduced loss) or (N,) (per-row losses).
    """
    n_rows, n_cols = input.shape
    config = launch_config(n_cols, input.device, "gradient")
    grad_output = _float32(grad_output)
    grid = _grid(n_rows, input.device, config)
    _launch(
        input, _kernels().cross_entropy_backward_kernel, grid,
        input, input.stride(0), input.stride(1),
        target, target.stride(0),
        lse,
        grad_output, grad_output.stride(0) if grad_output.dim() else 0,
        denominator if denominator is not None else lse,
        grad, grad.stride(0), grad.stride(1),
        site.state(input.device) if site is not None else lse,
        n_rows, N_COLS=n_cols, n_programs=grid[0],
        **_transform_args(options),
        HAS_DENOMINATOR=denominator is not None,
        HAS_SITE=site is not None,
        ALIGN_ROWS=_realigned(input, grad),
        BLOCK=config.block,
        num_warps=config.num_warps,
    )  # fmt: skip
    return grad


def correct_gradient(grad: Tensor, grad_output: Tensor, prediction: Tensor, site: CallSite) -> None:
    """``grad *= grad_output / prediction`` in place where the forward's prediction was
    wrong (zeros stay zeros), and record ``grad_output`` in the site's state."""
    n_rows, n_cols = grad.shape
    config = launch_config(n_cols, grad.device, "gradient")
    grid = _grid(n_rows, grad.device, config)
    _launch(
        grad, _kernels().correct_gradient_kernel, grid,
        grad, grad.stride(0), grad.stride(1),
        _float32(grad_output), prediction, site.state(grad.device),
        n_rows, N_COLS=n_cols, n_programs=grid[0],
        ALIGN_ROWS=_realigned(grad),
        BLOCK=config.block,
        num_warps=config.num_warps,
    )  # fmt: skip


def refuse_second_derivative(op: str) -> None:
    """Raise in a backward that autograd runs with ``create_graph=True``: the kernels make
    gradients without a graph, so a second derivative through them would silently be
    zero."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"liger_autopatch.{op}: its gradient is made by a Triton kernel and has no second "
            "derivative (backward with create_graph=True); set LIGER_DISABLE=1 for code that "
            "differentiates twice"
        )


def _float32(t: Tensor) -> Tensor:
    # .to() parses its arguments even when there is nothing to convert (1 us).
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _fresh_gradient_buffer(input: Tensor) -> Tensor:
    return torch.empty_like(input, memory_format=torch.preserve_format)


class _CrossEntropy(torch.autograd.Function):
    """Eager autograd for the Triton path (see the module docstring for the two modes)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        input: Tensor,
        target: Tensor,
        denominator: Tensor | None,
        prediction: Tensor,
        summed_with: TargetCheck | None,
        options: Options,
        site: CallSite,
        grad_in_forward: bool,
        in_place: bool,
    ) -> Tensor:
        ctx.grad_in_forward = grad_in_forward
        ctx.reduced = summed_with is not None
        ctx.site = site
        # Set to None, never deleted, once the backward has handed them out (compiled
        # autograd passes the backward a stand-in for ctx that cannot delete them).
        ctx.grad = ctx.logits = None
        if grad_in_forward:
            grad = input if in_place else _fresh_gradient_buffer(input)
            loss, _ = run_forward_kernel(
                input, target, options, denominator, prediction, grad=grad, store_lse=False, summed_with=summed_with
            )
            ctx.grad = grad
            ctx.prediction = prediction
        else:
            loss, lse = run_forward_kernel(
                input, target, options, denominator, None, grad=None, store_lse=True, summed_with=summed_with
            )
            # Held as an attribute, not saved: at backward time this lets us see whether
            # anyone else still holds the logits (then the gradient may overwrite them).
            ctx.logits = input
            ctx.logits_version = input._version
            ctx.save_for_backward(target, lse, denominator)
            ctx.options = options
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_second_derivative("cross_entropy")
        nones = (None,) * 8
        if ctx.grad is None and ctx.logits is None:
            raise RuntimeError(
                "liger_autopatch.cross_entropy: a second backward through the same loss "
                "(retain_graph=True) is not supported: its gradient was handed out by the "
                "first; set LIGER_DISABLE=1 for code that needs it"
            )
        if ctx.reduced and grad_output.dim() != 0:
            # (1,) where num_items_in_batch was; a view costs host time, so only then.
            grad_output = grad_output.reshape(())
        if ctx.grad_in_forward:
            grad, ctx.grad = ctx.grad, None
            correct_gradient(grad, grad_output, ctx.prediction, ctx.site)
            return (grad, *nones)
        logits, ctx.logits = ctx.logits, None
        if logits._version != ctx.logits_version:
            raise RuntimeError("cross_entropy: the logits were modified in place between forward and backward")
        target, lse, denominator = ctx.saved_tensors
        # Two references here: `logits` and getrefcount's argument.
        in_place = sys.getrefcount(logits) <= 2 and _unobservable(logits)
        grad = logits if in_place else _fresh_gradient_buffer(logits)
        site = ctx.site if ctx.reduced else None
        run_backward_kernel(grad_output, logits, target, lse, ctx.options, denominator, site, grad)
        return (grad, *nones)


# ---------------------------------------------------------------------------------------
# torch.library registration: what torch.compile sees (gradient in the backward).


@torch.library.custom_op("liger_autopatch::cross_entropy_rows", mutates_args=())
def _cross_entropy_rows(
    input: Tensor,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-row losses (float32) and per-row log-sum-exp (base 2) for the backward."""
    options = Options(ignore_index, label_smoothing, softcap, logit_scale)
    check = check_targets(input, target, options, None)
    rows, lse = run_forward_kernel(input, target, options, None, None, grad=None, store_lse=True, summed_with=None)
    read_check(check, input, options, None)
    assert lse is not None
    return rows, lse


@_cross_entropy_rows.register_fake
def _(
    input: Tensor,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
) -> tuple[Tensor, Tensor]:
    n_rows = input.shape[0]
    return input.new_empty(n_rows, dtype=torch.float32), input.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("liger_autopatch::cross_entropy_rows_backward", mutates_args=())
def _cross_entropy_rows_backward(
    grad_rows: Tensor,
    input: Tensor,
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
) -> Tensor:
    """Gradient of sum(grad_rows * rows) with respect to the logits, in a fresh buffer."""
    options = Options(ignore_index, label_smoothing, softcap, logit_scale)
    return run_backward_kernel(grad_rows, input, target, lse, options, None, None, _fresh_gradient_buffer(input))


@_cross_entropy_rows_backward.register_fake
def _(
    grad_rows: Tensor,
    input: Tensor,
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    logit_scale: float | None,
) -> Tensor:
    return torch.empty_like(input, memory_format=torch.preserve_format)


def _rows_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    input, target, ignore_index, label_smoothing, softcap, logit_scale = inputs
    ctx.save_for_backward(input, target, output[1])
    ctx.scalars = (ignore_index, label_smoothing, softcap, logit_scale)


def _rows_backward(ctx: torch.autograd.function.FunctionCtx, grad_rows: Tensor, grad_lse: Tensor) -> tuple:
    input, target, lse = ctx.saved_tensors
    grad = torch.ops.liger_autopatch.cross_entropy_rows_backward(grad_rows, input, target, lse, *ctx.scalars)
    return grad, None, None, None, None, None


_cross_entropy_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)
