"""liger_autopatch.ops.cross_entropy against float64 references and torch itself.

Without CUDA, the Triton kernels run on the CPU through the interpreter
(TRITON_INTERPRET=1, set only while this module's tests run). Tests marked ``gpu`` need
CUDA and run the compiled kernels at real sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from liger_autopatch.ops import cross_entropy as ce_module
from liger_autopatch.ops.cross_entropy import LaunchConfig, cross_entropy, supports

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# The interpreter tests assert that the Triton path served them; with CUDA present the
# CPU tensors go to the fallback, so they only run where the interpreter is on.
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter tests; CUDA runs the gpu tests")


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """TRITON_INTERPRET=1 for this module only, and only without CUDA (so that GPU runs
    compile the kernels and other test modules see the CPU fallback)."""
    with pytest.MonkeyPatch.context() as patch:
        if not HAS_CUDA:
            patch.setenv("TRITON_INTERPRET", "1")
        yield


def reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """The same function in float64 torch ops (differentiable)."""
    x = logits.double()
    if logit_scale is not None:
        x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(x, target.long(), ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
        return loss / (num_items_in_batch.double() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch)
    return F.cross_entropy(x, target.long(), ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


def make_case(n: int, v: int, dtype: torch.dtype, device: str = "cpu", ignored: float = 0.25, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=generator) * 4).to(dtype).to(device)
    target = torch.randint(0, v, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < ignored] = -100
    return logits, target.to(device)


def check(logits, target, grad_outputs=(1.0,), loss_rtol=1e-5, grad_tol=None, **kwargs):
    """Loss and gradient against the float64 reference, for each grad_output in turn
    (from one call site, so the site's choice of gradient path changes between them)."""
    grad_tol = grad_tol if grad_tol is not None else (1e-5 if logits.dtype == torch.float32 else 8e-3)
    ref_input = logits.detach().clone().requires_grad_()
    ref_loss = reference(ref_input, target, **kwargs)
    for scale in grad_outputs:
        upstream = torch.full_like(ref_loss, scale) if ref_loss.dim() == 0 else torch.randn_like(ref_loss)
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_input, upstream, retain_graph=True)
        leaf = logits.detach().clone().requires_grad_()
        loss = cross_entropy(leaf, target, **kwargs)
        assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=loss_rtol, atol=1e-6, equal_nan=True)
        loss.backward(upstream.float())
        assert leaf.grad.dtype == logits.dtype
        scale_of = ref_grad.abs().max().clamp_min(1e-30)
        error = (leaf.grad.double() - ref_grad).abs().max() / scale_of
        assert error <= grad_tol, f"gradient error {error:.3g} (grad_output={scale})"


@interpreter_only
@pytest.mark.parametrize(
    "n, v, dtype, kwargs",
    [
        (8, 300, torch.float32, {}),
        (1, 300, torch.float32, {}),
        (5, 40, torch.float32, {"reduction": "sum"}),  # V smaller than a block
        (3, 64, torch.float32, {"label_smoothing": 0.1}),  # V one block exactly
        (4, 256, torch.bfloat16, {"label_smoothing": 0.1}),  # whole blocks only, no tail
        (7, 300, torch.bfloat16, {"reduction": "none"}),
        (6, 130, torch.float16, {"label_smoothing": 0.1}),
        (6, 130, torch.float32, {"label_smoothing": 0.2, "reduction": "sum"}),
        (6, 130, torch.float32, {"label_smoothing": 0.1, "reduction": "none"}),
        (6, 200, torch.float32, {"num_items_in_batch": 11}),
        (6, 200, torch.bfloat16, {"num_items_in_batch": torch.tensor(7)}),
        (6, 200, torch.float32, {"softcap": 3.0}),
        (6, 200, torch.float32, {"logit_scale": 0.0625, "label_smoothing": 0.1}),
        (6, 200, torch.bfloat16, {"softcap": 30.0, "logit_scale": 2.0, "num_items_in_batch": 9}),
    ],
)
def test_matches_float64_reference(n, v, dtype, kwargs):
    logits, target = make_case(n, v, dtype)
    assert supports(logits, target)
    check(logits, target, grad_outputs=(1.0, 0.125, 0.125, 1.0), **kwargs)


@interpreter_only
@pytest.mark.parametrize("v", [150, 130, 128], ids=["with_tail", "with_short_tail", "whole_blocks"])
def test_gradient_pass_walking_rows_backwards(monkeypatch, v):
    reverse = LaunchConfig(block=32, num_warps=1, programs_per_sm=1, reverse=True)
    monkeypatch.setattr(ce_module, "launch_config", lambda n_cols, device, kernel_pass: reverse)
    logits, target = make_case(5, v, torch.float32)
    check(logits, target, label_smoothing=0.1)


