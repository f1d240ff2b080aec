"""Fixtures and checks shared by the test modules."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest


@pytest.fixture(autouse=True)
def triton_path_stays_on():
    """A kernel that fails turns the Triton path off and the op answers with torch's result,
    which would let a broken kernel pass any test that compares results: no test may leave
    a device marked unusable (tests that make kernels fail use ``failing_kernel``)."""
    yield
    ops = sys.modules.get("liger_autopatch.ops.cross_entropy")
    if ops is not None and ops._unusable_devices:
        unusable = dict(ops._unusable_devices)
        ops._unusable_devices.clear()  # the next tests run on the Triton path again
        pytest.fail(f"the Triton path went off: {unusable}")


class _FailingLaunch:
    """A kernel whose launch raises, as Triton's does when it cannot build the kernel."""

    def __init__(self, launches: list[str], name: str, error: Exception) -> None:
        self.launches, self.name, self.error = launches, name, error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.name)
            raise self.error

        return launch


@pytest.fixture
def failing_kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """``failing_kernel(name, error=...)``: from then on, launching the kernel called
    ``name`` raises ``error`` (by default a build error); returns the list of attempted
    launches. The record of unusable devices and the registry's records are the test's own."""
    from liger_autopatch import _registry
    from liger_autopatch.ops import cross_entropy as ops

    monkeypatch.setattr(ops, "_unusable_devices", {})
    monkeypatch.setattr(_registry, "_records", {})
    launches: list[str] = []

    def make(name: str, error: Exception | None = None) -> list[str]:
        error = error or RuntimeError("PTXAS error: simulated\nptxas fatal: the rest of its output")
        kernels = ops._kernels()
        namespace = types.SimpleNamespace(**{k: getattr(kernels, k) for k in dir(kernels) if not k.startswith("__")})
        setattr(namespace, name, _FailingLaunch(launches, name, error))
        monkeypatch.setattr(ops, "_kernels", lambda: namespace)
        return launches

    return make
