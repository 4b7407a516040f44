"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import json
import sys
from typing import Any

import typer

DataRoot = typer.Option(None, "--data", help="Data root folder (default: $IMCLASS_DATA, else ~/.cache/imclass).")


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (for --json)."""
    sys.stdout.write(json.dumps(obj, default=float) + "\n")


def fail(message: str, code: int = 2) -> None:
    """Print a clear error for the user and exit (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