def test_rows_realigned_where_triton_cannot_prove_them_aligned():
    # Rows whose stride is not a multiple of 16 elements, or whose data does not start on
    # 16 bytes, are realigned; a gradient tensor written in step with them must sit where
    # they do modulo 128 bytes.
    def rows(v, dtype=torch.bfloat16, offset=0, width=None):
        width = width or v
        return torch.empty(4 * width + offset + 8, dtype=dtype)[offset : offset + 4 * width].view(4, width)[:, :v]

    assert not ce_module._realigned(rows(32000))
    assert not ce_module._realigned(rows(128256, torch.float32))
    assert ce_module._realigned(rows(50257))
    assert ce_module._realigned(rows(50280))  # a multiple of 8, not of 16
    assert ce_module._realigned(rows(100003, torch.float32))
    assert ce_module._realigned(rows(32000, offset=3))  # data not on 16 bytes
    assert not ce_module._realigned(torch.empty(4, 2 * 50257, dtype=torch.bfloat16)[:, ::2])  # strided columns
    buffer = torch.empty(2 * 4 * 50257 + 256, dtype=torch.bfloat16)

    def rows_at(offset):  # 4 rows of 50257 that start `offset` elements into one buffer
        return buffer[offset : offset + 4 * 50257].view(4, 50257)

    logits, second = rows_at(0), 4 * 50257 // 64 * 64 + 64  # a whole number of 128-byte lines on
    assert ce_module._realigned(logits, logits)
    assert ce_module._realigned(logits, rows_at(second))
    assert not ce_module._realigned(logits, rows_at(second + 1))
    assert not ce_module._realigned(logits, rows_at(second + 8))  # 16 bytes apart, not 128
    assert not ce_module._realigned(rows(50257, width=50260), torch.empty(4, 50257, dtype=torch.bfloat16))


def test_realigned_rows_fetched_into_l2_are_not_loaded_ahead_into_registers(monkeypatch):
    # H200: realigned rows lose 2-11% with both read-aheads; aligned ones gain.
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs)

    both = LaunchConfig(block=64, num_warps=1, programs_per_sm=1, reverse=False, prefetch=True, l2_prefetch=True)
    monkeypatch.setattr(ce_module, "_kernels", lambda: type("Kernels", (), {"cross_entropy_forward_kernel": Kernel()}))
    monkeypatch.setattr(ce_module, "launch_config", lambda n_cols, device, kernel_pass: both)
    options = ce_module.Options(-100, 0.0, None, None)
    for v in (256, 257):
        logits, target = make_case(4, v, torch.bfloat16)
        # In place: a fresh CPU buffer starts on 64 bytes, so only sometimes where the
        # logits do modulo 128 (the CUDA allocator's blocks start on 512).
        ce_module.run_forward_kernel(logits, target, options, None, None, grad=logits, store_lse=False, summed_with=None)
    aligned, realigned = launched
    assert not aligned["ALIGN_ROWS"] and aligned["PREFETCH"] and aligned["L2_PREFETCH"]
    assert realigned["ALIGN_ROWS"] and not realigned["PREFETCH"] and realigned["L2_PREFETCH"]


@interpreter_only
@pytest.mark.parametrize(
    "n, v, dtype, offset",
    [
        (5, 1, torch.float32, 0),
        (5, 3, torch.bfloat16, 0),  # rows shorter than a 16-byte chunk
        (6, 7, torch.bfloat16, 5),
        (6, 9, torch.float16, 0),
        (6, 67, torch.bfloat16, 3),  # data not on 16 bytes
        (6, 67, torch.float32, 1),
        (6, 131, torch.bfloat16, 0),  # a row's first chunk past the first block's start
        (7, 72, torch.bfloat16, 0),  # row stride a multiple of 8, not 16
        (5, 64, torch.bfloat16, 3),  # row stride a multiple of 16, data not on 16 bytes
    ],
)
def test_realigned_rows_match_float64_reference(n, v, dtype, offset):
    # Neighbouring rows share 16-byte chunks here. The interpreter runs its 3 programs
    # (rows 3 apart) one after another, so a store outside a row overwrites a neighbour
    # that an earlier program has already written, for some pairs of rows, and fails the
    # comparison.
    logits, target = make_case(n, v, dtype, ignored=0.3)
    logits = torch.cat([torch.zeros(offset, dtype=dtype), logits.flatten()])[offset:].view(n, v)
    assert ce_module._realigned(logits)
    # The rows where they lie (check() below works on copies, which start on 16 bytes).
    with torch.no_grad():
        rows = cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
    expected = reference(logits, target, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)
    check(logits, target, grad_outputs=(1.0, 0.125, 0.125, 1.0), label_smoothing=0.1)
    check(logits, target, reduction="none")
    leaf = logits.clone().requires_grad_()
    cross_entropy(leaf * 1.0, target).backward()  # in place
    expected = logits.clone().requires_grad_()
    reference(expected, target).backward()
    error = (leaf.grad.double() - expected.grad.double()).abs().max() / expected.grad.abs().max().double().clamp_min(1e-30)
    assert error <= (1e-5 if dtype == torch.float32 else 8e-3)


