"""``import liger_autopatch.auto`` starts patching where ``.pth`` files are not processed.

For ``python -S``, ``PYTHONPATH`` or ``pip install --target`` layouts and zipapps: the
same as calling :func:`liger_autopatch.install`.
"""

from liger_autopatch._bootstrap import boot

boot()
