"""The record of every patch target, and the only code that sets or restores attributes.

Target families (:mod:`liger_autopatch.targets`) never assign to a transformers module
themselves: they stage replacements on a :class:`TargetPatch` through :func:`apply_target`,
which applies them all or none, logs the outcome and remembers the originals so that
:func:`unpatch` can put them back. Standard library only, so that ``status`` works even
when torch, triton or wrapt cannot be imported.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from liger_autopatch import _bootstrap
from liger_autopatch.targets import FAMILIES

logger = logging.getLogger("liger_autopatch")
logger.addHandler(logging.NullHandler())

STATES = ("patched", "pending", "skipped", "failed", "disabled")

# Attribute that every replacement object carries, pointing at the object it replaces.
ORIGINAL_ATTR = "__liger_autopatch_original__"

_lock = threading.RLock()


@dataclass(frozen=True)
class TargetStatus:
    """One row of :func:`status`: a patch target and what happened to it."""

    target: str
    family: str
    state: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        """The row as a plain dict (the shape of ``status --json``)."""
        return asdict(self)


@dataclass
class _Change:
    owner: Any  # a module (attribute change) or a mapping (item change)
    key: str
    original: Any
    replacement: Any
    is_item: bool

    def current(self) -> Any:
        if self.is_item:
            return self.owner.get(self.key)
        return getattr(self.owner, self.key, None)

    def write(self, value: Any) -> None:
        if self.is_item:
            self.owner[self.key] = value
        else:
            setattr(self.owner, self.key, value)


_records: dict[str, TargetStatus] = {}
_applied: list[_Change] = []


class Skip(Exception):
    """Raised through :meth:`TargetPatch.skip`: the target is left as it is, with a reason."""


def is_ours(obj: Any) -> bool:
    """Whether ``obj`` is a replacement installed by liger_autopatch."""
    return hasattr(obj, ORIGINAL_ATTR)


def original_of(obj: Any) -> Any:
    """The object that ``obj`` replaces (``obj`` itself if it is not ours)."""
    return getattr(obj, ORIGINAL_ATTR, obj)


class TargetPatch:
    """The replacements staged for one target; applied by :func:`apply_target` on success."""

    def __init__(self) -> None:
        self.changes: list[_Change] = []

    def set_attr(self, owner: Any, name: str, replacement: Any) -> None:
        """Stage ``owner.name = replacement``; a no-op where the current value is ours."""
        self._stage(_Change(owner, name, getattr(owner, name), replacement, is_item=False))

    def set_item(self, mapping: MutableMapping[str, Any], key: str, replacement: Any) -> None:
        """Stage ``mapping[key] = replacement``; a no-op where the current value is ours."""
        self._stage(_Change(mapping, key, mapping[key], replacement, is_item=True))

    def skip(self, reason: str) -> NoReturn:
        """Leave the target untouched and record why."""
        raise Skip(reason)

    def _stage(self, change: _Change) -> None:
        if not is_ours(change.original):
            self.changes.append(change)


def _record(target: str, family: str, state: str, detail: str = "") -> None:
    _records[target] = TargetStatus(target, family, state, detail)


def declare(target: str, family: str, detail: str) -> None:
    """List a target as pending (or disabled) before its module is imported."""
    with _lock:
        if target in _records:
            return
        reason = disabled_reason(target, family)
        _record(target, family, "disabled" if reason else "pending", reason or detail)


def disabled_reason(target: str, family: str) -> str | None:
    """Why this target stays as transformers has it, or None where it may be patched.

    ``LIGER_DISABLE`` naming everything, the family, the target or its short name.
    """
    short_name = target.rsplit(".", 1)[-1].lower()
    if _bootstrap.disabled_names() & {"all", family.lower(), target.lower(), short_name}:
        return "LIGER_DISABLE"
    return None


def apply_target(target: str, family: str, stage: Callable[[TargetPatch], None]) -> None:
    """Run ``stage`` to collect the replacements of one target; apply all of them or none.

    When ``stage`` returns, the staged changes are applied and ``patched`` is recorded.
    :meth:`TargetPatch.skip` records ``skipped``; any other exception records ``failed``
    and is logged, never raised: the original stays in place either way.
    """
    with _lock:
        reason = disabled_reason(target, family)
        if reason:
            _record(target, family, "disabled", reason)
            return
        patch = TargetPatch()
        try:
            stage(patch)
        except Skip as skip:
            _record(target, family, "skipped", str(skip))
            return
        except Exception as exc:
            record_failure(target, family, exc)
            return
        for change in patch.changes:
            change.write(change.replacement)
            _applied.append(change)
        previous = _records.get(target)
        _record(target, family, "patched")
        if patch.changes and (previous is None or previous.state != "patched"):
            logger.info("liger_autopatch: patched %s", target)


def record_failure(target: str, family: str, exc: BaseException) -> None:
    """Record ``failed`` for a target; the original stays in place."""
    with _lock:
        _record(target, family, "failed", f"{type(exc).__name__}: {exc}")
    logger.warning("liger_autopatch: %s failed, the original code runs instead: %s", target, exc)


def unpatch() -> None:
    """Put every original back where the current value is still ours; stop patching.

    Removes the import finder, so nothing is patched again until :func:`install`.
    A value that somebody else replaced after us is left alone. transformers modules
    that imported a replacement by name after we patched (``from .loss.loss_utils import
    ForCausalLMLoss`` in ``transformers.trainer``) get the original back too, so identity
    checks against ``LOSS_MAPPING`` keep holding.
    """
    with _lock:
        finder = _bootstrap.installed_finder()
        while finder is not None:
            sys.meta_path.remove(finder)
            finder = _bootstrap.installed_finder()
        originals = {id(change.replacement): change.original for change in _applied}
        for change in reversed(_applied):
            if change.current() is change.replacement:
                change.write(change.original)
        _applied.clear()
        for name, module in list(sys.modules.items()):
            if name.startswith("transformers.") and module is not None:
                namespace = vars(module)
                for attr, value in list(namespace.items()):
                    if id(value) in originals and is_ours(value):
                        namespace[attr] = originals[id(value)]
        for target, row in list(_records.items()):
            if row.state == "patched":
                _record(target, row.family, "disabled", "unpatch() restored the original")


def status() -> list[TargetStatus]:
    """Every target this interpreter knows of, with its state and a reason where useful.

    States: ``patched``, ``pending`` (its module is not imported yet), ``skipped`` (left
    as transformers has it, with the reason), ``failed`` (an error inside
    liger_autopatch; the original stays) and ``disabled`` (by ``LIGER_DISABLE`` or
    :func:`unpatch`). Failures of the bootstrap itself appear as target ``bootstrap``.
    """
    imported = [name for name, module in list(sys.modules.items()) if module is not None]
    for family in FAMILIES:
        for target in family.declared:
            declare(target, family.name, f"waiting for transformers to import {family.summary}")
            with _lock:
                # Still pending though its module is imported: the import hook failed.
                if _records[target].state == "pending" and any(map(family.matches, imported)):
                    _record(target, family.name, "failed", "imported but not patched: see the bootstrap errors")
    with _lock:
        rows = list(_records.values())
    rows += [TargetStatus("bootstrap", "bootstrap", "failed", error) for error in _bootstrap.errors]
    return rows
