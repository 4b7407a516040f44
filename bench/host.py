"""Where a benchmark figure came from, and how to take one a reader can trust: the one provenance helper.

Every benchmark in ``bench/`` uses this module, so every result file says the same things the same way:

- ``provenance()``: commit (and whether the tree was dirty), CPU model and the flags that decide kernel
  speed, core count, Python / torch / numpy (/ scikit-learn / scipy when imported) versions, the BLAS
  libraries actually loaded and the kernel each picked (threadpoolctl), torch and BLAS threads, the
  OpenBLAS variables in the environment, load average and the date (UTC).
- ``full_strength_blas()``: call first thing in a benchmark (before numpy is imported): when this
  machine's ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` are set (they force the Haswell kernel on an
  AVX-512 CPU, halving numpy/scikit-learn), the script re-executes itself with both removed, so the
  peer *and* imclass's own numpy work run at full strength in that process. ``clean_env()`` gives the
  same environment for a peer run as a subprocess.
- ``interleave({"imclass": f, "sklearn": g}, rounds=3)``: ABAB... rounds, median and range per side.
- ``LoadGuard(cores)``: load average before/after; ``guard.check()`` refuses the figure (raises
  ``HostBusy``) when the load exceeded the cores in use, so the caller re-runs it in a quiet window.
- ``write_result(path, figures, ...)``: writes ``{"host": provenance(...), **figures}`` as JSON.

    python bench/host.py            # the one-line CPU description
    python bench/host.py --json     # the whole provenance record
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

REPO = Path(__file__).resolve().parent.parent

# the flags that change which kernels are fastest (as /proc/cpuinfo spells them)
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# variables that pin OpenBLAS to an older kernel on this family of hosts; a peer must run without them
HANDICAP_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REEXEC_MARK = "IMCLASS_BENCH_CLEAN_BLAS"


class HostBusy(RuntimeError):
    """The load average exceeded the cores a benchmark used: its figure is refused (re-run when quiet)."""


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


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool}`` of the checkout holding this file."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, False
    return {"commit": sha, "dirty": dirty}


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def blas_kernels() -> list[dict]:
    """The BLAS/OpenMP libraries loaded in this process (threadpoolctl): library, version, kernel, threads.

    ``architecture`` is the kernel OpenBLAS picked (``SkylakeX`` on AVX-512, ``Haswell`` when forced or
    on AVX2); call after numpy / scikit-learn / torch are imported so their libraries are listed.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl not installed: pip install threadpoolctl"}]
    keep = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer", "num_threads")
    return [{k: lib.get(k) for k in keep if lib.get(k) is not None} for lib in threadpool_info()]


def blas_kernel_line(kernels: list[dict] | None = None) -> str:
    """``openblas 0.3.31 SkylakeX x2, ...``: the BLAS kernels in one printable phrase."""
    libs = blas_kernels() if kernels is None else kernels
    parts = [f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture', '')} x{lib.get('num_threads')}"
             for lib in libs if lib.get("user_api") == "blas"]
    return ", ".join(p.replace("  ", " ") for p in parts) or "no BLAS loaded"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "sklearn", "scipy", "numba", "faiss", "torchvision", "PIL", "webdataset"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "unknown")
    return out


def _threads() -> dict:
    out = {"cpu_count": os.cpu_count() or 0}
    if hasattr(os, "sched_getaffinity"):
        out["affinity"] = len(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if var in os.environ:
            out[var] = os.environ[var]
    return out


def provenance(load_before: list[float] | None = None, load_after: list[float] | None = None) -> dict:
    """Everything a result file needs to say where its figures came from (see the module docstring).

    ``load_before`` / ``load_after``: the load averages around the measurement (``LoadGuard`` records
    them); without them the current load average is stored as ``load_average``.
    """
    record = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        "cpu": cpu_info(),
        "hostname": platform.node(),
        "versions": _versions(),
        "threads": _threads(),
        "blas": blas_kernels(),
        "blas_env": {v: os.environ[v] for v in HANDICAP_VARS if v in os.environ},
        "full_strength_blas": not any(v in os.environ for v in HANDICAP_VARS),
    }
    if load_before is not None:
        record["load_before"] = load_before
    if load_after is not None:
        record["load_after"] = load_after
    if load_before is None and load_after is None:
        record["load_average"] = load_average()
    return record


