"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from imclass.data.download import DownloadError

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

STARTED = time.perf_counter()  # the command line began loading: what precedes a command's work is its start-up

# what bad input raises (an unknown name, a missing or corrupt file, data that cannot be fetched):
# reported as one `error: ...` line; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, DownloadError)

DATA_MODE_HELP = ("Where a folder's images live while the command runs: memory, cache (a memory-mapped file of the "
                  "resized images on disk, $IMCLASS_CACHE/images, reused by later runs) or stream (decoded batch by "
                  "batch). Default: chosen from the image count and size against the memory available, and said on "
                  "stderr.")


def data_mode_option(**kwargs: Any) -> Any:
    """The ``--data-mode memory|cache|stream`` option of every command that reads a folder of images: one
    meaning (``imclass.data.source.choose_mode``; ``help=`` may say a command's own default)."""
    kwargs.setdefault("help", DATA_MODE_HELP)
    return typer.Option(None, "--data-mode", **kwargs)


DataRoot = typer.Option(None, "--data", help="Data root folder (default: $IMCLASS_DATA, else ~/.cache/imclass).")

DATA_HELP = "cifar10, mnist, fashion-mnist or a folder of images (one sub-folder per class)."


def data_argument(default: Any = None, help: str = DATA_HELP, **kwargs: Any) -> Any:
    """The data set a command works on: always the positional DATA (``imclass train FOLDER``,
    ``imclass evaluate RUN FOLDER``); ``--dataset`` stays a hidden alias (``dataset_alias``)."""
    return typer.Argument(default, metavar="DATA", help=help, show_default=False, **kwargs)


def dataset_alias(**kwargs: Any) -> Any:
    """The hidden ``--dataset``/``-d`` option: the older spelling of the positional DATA (kept working)."""
    return typer.Option(None, "--dataset", "-d", hidden=True, help="Same as the positional DATA.", **kwargs)


def pick_data(data: str | None, alias: str | None, default: str | None = None, *, required: bool = False) -> str | None:
    """The data set of a command from its positional DATA and the hidden ``--dataset`` alias: one of
    them, or ``default``; both given and different, or neither when ``required``, is a one-line error."""
    if data is not None and alias is not None and data != alias:
        fail(f"the data set was given twice, as DATA ({data}) and --dataset ({alias}): give it once, as DATA")
    chosen = data if data is not None else alias if alias is not None else default
    if chosen is None and required:
        fail(f"expected DATA: {DATA_HELP.rstrip('.')}")
    return chosen


LIMIT_HELP = ("A seeded, stratified sample of N images of each split (every class keeps its share; "
              "the same images in every command).")


def limit_option(**kwargs: Any) -> Any:
    """The ``--limit N`` option of every command: one meaning (``imclass.data.split.limit_indices``)."""
    return typer.Option(None, "--limit", help=LIMIT_HELP, **kwargs)


def time_line(total: float, stages: dict[str, float], *, began: float | None = None) -> str:
    """The end-of-run breakdown: ``time 44.0 s = start-up 6.1 s, read 12.1 s, training 25.8 s, ...``: the
    stages add up to the total. ``began``: the ``time.perf_counter()`` at which the command's work began;
    the time from ``STARTED`` (imports, torch's included) to it is shown as ``start-up`` and counted."""
    if began is not None:
        startup = max(0.0, began - STARTED)
        stages, total = {"start-up": startup, **stages}, total + startup
    return f"time {total:.1f} s = " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (for --json)."""
    sys.stdout.write(json.dumps(_finite(obj), default=float, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (json.dumps would print invalid ``NaN``)."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def fail(message: str, code: int = 2) -> None:
    """Print a clear error for the user and exit (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def write_error(err: OSError) -> str:
    """One line for a failed write (full disk, file size limit, permissions): what, where, why."""
    where = f" {err.filename}" if err.filename else ""
    why = err.strerror or str(err)
    hint = " (disk full or a file size limit?)" if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
    return f"cannot write{where}: {why}{hint}"


@contextlib.contextmanager
def plain_warnings():
    """Show Python warnings (e.g. "cifar10 test split has 1,000 of the official 10,000 images") as one
    `warning: ...` line on stderr, without the file and source line; the same message only once."""

    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message) in shown:  # e.g. the folder walk's report, once per split read
            return
        shown.add(str(message))
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


TTAOption = typer.Option(
    None, "--tta/--no-tta",
    help="Test-time augmentation: default = what the model file records (the figure training printed); "
    "--tta forces flip+translate, --no-tta the plain image.",
)


@dataclass
class Saved:
    """A loaded model file: the predictor, its class names, the input size (C, H, W) it expects and
    the test-time augmentation it was evaluated with (``None``: none recorded)."""

    predictor: Any
    classes: list[str] | None
    input_size: list[int] | None
    tta: str | None = None

    def resolve_tta(self, flag: bool | None) -> str:
        """The TTA to apply for ``--tta/--no-tta`` (``None``: the recorded one): a name of ``imclass.tta``."""
        from imclass.tta import choose_tta

        return choose_tta(self.tta, flag, knn=not hasattr(self.predictor, "predict_logits"))

    def memory_reserve(self) -> int:
        """Bytes the tier chooser keeps free beside the images for this model (``model_reserve``)."""
        import torch

        from imclass.data.source import model_reserve

        module = getattr(self.predictor, "model", None)
        return model_reserve(module if isinstance(module, torch.nn.Module) else None)

    def class_names(self, n_columns: int) -> list[str]:
        """Names of the probability columns: a Classifier's are its classes; a KNN's are its sorted labels."""
        labels = getattr(self.predictor, "classes_", None)  # a KNN: columns follow its label values
        if labels is not None:
            labels = [int(v) for v in labels]
            return [self.classes[v] if self.classes and v < len(self.classes) else str(v) for v in labels]
        return list(self.classes) if self.classes else [str(i) for i in range(n_columns)]


def load_saved(run: Path) -> Saved:
    """Load a model file or run folder with the metadata the commands need (errors name the file)."""
    from imclass.model_file.format import read_metadata
    from imclass.models.rebuild import load

    header = read_metadata(run)
    predictor = load(run)
    pre = header.get("preprocessing") or {}
    return Saved(predictor, header.get("classes"), pre.get("input_size"), pre.get("tta"))
