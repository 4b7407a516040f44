"""``imclass compare``: the course's approaches trained and tested on the same split, each within one time budget."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from imclass.cli._common import (
    USER_ERRORS,
    DataRoot,
    data_argument,
    data_mode_option,
    dataset_alias,
    fail,
    limit_option,
    pick_data,
    plain_warnings,
    print_json,
)

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``compare`` to ``app``."""
    app.command("compare")(compare)


def compare(
    data: Optional[str] = data_argument(),
    dataset: Optional[str] = dataset_alias(),
    models: str = typer.Option(
        "knn-l1,knn-l2,mlp,keras_cnn,resnet20,fastnet", "--models",
        help="Comma-separated: knn-l1, knn-l2, knn-cosine, fastnet (the fast recipe), transfer:<backbone>, or any "
        "model of `imclass models list`.",
    ),
    budget: str = typer.Option("10m", "--budget", help="Training time per approach: 10m, 90s, 1h."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the leaderboard, the entries and each "
                                       "approach's run (default runs/compare-<data set>)."),
    limit: Optional[int] = limit_option(),
    data_mode: Optional[str] = data_mode_option(
        help="Where a folder's images live for every entry: memory or cache (a memory-mapped file of the resized "
        "images on disk, reused by later runs). Default: chosen and said on stderr."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to N x N for k-NN and the "
                                             "networks trained from scratch (default for a folder: 32; transfer "
                                             "entries read the photos at their backbone's size)."),
    data_root: Optional[str] = DataRoot,
    max_epochs: int = typer.Option(30, "--max-epochs", help="Epoch cap of an approach that beats the budget."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the leaderboard's JSON on stdout."),
) -> None:
    """Train and test each approach on the same split within --budget; write a leaderboard.

    OUT gets leaderboard.json, leaderboard.md, accuracy_vs_time.png, entries/<name>.json and
    runs/<name>/ (a model file each: `imclass challenge OUT/runs/* DATA --report DIR` tests them all).
    Run it again after an interruption: finished entries are kept.
    """
    dataset = pick_data(data, dataset, required=True)
    from imclass.evaluate.compare import LEADERBOARD_MD, PLOT, compare as run_compare, leaderboard_table

    if out is None:
        out = Path("runs") / f"compare-{Path(dataset).expanduser().name or dataset}"
    try:
        if max_epochs < 1:
            raise ValueError(f"expected --max-epochs >= 1, received {max_epochs}")
        log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
        with plain_warnings():
            board = run_compare(dataset, models, budget, out, limit=limit, root=data_root, image_size=image_size, mode=data_mode,
                                seed=seed, max_epochs=max_epochs, device=device, log=log)
    except USER_ERRORS as err:
        fail(str(err))
    if as_json:
        print_json(board)
        return
    typer.echo(leaderboard_table(board))
    typer.echo(f"leaderboard: {out / LEADERBOARD_MD}, plot: {out / PLOT}")