@interpreter_only
@pytest.mark.parametrize(
    "n, v, dtype, kwargs",
    [
        (12, 300, torch.float32, {}),
        (1, 300, torch.float32, {}),
        (9, 64, torch.float32, {"label_smoothing": 0.1}),  # one block exactly
        (8, 256, torch.bfloat16, {"label_smoothing": 0.1}),  # whole blocks only
        (10, 130, torch.bfloat16, {"reduction": "sum"}),  # (float16 makes its gradient in the backward)
        (7, 200, torch.bfloat16, {"softcap": 30.0, "logit_scale": 2.0, "num_items_in_batch": 9}),
    ],
)
def test_first_blocks_loaded_ahead(monkeypatch, n, v, dtype, kwargs):
    # The grid of 8-warp programs (V < 65536 on a GPU) loads each row's first block
    # during the row before (3 programs here: rows 3 apart, some of them ignored) and the
    # gradient pass's first block before the max/sum pass's reductions.
    default = ce_module.launch_config
    prefetching = []

    def with_prefetch(n_cols, device, kernel_pass):
        config = default(n_cols, device, kernel_pass)
        prefetch = kernel_pass == "loss_and_gradient" and n_cols >= config.block
        prefetching.append(prefetch)
        return dataclasses.replace(config, prefetch=prefetch)

    monkeypatch.setattr(ce_module, "launch_config", with_prefetch)
    logits, target = make_case(n, v, dtype, ignored=0.3)
    check(logits, target, grad_outputs=(1.0, 0.125, 0.125, 1.0), **kwargs)
    assert any(prefetching)
    # In place: the gradient overwrites the rows it reads.
    leaf = logits.clone().requires_grad_()
    cross_entropy(leaf * 1.0, target, **kwargs).sum().backward()
    expected = logits.clone().requires_grad_()
    reference(expected, target, **kwargs).sum().backward()
    scale_of = expected.grad.abs().max().double()
    grad_tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert (leaf.grad.double() - expected.grad.double()).abs().max() / scale_of <= grad_tol


@interpreter_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
# The interpreter evaluates the overflowing sum with numpy before the row is redone.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf
def test_rows_the_target_logit_cannot_scale(reduction):
    # The max/sum pass sums exp2 against the target's logit. Rows with a logit more than
    # 64 / log2(e) (44.4) above it take the rescaling loop (at 128 / log2(e) the sum would
    # overflow), and so do rows whose target logit is not finite, which gives no scale.
    # Row 0: a logit 100 above its target's; row 1: 40 above, under the threshold; row 2:
    # a target logit of -inf; row 3: that, with logits so small that sums against a shift
    # of 0 vanish.
    logits, target = make_case(4, 200, torch.float32, ignored=0.0)
    for row, (at_target, elsewhere) in enumerate([(-50.0, 50.0), (-10.0, 30.0)]):
        logits[row, target[row]] = at_target
        logits[row, (target[row] + 100) % 200] = elsewhere
    logits[2, target[2]] = float("-inf")
    logits[3] = -200.0
    logits[3, target[3]] = float("-inf")
    check(logits, target, grad_outputs=(1.0, 0.5), reduction=reduction, label_smoothing=0.1)


@interpreter_only
def test_int32_targets_and_strided_rows():
    wide, target = make_case(6, 260, torch.float32)
    logits = wide[:, 3:203]  # rows 260 apart, 200 long
    assert logits.stride(0) == 260
    check(logits, target.to(torch.int32), reduction="sum")


@interpreter_only
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's 1 / 0
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    logits, target = make_case(4, 100, torch.float32, ignored=1.0)
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, target, reduction=reduction)
    expected = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@interpreter_only
def test_ignore_index_at_or_above_vocabulary():
    logits, target = make_case(6, 100, torch.float32, ignored=0.0)
    target[1] = 100
    target[4] = 100
    check(logits, target, ignore_index=100)
    check(logits, target, ignore_index=100, reduction="none")


