"""Memory of a training process: keep freed memory inside it on CPU (Linux, glibc), and count what a step takes.

A training step allocates and frees the same few hundred megabytes of activations again and
again. glibc's malloc serves blocks that large with fresh ``mmap`` pages and gives them back
on ``free``, so the kernel zero-fills every page again at each step: on the 2-core CPU in
bench/RESULTS.md that page-faulting took about a quarter of a FastNet step (110 -> 153 img/s
once freed memory is kept; bench/fast.py). The price: the process keeps its peak memory, and the
blocks one phase keeps (a training step's) are not always the ones the next needs (an evaluation's
bigger batches), so peaks add up: keras_cnn at 128 px kept 1.88 GB against 1.44 GB without. Under a
memory limit (a container's cgroup, ``RLIMIT_AS``) of less than ``RETAIN_MIN_BYTES`` memory matters
more than that speed, and freed memory goes back.
"""
from __future__ import annotations

import os
import weakref
from typing import Sequence

import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from imclass.data.malloc import M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt
from imclass.data.source import memory_budget

__all__ = ["activation_reserve", "limited_memory", "retain_freed_memory", "step_tensor_bytes"]

RETAIN_MIN_BYTES = 4 << 30
_active = False
_limited: bool | None = None  # limited_memory(), read once (every prediction of a server asks)


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to serve big blocks from its heap and never trim it; returns whether active.

    Process-wide and not undone (the same as starting Python with ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...``). A no-op returning ``False`` off Linux/glibc, when the
    environment sets ``IMCLASS_RETAIN_MEMORY=0``, or under a memory limit that leaves this process less
    than ``RETAIN_MIN_BYTES`` (``limited_memory``). ``Classifier.fit`` and ``Classifier.predict*``/``evaluate``
    call it on a CPU, and so does ``imclass.transfer.extract_features``.
    """
    global _active, _limited
    if _active:
        return True
    setting = mallopt()
    if os.environ.get("IMCLASS_RETAIN_MEMORY", "1") == "0" or setting is None:
        return False
    if _limited is None:
        _limited = limited_memory()
    if _limited:
        return False
    _active = bool(setting(M_MMAP_MAX, 0)) and bool(setting(M_TRIM_THRESHOLD, 2**31 - 1))
    return _active


def limited_memory(minimum: int = RETAIN_MIN_BYTES) -> bool:
    """Whether a memory limit set on this process (a cgroup's, ``RLIMIT_AS``; not the host's free memory,
    which other processes move) leaves it less than ``minimum`` bytes (``imclass.data.source.memory_budget``)."""
    hard = [left for source, left in memory_budget().limits.items() if not source.startswith("host")]
    return bool(hard) and min(hard) < minimum


# --------------------------------------------------------------------------------------------
# how much memory one step of a model takes, counted without allocating it

# Measured against the counted peak (2 cores, glibc, oneDNN): a CPU step's real peak anonymous memory is up
# to 1.4x the tensors it holds (oneDNN's blocked-layout copies and scratch), plus about 100 MB that any first
# step adds (thread pools, kernels' buffers): keras_cnn at 128 px, batch 32: 0.47 GB counted, 0.83 GB measured
# with its 59 MB of weights; AlexNet at 224 px, batch 16: 3.37 GB counted, 5.19 GB measured with 0.84 GB.
ALLOCATOR_FACTOR = 1.5
RUNTIME_BYTES = 128 << 20


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that operators create while they are alive (views are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for declared, result in zip(func._schema.returns, results):
            if isinstance(result, torch.Tensor) and declared.alias_info is None:
                nbytes = result.numel() * result.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(result.untyped_storage(), self._free, nbytes)
        return out


def step_tensor_bytes(model: torch.nn.Module, input_shape: Sequence[int], batch_size: int, *,
                      training: bool = True) -> int | None:
    """Peak bytes of the tensors one step of ``model`` on ``batch_size`` inputs of ``input_shape`` holds beside
    its weights: a training step's forward and backward (the activations kept for backward, the gradients), or
    an inference forward (``training=False``). Counted on the meta device: nothing is allocated or computed,
    the model's own weights are not touched (``torch.func.functional_call`` with meta stand-ins). None when
    the model cannot run there (an operator without a meta kernel)."""
    stand_ins = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad and training)
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty(int(batch_size), *(int(v) for v in input_shape), device="meta")
    counter = _LiveTensorBytes()
    was_training = model.training
    model.train(training)
    try:
        with counter, torch.set_grad_enabled(training):
            out = functional_call(model, stand_ins, (x,))
            if training:
                out.float().sum().backward()
            del out
    except Exception:  # noqa: BLE001 - any operator the meta device lacks: no figure rather than a wrong one
        return None
    finally:
        model.train(was_training)
    return counter.peak


def activation_reserve(model: torch.nn.Module, input_shape: Sequence[int], batch_size: int) -> int | None:
    """Bytes to keep free for ``model``'s activations while it trains on batches of ``batch_size``: the counted
    peak of one training step (``step_tensor_bytes``) x ``ALLOCATOR_FACTOR`` + ``RUNTIME_BYTES``, for
    ``imclass.data.source.model_reserve(model, activations=...)``; None when it cannot be counted."""
    counted = step_tensor_bytes(model, input_shape, batch_size)
    return None if counted is None else int(ALLOCATOR_FACTOR * counted) + RUNTIME_BYTES
