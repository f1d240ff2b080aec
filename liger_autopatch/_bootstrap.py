"""What runs at interpreter start: ``liger_autopatch.pth`` and ``liger_autopatch.start`` call :func:`boot`.

This module runs in every Python process of the environment, so it follows two rules:

* It imports nothing that a bare ``python -c pass`` has not imported already (``os``,
  ``sys`` and ``_thread`` are always there). wrapt, torch and transformers are imported
  only once transformers itself is being imported.
* It never raises. A failure is recorded in :data:`errors`, shown by
  ``python -m liger_autopatch status`` and printed when ``LIGER_AUTOPATCH_DEBUG=1``.

The finder installed here is a filter: for every import it compares the module name
with the patch targets and steps aside unless it is one. For a target it hands over to
:mod:`liger_autopatch._hooks`, which registers the wrapt post-import hook.
"""

import _thread
import os
import sys

LOSS_MODULE = "transformers.loss.loss_utils"
MODELS_PACKAGE = "transformers.models."

# Values of LIGER_DISABLE that switch everything off; anything else is a list of names.
_ALL = frozenset({"1", "true", "yes", "on", "all"})

# Why bootstrap steps failed, for `status`. Never raised into the host program.
errors: list[str] = []
# Set once boot() has run in this interpreter (by the .pth/.start file or install()).
booted = False


def is_target_module(name: str) -> bool:
    """Whether ``name`` is a module whose loss code we may patch.

    ``transformers.loss.loss_utils`` and every ``transformers.models.<model>.modeling_<x>``.
    """
    if name == LOSS_MODULE:
        return True
    if not name.startswith(MODELS_PACKAGE):
        return False
    parts = name.split(".")
    return len(parts) == 4 and parts[3].startswith("modeling_")


def disabled_names() -> frozenset[str]:
    """The lower-cased names listed in ``LIGER_DISABLE``; ``{"all"}`` when everything is off."""
    names = {part.strip().lower() for part in os.environ.get("LIGER_DISABLE", "").split(",")}
    names -= {"", "0", "false", "no", "off"}
    return frozenset({"all"}) if names & _ALL else frozenset(names)


def record_error(where: str, exc: BaseException) -> None:
    """Remember a failure inside liger_autopatch; print it only when debugging is on."""
    errors.append(f"{where}: {type(exc).__name__}: {exc}")
    if os.environ.get("LIGER_AUTOPATCH_DEBUG", "").strip().lower() in _ALL:
        import traceback

        print(f"liger_autopatch: {where} failed", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)


class AutopatchFinder:
    """A meta-path finder that notices the import of a patch target and nothing else.

    It never loads a module itself: for a target it asks :mod:`liger_autopatch._hooks`
    for the spec, which comes back with a loader that applies the patches once the
    module body has run. Re-entrant lookups of the same name from the same thread (the
    hook machinery looks the module up again) are answered with ``None``.
    """

    def __init__(self) -> None:
        self._busy: set[tuple[str, int]] = set()

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if not fullname.startswith("transformers.") or not is_target_module(fullname):
            return None
        key = (fullname, _thread.get_ident())
        if key in self._busy:
            return None
        self._busy.add(key)
        try:
            from liger_autopatch import _hooks

            return _hooks.find_target_spec(fullname, path, target)
        except Exception as exc:  # never break the host's import
            record_error(f"import hook for {fullname}", exc)
            return None
        finally:
            self._busy.discard(key)


def installed_finder() -> "AutopatchFinder | None":
    """Our finder if it is in ``sys.meta_path``."""
    for finder in sys.meta_path:
        if isinstance(finder, AutopatchFinder):
            return finder
    return None


def install() -> None:
    """Start patching in this interpreter: install the finder, patch what is already imported.

    Idempotent. This is what the ``.pth``/``.start`` files run; call it yourself where
    those files are not processed (``python -S``, ``PYTHONPATH`` or ``pip install
    --target`` layouts, zipapps), or ``import liger_autopatch.auto``. Does nothing when
    ``LIGER_DISABLE`` switches everything off.
    """
    global booted
    booted = True
    if "all" in disabled_names():
        return
    if installed_finder() is None:
        sys.meta_path.insert(0, AutopatchFinder())
    # None in sys.modules blocks a module's import: nothing to patch there.
    already_imported = [
        module for name, module in list(sys.modules.items()) if is_target_module(name) and module is not None
    ]
    if already_imported:
        from liger_autopatch import _hooks

        for module in already_imported:
            _hooks.patch_module(module)


def boot() -> None:
    """Entry point of ``liger_autopatch.pth`` and ``liger_autopatch.start``; never raises."""
    try:
        install()
    except Exception as exc:
        record_error("bootstrap", exc)