@interpreter_only
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf
def test_nan_and_inf_propagate_like_torch():
    logits, target = make_case(4, 100, torch.float32, ignored=0.0)
    logits[0, 5] = float("nan")
    logits[1, :50] = float("-inf")  # masked vocabulary: finite loss
    target[1] = 70
    logits[2, 9] = float("inf")
    loss = cross_entropy(logits, target, reduction="none")
    expected = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert torch.isfinite(loss[1]) and loss[[0, 2]].isnan().all()


@interpreter_only
@pytest.mark.parametrize("bad", [100, 1000, -1, -101])
def test_bad_target_raises_naming_it(bad):
    logits, target = make_case(5, 100, torch.float32)
    target[3] = bad
    with pytest.raises(ValueError, match=rf"target {bad} is outside \[0, 100\)"):
        cross_entropy(logits.requires_grad_(), target)
    with pytest.raises(IndexError):  # what torch raises, for code that catches it
        cross_entropy(logits, target)


@interpreter_only
def test_bad_targets_name_the_first_row_with_one():
    logits, target = make_case(150, 100, torch.float32)  # rows over three blocks of the check
    target[130], target[70] = -5, 1000
    with pytest.raises(ValueError, match=r"target 1000 is outside"):
        cross_entropy(logits, target)


@interpreter_only
def test_callers_tensors_are_unchanged():
    logits, target = make_case(6, 200, torch.bfloat16)
    for grad_output in (1.0, 0.5, 0.5):
        leaf = logits.clone().requires_grad_()
        held = leaf * 1.0  # non-leaf the caller keeps
        kept_logits, kept_target = held.detach().clone(), target.clone()
        loss = cross_entropy(held, target)
        (loss * grad_output).backward()
        assert torch.equal(held.detach(), kept_logits)
        assert torch.equal(target, kept_target)


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=[gpu, needs_cuda])]
)
@pytest.mark.parametrize("name", ["check_targets_kernel", "cross_entropy_forward_kernel"])
def test_kernel_failure_gives_torchs_result_and_turns_the_path_off(failing_kernel, name, device):
    import liger_autopatch

    launches = failing_kernel(name)
    logits, target = make_case(6, 200, torch.bfloat16, device)
    kept = logits.clone()
    # The upcast path transformers runs, which the patched code falls back to.
    upcast = logits.float().requires_grad_()
    expected = F.cross_entropy(upcast, target, label_smoothing=0.1)
    expected.backward()
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf * 1.0, target, label_smoothing=0.1)  # a temporary: in place if it ran
    loss.backward()
    assert launches == [name]
    assert loss.dtype == torch.float32 and torch.equal(loss, expected.detach())
    assert torch.equal(leaf.grad, upcast.grad.to(torch.bfloat16))
    assert torch.equal(logits, kept)
    assert not supports(logits, target)
    (row,) = [row for row in liger_autopatch.status() if row.target == f"Triton kernels on {logits.device}"]
    assert row.state == "failed" and "PTXAS error: simulated" in row.detail
    # From now on torch's loss, exactly, and no more launch attempts.
    assert torch.equal(cross_entropy(logits, target), F.cross_entropy(logits, target))
    assert launches == [name]


