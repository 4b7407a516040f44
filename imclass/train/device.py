"""Where the engine runs: the device by name, and whether this CPU computes bfloat16 natively."""
from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512-BF16 or AMX): there bf16 autocast
    trains convolutions about 1.7x faster than float32 (bench/fast.py --amp-ab); elsewhere it is
    emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    A ValueError names the problem: an unknown device name, or a CUDA / MPS device this machine lacks.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"expected --device auto, cpu, cuda, cuda:N or mps, received {device!r}") from None
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu or auto)")
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif found.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: no Apple MPS device is available on this machine (use --device cpu)")
    elif found.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"expected --device auto, cpu, cuda, cuda:N or mps, received {device!r}")
    return found
