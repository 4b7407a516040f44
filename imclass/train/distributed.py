"""Data-parallel training with ``torch.distributed`` under ``torchrun``: one process per device.

    torchrun --standalone --nproc_per_node=2 -m imclass train cifar10 --model mlp --device cpu

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init_from_env`
joins the process group (gloo on CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``). Then
``Classifier.fit`` notices the group and: wraps the model in ``DistributedDataParallel`` (gradients
averaged), gives each rank its slice of every global batch (``TensorLoader(rank=, world_size=)``),
sums the epoch's loss and correct counts over ranks, validates on a slice per rank and sums those,
and lets only rank 0 write checkpoints, logs and model files (:func:`is_main`). ``batch_size`` stays
the *global* batch: the same seed and batch size give the same run on 1 or N processes (up to
float rounding, for models without dropout or batch statistics).

Outside ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) everything here is a no-op, so the
same code runs in one process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from imclass.data.loader import shard_slice

# Deferred imports (inside functions), for start-up time: torch.nn.parallel
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["DistContext", "all_gather_objects", "barrier", "broadcast_object", "env_rank", "init_from_env",
           "is_distributed", "is_main", "launched", "leave", "rank", "session", "shard", "sum_across", "world_size",
           "wrap_model"]

DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer than this (a rank died or hangs) raises


@dataclass
class DistContext:
    """Where this process stands: its rank among ``world_size``, its ``local_rank`` on the machine,
    the backend and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or the like) as one of several (``WORLD_SIZE > 1``)."""
    return _env_int("WORLD_SIZE", 1) > 1


def env_rank() -> int:
    """The rank ``torchrun`` gave this process (``RANK``; 0 when not launched), whether or not it joined a group."""
    return _env_int("RANK", 0)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside distributed runs)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 outside distributed runs)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, and in a run of one process: only the main process writes files."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected the environment variable {name} to be an integer, received {value!r}") from None


def init_from_env(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (no-op in one process).

    ``device``: ``"cpu"`` -> gloo; ``"cuda"`` (or ``"auto"`` with CUDA) -> NCCL, one GPU per local rank.
    ``timeout_s`` (default ``$IMCLASS_DIST_TIMEOUT`` or 300 s) bounds every collective, so a rank that
    died makes the others fail with an error instead of waiting forever.
    Returns the :class:`DistContext` with the device string this rank must use.
    """
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    want_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if world <= 1:
        return DistContext(device="cuda" if str(device) == "auto" and want_cuda else str(device))
    if is_distributed():  # already joined (e.g. by the caller)
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), _device(want_cuda, local))
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} under torchrun, but CUDA is not available on this machine")
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                               "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
    backend = "nccl" if want_cuda else "gloo"
    seconds = timeout_s if timeout_s is not None else float(os.environ.get("IMCLASS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds),
                            device_id=torch.device("cuda", local) if want_cuda else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend, _device(want_cuda, local))


def _device(cuda: bool, local_rank: int) -> str:
    return f"cuda:{local_rank}" if cuda else "cpu"


@contextlib.contextmanager
def session(device: str = "auto", timeout_s: float | None = None) -> Iterator[DistContext]:
    """``init_from_env`` for the length of a ``with`` block; leaves the process group at the end."""
    joined_here = not is_distributed()
    ctx = init_from_env(device, timeout_s)
    try:
        yield ctx
    finally:
        if joined_here and is_distributed():
            dist.destroy_process_group()


def leave() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def sum_across(*values: torch.Tensor) -> list[torch.Tensor]:
    """The element-wise sums over ranks of ``values`` (one all-reduce; returned in float64 so that
    counts and loss sums stay exact; the inputs are not modified)."""
    if not is_distributed():
        return list(values)
    device = values[0].device
    flat = torch.stack([v.detach().to(device=device, dtype=torch.float64).reshape(()) for v in values])
    if dist.get_backend() == "nccl" and device.type != "cuda":
        flat = flat.cuda()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [t.to(device) for t in flat.unbind()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable) in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The contiguous slice of ``range(n)`` that rank ``rank_`` of ``world`` handles (sizes differ by at most 1)."""
    return shard_slice(n, rank() if rank_ is None else rank_, world_size() if world is None else world)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. a seed drawn at random); ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` (parameters broadcast from rank 0, gradients averaged);
    the model itself is returned in one process."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    return DDP(model)