@interpreter_only
def test_out_of_memory_at_a_launch_propagates_and_keeps_the_path_on(failing_kernel):
    launches = failing_kernel("cross_entropy_forward_kernel", torch.OutOfMemoryError("simulated"))
    logits, target = make_case(6, 200, torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        cross_entropy(logits, target)
    assert launches == ["cross_entropy_forward_kernel"]
    assert supports(logits, target)


def test_gpus_the_kernels_cannot_be_built_for(monkeypatch):
    monkeypatch.setattr(ce_module, "_unusable_devices", {})
    monkeypatch.setattr(ce_module, "_cuda_devices", {})
    asked = []

    def properties(device):
        asked.append(device)
        major, minor = {0: (6, 0), 1: (7, 5)}[device.index]
        return type("Properties", (), {"major": major, "minor": minor})

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    reason = ce_module.unusable_reason(torch.device("cuda", 0))
    assert reason is not None and "compute capability 6.0" in reason and "7.0" in reason
    assert ce_module.unusable_reason(torch.device("cuda", 1)) is None
    # Asked once per device.
    assert ce_module.unusable_reason(torch.device("cuda", 0)) == reason
    assert ce_module.unusable_reason(torch.device("cuda", 1)) is None
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_l2_fetches_only_on_nvidia_hopper_for_long_rows(monkeypatch):
    # The fetch is a Hopper PTX instruction: any other GPU would fail to build the kernel.
    major_of = {0: 9, 1: 8, 2: 10}
    monkeypatch.setattr(ce_module, "_cuda_devices", {})
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: type("Properties", (), {"major": major_of[device.index], "minor": 0, "multi_processor_count": 132}),
    )

    def fetches(v, index):
        return ce_module.launch_config(v, torch.device("cuda", index), "loss_and_gradient").l2_prefetch

    assert fetches(128256, 0) and fetches(81920, 0)  # 32-warp grid: 7.8 and 5 blocks
    assert not fetches(77824, 0) and not fetches(65536, 0)  # 4.75 and 4 blocks
    assert fetches(50304, 0) and fetches(36864, 0)  # 8-warp grid: 6.1 and 4.5 blocks
    assert not fetches(32000, 0)  # 3.9 blocks
    assert not fetches(128256, 1) and not fetches(128256, 2)  # Ampere, Blackwell
    assert not ce_module.launch_config(128256, torch.device("cuda", 0), "loss").l2_prefetch
    # Memory slower than 4 TB/s (an H100's 3.35: 2619 MHz, 5120 bits): no fetch from ten
    # blocks of 16384, where it measured slower there. 4.8 TB/s (the H200's specification:
    # 3125 MHz, 6144 bits here) fetches on.
    memory = {0: (2619000, 5120), 1: (3125000, 6144)}
    monkeypatch.setattr(ce_module, "_cuda_devices", {})
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: type(
            "Properties",
            (),
            {"major": 9, "minor": 0, "multi_processor_count": 132,
             "memory_clock_rate": memory[device.index][0], "memory_bus_width": memory[device.index][1]},
        ),
    )  # fmt: skip
    assert fetches(151936, 0) and fetches(81920, 0) and fetches(50304, 0)
    assert not fetches(163840, 0) and not fetches(262144, 0)
    assert fetches(163840, 1) and fetches(262144, 1)
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm reports major 9 for MI300
    monkeypatch.setattr(ce_module, "_cuda_devices", {})  # a process's ROCm is fixed: configs are kept
    assert not fetches(128256, 0)


def test_first_blocks_not_loaded_ahead_where_the_kernel_would_spill(monkeypatch):
    # Compiled for compute capability 7.0 (V100) the 8-warp kernel spills with the blocks
    # it loads ahead (NOTES-ce v27); from 7.5 it does not.
    capability_of = {0: (7, 0), 1: (7, 5), 2: (9, 0)}
    monkeypatch.setattr(ce_module, "_cuda_devices", {})

    def properties(device):
        major, minor = capability_of[device.index]
        return type("Properties", (), {"major": major, "minor": minor, "multi_processor_count": 80})

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    loads_ahead = [
        ce_module.launch_config(32000, torch.device("cuda", index), "loss_and_gradient").prefetch
        for index in range(3)
    ]
    assert loads_ahead == [False, True, True]


class _Probe(torch.autograd.Function):
    """Identity that records the data pointers of its output and of the gradient."""

    pointers: list[int] = []

    @staticmethod
    def forward(ctx, x):
        y = x * 1.0
        _Probe.pointers.append(y.data_ptr())
        return y

    @staticmethod
    def backward(ctx, grad):
        _Probe.pointers.append(grad.data_ptr())
        return grad


@interpreter_only
def test_gradient_reuses_logits_only_nobody_else_holds():
    logits, target = make_case(6, 200, torch.float32)
    leaf = logits.clone().requires_grad_()
    ref_input = logits.clone().requires_grad_()
    for grad_output in (1.0, 0.25, 0.25):  # gradient in the forward, then in the backward
        _Probe.pointers.clear()
        leaf.grad = ref_input.grad = None
        (cross_entropy(_Probe.apply(leaf), target) * grad_output).backward()
        (reference(ref_input, target) * grad_output).backward()
        in_place, grad_ptr = _Probe.pointers
        assert in_place == grad_ptr, "a temporary's buffer should take its own gradient"
        torch.testing.assert_close(leaf.grad, ref_input.grad, rtol=1e-5, atol=1e-9)

        _Probe.pointers.clear()
        held = _Probe.apply(leaf)
        (cross_entropy(held, target) * grad_output).backward()
        assert _Probe.pointers[0] != _Probe.pointers[1], "a held tensor must not be overwritten"


@interpreter_only
def test_call_site_predicts_grad_output():
    logits, target = make_case(4, 100, torch.float32)
    ref_input = logits.clone().requires_grad_()
    ref_loss = reference(ref_input, target)
    seen = []
    for grad_output in (1.0, 0.5, 0.5, 0.5, 1.0, 1.0):
        leaf = logits.clone().requires_grad_()
        loss = cross_entropy(leaf, target)
        node = loss.grad_fn
        seen.append(node.prediction.item() if node.grad_in_forward else None)
        (loss * grad_output).backward()
        (expected,) = torch.autograd.grad(ref_loss * grad_output, ref_input, retain_graph=True)
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-9)
    # The gradient is made in the forward, scaled by the last backward's grad_output,
    # except when the call before found that grad_output had just changed: then in the
    # backward.
    assert seen == [1.0, 1.0, 0.5, None, 0.5, 1.0]


