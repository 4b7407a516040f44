"""``imclass models``: the architectures by name with their parameter counts, and their summaries."""
from __future__ import annotations

import json
from typing import Any, List, Optional

import typer

from imclass.cli._common import fail, print_json

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.

models_app = typer.Typer(
    help="List the architectures (`imclass models`, `--pattern 'res*'`, `--pattern 'timm:*vit*'`) "
    "or print one's layers (`imclass models summary resnet20`).",
    invoke_without_command=True,
)

_PATTERN = typer.Option("*", "--pattern", "-p", help="Shell-style pattern; 'timm:<pattern>' lists timm's models.")
_JSON = typer.Option(False, "--json", help="Print one JSON object: {'models': [{'name', 'params', 'description'}]}.")
TIMM_NOTE = "Any timm architecture works too as timm:<name> (e.g. timm:resnet18; list them with --pattern 'timm:*')."


def register(app: typer.Typer) -> None:
    """Add the ``models`` command group to the ``imclass`` app."""
    app.add_typer(models_app, name="models")


def count_params(name: str, **options: Any) -> int:
    """Parameter count of a registered architecture, built without allocating its weights when possible."""
    import torch

    from imclass.models import create

    try:
        with torch.device("meta"):
            model = create(name, **options)
    except (RuntimeError, NotImplementedError):  # an architecture that cannot be built on the meta device
        model = create(name, **options)
    return sum(p.numel() for p in model.parameters())


def _describe(name: str) -> str:
    import re

    from imclass.models._registry import model_doc

    doc = model_doc(name)
    first = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())  # the whole first paragraph
    first = re.sub(r":\w+:`([^`]*)`", r"\1", first)  # RST roles (:func:`x`) -> x
    return first.replace("``", "")  # RST literals -> plain text


def list_models(pattern: str = "*") -> list[dict[str, Any]]:
    """``[{"name", "params", "description"}]`` for the names matching ``pattern`` (timm ones: no count)."""
    from imclass.models import names

    if pattern.startswith("timm:"):
        import timm

        return [{"name": f"timm:{n}", "params": None, "description": ""} for n in timm.list_models(pattern[5:] or "*")]
    return [{"name": n, "params": count_params(n), "description": _describe(n)} for n in names(pattern)]


@models_app.callback()
def models_main(ctx: typer.Context, pattern: str = _PATTERN, as_json: bool = _JSON) -> None:
    """List the architectures with their parameter counts (for 10 classes, 3x32x32 input)."""
    if ctx.invoked_subcommand is None:
        _print_list(pattern, as_json)


@models_app.command("list")
def list_command(pattern: str = _PATTERN, as_json: bool = _JSON) -> None:
    """List the architectures with their parameter counts (for 10 classes, 3x32x32 input)."""
    _print_list(pattern, as_json)


def _print_list(pattern: str, as_json: bool) -> None:
    rows = list_models(pattern)
    if as_json:
        print_json({"models": rows, "note": TIMM_NOTE})
        return
    if not rows:
        typer.echo(f"no architecture matches {pattern!r}")
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        params = "" if r["params"] is None else f"{r['params']:>12,}"
        typer.echo(f"{r['name']:<{width}}  {params}  {r['description']}".rstrip())
    if not pattern.startswith("timm:"):
        typer.echo(f"\n{TIMM_NOTE}")


@models_app.command("summary")
def summary_command(
    name: str = typer.Argument(..., help="Architecture name, e.g. resnet20, keras_cnn or timm:resnet10t."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="Model option KEY=VALUE (JSON value)."),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="One input's shape, e.g. 3,32,32 or 32,32,3 [the model's own, else in_chans,32,32]."
    ),
    arithmetic: bool = typer.Option(False, "--arithmetic", help="Show (W - F + 2P)/S + 1 for conv and pool layers."),
) -> None:
    """Print a model's layers, output shapes and parameter counts (like Keras's model.summary())."""
    from imclass.models import create
    from imclass.summarize import summary

    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"expected --option KEY=VALUE, received {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string such as relu
    try:
        model = create(name, **options)
        if input_shape is not None:
            shape: Any = tuple(int(d) for d in input_shape.replace("x", ",").split(","))
        else:  # a Sequential knows its input shape
            shape = getattr(model, "input_shape", None) or (options.get("in_chans", 3), 32, 32)
        summary(model, shape, arithmetic=arithmetic, print_fn=typer.echo)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        fail(str(err))
