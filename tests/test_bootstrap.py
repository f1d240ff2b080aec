"""The install-and-forget machinery: start-up hook, import finder, hooks, opt-out, status.

Each test runs a fresh interpreter of this environment, where the package is installed
(CI installs it with `pip install .`), so the `.pth` file does what it does for users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._subprocess import run_python

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from startup import bare_env, modules_at_start  # noqa: E402

# Printed by the child snippets below: is the loss function liger_autopatch's replacement?
REPORT_LOSS = """
import json, sys
import transformers.loss.loss_utils as lu
from liger_autopatch import _registry
print(json.dumps({
    "patched": _registry.is_ours(lu.fixed_cross_entropy),
    "finder": any(type(f).__name__ == "AutopatchFinder" for f in sys.meta_path),
    "status": {row.target: row.state for row in _registry.status()},
}))
"""


def test_startup_files_installed_next_to_the_package():
    code = """
    import json, pathlib, liger_autopatch
    site_packages = pathlib.Path(liger_autopatch.__file__).resolve().parent.parent
    print(json.dumps({
        "pth": (site_packages / "liger_autopatch.pth").read_text().strip(),
        "start": (site_packages / "liger_autopatch.start").read_text().strip(),
    }))
    """
    assert run_python(code) == {
        "pth": 'import sys; exec("try:\\n from liger_autopatch._bootstrap import boot\\nexcept ImportError:\\n'
        ' pass\\nelse:\\n boot()")',
        "start": "liger_autopatch._bootstrap:boot",
    }


def test_a_leftover_pth_without_the_package_stays_quiet(tmp_path):
    # An editable install whose checkout moved, a half-removed package: no traceback in
    # every process. (-S: this environment's own site-packages, which has the package, is
    # not on the path.)
    (tmp_path / "liger_autopatch.pth").write_text((REPO / "liger_autopatch.pth").read_text())
    code = f"import site, sys; site.addsitedir({str(tmp_path)!r}); print('liger_autopatch' in sys.modules)"
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "False\n", "")


def test_install_skips_modules_whose_import_is_blocked():
    # None in sys.modules blocks an import; install() must still patch the rest.
    code = """
    import json, os, sys
    import transformers.loss.loss_utils as lu
    sys.modules["transformers.models.fake.modeling_fake"] = None
    del os.environ["LIGER_DISABLE"]
    import liger_autopatch
    liger_autopatch.install()
    print(json.dumps(hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__")))
    """
    assert run_python(code, env={"LIGER_DISABLE": "1"}) is True


def test_a_program_that_never_imports_us_is_patched():
    code = """
    import json, sys, torch
    cross_entropy, loss_class, loss_forward = torch.nn.functional.cross_entropy, torch.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss.forward
    import transformers.loss.loss_utils as lu
    print(json.dumps({
        "ours": hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__"),
        "torch_untouched": torch.nn.functional.cross_entropy is cross_entropy
            and torch.nn.CrossEntropyLoss is loss_class and torch.nn.CrossEntropyLoss.forward is loss_forward,
    }))
    """
    assert run_python(code) == {"ours": True, "torch_untouched": True}


@pytest.mark.parametrize("value", ["1", "true", "YES", "on", "all"])
def test_liger_disable_switches_everything_off(value):
    code = """
    import json, sys
    import transformers.loss.loss_utils as lu
    import transformers.models.llama.modeling_llama
    print(json.dumps({
        "finder": any(type(f).__name__ == "AutopatchFinder" for f in sys.meta_path),
        "patched": hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__"),
        "ours_loaded": sorted(m for m in sys.modules if m.startswith("liger_autopatch")),
        "wrapt_loaded": "wrapt" in sys.modules,
    }))
    """
    assert run_python(code, env={"LIGER_DISABLE": value}) == {
        "finder": False,
        "patched": False,
        "ours_loaded": ["liger_autopatch", "liger_autopatch._bootstrap"],
        "wrapt_loaded": False,
    }


def test_liger_disable_by_family_and_by_target():
    by_family = run_python(REPORT_LOSS, env={"LIGER_DISABLE": "loss"})
    assert by_family["finder"] and not by_family["patched"]
    assert by_family["status"]["loss_utils.fixed_cross_entropy"] == "disabled"
    by_target = run_python(REPORT_LOSS, env={"LIGER_DISABLE": "ForCausalLMLoss, something_else"})
    assert by_target["patched"]
    assert by_target["status"]["loss_utils.ForCausalLMLoss"] == "disabled"


def test_no_module_imported_at_start_besides_the_bootstrap(tmp_path):
    plain = bare_env(tmp_path / "plain", with_package=False)
    with_package = bare_env(tmp_path / "with", with_package=True)
    env = {"PATH": "/usr/bin:/bin"}
    added = modules_at_start(with_package, env) - modules_at_start(plain, env)
    assert added == {"liger_autopatch", "liger_autopatch._bootstrap"}
    disabled = modules_at_start(with_package, {**env, "LIGER_DISABLE": "1"}) - modules_at_start(plain, env)
    assert disabled == {"liger_autopatch", "liger_autopatch._bootstrap"}


def test_install_after_transformers_was_imported_patches_at_once():
    code = """
    import json, os
    import transformers.loss.loss_utils as lu
    before = hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__")
    del os.environ["LIGER_DISABLE"]
    import liger_autopatch
    liger_autopatch.install()
    print(json.dumps([before, hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__")]))
    """
    assert run_python(code, env={"LIGER_DISABLE": "1"}) == [False, True]


def test_install_twice_patches_once_and_unpatch_restores():
    code = """
    import json, logging, io
    stream = io.StringIO()
    logging.getLogger("liger_autopatch").addHandler(logging.StreamHandler(stream))
    logging.getLogger("liger_autopatch").setLevel(logging.INFO)
    import liger_autopatch
    import transformers.loss.loss_utils as lu
    replacement = lu.fixed_cross_entropy
    original = replacement.__liger_autopatch_original__
    causal = lu.ForCausalLMLoss
    liger_autopatch.install()
    liger_autopatch.install()
    same_after_install = lu.fixed_cross_entropy is replacement and lu.ForCausalLMLoss is causal
    liger_autopatch.unpatch()
    restored = lu.fixed_cross_entropy is original and lu.LOSS_MAPPING["ForCausalLM"] is lu.ForCausalLMLoss
    states = {row.target: row.state for row in liger_autopatch.status()}
    print(json.dumps({
        "same_after_install": same_after_install,
        "restored": restored,
        "unhooked_state": states["loss_utils.fixed_cross_entropy"],
        "patched_log_lines": stream.getvalue().count("patched loss_utils.fixed_cross_entropy"),
    }))
    """
    assert run_python(code) == {
        "same_after_install": True,
        "restored": True,
        "unhooked_state": "disabled",
        "patched_log_lines": 1,
    }


def test_unpatch_leaves_a_value_somebody_else_set():
    code = """
    import json
    import liger_autopatch
    import transformers.loss.loss_utils as lu
    def theirs(*args, **kwargs): pass
    lu.fixed_cross_entropy = theirs
    liger_autopatch.unpatch()
    print(json.dumps(lu.fixed_cross_entropy is theirs))
    """
    assert run_python(code) is True


def test_reload_patches_again():
    code = """
    import importlib, json
    import transformers.loss.loss_utils as lu
    first = lu.fixed_cross_entropy
    importlib.reload(lu)
    print(json.dumps({
        "patched": hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__"),
        "fresh": lu.fixed_cross_entropy is not first,
        "loader_restored": type(lu.__loader__).__name__ == "SourceFileLoader",
    }))
    """
    assert run_python(code) == {"patched": True, "fresh": True, "loader_restored": True}


def test_lazy_attribute_and_threads_patch_model_modules():
    code = """
    import json, sys, threading
    import transformers
    transformers.GPT2LMHeadModel  # transformers' lazy module imports modeling_gpt2 here
    names = ["bert", "roberta", "electra", "gpt_neo", "opt", "bloom"]
    threads = [threading.Thread(target=__import__, args=(f"transformers.models.{n}.modeling_{n}",)) for n in names]
    [t.start() for t in threads]
    [t.join() for t in threads]
    import liger_autopatch
    states = {row.target: row.state for row in liger_autopatch.status()}
    print(json.dumps({n: states.get(f"modeling_{n}.CrossEntropyLoss") for n in ["gpt2", *names]}))
    """
    states = run_python(code)
    assert set(states.values()) == {"patched"}, states


def test_a_failing_patch_leaves_the_original_and_is_recorded():
    code = """
    import json
    import liger_autopatch.targets.loss_functions as family
    def broken(module):
        raise RuntimeError("boom")
    family.apply = broken
    import transformers.loss.loss_utils as lu
    import liger_autopatch
    states = {row.target: (row.state, row.detail) for row in liger_autopatch.status()}
    print(json.dumps({
        "original": not hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__"),
        "state": states["loss_utils.fixed_cross_entropy"],
    }))
    """
    assert run_python(code) == {"original": True, "state": ["failed", "RuntimeError: boom"]}


def test_missing_wrapt_never_breaks_import(tmp_path):
    shadow = tmp_path / "wrapt"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('wrapt is broken in this environment')\n")
    code = """
    import json
    import transformers.loss.loss_utils as lu
    from liger_autopatch import _bootstrap
    print(json.dumps({
        "original": not hasattr(lu.fixed_cross_entropy, "__liger_autopatch_original__"),
        "errors": _bootstrap.errors,
    }))
    """
    report = run_python(code, env={"PYTHONPATH": str(tmp_path)})
    assert report["original"]
    cli = subprocess.run(
        [sys.executable, "-m", "liger_autopatch", "status"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=Path(sys.executable).parent,
    )
    assert "wrapt cannot be imported" in cli.stdout and "supported: NO" in cli.stdout, cli.stdout
    assert any("wrapt is broken" in error for error in report["errors"]), report
    # status says the imported targets failed, not that they wait for their module.
    status_code = """
    import json
    import transformers.loss.loss_utils
    from liger_autopatch import _registry
    print(json.dumps({row.target: row.state for row in _registry.status()}))
    """
    states = run_python(status_code, env={"PYTHONPATH": str(tmp_path)})
    assert states["loss_utils.ForCausalLMLoss"] == "failed", states


def test_unsupported_transformers_is_skipped_with_a_reason(tmp_path):
    # A transformers whose loss_utils has none of the functions we know: nothing patched.
    package = tmp_path / "transformers"
    (package / "loss").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '99.0.0'\n")
    (package / "loss" / "__init__.py").write_text("")
    (package / "loss" / "loss_utils.py").write_text("def some_other_loss(x):\n    return x\n")
    code = """
    import json
    import transformers.loss.loss_utils as lu
    import liger_autopatch
    rows = [row for row in liger_autopatch.status() if row.family == "loss"]
    print(json.dumps({"untouched": lu.some_other_loss(3) == 3, "states": sorted({row.state for row in rows})}))
    """
    report = run_python(code, env={"PYTHONPATH": str(tmp_path)})
    assert report == {"untouched": True, "states": ["skipped"]}


def test_status_cli_json_and_exit_codes():
    result = subprocess.run(
        [sys.executable, "-m", "liger_autopatch", "status", "--probe", "--json"],
        capture_output=True, text=True, cwd=Path(sys.executable).parent,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"enabled", "bootstrap", "versions", "targets"} <= set(report)
    assert report["enabled"] and report["bootstrap"]["ran"]
    states = {row["target"]: row["state"] for row in report["targets"]}
    assert states["loss_utils.fixed_cross_entropy"] == "patched"
    assert states["modeling_gpt2.CrossEntropyLoss"] == "patched"
    assert all({"target", "state", "detail"} <= set(row) for row in report["targets"])


def test_status_cli_stops_quietly_when_its_reader_goes_away():
    """`status | head`: the reader closes the pipe before status writes; no traceback."""
    # A buffered stdout (PYTHONUNBUFFERED unset) fails at the flush, not at the print.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [sys.executable, "-m", "liger_autopatch", "status", "--probe"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(sys.executable).parent, env=env,
    )
    child.stdout.close()  # before the child has started: its first write finds no reader
    stderr = child.stderr.read()
    assert child.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_status_cli_says_when_the_bootstrap_did_not_run(tmp_path):
    # `python -S` skips site-packages and its .pth files: point at the package by hand.
    import liger_autopatch

    package_parent = str(Path(liger_autopatch.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {package_parent!r}); "
         "from liger_autopatch.cli import main; sys.exit(main(['status']))"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "did not run" in result.stderr


def test_unpatch_restores_names_other_modules_imported_after_patching():
    code = """
    import json
    import transformers.loss.loss_utils as lu
    import transformers.trainer as trainer  # binds ForCausalLMLoss by name, after we patched
    import liger_autopatch
    liger_autopatch.unpatch()
    print(json.dumps(trainer.ForCausalLMLoss is lu.ForCausalLMLoss is lu.LOSS_MAPPING["ForCausalLM"]))
    """
    assert run_python(code) is True


@pytest.mark.parametrize("build", ["build_wheel", "build_editable"])
def test_wheels_carry_the_startup_files_so_uninstall_removes_them(build, tmp_path):
    # pip installs and uninstalls exactly the files a wheel's RECORD lists: the start-up
    # files must be there, at the root of site-packages, for `pip install .` and `-e .`.
    hatchling_build = pytest.importorskip("hatchling.build")
    import os
    import zipfile

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        wheel = tmp_path / getattr(hatchling_build, build)(str(tmp_path))
    finally:
        os.chdir(cwd)
    record = next(name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".dist-info/RECORD"))
    listed = {line.split(",")[0] for line in zipfile.ZipFile(wheel).read(record).decode().splitlines()}
    assert {"liger_autopatch.pth", "liger_autopatch.start"} <= listed


def test_fused_linear_family_is_on_unless_liger_disable_names_it():
    code = """
    import json
    import transformers.models.llama.modeling_llama
    import liger_autopatch
    rows = {row.target: [row.state, row.detail] for row in liger_autopatch.status()}
    print(json.dumps(rows["flce.LlamaForCausalLM"]))
    """
    assert run_python(code)[0] == "patched"
    assert run_python(code, env={"LIGER_DISABLE": "flce"}) == ["disabled", "LIGER_DISABLE"]