def clean_env(env: Mapping[str, str] | None = None) -> dict:
    """A copy of ``env`` (default ``os.environ``) without the variables that handicap OpenBLAS: for a peer
    run as a subprocess (``subprocess.run(..., env=clean_env())``)."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in HANDICAP_VARS}


def full_strength_blas() -> None:
    """Re-execute this script without ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` when they are set.

    OpenBLAS reads them when it loads, so call this before importing numpy, scipy, scikit-learn or torch.
    Refuses (SystemExit) when numpy is already imported with them set: the figure would be handicapped.
    """
    if not any(v in os.environ for v in HANDICAP_VARS):
        return
    if os.environ.get(_REEXEC_MARK):
        raise SystemExit("bench/host.py: could not remove OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE from the environment")
    if "numpy" in sys.modules:
        raise SystemExit("bench/host.py: full_strength_blas() must run before numpy is imported "
                         f"({', '.join(v for v in HANDICAP_VARS if v in os.environ)} set)")
    env = clean_env() | {_REEXEC_MARK: "1"}
    print(f"bench/host.py: re-running without {', '.join(v for v in HANDICAP_VARS if v in os.environ)} "
          "(peers at full strength)", file=sys.stderr, flush=True)
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]  # keeps -c / -m / interpreter flags
    os.execve(sys.executable, [sys.executable, *argv], env)


def summarise(times: list[float]) -> dict:
    """``{"median", "min", "max", "runs"}`` of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": list(times)}


def interleave(fns: Mapping[str, Callable[[], object]], rounds: int = 3,
               on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Time each callable once per round, in turn (A B A B ...), ``rounds`` >= 3 rounds.

    Returns ``{name: {"median", "min", "max", "runs", "result"}}`` (``result``: the last return value),
    so a load change during the run shows in both sides' ranges instead of in one side's figure.
    """
    if rounds < 3:
        raise ValueError(f"expected at least 3 interleaved rounds, received rounds={rounds}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, object] = {}
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))  # ABBA: no side always first
        for name, fn in order:
            start = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(r, {name: t[-1] for name, t in times.items()})
    return {name: summarise(t) | {"result": last[name]} for name, t in times.items()}


class LoadGuard:
    """Records the load average before and after a measurement and refuses it when the host was busy.

        guard = LoadGuard(cores=torch.get_num_threads())
        ... measure ...
        guard.check()          # raises HostBusy when a load average exceeded `cores` (re-run when quiet)

    ``strict=False`` (for a trial run on a shared host) makes ``check`` mark the figures ``"refused"``
    instead of raising. The 1-minute load average counts the benchmark itself, so the limit is the cores
    in use: anything above means something else competed for them.
    """

    def __init__(self, cores: int | None = None, strict: bool = True):
        self.cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        self.strict = strict
        self.before = load_average()
        self.after: list[float] | None = None

    def check(self) -> dict:
        """Take the load after; returns ``{"load_before", "load_after", "cores_in_use", "quiet", "refused"}``."""
        self.after = load_average()
        busy = max(self.before[0], self.after[0]) > self.cores
        status = {"load_before": self.before, "load_after": self.after, "cores_in_use": self.cores,
                  "quiet": not busy, "refused": busy}
        if busy and self.strict:
            raise HostBusy(f"load average {self.before[0]:.2f} before / {self.after[0]:.2f} after exceeded the "
                           f"{self.cores} cores in use: figure refused, re-run on a quiet host")
        return status


def write_result(path: str | os.PathLike, figures: Mapping, guard: LoadGuard | None = None,
                 command: str | None = None) -> dict:
    """Write ``{"host": provenance, "command": ..., "load": ..., **figures}`` to ``path`` (JSON) and return it.

    ``command`` defaults to this process's command line; ``guard`` adds its load record.
    """
    load = guard.check() if guard is not None and guard.after is None else None
    if guard is not None and load is None:
        load = {"load_before": guard.before, "load_after": guard.after, "cores_in_use": guard.cores}
    record = {"host": provenance(guard.before if guard else None, guard.after if guard else None),
              "command": command or " ".join([Path(sys.executable).name, *sys.argv])}
    if load is not None:
        record["load"] = load
    record |= dict(figures)
    Path(path).write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
    return record


def jsonable(obj):
    """JSON fallback for numpy/torch values and paths (``json.dumps(..., default=jsonable)``)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return float(obj)


if __name__ == "__main__":
    if "--json" in sys.argv[1:]:
        import numpy  # noqa: F401  (so its BLAS is listed)
        print(json.dumps(provenance(), indent=1))
    else:
        print(cpu_line())
