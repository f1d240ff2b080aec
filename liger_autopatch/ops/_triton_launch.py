"""Launching compiled Triton kernels with less host time than ``kernel[grid](...)``.

On every call, Triton's launcher binds and specializes each argument, turns the options
into a cache-key string, looks the compiled kernel up and builds launch metadata: on an
H200 machine's host, 20-35 us of Python around a launch of 10 us (bench/NOTES-ce.md, v30,
v33), and the cross-entropy op launches three kernels per forward + backward. Where the
op is bound by the host (small vocabularies), that is what the GPU waits for.

:func:`launch` keeps, per kernel, device, options and argument properties, the compiled
kernel that the first such launch returned, and launches it directly after that. The
properties are those Triton compiles a variant for, recorded at least as finely as Triton
does: a tensor's dtype and whether its address is a multiple of 16 bytes; an integer's
width, whether it is 1 and whether it is a multiple of 16; a constexpr's value. Two
launches with the same key therefore run the code Triton's own lookup would pick.

The direct call follows the calling convention of the compiled kernels of the Triton
versions in :data:`DIRECT_LAUNCH_VERSIONS` (every argument in signature order, constexprs
included). Other versions, and launches while Triton's launch hooks are set (its
profiler), take ``kernel[grid](...)``, as does each first launch of a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Triton versions whose compiled-kernel call this module was checked against (GPU tests).
DIRECT_LAUNCH_VERSIONS = ("3.6",)


@dataclass(frozen=True)
class _Signature:
    """A kernel's parameters in signature order, and the names of its options."""

    params: tuple[tuple[str, bool, Any], ...]  # (name, is constexpr, default)
    names: frozenset[str]


_signatures: dict[Any, _Signature] = {}
# (kernel, device index, options, argument properties) -> the compiled kernel.
_compiled: dict[tuple, Any] = {}
# triton.knobs.runtime where launches go direct; None where they do not; unset at first.
_runtime_knobs: Any = ...


def launch(kernel: Any, grid: tuple[int, ...], device_index: int, args: tuple, kwargs: dict[str, Any]) -> None:
    """``kernel[grid](*args, **kwargs)`` on CUDA device ``device_index`` (the current one)."""
    runtime = _runtime_knobs if _runtime_knobs is not ... else _find_runtime_knobs()
    if runtime is None or runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
        kernel[grid](*args, **kwargs)
        return
    signature = _signatures.get(kernel) or _signature_of(kernel)
    params = signature.params
    values = args + tuple(kwargs.get(name, default) for name, _, default in params[len(args) :])
    options = tuple(item for item in kwargs.items() if item[0] not in signature.names)
    properties = tuple(value if param[1] else _property(value) for value, param in zip(values, params))
    key = (kernel, device_index, options, properties)
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **kwargs)
        return
    compiled.run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
        _current_stream(device_index), compiled.function, compiled.packed_metadata,
        None, runtime.launch_enter_hook, runtime.launch_exit_hook,
        *values,
    )  # fmt: skip


def _find_runtime_knobs() -> Any:
    global _runtime_knobs
    import triton
    from triton import knobs

    checked = ".".join(triton.__version__.split(".")[:2]) in DIRECT_LAUNCH_VERSIONS
    _runtime_knobs = knobs.runtime if checked else None
    return _runtime_knobs


def _signature_of(kernel: Any) -> _Signature:
    params = tuple((p.name, p.is_constexpr, p.default) for p in kernel.params)
    signature = _signatures[kernel] = _Signature(params, frozenset(name for name, _, _ in params))
    return signature


def _property(value: Any) -> Any:
    """What Triton specializes a non-constexpr argument on (or finer)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        width = 32 if -(2**31) <= value < 2**31 else 64 if -(2**63) <= value < 2**63 else 65
        return (width, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return float
    return value  # None and anything else: by value


def _current_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)
