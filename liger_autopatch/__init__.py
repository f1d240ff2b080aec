"""liger_autopatch: Triton cross-entropy for Hugging Face transformers, patched in on import.

Installed, it needs no call: ``liger_autopatch.pth`` installs an import finder at
interpreter start, and transformers' loss functions are replaced when transformers
imports them. This package namespace is lazy: importing it costs nothing until one of
the names below is used (it is imported at every interpreter start).

Public API: :func:`install`, :func:`unpatch`, :func:`status`, :func:`cross_entropy`.
"""

__version__ = "0.1.0"
__all__ = ["TargetStatus", "cross_entropy", "install", "status", "unpatch", "__version__"]

_LAZY = {
    "install": "liger_autopatch._bootstrap",
    "unpatch": "liger_autopatch._registry",
    "status": "liger_autopatch._registry",
    "TargetStatus": "liger_autopatch._registry",
    "cross_entropy": "liger_autopatch.ops.cross_entropy",
}


# No `typing` import here: this module is imported at every interpreter start, and
# typing pulls in re, enum and a dozen more modules.
def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'liger_autopatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
