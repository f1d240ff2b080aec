"""What liger_autopatch adds to the start of every Python process (budget: 1 ms).

Two bare virtualenvs on the same interpreter, one with the package and its
``liger_autopatch.pth`` copied into site-packages as a wheel install lays them out, one
without. ``python -c pass`` runs alternately in each; the table shows the medians and
the modules the start-up hook imports. Also run with ``LIGER_DISABLE=1``.

    python bench/startup.py            # prints the table, writes bench/results/startup-*.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = 200
MODULES_SNIPPET = "import sys; print(' '.join(sorted(sys.modules)))"


def bare_env(root: Path, with_package: bool) -> Path:
    """Make a virtualenv with nothing in it (optionally liger_autopatch); return its python."""
    venv.create(root, with_pip=False, symlinks=True)
    python = root / "bin" / "python"
    if with_package:
        site_packages = Path(
            subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
        )
        shutil.copytree(REPO / "liger_autopatch", site_packages / "liger_autopatch", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("liger_autopatch.pth", "liger_autopatch.start"):
            shutil.copy(REPO / name, site_packages / name)
        # pip compiles a wheel's modules at install time; do the same.
        subprocess.check_call([python, "-m", "compileall", "-q", site_packages / "liger_autopatch"])
    return python


def _time_pass(python: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - start) * 1e3


def modules_at_start(python: Path, env: dict[str, str] | None = None) -> set[str]:
    """The modules imported once the interpreter has started."""
    output = subprocess.check_output([python, "-c", MODULES_SNIPPET], env=env, text=True)
    return set(output.split())


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LIGER_DISABLE", "PYTHONPATH")}
    disabled_env = {**env, "LIGER_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        plain = bare_env(Path(tmp) / "plain", with_package=False)
        with_pkg = bare_env(Path(tmp) / "with", with_package=True)
        variants = {"without the package": (plain, env), "with liger_autopatch.pth": (with_pkg, env),
                    "with it, LIGER_DISABLE=1": (with_pkg, disabled_env)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, (python, run_env) in variants.items():  # warm the page cache
            _time_pass(python, run_env)
        for _ in range(RUNS):
            for name, (python, run_env) in variants.items():
                times[name].append(_time_pass(python, run_env))
        extra_modules = sorted(modules_at_start(with_pkg, env) - modules_at_start(plain, env))
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    baseline = medians["without the package"]
    print(f"python -c pass, median of {RUNS} runs each, interleaved ({platform.python_version()}, {platform.machine()})")
    print(f"  {'variant':<28} {'median ms':>10} {'added ms':>9}")
    for name, median in medians.items():
        print(f"  {name:<28} {median:>10.2f} {median - baseline:>9.2f}")
    print("modules added at start:", ", ".join(extra_modules) or "none")
    result = {
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "runs": RUNS,
        "median_ms": medians,
        "added_ms": {name: median - baseline for name, median in medians.items()},
        "extra_modules": extra_modules,
    }
    out = REPO / "bench" / "results" / f"startup-{platform.node() or 'host'}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("saved", out.relative_to(REPO))


if __name__ == "__main__":
    sys.exit(main())
