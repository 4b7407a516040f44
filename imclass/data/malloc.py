"""glibc's ``mallopt``, the one way imclass tunes the C allocator (Linux only): ``train.memory`` keeps freed
memory in a training process, ``data.stream`` bounds each DataLoader worker's heap."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Callable

__all__ = ["M_MMAP_MAX", "M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "mallopt"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameter numbers from glibc's malloc.h


@functools.cache
def mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt(param, value)`` (returns 1 on success), or None off Linux or without glibc (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return None
