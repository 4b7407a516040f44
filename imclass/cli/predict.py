"""``imclass predict``: class names and probabilities for image files and folders with a saved model
(table, JSON or CSV); decoding and batched prediction live in ``imclass.serve.predictor``."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import USER_ERRORS, TTAOption, data_mode_option, fail, plain_warnings, print_json

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``predict`` to ``app``."""
    app.command("predict")(predict)


FORMATS = ("table", "json", "csv")


def predict(
    run: Path = typer.Argument(..., help="Run folder, .safetensors model file or exported .onnx file."),
    images: Optional[List[Path]] = typer.Argument(None, help="Image files (PNG, JPEG, ...) and folders (searched recursively)."),
    top: int = typer.Option(3, "--top", "-t", help="How many classes to show per image."),
    top_k: Optional[int] = typer.Option(None, "-k", hidden=True, help="Old short form of --top (-k is k-NN's k)."),
    tta: Optional[bool] = TTAOption,
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Output: table (default), json or csv (one row per file)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json: one JSON object."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    data_mode: Optional[str] = data_mode_option(
        help="stream (default: each batch decoded, predicted and dropped), memory (all decoded "
        "first) or cache (decoded once into a memory-mapped file of the model's input size, reused next time)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Zero-shot: ImageNet top-k by this pretrained backbone (then every argument is an image)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="With --backbone: imagenet (default) or a weights file."),
    weights_dir: Optional[str] = typer.Option(
        None, "--weights-dir", help="Weights root (default: $IMCLASS_WEIGHTS, else ~/.cache/imclass/weights)."),
) -> None:
    """Class names and probabilities for image files and folders, using a saved model (with the
    test-time augmentation its model file records, unless --no-tta).

    An image that is missing or unreadable is reported and skipped; the others are still
    predicted (exit code 1 when any failed).
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm.auto import tqdm

    from imclass.serve.predictor import ImageError, Predictor, find_images

    top = top if top_k is None else top_k  # the old short form -k still works
    if backbone is not None:  # `imclass predict --backbone NAME photo.jpg ...`: RUN is the first image
        from imclass.cli.transfer import predict_backbone

        fmt = "json" if as_json else (fmt or "table").lower()
        return predict_backbone(backbone, [run, *(images or [])], weights=weights, weights_dir=weights_dir,
                                top=top if top != 3 else 5, fmt=fmt)
    if not images:
        fail("expected image files or folders after the run folder (or --backbone NAME IMAGE... for ImageNet classes)")
    fmt = "json" if as_json and fmt is None else (fmt or "table").lower()
    if fmt not in FORMATS:
        fail(f"expected --format in {list(FORMATS)}, received --format {fmt}")
    if as_json and fmt != "json":
        fail(f"--json means --format json; received also --format {fmt}")
    if top < 1:
        fail(f"expected --top >= 1, received --top {top}")
    if batch_size < 1:
        fail(f"expected --batch-size >= 1, received --batch-size {batch_size}")
    try:
        predictor = Predictor.load(run, tta=tta)
    except USER_ERRORS as err:
        fail(str(err))
    with plain_warnings():  # what the folder walk skipped: one `warning:` line
        paths = find_images(images)
    if not paths:
        fail(f"no image files found in {', '.join(map(str, images))}")
    results: dict[int, dict] = {}
    errors: dict[int, dict] = {}
    from imclass.train import distributed

    group = distributed.init_from_env("cpu") if distributed.launched() else None  # torchrun: one shard per rank
    mine = list(range(len(paths)))[distributed.shard(len(paths))]

    def decode(i: int):
        try:
            return i, predictor.decode(paths[i], name=str(paths[i]))
        except ImageError as err:
            return i, err

    if data_mode not in (None, "memory", "cache", "stream"):
        fail(f"expected --data-mode memory, cache or stream, received {data_mode!r}")
    if data_mode in ("memory", "cache"):
        try:
            with plain_warnings():
                batches = _decoded_batches(predictor, paths, mine, data_mode, batch_size)
        except USER_ERRORS as err:
            fail(str(err))
    else:
        batches = None
    bar = tqdm(total=len(mine), desc="predict", unit="img", disable=None if len(mine) > batch_size else True,
               leave=False, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(mine), batch_size):
            decoded = next(batches) if batches is not None else list(pool.map(decode, mine[start : start + batch_size]))
            good = [(i, t) for i, t in decoded if not isinstance(t, Exception)]
            for i, err in decoded:
                if isinstance(err, Exception):
                    errors[i] = {"image": str(paths[i]), "error": str(err)}
            if good:
                try:
                    probs = predictor.predict_many([t for _, t in good], batch_size=batch_size)
                except USER_ERRORS as err:
                    fail(f"{run}: cannot predict these images: {err}")
                finite = torch.isfinite(probs).all(dim=1).tolist()
                for (i, _), tops, ok in zip(good, predictor.top_k(probs, top), finite):
                    if not ok:  # NaN weights (a diverged run) give NaN probabilities: no label is better than any
                        errors[i] = {"image": str(paths[i]), "error": f"{paths[i]}: the model gave NaN or infinite "
                                     f"probabilities (its weights are not finite: {predictor.non_finite_weights:,})"}
                        continue
                    results[i] = {"image": str(paths[i]), "top": [{"class": t["class"], "probability": t["probability"]}
                                                                  for t in tops]}
            bar.update(len(decoded))
    bar.close()
    if group is not None:  # rank 0 gathers every shard's rows and reports them all
        for part_results, part_errors in distributed.all_gather_objects((results, errors)):
            results.update(part_results)
            errors.update(part_errors)
        distributed.leave()
        if group.rank != 0:
            return
    rows = [results[i] for i in sorted(results)]
    errs = [errors[i] for i in sorted(errors)]
    if fmt == "json":
        print_json({"predictions": rows, "errors": errs, "tta": predictor.tta})
    elif fmt == "csv":
        _write_csv(rows, errs, top, len(paths))
    else:
        _write_table(rows, top)
    if fmt != "json":
        typer.echo(f"(tta: {predictor.tta})", err=True)
        for e in errs:
            typer.secho(f"error: {e['error']}", fg=typer.colors.RED, err=True)
    if errs:
        if fmt != "json":
            typer.secho(f"{len(errs)} of {len(paths)} image(s) could not be read", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _decoded_batches(predictor, paths: list[Path], mine: list[int], mode: str, batch_size: int):
    """``imclass predict --data-mode memory|cache``: the files decoded through the tier interface
    (``imclass.data.source.open_images``: the cache is keyed by the files and the model's input
    preprocessing), yielded as the lists ``[(i, image or error)]`` of each batch of ``batch_size`` files."""
    import json

    from imclass.data.decode import ImageError
    from imclass.data.source import Decoder, ImageList, open_images

    if not predictor.input_size:
        raise ValueError(f"--data-mode {mode} needs a model with a fixed input size; use --data-mode stream")
    size = tuple(predictor.input_size[1:])
    key = "predict:" + json.dumps({"pre": predictor.preprocessing, "size": size, "channels": predictor.channels},
                                  sort_keys=True, default=str)
    files = ImageList([paths[i] for i in mine], list(mine), ["file"], Path(os.path.commonpath([str(p) for p in paths]
                                                                                             or ["."])))
    decoder = Decoder(lambda p: predictor.decode(p, name=str(p)).permute(1, 2, 0).numpy(), size, key,
                      predictor.channels or 3)
    ds = open_images(files, decoder, mode)
    kept = dict(zip(ds.labels.tolist(), range(len(ds))))  # a file's index -> its row (unreadable files have none)
    for start in range(0, len(mine), batch_size):
        part = mine[start : start + batch_size]
        rows = [kept[i] for i in part if i in kept]
        images = ds.read(rows) if rows else None
        out, j = [], 0
        for i in part:
            if i in kept:
                out.append((i, images[j]))
                j += 1
            else:
                out.append((i, ImageError(f"{paths[i]}: not a readable image")))
        yield out


def _write_table(rows: list[dict], top: int) -> None:
    """One line per image: the path, then the top-k classes with their probabilities in aligned columns."""
    if not rows:
        return
    width = max(len(r["image"]) for r in rows)
    cells = [[f"{t['class']} {t['probability']:.3f}" for t in r["top"]] for r in rows]
    col = [max(len(c[j]) for c in cells if j < len(c)) for j in range(max(len(c) for c in cells))]
    typer.echo("image".ljust(width) + "  " + "  ".join(f"top-{j + 1}".ljust(w) for j, w in enumerate(col)).rstrip())
    for r, c in zip(rows, cells):
        typer.echo(r["image"].ljust(width) + "  " + "  ".join(v.ljust(w) for v, w in zip(c, col)).rstrip())


def _write_csv(rows: list[dict], errs: list[dict], top: int, n: int) -> None:
    """One CSV row per file: ``image, class_1, probability_1, ..., error`` (unreadable files keep their row)."""
    import csv

    k = max([len(r["top"]) for r in rows], default=top)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["image"] + [f"{f}_{j + 1}" for j in range(k) for f in ("class", "probability")] + ["error"])
    for r in rows:
        writer.writerow([r["image"]] + [v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}")] + [""])
    for e in errs:
        writer.writerow([e["image"]] + [""] * (2 * k) + [e["error"]])