@interpreter_only
def test_float16_gradient_is_made_at_the_real_loss_scale():
    # A loss scale that halves (GradScaler backing off): the first scale overflows the
    # float16 gradient, the second does not, in torch as here.
    logits, target = make_case(1, 50, torch.float16, ignored=0.0)
    for scale in (2.0**17, 2.0**16, 2.0**16):
        leaf = logits.clone().requires_grad_()
        loss = cross_entropy(leaf, target)
        assert not loss.grad_fn.grad_in_forward
        (loss * scale).backward()
        expected_leaf = logits.clone().requires_grad_()
        (F.cross_entropy(expected_leaf.float(), target) * scale).backward()
        assert torch.equal(leaf.grad.isfinite(), expected_leaf.grad.isfinite()), scale
        torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=2e-3, atol=1e-3)


@interpreter_only
def test_second_backward_through_one_loss_raises_clearly():
    logits, target = make_case(4, 100, torch.float32)
    for reduction in ("mean", "none"):
        loss = cross_entropy(logits.clone().requires_grad_(), target, reduction=reduction).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()


@interpreter_only
def test_num_items_in_batch_as_a_one_element_tensor():
    # Shape (1,) as torch's division gives it; both gradient paths read grad_output as one number.
    logits, target = make_case(6, 70, torch.float32)
    check(logits, target, grad_outputs=(1.0, 0.5, 0.5), num_items_in_batch=torch.tensor([7.0]))
    with pytest.raises(ValueError, match="one number"):
        cross_entropy(logits, target, num_items_in_batch=torch.tensor([7.0, 8.0]))


@interpreter_only
def test_label_smoothing_outside_zero_to_one_as_torch():
    logits, target = make_case(4, 60, torch.float32)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5)
    torch.testing.assert_close(
        cross_entropy(logits, target, label_smoothing=-0.5),
        F.cross_entropy(logits, target, label_smoothing=-0.5),
    )


@interpreter_only
def test_ignored_rows_keep_a_zero_gradient_under_an_infinite_grad_output():
    logits, target = make_case(6, 40, torch.float32, ignored=0.5)
    for _ in range(2):  # the second call bakes in grad_output 1 and must rescale by inf
        leaf = logits.clone().requires_grad_()
        (cross_entropy(leaf, target) * float("inf")).backward()
    ignored = target == -100
    assert ignored.any() and torch.equal(leaf.grad[ignored], torch.zeros_like(leaf.grad[ignored]))


@interpreter_only
def test_no_grad_forward_only():
    logits, target = make_case(5, 150, torch.float32)
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), target)
    torch.testing.assert_close(loss.double(), reference(logits, target).detach(), rtol=1e-5, atol=1e-6)
    assert loss.grad_fn is None


@interpreter_only
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["gradient in the forward", "in the backward"])
def test_second_derivative_raises_instead_of_being_zero(reduction):
    logits, target = make_case(4, 100, torch.float32)
    loss = cross_entropy(logits.requires_grad_(), target, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, logits, create_graph=True)


@interpreter_only
def test_torch_func_transforms_take_torchs_path_and_leave_ours_on():
    # Their wrapped tensors have no storage a kernel can read: torch answers, and the
    # Triton path is not taken for broken.
    logits, target = make_case(3, 40, torch.float32)
    per_row = torch.func.vmap(lambda x: cross_entropy(x[None], target[:1]))(logits)
    grad = torch.func.grad(lambda x: cross_entropy(x, target))(logits)
    torch.testing.assert_close(per_row, torch.stack([F.cross_entropy(x[None], target[:1]) for x in logits]))
    torch.testing.assert_close(grad.double(), torch.func.grad(lambda x: reference(x, target))(logits.double()))
    assert supports(logits, target)


