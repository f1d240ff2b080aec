"""The forward kernel's launches compile for sm_90 with no spill inside a column loop.

The kernels run at register caps that leave nothing spare (bench/NOTES-ce.md, v14, v23).
A spill inside a column loop costs a local-memory access per block, which otherwise only a
GPU run would show, as time. bench/registers.py compiles the launches as the op makes them
with an H100's configurations, here on the CPU, with the Triton that CI pins (3.9 does
spill there for realigned rows: NOTES-ce, v40).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

REPO = pathlib.Path(__file__).resolve().parents[1]
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.fixture(scope="module")
def compiled_launches(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not CUOBJDUMP.exists():
        pytest.skip("this Triton has no NVIDIA backend tools")
    out = tmp_path_factory.mktemp("registers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(REPO / "bench" / "registers.py"), "--out", str(out)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    (result,) = out.glob("registers-*.json")
    return json.loads(result.read_text())["rows"]


def test_no_spill_in_the_column_loops(compiled_launches: list[dict]) -> None:
    assert {(row["vocab"], row["pass"]) for row in compiled_launches} >= {
        (32000, "loss_and_gradient"), (50257, "loss_and_gradient"), (128256, "loss_and_gradient"), (128256, "loss"),
    }  # fmt: skip
    in_loops = {(row["vocab"], row["pass"]): row["in_innermost_loops"] for row in compiled_launches}
    assert all(count == 0 for count in in_loops.values()), in_loops

