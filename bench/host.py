"""The CPU a benchmark ran on: model name and the vector/matrix extensions that decide kernel speed.

Every benchmark prints this line and stores the dict in its JSON, so each figure in
bench/RESULTS.md names the host it came from (hosts differ between sessions: AVX2 vs AVX-512).
"""
from __future__ import annotations

import os
from pathlib import Path

# the flags that change which kernels are fastest (as /proc/cpuinfo spells them)
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """``{"model": str, "cores": int, "features": [...]}`` of this machine (Linux; "unknown" elsewhere)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count() or 0, "features": [f for f in FEATURES if f in flags]}


def cpu_line() -> str:
    """One printable line, e.g. ``CPU: AMD EPYC, 2 cores, avx2 fma avx512f ... avx512_bf16``."""
    info = cpu_info()
    return f"CPU: {info['model']}, {info['cores']} cores, {' '.join(info['features']) or 'no AVX2'}"


if __name__ == "__main__":
    print(cpu_line())
