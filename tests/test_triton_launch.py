"""liger_autopatch.ops._triton_launch: which launches reuse a compiled kernel.

A fake kernel stands in for a ``@triton.jit`` function, so these run without a GPU; the
GPU tests of the cross-entropy op launch the real kernels through the same code.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from liger_autopatch.ops import _triton_launch


class FakeCompiled:
    function = "function handle"
    packed_metadata = "packed metadata"

    def __init__(self, runs: list) -> None:
        self.runs = runs

    def run(self, *launch_args) -> None:
        self.runs.append(launch_args)


class FakeKernel:
    """Parameters ``x_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = False``."""

    def __init__(self) -> None:
        def signature(x_ptr, n, scale, BLOCK, FLAG=False): ...

        parameters = inspect.signature(signature).parameters.values()
        self.params = [
            types.SimpleNamespace(name=p.name, is_constexpr=p.name.isupper(), default=p.default) for p in parameters
        ]
        self.compiles: list[tuple] = []  # launches through kernel[grid]
        self.runs: list[tuple] = []  # direct launches of the compiled kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiles.append((grid, args, kwargs))
            return FakeCompiled(self.runs)

        return launch


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    monkeypatch.setattr(_triton_launch, "_runtime_knobs", types.SimpleNamespace(
        launch_enter_hook=types.SimpleNamespace(calls=[]), launch_exit_hook=types.SimpleNamespace(calls=[])
    ))  # fmt: skip
    monkeypatch.setattr(_triton_launch, "_current_stream", lambda index: 1000 + index)
    monkeypatch.setattr(_triton_launch, "_compiled", {})
    monkeypatch.setattr(_triton_launch, "_signatures", {})
    return FakeKernel()


def buffer(offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor whose address is a multiple of 16 bytes plus ``offset`` elements."""
    base = torch.empty(64, dtype=dtype)
    base = base[(-base.data_ptr() % 16) // base.element_size() :]
    return base[offset : offset + 16]


def test_second_launch_of_the_same_specialization_calls_the_compiled_kernel(kernel):
    _triton_launch.launch(kernel, (4,), 0, (buffer(), 32, 0.5), {"BLOCK": 64, "num_warps": 4})
    assert len(kernel.compiles) == 1 and kernel.runs == []
    other = buffer(offset=4)  # another address, also on 16 bytes
    _triton_launch.launch(kernel, (7,), 0, (other, 48, 2.0), {"BLOCK": 64, "num_warps": 4})
    assert len(kernel.compiles) == 1
    # Grid, the device's stream, the handles, no launch metadata, the hooks, then every
    # argument in signature order: constexprs and defaults included.
    ((*head, x_ptr, n, scale, block, flag),) = kernel.runs
    assert head[:6] == [7, 1, 1, 1000, "function handle", "packed metadata"] and head[6] is None
    assert x_ptr is other and (n, scale, block, flag) == (48, 2.0, 64, False)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((buffer(offset=1), 32, 0.5), {"BLOCK": 64}),  # an address not on 16 bytes
        ((buffer(dtype=torch.bfloat16), 32, 0.5), {"BLOCK": 64}),  # another dtype
        ((buffer(), 33, 0.5), {"BLOCK": 64}),  # an integer not a multiple of 16
        ((buffer(), 1, 0.5), {"BLOCK": 64}),  # an integer equal to 1
        ((buffer(), 2**40, 0.5), {"BLOCK": 64}),  # a 64-bit integer
        ((buffer(), 32, 0.5), {"BLOCK": 128}),  # another constexpr value
        ((buffer(), 32, 0.5), {"BLOCK": 64, "FLAG": True}),  # a constexpr default overridden
        ((buffer(), 32, 0.5), {"BLOCK": 64, "num_warps": 8}),  # another option
    ],
)
def test_launches_triton_would_compile_apart_are_not_reused(kernel, args, kwargs):
    _triton_launch.launch(kernel, (4,), 0, (buffer(), 32, 0.5), {"BLOCK": 64})
    _triton_launch.launch(kernel, (4,), 0, args, kwargs)
    assert len(kernel.compiles) == 2 and kernel.runs == []


def test_each_device_compiles_its_own(kernel):
    for device_index in (0, 1, 0, 1):
        _triton_launch.launch(kernel, (4,), device_index, (buffer(), 32, 0.5), {"BLOCK": 64})
    assert len(kernel.compiles) == 2
    assert [run[3] for run in kernel.runs] == [1000, 1001]  # each on its device's stream


def test_launch_hooks_and_unchecked_triton_versions_take_tritons_launch(kernel, monkeypatch):
    kernel_args = ((buffer(), 32, 0.5), {"BLOCK": 64})
    _triton_launch._runtime_knobs.launch_enter_hook.calls.append(print)  # a profiler's hook
    for _ in range(2):
        _triton_launch.launch(kernel, (4,), 0, *kernel_args)
    monkeypatch.setattr(_triton_launch, "_runtime_knobs", ...)  # looked up again: not a checked version
    monkeypatch.setattr(_triton_launch, "DIRECT_LAUNCH_VERSIONS", ())
    for _ in range(2):
        _triton_launch.launch(kernel, (4,), 0, *kernel_args)
    assert len(kernel.compiles) == 4 and kernel.runs == []


def test_keys_are_at_least_as_fine_as_tritons_specialization():
    # Two arguments with the same property must get the same specialization from Triton
    # (its own function, as its launcher calls it for a plain parameter): otherwise a
    # kernel compiled for one would run for the other.
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def triton_specialization(value):
        return native_specialize_impl(BaseBackend, value, False, True, True)

    def tensors():
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.int32):
            for offset in range(4):
                yield buffer(offset, dtype)

    integers = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -(2**31), -(2**31) - 1,
                -(2**31) - 16, 2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16]  # fmt: skip
    for samples in (list(tensors()), integers, [0.5, -2.0, 1.0], [True, False], [None]):
        for a in samples:
            for b in samples:
                if _triton_launch._property(a) == _triton_launch._property(b):
                    assert triton_specialization(a) == triton_specialization(b), (a, b)
