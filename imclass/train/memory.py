"""Keep freed memory inside the process while training on CPU (Linux, glibc).

A training step allocates and frees the same few hundred megabytes of activations again and
again. glibc's malloc serves blocks that large with fresh ``mmap`` pages and gives them back
on ``free``, so the kernel zero-fills every page again at each step: on the 2-core CPU in
bench/RESULTS.md that page-faulting took about a quarter of a FastNet step (110 -> 153 img/s
once freed memory is kept; bench/fast.py). The price: the process keeps its peak memory.
"""
from __future__ import annotations

import os

from imclass.data.malloc import M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt

__all__ = ["retain_freed_memory"]

_active = False


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to serve big blocks from its heap and never trim it; returns whether active.

    Process-wide and not undone (the same as starting Python with ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...``). A no-op returning ``False`` off Linux/glibc or when the
    environment sets ``IMCLASS_RETAIN_MEMORY=0``. ``Classifier.fit`` and ``Classifier.predict*``/``evaluate``
    call it on a CPU, and so does ``imclass.transfer.extract_features``.
    """
    global _active
    if _active:
        return True
    setting = mallopt()
    if os.environ.get("IMCLASS_RETAIN_MEMORY", "1") == "0" or setting is None:
        return False
    _active = bool(setting(M_MMAP_MAX, 0)) and bool(setting(M_TRIM_THRESHOLD, 2**31 - 1))
    return _active
