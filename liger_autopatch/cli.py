"""``python -m liger_autopatch``: ``status`` shows what is patched and why; ``demo`` shows it working."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import site
import sys
import sysconfig
from typing import Any

from liger_autopatch import _bootstrap, _registry

# Oldest and newest transformers releases that CI runs the parity tests against.
TESTED_TRANSFORMERS = ("4.45.2", "5.25.0")
# Oldest transformers with transformers.loss.loss_utils; older ones get only the CrossEntropyLoss
# globals of their model modules replaced.
LOSS_UTILS_SINCE = "4.46.0"
# Modules that `status --probe` imports to show the real outcome of patching.
PROBE_MODULES = (
    _bootstrap.LOSS_MODULE,
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.bert.modeling_bert",
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def _startup_files() -> list[str]:
    """The ``liger_autopatch.pth``/``.start`` files in the site directories of this interpreter."""
    directories = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    if site.ENABLE_USER_SITE:
        directories.add(site.getusersitepackages())
    found = []
    for directory in sorted(directories):
        for name in ("liger_autopatch.pth", "liger_autopatch.start"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                found.append(path)
    return found


def _support(versions: dict[str, str | None]) -> dict[str, Any]:
    transformers_version = versions["transformers"]
    notes = []
    supported = True
    if transformers_version is None:
        supported = False
        notes.append("transformers is not installed: nothing to patch")
    else:
        oldest, newest = TESTED_TRANSFORMERS
        current = _version_tuple(transformers_version)
        if current < _version_tuple(oldest):
            supported = False
            notes.append(f"transformers older than {oldest} is not tested")
        elif current > _version_tuple(newest):
            notes.append(f"transformers newer than {newest} is not tested; patches are gated per target")
        if current < _version_tuple(LOSS_UTILS_SINCE):
            notes.append("no transformers.loss.loss_utils: only model-module CrossEntropyLoss is patched")
    for required in ("torch", "wrapt"):
        if versions[required] is None:
            supported = False
            notes.append(f"{required} is not installed")
    if versions["wrapt"] is not None:
        try:
            import wrapt  # noqa: F401  (installed is not enough: the import hooks need it)
        except Exception as exc:
            supported = False
            notes.append(f"wrapt cannot be imported: {exc}")
    return {
        "supported": supported,
        "tested_transformers": f"{TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}",
        "notes": notes,
    }


def _accelerator() -> dict[str, Any]:
    """The GPU, and whether the Triton kernels can run here (the fallback runs otherwise)."""
    try:
        import torch
    except Exception as exc:
        return {"gpu": None, "triton_path": False, "reason": f"torch cannot be imported: {exc}"}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return {"gpu": gpu, "triton_path": False, "reason": f"triton cannot be imported: {exc}"}
    if gpu is not None:
        from liger_autopatch.ops.cross_entropy import unusable_reason

        reason = unusable_reason(torch.device("cuda", torch.cuda.current_device()))
        if reason is not None:
            return {"gpu": gpu, "triton_path": False, "reason": f"{reason}: transformers' own loss code runs"}
        return {"gpu": gpu, "triton_path": True, "reason": "CUDA tensors use the Triton kernels"}
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"gpu": None, "triton_path": True, "reason": "TRITON_INTERPRET=1: CPU tensors run the kernels in Triton's interpreter"}
    return {"gpu": None, "triton_path": False, "reason": "no CUDA GPU: transformers' own loss code runs"}


def collect_status(probe: bool) -> dict[str, Any]:
    """Everything ``status`` reports, as a JSON-ready dict."""
    probe_errors = {}
    if probe:
        for name in PROBE_MODULES:
            try:
                if name == _bootstrap.LOSS_MODULE and importlib.util.find_spec("transformers.loss") is None:
                    continue  # transformers before 4.46: the model modules carry the loss
                importlib.import_module(name)
            except Exception as exc:
                probe_errors[name] = f"{type(exc).__name__}: {exc}"
    versions = {
        "python": sys.version.split()[0],
        "liger_autopatch": _version("liger-autopatch"),
        **{name: _version(name) for name in ("torch", "triton", "transformers", "wrapt")},
    }
    disabled = sorted(_bootstrap.disabled_names())
    finder = _bootstrap.installed_finder() is not None
    return {
        "enabled": finder and "all" not in disabled,
        "disabled": disabled,
        "bootstrap": {
            "ran": _bootstrap.booted,
            "finder_installed": finder,
            "startup_files": _startup_files(),
            "errors": list(_bootstrap.errors),
        },
        "versions": versions,
        "support": _support(versions),
        "accelerator": _accelerator(),
        "targets": [row.as_dict() for row in _registry.status() if row.family != "bootstrap"],
        "probe_errors": probe_errors,
    }


def _print_report(report: dict[str, Any]) -> None:
    boot = report["bootstrap"]
    print("liger_autopatch", report["versions"]["liger_autopatch"] or "(not installed)")
    print("  versions:", ", ".join(f"{k} {v or '-'}" for k, v in report["versions"].items() if k != "liger_autopatch"))
    support = report["support"]
    print(f"  supported: {'yes' if support['supported'] else 'NO'} (tested: transformers {support['tested_transformers']})")
    for note in support["notes"]:
        print("    -", note)
    accel = report["accelerator"]
    print(f"  GPU: {accel['gpu'] or 'none'}; Triton path: {'yes' if accel['triton_path'] else 'no'} ({accel['reason']})")
    print("  start-up files:", ", ".join(boot["startup_files"]) or "none found")
    print(f"  bootstrap in this interpreter: {'ran' if boot['ran'] else 'did NOT run'}; "
          f"import finder {'installed' if boot['finder_installed'] else 'not installed'}")
    for error in boot["errors"]:
        print("    error:", error)
    disabled = report["disabled"]
    print("  LIGER_DISABLE:", ", ".join(disabled) if disabled else "(not set)")
    print()
    rows = report["targets"]
    width = max([len(row["target"]) for row in rows] + [6])
    print(f"  {'target':<{width}}  {'state':<8}  detail")
    for row in rows:
        print(f"  {row['target']:<{width}}  {row['state']:<8}  {row['detail']}")
    if not rows:
        print("  (no targets: the bootstrap is not active)")
    for name, error in report["probe_errors"].items():
        print(f"  probe: importing {name} failed: {error}")


def _status(args: argparse.Namespace) -> int:
    report = collect_status(args.probe)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if not report["bootstrap"]["ran"]:
        print(
            "liger_autopatch is installed but its start-up hook did not run in this interpreter "
            "(no liger_autopatch.pth processed, or python -S). Call liger_autopatch.install() "
            "or `import liger_autopatch.auto` in your program.",
            file=sys.stderr,
        )
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from liger_autopatch import demo

    return demo.run()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m liger_autopatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="what is patched in this environment, and why")
    status.add_argument("--probe", action="store_true", help="import the target modules first and show the real outcome")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(handler=_status)
    demo = commands.add_parser("demo", help="train a tiny model patched and unpatched, side by side")
    demo.set_defaults(handler=_demo)
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
        sys.stdout.flush()  # a buffered stdout fails here, not at exit, if the reader left
        return status
    except BrokenPipeError:
        # The reader went away (`status | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
