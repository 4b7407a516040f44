"""``imclass challenge``: accuracy of saved models against the severity of the course's recognition challenges."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import (
    USER_ERRORS,
    DataRoot,
    TTAOption,
    data_mode_option,
    dataset_alias,
    fail,
    limit_option,
    plain_warnings,
    print_json,
)

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


def register(app: typer.Typer) -> None:
    """Add the top-level command ``challenge`` to ``app``."""
    app.command("challenge")(challenge)


def challenge(
    args: List[str] = typer.Argument(..., help="RUN [RUN...] DATA: run folders or model files, then the data set."),
    dataset: Optional[str] = dataset_alias(),
    report: Path = typer.Option(..., "--report", help="Folder for the HTML page, the JSON and the PNGs."),
    shift: Optional[str] = typer.Option(
        None, "--shift", help="A second test set of the same classes (a folder of images, or a data set name)."
    ),
    split: str = typer.Option("test", "--split", help="Which split of DATA to test on."),
    data_root: Optional[str] = DataRoot,
    limit: Optional[int] = limit_option(),
    data_mode: Optional[str] = data_mode_option(),
    challenges: str = typer.Option(
        "all", "--challenges", help="Comma-separated subset of illumination,viewpoint,deformation,occlusion,clutter."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the transforms' random draws."),
    tta: Optional[bool] = TTAOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report's JSON on stdout."),
) -> None:
    """Test saved models under illumination, viewpoint, deformation, occlusion, clutter (and --shift).

    Severity 0 is the clean test set (the accuracy `imclass evaluate` reports); 1-5 grow each
    challenge. Several runs go on one plot: `imclass challenge runs/knn runs/cnn cifar10 --report DIR`.
    """
    from imclass.data.challenge_transforms import parse_challenges
    from imclass.evaluate.challenge_report import HTML_NAME, challenge_report, load_models, pct

    if dataset is not None:  # the hidden alias: every positional argument is a RUN
        runs = list(args)
    elif len(args) < 2:
        fail("expected at least one RUN and then DATA, e.g. `imclass challenge runs/x cifar10 --report reports/x`")
    else:
        *runs, dataset = args
    try:
        if limit is not None and limit < 1:
            raise ValueError(f"expected --limit >= 1, received {limit}")
        names = parse_challenges(challenges)
        models = load_models(runs, tta=tta)
        with plain_warnings():
            result = challenge_report(models, dataset, report, challenges=names, shift=shift, split=split,
                                      root=data_root, limit=limit, seed=seed, progress=not as_json,
                                      mode=data_mode)
    except USER_ERRORS as err:
        fail(str(err))
    if as_json:
        print_json(result)
        return
    width = max(len(m["name"]) for m in result["models"])
    cols = ["clean", *result["challenges"]]
    typer.echo(f"{result['dataset']} {result['split']} ({result['images']:,} images): accuracy in percent (as on the "
               "page), clean and mean over severities 1-5")
    typer.echo(f"  {'model':<{width}}  " + "  ".join(f"{c:>12}" for c in cols))
    for name, row in result["summary"].items():
        typer.echo(f"  {name:<{width}}  " + "  ".join(f"{pct(row[c]):>12}" for c in cols))
    typer.echo(f"report: {report / HTML_NAME}")
