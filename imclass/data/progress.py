"""Progress of a phase that can take more than a few seconds: a tqdm bar on a terminal, else one line
when the phase starts and one when it ends (logs and CI stay readable)."""
from __future__ import annotations

import sys
import time

# Deferred imports (inside functions), for start-up time: tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["Progress"]


class Progress:
    """``Progress(total, "extracting features", unit="images")``; ``update(n)`` per step, ``close()`` at the end
    (also a context manager). ``verbose=False`` prints nothing."""

    def __init__(self, total: int, desc: str, *, unit: str = "images", verbose: bool = True) -> None:
        self.total, self.desc, self.unit, self.verbose = total, desc, unit, verbose
        self.t0 = time.perf_counter()
        self.bar = None
        self.closed = False
        if verbose and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s") or unit, leave=False, file=sys.stderr)
        elif verbose:
            print(f"{desc}: {total:,} {unit} ...", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.verbose:
            print(f"{self.desc}: {self.total:,} {self.unit} in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
