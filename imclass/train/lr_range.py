"""What a learning-rate range test (``Classifier.lr_find``) suggests, and its picture.

The test raises the learning rate exponentially batch by batch and records the loss (smoothed by a
bias-corrected running mean). Here, as fastai does: the curve is cut where it diverges (the loss
leaves ``diverge`` times its minimum, climbs back above its starting level, or stops being finite), the
first few noisy steps are skipped,
and the suggestion is the **steepest descent** of the smoothed loss per log-learning-rate before its
minimum; ``minimum / 10`` (fastai's other rule) is given beside it. The suggestion always lies strictly
between the start and end learning rates of the test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from imclass.visualize.plots import pyplot, save_figure

__all__ = ["LRFindResult", "clean_curve", "suggest_lr"]

DIVERGE = 4.0  # the curve ends where the smoothed loss exceeds this many times its minimum so far


def clean_curve(lrs: Sequence[float], losses: Sequence[float], diverge: float = DIVERGE) -> tuple[list[float], list[float]]:
    """The points of the curve up to divergence: it ends at the first non-finite loss, the first loss above
    ``diverge`` times the lowest loss before it, or (once the loss has fallen 5 % below where it started) the
    first loss back above the starting level; that point and the tail after it are dropped."""
    out_lr: list[float] = []
    out_loss: list[float] = []
    head = [float(v) for v in losses[: max(3, len(losses) // 10)] if math.isfinite(v)]
    start = max(head) if head else math.inf  # the starting level (the first steps are noisy)
    best = math.inf
    for lr, loss in zip(lrs, losses):
        if not math.isfinite(loss) or loss > diverge * best or (best < 0.95 * start and loss > start):
            break
        best = min(best, loss)
        out_lr.append(float(lr))
        out_loss.append(float(loss))
    return out_lr, out_loss


def _skip(n: int) -> int:
    """Points skipped at the start (fastai skips 10 of 100): the first steps' losses are the noisiest."""
    return min(10, n // 10)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], diverge: float = DIVERGE) -> float:
    """The learning rate where the smoothed loss falls fastest per log-learning-rate, before its minimum
    (after cutting the diverged tail and skipping the first noisy steps); when no stretch falls
    (a flat or rising curve) ``minimum / 10``. NaN for fewer than 3 usable points.

    >>> lrs = [10 ** (-5 + i / 10) for i in range(50)]
    >>> losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) for lr in lrs]   # steepest at 1e-3
    >>> round(math.log10(suggest_lr(lrs, losses)), 1)
    -3.0
    """
    lr_c, loss_c = clean_curve(lrs, losses, diverge)
    if len(lr_c) < 3:
        return float("nan")
    start = _skip(len(lr_c))
    lr_c, loss_c = lr_c[start:], loss_c[start:]
    low = min(range(len(loss_c)), key=loss_c.__getitem__)
    best_i, best_slope = None, 0.0
    for i in range(1, low + 1):  # central differences on a log-lr axis, the descent before the minimum
        a, b = max(0, i - 1), min(len(lr_c) - 1, i + 1)
        slope = (loss_c[b] - loss_c[a]) / (math.log(lr_c[b]) - math.log(lr_c[a]))
        if slope < best_slope:
            best_i, best_slope = i, slope
    if best_i is None:
        return lr_c[low] / 10
    return lr_c[best_i]


@dataclass
class LRFindResult:
    """Learning rates tried, the smoothed loss at each, the suggestion (steepest descent) and ``minimum``
    (the learning rate of the lowest loss, divided by 10), and the range tried."""

    lrs: list[float]
    losses: list[float]
    start_lr: float | None = None
    end_lr: float | None = None
    suggestion: float = field(init=False)
    minimum: float = field(init=False)

    def __post_init__(self) -> None:
        self.suggestion = suggest_lr(self.lrs, self.losses)
        lr_c, loss_c = clean_curve(self.lrs, self.losses)
        self.minimum = lr_c[min(range(len(loss_c)), key=loss_c.__getitem__)] / 10 if loss_c else float("nan")

    def plot(self, path: str | Path) -> Path:
        """Loss against learning rate (log scale) up to divergence, the suggestion and minimum / 10 marked;
        the y axis spans the curve's own range, never a diverged tail."""
        plt = pyplot()

        lr_c, loss_c = clean_curve(self.lrs, self.losses)
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        ax.plot(lr_c, loss_c, color="tab:blue", label="loss (smoothed)")
        if math.isfinite(self.suggestion):
            at = min(range(len(lr_c)), key=lambda i: abs(math.log(lr_c[i]) - math.log(self.suggestion)))
            ax.plot([self.suggestion], [loss_c[at]], "o", color="tab:red", ms=8,
                    label=f"suggestion (steepest descent) {self.suggestion:.2g}")
        if math.isfinite(self.minimum):
            ax.axvline(self.minimum, color="gray", ls="--", lw=1, label=f"minimum / 10: {self.minimum:.2g}")
        if loss_c:
            top = loss_c[_skip(len(loss_c))] if len(loss_c) > 1 else loss_c[0]
            spread = max(loss_c) - min(loss_c)
            ax.set_ylim(min(loss_c) - 0.05 * spread, max(top, min(loss_c) + 0.1) + 0.1 * spread)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss (smoothed)")
        tried = f" (tried {self.start_lr:.0e} to {self.end_lr:.0e})" if self.start_lr and self.end_lr else ""
        ax.set_title(f"learning-rate range test{tried}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return save_figure(fig, path)
