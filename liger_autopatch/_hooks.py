"""From "a target module is being imported" to "its patches are applied".

Imported by the bootstrap finder the first time transformers looks up a target module,
never at interpreter start. Three ways in:

* a first import: :func:`find_target_spec` registers a wrapt post-import hook for the
  name, then looks the module up again; wrapt's finder, now in ``sys.meta_path``, answers
  with a loader that runs the hook after the module body. (Registering is not enough on
  its own: the import system has already walked past wrapt's finder for this lookup.)
* ``importlib.reload``: wrapt fires a hook once per name, so the reloaded module gets a
  loader of ours that patches again after the body ran.
* ``install()`` after the module was imported: :func:`patch_module` at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from liger_autopatch import _bootstrap, _registry
from liger_autopatch.targets import families_for


def find_target_spec(fullname: str, path: Any, target: ModuleType | None) -> Any:
    """The spec of a target module, wired so that :func:`patch_module` runs after its body."""
    if target is not None:
        return _reload_spec(fullname, path, target)
    import wrapt  # deferred: about 50 ms, paid only by processes that import transformers

    wrapt.register_post_import_hook(patch_module, fullname)
    return importlib.util.find_spec(fullname)


def patch_module(module: ModuleType) -> None:
    """Apply every family that targets ``module``; never raises.

    Does nothing once :func:`liger_autopatch.unpatch` removed the finder (a hook
    registered before that may still fire).
    """
    if _bootstrap.installed_finder() is None:
        return
    for family in families_for(module.__name__):
        try:
            implementation = importlib.import_module(family.implementation)
            implementation.apply(module)
        except Exception as exc:
            for target in family.declared or (f"{module.__name__} ({family.name})",):
                _registry.record_failure(target, family.name, exc)


class _PatchAfterReload:
    """Loader for ``importlib.reload`` of a target: the real loader, then the patches."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> None:
        return None  # reload executes into the existing module

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        patch_module(module)


def _reload_spec(fullname: str, path: Any, target: ModuleType) -> Any:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec = find_spec(fullname, path, target)  # our own finder answers None: re-entrant
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchAfterReload(spec.loader)
            return spec
    return None
