"""``imclass serve``: the REST service (FastAPI + uvicorn) with its web page, for one or more saved models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from imclass.cli._common import USER_ERRORS, TTAOption, fail

# Start-up time: each command imports its machinery (torch and up) inside its function, so that
# `imclass --help` and every other command start in a fraction of a second.


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
    allowed_hosts: Optional[str] = typer.Option(
        None, "--allowed-hosts", help="Host header values to answer, comma-separated ('*': any); default: the --host "
        "address, plus localhost and 127.0.0.1 when it is a loopback address; any when bound to 0.0.0.0."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds a client has to send a request's "
                                         "headers; then the connection is closed."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", help="Seconds a client has to send a request's body; "
                                       "then 408."),
) -> None:
    """Serve saved models over HTTP: POST /predict, GET /health, GET /models, the page at /, docs at /docs."""
    from imclass.serve.app import API_KEY_ENV, ServeConfig, create_app
    from imclass.serve.predictor import Predictor
    from imclass.serve.server import default_allowed_hosts, listen, run

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    hosts = tuple(h.strip() for h in allowed_hosts.split(",")) if allowed_hosts is not None \
        else default_allowed_hosts(host)
    try:
        config = ServeConfig(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_files=max_files,
                             max_pixels=max_pixels, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV),
                             allowed_hosts=hosts, header_timeout_s=header_timeout, body_timeout_s=body_timeout)
        sock = listen(host, port)  # bound before loading models: a port in use or out of range is one clear error
    except USER_ERRORS as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot listen on {host}:{port}: {err.strerror or err}")
    try:
        predictors = [Predictor.load(run_, tta=tta) for run_ in runs]
        app = create_app(predictors, config)
    except USER_ERRORS as err:
        sock.close()
        fail(str(err))
    bound = sock.getsockname()[1]
    names = ", ".join(p.name for p in predictors)
    typer.echo(f"serving {names} on http://{host}:{bound} (docs: /docs; batching {'on' if batching else 'off'}"
               f"{'; API key required' if config.api_key else ''}; hosts: "
               f"{', '.join(config.allowed_hosts) if config.allowed_hosts else 'any'})", err=True)
    run(app, sock, header_timeout=header_timeout)
