"""``imclass knn``: nearest neighbour / k-NN on raw pixels, with k chosen by cross-validation if asked."""
from __future__ import annotations

import time
import warnings
from typing import Optional

import typer

from imclass.cli._common import DATA_HELP, DataRoot, data_argument, dataset_alias, fail, limit_option, pick_data, print_json
from imclass.data.catalog import FOLDER_IMAGE_SIZE

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError)


def register(app: typer.Typer) -> None:
    """Add the top-level ``knn`` command to the ``imclass`` app."""
    app.command("knn")(knn)


def parse_ks(text: str) -> list[int]:
    """``"1,3,5"`` -> [1, 3, 5]; anything else is a clear error."""
    try:
        ks = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        fail(f"expected --ks as positive integers separated by commas (like 1,3,5,7), received {text!r}")
    return ks


def _limit(ds, n: Optional[int], flag: str, seed: int):
    """``--limit``: a seeded, stratified sample of the split (``imclass.data.split.limit_indices``)."""
    from imclass.data.split import limit_dataset

    if n is None:
        return ds
    if n < 1:
        fail(f"expected {flag} >= 1, received {n}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = limit_dataset(ds, n, seed=seed)
    for w in caught:
        typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    return out


def _load(name: str, split: str, root: Optional[str], image_size: Optional[int] = None):
    from pathlib import Path

    from imclass.data import load
    from imclass.data.catalog import scratch_image_size

    image_size = scratch_image_size(name, image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = load(name, split=split, root=root, image_size=image_size)
        except _USER_ERRORS as err:
            fail(str(err))
    for w in caught:
        typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    return ds


def knn(
    data_set: Optional[str] = data_argument(help=DATA_HELP + " Default: cifar10."),
    dataset: Optional[str] = dataset_alias(),
    metric: str = typer.Option("l2", "--metric", help="l1, l2 or cosine."),
    metric_short: Optional[str] = typer.Option(None, "-m", hidden=True, help="Old short form of --metric."),
    k: int = typer.Option(1, "--k", "-k", help="Neighbours that vote (ignored with --cv, which chooses k)."),
    vote: str = typer.Option("uniform", "--vote", help="How the k neighbours vote: uniform or distance (weighted by "
                             "1/distance)."),
    weights: Optional[str] = typer.Option(None, "--weights", hidden=True, help="Deprecated spelling of --vote "
                                          "(--weights means backbone weights elsewhere)."),
    data: Optional[str] = DataRoot,
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help=f"Resize every image to N x N (default for a folder: {FOLDER_IMAGE_SIZE}; "
        "a named data set keeps its size)."),
    limit: Optional[int] = limit_option(),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", hidden=True,
                                              help="--limit for the training split only."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", hidden=True, help="--limit for the test split only."),
    cv: bool = typer.Option(False, "--cv", help="Choose k by cross-validation on the training images first."),
    ks: str = typer.Option("1,3,5,7,10,20", "--ks", help="k values tried by --cv."),
    folds: int = typer.Option(5, "--folds", help="Folds for --cv."),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="With --cv: one validation split of this fraction instead of folds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cross-validation split."),
    plot: Optional[str] = typer.Option(None, "--plot", help="With --cv: write the accuracy-vs-k PNG here."),
    neighbours_png: Optional[str] = typer.Option(None, "--neighbours-png",
                                                 help="Write the test images / nearest training images grid here."),
    backend: str = typer.Option("auto", "--backend",
                                help="auto (the fastest exact kernel here), torch, numba, int8 (L2) or faiss."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Queries per chunk (default: automatic)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Classify test images by their nearest training images (raw pixels): accuracy and time."""
    dataset = pick_data(data_set, dataset, "cifar10")
    metric = metric_short or metric
    weights = vote if weights is None else weights  # the old spelling still works
    from imclass.knn import KNN, choose_k, neighbour_grid

    if plot and not cv:
        fail("--plot draws the accuracy-vs-k curve of --cv: add --cv")
    try:
        model = KNN(k=k, metric=metric, weights=weights, backend=backend, batch_size=batch_size, verbose=not as_json)
    except ValueError as err:
        fail(str(err))
    k_values = parse_ks(ks) if cv else None
    t_load = time.perf_counter()
    if image_size is not None and image_size < 1:
        fail(f"expected --image-size >= 1, received {image_size}")
    train = _limit(_load(dataset, "train", data, image_size), limit if train_limit is None else train_limit, "--limit", seed)
    test = _limit(_load(dataset, "test", data, image_size), limit if test_limit is None else test_limit, "--limit", seed)
    t_load = time.perf_counter() - t_load

    result: dict = {"dataset": dataset, "metric": model.metric_, "weights": weights,
                    "n_train": len(train), "n_test": len(test), "load_seconds": round(t_load, 3)}
    start = time.perf_counter()
    try:
        if cv:
            selection = choose_k(train.images, train.labels, k_values, metric=metric, weights=weights,
                                 folds=None if val_fraction is not None else folds, val_fraction=val_fraction,
                                 seed=seed, plot=plot, backend=backend, batch_size=batch_size, verbose=not as_json)
            result["cv"] = selection.to_dict()
            model.k = selection.best_k
            if not as_json:
                _print_selection(selection)
        if model.k > len(train):
            fail(f"expected --k <= the number of training images ({len(train)}), received {model.k}")
        model.fit(train.images, train.labels)
        pred = model.predict(test.images)
    except _USER_ERRORS as err:
        fail(str(err))
    seconds = time.perf_counter() - start
    accuracy = float((pred == test.labels).double().mean())
    result |= {"k": model.k, "backend": model.backend_, "accuracy": accuracy, "seconds": round(seconds, 3)}
    if neighbours_png:
        import torch

        # 10 queries spread over the test split (sorted by class: the first 10 would all be one class)
        picks = torch.linspace(0, len(test) - 1, min(10, len(test))).round().long()
        names = [test.classes[int(c)] for c in test.labels[picks]]
        neighbour_grid(model, test.images[picks], neighbours_png, n_neighbours=10, row_labels=names,
                       query_labels=test.labels[picks].tolist(), class_names=list(test.classes))
        result["neighbours_png"] = neighbours_png
    if as_json:
        print_json(result)
        return
    from imclass.data.folder import split_word

    word = split_word(dataset, "test")  # a plain folder's seeded 20 %: "held-out", as train and evaluate say
    typer.echo(f"{model.k}-NN ({model.metric_}, {weights}) on {dataset}: accuracy {accuracy:.2%} on {len(test)} {word} "
               f"images with {len(train)} training images, {seconds:.1f} s ({model.backend_} backend)")
    if neighbours_png:
        typer.echo(f"wrote {neighbours_png}")


def _print_selection(selection) -> None:
    typer.echo(f"choosing k by {selection.method} ({selection.metric}):")
    for k, mean, std in zip(selection.ks, selection.mean, selection.std):
        mark = "  <- best" if k == selection.best_k else ""
        typer.echo(f"  k={k:<4d} accuracy {mean:.2%} +/- {std:.2%}{mark}")
    if selection.plot:
        typer.echo(f"wrote {selection.plot}")
