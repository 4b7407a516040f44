"""``imclass review DATA``: rank the images whose label looks wrong, write a page, serve it for decisions;
``imclass review apply PLAN`` and ``imclass review undo LOG`` fix the folder (never deleting)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import USER_ERRORS, DataRoot, fail, limit_option, plain_warnings, print_json


def register(app: typer.Typer) -> None:
    """Add the top-level command ``review`` (with its ``apply`` and ``undo`` forms) to ``app``."""
    app.command("review")(review_command)


def review_command(
    data: str = typer.Argument(..., help="A folder of images (one sub-folder per class), cifar10, mnist, fashion-mnist; "
                                         "or `apply PLAN` / `undo LOG`."),
    target: Optional[str] = typer.Argument(None, help="With apply: the plan (relabel.csv); with undo: the undo log."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for review.json and the page index.html."),
    run: Optional[str] = typer.Option(None, "--run", help="Score with this run's model, on images it did not train on "
                                                           "(default: k-fold cross-validation)."),
    split: Optional[str] = typer.Option(None, "--split", help="Named data sets: train (default) or test; folders: all "
                                                              "(default), train, val, test; with --run: test."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and of the networks trained per fold."),
    limit: Optional[int] = limit_option(),
    data_root: Optional[str] = DataRoot,
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Folders: feature backbone (default: one whose "
                                                                     "weights are in the weights root)."),
    weights_dir: Optional[str] = typer.Option(None, "--weights-dir", help="Weights root (default: $IMCLASS_WEIGHTS)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Feature cache folder (default: $IMCLASS_CACHE/features); "
                                                              "'none' to skip."),
    filter_by: str = typer.Option("prune_by_noise_rate", "--filter-by", help="Confident learning's selection: "
                                  "prune_by_noise_rate, prune_by_class, both, confident_joint."),
    rank_by: str = typer.Option("self_confidence", "--rank-by", help="self_confidence or normalized_margin."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Named data sets: fast-recipe epochs per fold."),
    width: Optional[str] = typer.Option(None, "--widths", help="Named data sets: fast-recipe widths per fold, e.g. 16,64,64."),
    show: int = typer.Option(500, "--show", help="Findings on the page (all are in review.json)."),
    serve: bool = typer.Option(False, "--serve", help="Serve the page with Accept / Reject buttons writing "
                                                      "OUT/relabel.csv (then: imclass review apply OUT/relabel.csv)."),
    host: str = typer.Option("127.0.0.1", "--host", help="--serve: address to bind."),
    port: int = typer.Option(8765, "--port", help="--serve: port."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the last line of stdout)."),
) -> None:
    """The images whose given label is most likely wrong (confident learning on out-of-sample probabilities),
    feature-space outliers and duplicates with two labels, ranked; a page to judge them; a safe fix.

    imclass review photos/ --out review/ [--serve]; imclass review apply review/relabel.csv;
    imclass review undo review/undo-*.jsonl. Nothing is ever deleted.
    """
    if data in ("apply", "undo") and target is not None:
        return _apply_or_undo(data, Path(target), as_json)
    if target is not None:
        fail(f"expected one DATA argument, received also {target!r} (did you mean `imclass review apply PLAN`?)")
    if out is None:
        fail("expected --out DIR (the review is written there: review.json, index.html)")
    from imclass.review.find import ReviewConfig, config_dict, review
    from imclass.review.page import write_review

    fast = {}
    if epochs is not None:
        fast["epochs"] = epochs
    if width is not None:
        try:
            fast["widths"] = tuple(int(w) for w in width.split(","))
        except ValueError:
            fail(f"expected --widths as integers like 16,64,64, received {width!r}")
    try:
        cfg = ReviewConfig(data=data, split=split, run=run, folds=folds, seed=seed, limit=limit, data_root=data_root,
                           backbone=backbone, weights_dir=weights_dir, cache_dir=cache, filter_by=filter_by,
                           rank_by=rank_by, fast=fast, verbose=True)
        with plain_warnings():
            result = review(cfg)
            review_path, page_path = write_review(result, out, config=config_dict(cfg), max_shown=show)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except USER_ERRORS as err:
        fail(str(err))
    summary = result.to_dict()
    if as_json and not serve:
        print_json({**summary, "out": str(out), "page": str(page_path)})
        return
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items())
    typer.echo(f"{len(result.issues):,} findings in {result.images:,} images of {result.source} ({counts}); "
               f"confident learning estimates {result.estimated_label_errors:,} label errors; {result.method}; "
               f"{result.seconds:.1f} s")
    for r in result.issues[:10]:
        where = r["path"] if r["path"] is not None else f"#{r['index']}"
        typer.echo(f"  {r['score']:.3f}  {r['kind']:<9} {r['given']} -> {r['suggested'] or '?'}  {where}")
    typer.echo(f"wrote {review_path} and {page_path} (open it in a browser)")
    if serve:
        _serve(out, host, port)


def _serve(out: Path, host: str, port: int) -> None:
    import uvicorn

    from imclass.review.app import PLAN_FILE, create_review_app

    try:
        app = create_review_app(out)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"review page on http://{host}:{port}/ : accept or reject each suggestion; decisions go to "
               f"{out / PLAN_FILE}. Ctrl-C to stop, then: imclass review apply {out / PLAN_FILE}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _apply_or_undo(action: str, target: Path, as_json: bool) -> None:
    from imclass.review.plan import apply_plan, undo_log

    try:
        outcome = apply_plan(target) if action == "apply" else undo_log(target)
    except USER_ERRORS as err:
        fail(str(err))
    for message in outcome.skipped:
        typer.secho(f"skipped: {message}", fg=typer.colors.YELLOW, err=True)
    if as_json:
        print_json({"action": action, **outcome.to_dict()})
        return
    for a, b in outcome.moved:
        typer.echo(f"  {a} -> {b}")
    if action == "apply":
        typer.echo(f"moved {len(outcome.moved)} file(s), skipped {len(outcome.skipped)}; undo with: "
                   f"imclass review undo {outcome.log}")
    else:
        typer.echo(f"moved {len(outcome.moved)} file(s) back, skipped {len(outcome.skipped)}")
