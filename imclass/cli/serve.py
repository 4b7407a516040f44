"""``imclass serve``: the REST service (FastAPI + uvicorn) with its web page, for one or more saved models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import USER_ERRORS, TTAOption, fail


def register(app: typer.Typer) -> None:
    """Add the top-level command ``serve`` to ``app``."""
    app.command("serve")(serve)


def serve(
    runs: List[Path] = typer.Argument(..., help="Run folders, .safetensors model files or exported .onnx files; "
                                      "the first is the default model of POST /predict."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed at start)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require this key (X-API-Key header); "
                                          "default: $IMCLASS_API_KEY, else no key."),
    tta: Optional[bool] = TTAOption,
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Micro-batch concurrent requests."),
    max_batch: int = typer.Option(32, "--max-batch", help="Images per shared forward pass."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a batch waits for more images."),
    max_queue: int = typer.Option(256, "--max-queue", help="Images waiting at most; beyond: 503 + Retry-After."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest upload per file (MB); beyond: 413."),
    max_files: int = typer.Option(16, "--max-files", help="Files per request at most; beyond: 413."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Pixels per image at most (checked before decoding)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for inference (default: torch's)."),
) -> None:
    """Serve saved models over HTTP: POST /predict, GET /health, GET /models, the page at /, docs at /docs."""
    from imclass.serve.app import API_KEY_ENV, ServeConfig, create_app
    from imclass.serve.predictor import Predictor

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    try:
        config = ServeConfig(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_files=max_files,
                             max_pixels=max_pixels, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, api_key=api_key or os.environ.get(API_KEY_ENV) or None)
        predictors = []
        for run in runs:
            predictors.append(Predictor.load(run, tta=tta))
        app = create_app(predictors, config)
    except USER_ERRORS as err:
        fail(str(err))
    import socket

    import uvicorn

    # bind here so that --port 0 can say which port it got, and a port in use is one clear error
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        fail(f"cannot listen on {host}:{port}: {err.strerror or err}")
    bound = sock.getsockname()[1]
    names = ", ".join(p.name for p in predictors)
    typer.echo(f"serving {names} on http://{host}:{bound} (docs: /docs; batching {'on' if batching else 'off'}"
               f"{'; API key required' if config.api_key else ''})", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
