"""Run Python snippets in a fresh interpreter of this environment, as a user's program would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any


def run_python(code: str, *, env: dict[str, str] | None = None, argv: tuple[str, ...] = ()) -> Any:
    """Run ``code`` in a new interpreter, ``argv`` as its ``sys.argv[1:]``; return the JSON
    it printed last.

    The child inherits this environment minus ``LIGER_DISABLE`` (set it through ``env``)
    and runs outside the source tree, so it sees the package the way it is installed.
    """
    child_env = {k: v for k, v in os.environ.items() if k != "LIGER_DISABLE"}
    child_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv],
        env=child_env,
        cwd=os.path.dirname(sys.executable),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(f"child failed with {result.returncode}:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
