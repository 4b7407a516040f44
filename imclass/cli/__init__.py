"""The ``imclass`` command line: one module per command group, registered here."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="imclass",
    help="Image classification from a folder of images (or CIFAR-10) to a trained, evaluated classifier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)` adding its commands or sub-groups.
_COMMAND_MODULES = ["data", "knn", "models", "train", "evaluate", "predict", "serve", "export", "tune", "challenge", "compare", "transfer", "features", "explain", "review"]

for _name in _COMMAND_MODULES:
    importlib.import_module(f"imclass.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