@interpreter_only
def test_custom_op_registration():
    logits, target = make_case(4, 100, torch.float32)
    torch.library.opcheck(
        torch.ops.liger_autopatch.cross_entropy_rows.default,
        (logits.requires_grad_(), target, -100, 0.1, None, 2.0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_fallback_is_exactly_torch(monkeypatch):
    logits, target = make_case(6, 50, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not supports(logits, target)
    everything_counts = target.clamp_min(0)
    for kwargs in ({}, {"reduction": "none", "label_smoothing": 0.1}, {"ignore_index": int(everything_counts[0]), "reduction": "sum"}):
        labels = everything_counts if "ignore_index" in kwargs else target
        assert torch.equal(cross_entropy(logits, labels, **kwargs), F.cross_entropy(logits, labels, **kwargs))
    capped = cross_entropy(logits, target, softcap=5.0, logit_scale=0.5, num_items_in_batch=torch.tensor(4))
    expected = F.cross_entropy(5.0 * torch.tanh(logits * 0.5 / 5.0), target, reduction="sum") / torch.tensor(4)
    assert torch.equal(capped, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.randn(2, 3, 10), torch.randint(0, 3, (2, 10))),  # (N, C, d) input
        lambda: (torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 10, (4,))),
        lambda: (torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)),  # probabilities
    ],
)
def test_unsupported_inputs_fall_back_to_torch(make):
    logits, target = make()
    assert not supports(logits, target)
    assert torch.equal(cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_argument_errors():
    logits, target = make_case(2, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        cross_entropy(logits, target, reduction="none", num_items_in_batch=3)
    with pytest.raises(TypeError):  # as torch: not truncated to class 1
        cross_entropy(logits, target, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        cross_entropy(logits, target, ignore_index=2**64)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, target, softcap=2.0**200)


@interpreter_only
def test_tensor_softcap_and_logit_scale_are_numbers_to_the_kernel():
    # A 0-d tensor is taken as its value; no launch fails, so the Triton path stays on.
    logits, target = make_case(4, 60, torch.float32)
    loss = cross_entropy(logits, target, softcap=torch.tensor(3.0), logit_scale=torch.tensor(0.5))
    expected = reference(logits, target, softcap=3.0, logit_scale=0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert supports(logits, target)


# ---------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes.


@gpu
@needs_cuda
# 32000 and 50304: 8-warp programs loading first blocks ahead; 65024: the 32-warp grid below 65536;
# 32001, 50257, 128257: rows realigned to 16 bytes
@pytest.mark.parametrize("v", [32000, 32001, 50257, 50304, 65024, 128256, 128257])
@pytest.mark.parametrize("kwargs", [{}, {"label_smoothing": 0.1, "softcap": 30.0}, {"reduction": "none"}])
def test_gpu_real_sizes(v, kwargs):
    logits, target = make_case(2048, v, torch.bfloat16, device="cuda", ignored=0.1)
    check(logits, target, grad_outputs=(1.0, 0.125, 0.125), **kwargs)


@gpu
@needs_cuda
@pytest.mark.parametrize("v", [32000, 128256])
@pytest.mark.parametrize("grad", [True, False], ids=["loss and gradient", "loss only"])
def test_gpu_kernel_sums_every_programs_rows(v, grad):
    # The forward kernel sums the loss itself: each program leaves its rows' total, and
    # whichever takes the last ticket adds them up. A total it missed would be a whole
    # program's share, 1/132 of the loss or more; the order of the sum is fixed, so
    # repeated calls agree to the bit.
    logits, target = make_case(8192, v, torch.bfloat16, device="cuda", ignored=0.1)
    logits.requires_grad_(grad)
    rows = cross_entropy(logits, target, reduction="none").double()
    expected = rows.sum() / (target != -100).sum()
    first = cross_entropy(logits, target)
    for _ in range(100):
        loss = cross_entropy(logits, target)
        assert torch.equal(loss, first)
    torch.testing.assert_close(first.double(), expected, rtol=1e-6, atol=0)
    total = cross_entropy(logits, target, reduction="sum", label_smoothing=0.1)
    expected_total = cross_entropy(logits, target, reduction="none", label_smoothing=0.1).double().sum()
    torch.testing.assert_close(total.double(), expected_total, rtol=1e-6, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "v, dtype, view",
    [
        (100003, torch.bfloat16, "whole"),  # rows that do not start on 16 bytes
        (40961, torch.bfloat16, "whole"),  # the same in the 8-warp grid
        (128256, torch.float32, "whole"),
        (98304, torch.bfloat16, "columns 3 on of wider rows"),
        (98304, torch.bfloat16, "every other column"),  # not contiguous: no bulk prefetch
    ],
)
def test_gpu_rows_fetched_into_l2_ahead(v, dtype, view):
    # On Hopper the gradient-writing kernel has the TMA unit fetch blocks into L2 ahead of
    # its loads, each range cut to whole 16-byte units inside its row.
    if torch.cuda.get_device_capability()[0] == 9:
        assert ce_module.launch_config(v, torch.device("cuda"), "loss_and_gradient").l2_prefetch
    width = {"whole": v, "columns 3 on of wider rows": v + 11, "every other column": 2 * v}[view]
    base, target = make_case(1024, width, dtype, device="cuda", ignored=0.1)

    def logits_of(t):
        return {"whole": t, "columns 3 on of wider rows": t[:, 3 : 3 + v], "every other column": t[:, ::2]}[view]

    target = target.clamp(max=v - 1)
    for grad_output in (1.0, 0.125, 0.125):
        leaf = base.clone().requires_grad_()
        loss = cross_entropy(logits_of(leaf), target)
        (loss * grad_output).backward()
        expected = base.double().requires_grad_()
        expected_loss = reference(logits_of(expected), target)
        (expected_loss * grad_output).backward()
        torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=1e-5, atol=1e-6)
        error = (leaf.grad.double() - expected.grad).abs().max() / expected.grad.abs().max()
        assert error <= (1e-5 if dtype == torch.float32 else 8e-3)


@gpu
@needs_cuda
def test_gpu_64bit_offsets():
    n, v = 16384, 262144  # n * v = 2^32 elements, 8 GiB of bf16
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda")
    tail = slice(n - 4, n)
    tail_logits = logits[tail].double().requires_grad_()
    expected = sum(
        F.cross_entropy(logits[i : i + 1024].float(), target[i : i + 1024], reduction="sum") for i in range(0, n, 1024)
    )
    source = logits.requires_grad_()
    loss = cross_entropy(source * 1.0, target, reduction="sum")  # a temporary: gradient in place
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    loss.backward()
    (ref_grad,) = torch.autograd.grad(reference(tail_logits, target[tail], reduction="sum"), tail_logits)
    assert (source.grad[tail].double() - ref_grad).abs().max() < 1e-2 * ref_grad.abs().max()
    rows = cross_entropy(logits.detach(), target, reduction="none")
    torch.testing.assert_close(rows[tail].double(), reference(tail_logits, target[tail], reduction="none").detach(), rtol=1e-5, atol=1e-5)


@gpu
@needs_cuda
def test_gpu_bad_target_then_context_usable():
    logits, target = make_case(1024, 32000, torch.bfloat16, device="cuda")
    target[700] = 32000
    with pytest.raises(ValueError, match="target 32000"):
        cross_entropy(logits, target)
    torch.cuda.synchronize()
    target[700] = 5
    check(logits, target)
    # Each call reads its own status (the pinned buffers it is copied into are reused),
    # on whichever stream it runs.
    target[3] = -7
    with pytest.raises(ValueError, match="target -7"):
        cross_entropy(logits, target)
    target[3] = 4
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cross_entropy(logits, target)
        target[9] = 40000
        with pytest.raises(ValueError, match="target 40000"):
            cross_entropy(logits, target)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_logits_on_a_device_that_is_not_current():
    logits, target = make_case(512, 32000, torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        check(logits, target, grad_outputs=(1.0, 0.5, 0.5))


@gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph():
    logits, target = make_case(512, 32000, torch.bfloat16, device="cuda")

    @torch.compile(fullgraph=True)
    def loss_fn(x, t):
        return cross_entropy(x, t, label_smoothing=0.1, num_items_in_batch=300)

    leaf = logits.clone().requires_grad_()
    loss = loss_fn(leaf, target)
    loss.backward()
    ref_input = logits.clone().requires_grad_()
    ref = reference(ref_input, target, label_smoothing=0.1, num_items_in_batch=300)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert (leaf.grad.double() - ref_input.grad).abs().max() < 8e-3 * ref_input.grad.abs().max()


@gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay():
    """Forward and backward captured in a CUDA graph: no host read during capture, and each
    replay computes the loss and gradient of whatever the static inputs hold then."""
    logits, target = make_case(512, 32000, torch.bfloat16, device="cuda", ignored=0.1)
    static_logits = logits.clone().requires_grad_()
    static_target = target.clone()

    def step():
        loss = cross_entropy(static_logits, static_target)
        (grad,) = torch.autograd.grad(loss, static_logits)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the graph: compilation, call-site state
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    for seed in range(2):
        fresh, fresh_target = make_case(512, 32000, torch.bfloat16, device="cuda", ignored=0.1, seed=seed + 1)
        with torch.no_grad():
            static_logits.copy_(fresh)
        static_target.copy_(fresh_target)
        graph.replay()
        ref_input = fresh.double().requires_grad_()
        ref = reference(ref_input, fresh_target)
        ref.backward()
        torch.testing.assert_close(static_loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        assert (static_grad.double() - ref_input.grad).abs().max() < 8e-3 * ref_input.grad.abs().max()
