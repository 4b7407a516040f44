"""Line plots written as PNG (accuracy vs k, training curves)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg back end: the one way imclass code gets it.

    Imported here, on the first picture, not at module level: matplotlib costs about half a second
    of start-up that commands drawing nothing (``imclass --help``, ``predict``, ``serve``) never pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG; parent folders made) and close it: the last step of
    every picture imclass draws with matplotlib. Returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def save_line_plot(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    errors: Mapping[str, Sequence[float]] | None = None,
    logx: bool = False,
    marks: Mapping[str, float] | None = None,
) -> Path:
    """Write a PNG with one line per named series over ``x`` (error bars where ``errors`` has them).

    ``logx`` puts x on a log scale (learning rates); ``marks`` draws a labelled dashed vertical line
    at each x value (a suggested learning rate, a chosen k).
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, ys in series.items():
        xs = list(x)[: len(ys)]
        if errors and label in errors:
            ax.errorbar(xs, ys, yerr=errors[label], marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o" if len(ys) < 50 else None, label=label)
    for label, at in (marks or {}).items():
        ax.axvline(at, color="tab:red", ls="--", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) + len(marks or {}) > 1:
        ax.legend()
    return save_figure(fig, path)
