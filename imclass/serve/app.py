"""The REST service: FastAPI app over one or more ``Predictor``s, with micro-batching and a web page.

    app = create_app([Predictor.load("runs/x")], ServeConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `imclass serve runs/x` does

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /models``, ``GET /models/{name}``,
``POST /predict`` and ``POST /models/{name}/predict`` (multipart field ``file``, repeatable; ``top_k``),
``POST /explain`` (Grad-CAM overlay, when ``imclass.explain`` is installed), OpenAPI docs at ``/docs``.
Bad input gets a clear 4xx and never an internal detail: 400 a Host outside ``allowed_hosts``, 401
no/wrong API key (both checked in middleware before the body is read), 404 unknown model, 408 body
too slow, 413 upload too large / too many pixels / too many files, 415 not an accepted image format,
422 corrupt image or bad field, 503 + ``Retry-After`` when the queue is full (``/explain`` included).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from imclass.serve.batching import MicroBatcher, Overloaded
from imclass.serve.explaining import ExplainUnavailable, explain_available, gradcam_overlay
from imclass.serve.predictor import DEFAULT_MAX_PIXELS, ImageError, Predictor

# Deferred imports (inside functions), for start-up time: torch
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["ServeConfig", "create_app", "API_KEY_ENV"]

API_KEY_ENV = "IMCLASS_API_KEY"
STATIC = Path(__file__).parent / "static"
log = logging.getLogger("imclass.serve")


@dataclass
class ServeConfig:
    """Limits and batching of the service (every field is an ``imclass serve`` option)."""

    max_upload_bytes: int = 10 * 1024 * 1024  # per file
    max_files: int = 16  # per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, checked from the header before decoding
    batching: bool = True
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting; beyond -> 503
    retry_after_s: int = 1
    api_key: Optional[str] = None  # None: $IMCLASS_API_KEY, else open; "" is refused
    default_top_k: int = 5
    allowed_hosts: Optional[tuple[str, ...]] = None  # Host header values answered; None: any
    header_timeout_s: float = 10.0  # request line + headers must arrive within this (the server enforces it)
    body_timeout_s: float = 60.0  # the whole request body must arrive within this -> else 408
    explain_weight: int = 8  # an /explain (forward + backward) counts as this many images in the queue bound

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_files", "max_pixels", "max_batch", "max_queue", "default_top_k",
                     "explain_weight"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, received {name}={getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, received {name}={getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("expected a non-empty API key: an empty --api-key (or IMCLASS_API_KEY) would let "
                             "anyone in; leave it out to serve without a key")
        if self.allowed_hosts is not None:
            hosts = tuple(host_of(h) for h in self.allowed_hosts if h.strip())
            if not hosts:
                raise ValueError("expected at least one host name in allowed_hosts (or None for any)")
            self.allowed_hosts = hosts

    @property
    def max_request_bytes(self) -> int:
        """The most a whole request body may hold: every file at its limit plus the form's own fields."""
        return self.max_files * self.max_upload_bytes + 64 * 1024


OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"})


class _Refused(Exception):
    """Raised from inside ``receive`` to stop the app mid-body; the gate answers ``status`` instead."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def host_of(value: str) -> str:
    """The host part of a Host header or ``--allowed-hosts`` entry, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:value.index("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Gate:
    """ASGI middleware in front of every route, acting on the headers before any body byte is read:
    a Host outside ``allowed_hosts`` -> 400 (DNS rebinding); no or wrong API key -> 401 (compared as
    bytes in constant time; ``OPEN_PATHS`` need none); a body over ``limit`` bytes -> 413, by its
    Content-Length when sent, else while it streams in; a body not complete within ``body_timeout`` s -> 408."""

    def __init__(self, app: Any, *, limit: int, api_key: bytes | None = None,
                 allowed_hosts: frozenset[str] | None = None, body_timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts
        self.body_timeout = body_timeout

    def _key_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        given = None
        for name, value in headers:
            if name == b"x-api-key":
                given = value.strip()
                break
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        return given is not None and hmac.compare_digest(given, self.api_key or b"")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        if self.allowed_hosts is not None:
            host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1")
            if host_of(host) not in self.allowed_hosts:
                return await _answer(send, 400, "invalid Host header: this server answers only for its own host names "
                                                "(imclass serve --allowed-hosts)")
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS and not self._key_ok(headers):
            return await _answer(send, 401, "missing or wrong API key (send it as the X-API-Key header)",
                                 [(b"www-authenticate", b"Bearer")])
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _answer(send, 413, self._too_large(int(length)))
        received = 0
        done = False
        refused: _Refused | None = None
        started = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout if self.body_timeout else None

        async def guarded_receive():
            nonlocal received, done, refused
            if done:  # the body is in: waiting for a disconnect is not bounded here
                return await receive()
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                refused = _Refused(408, f"the request body did not arrive within {self.body_timeout:g} s")
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = _Refused(413, self._too_large(received))
                    raise refused
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def tracked_send(message):
            nonlocal started
            if refused is not None:  # the body was cut off mid-parse: whatever the app answers, the client gets ours
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _answer(send, refused.status, refused.detail)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except _Refused as err:
            if not started:
                await _answer(send, err.status, err.detail)

    def _too_large(self, size: int) -> str:
        return f"request body of {size:,}+ bytes exceeds the limit of {self.limit:,} bytes"


async def _answer(send: Any, status: int, detail: str, headers: list | None = None) -> None:
    """A JSON ``{"detail": ...}`` response that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def create_app(predictors: Sequence[Predictor], config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``predictors`` (the first is the default model of ``POST /predict``).

    The API key is ``config.api_key``, else ``$IMCLASS_API_KEY``, else none (open).
    """
    config = config or ServeConfig()
    predictors = list(predictors)
    if not predictors:
        raise ValueError("expected at least one model to serve")
    by_name: dict[str, Predictor] = {}
    for p in predictors:
        if p.name in by_name:
            raise ValueError(f"two models are named {p.name!r}: give each run its own folder name")
        by_name[p.name] = p
    default = predictors[0].name
    broken = [p for p in predictors if p.non_finite_weights]
    if broken:
        raise ValueError("; ".join(f"model {p.name!r} has {p.non_finite_weights:,} NaN or infinite weights (a diverged "
                                   "training run?): it would answer arbitrary labels, refusing to serve it"
                                   for p in broken))
    api_key = config.api_key
    if api_key is None and API_KEY_ENV in os.environ:
        api_key = ServeConfig(api_key=os.environ[API_KEY_ENV]).api_key  # an empty one is refused the same way
    batchers = {p.name: MicroBatcher(p.predict_proba, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                     max_queue=config.max_queue, enabled=config.batching,
                                     retry_after=config.retry_after_s)
                for p in predictors}

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        for b in batchers.values():
            b.close()

    app = FastAPI(title="imclass", version="1", lifespan=lifespan,
                  description="Image classification with imclass models: upload images, get class probabilities.")
    allowed = None if config.allowed_hosts is None or "*" in config.allowed_hosts else frozenset(config.allowed_hosts)
    app.add_middleware(_Gate, limit=config.max_request_bytes, api_key=api_key.encode() if api_key else None,
                       allowed_hosts=allowed, body_timeout=config.body_timeout_s)
    app.state.batchers = batchers
    app.state.config = config

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # never leak a traceback or a path
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors())
        return JSONResponse({"detail": f"bad request: {problems}"}, status_code=422)

    def model_or_404(name: str) -> Predictor:
        if name not in by_name:
            raise HTTPException(404, f"unknown model {name!r}; served: {sorted(by_name)}")
        return by_name[name]

    async def read_images(predictor: Predictor, files: List[UploadFile]) -> tuple[list, list[str]]:
        if len(files) > config.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; at most {config.max_files}")
        images, names = [], []
        for i, f in enumerate(files):
            label = (f.filename or f"file {i + 1}")[:120]
            data = await f.read(config.max_upload_bytes + 1)
            if len(data) > config.max_upload_bytes:
                raise HTTPException(413, f"{label}: larger than the limit of {config.max_upload_bytes:,} bytes")
            try:
                images.append(await run_in_threadpool(predictor.decode, data, max_pixels=config.max_pixels, name=label))
            except ImageError as err:
                raise HTTPException(err.status, str(err)) from None
            names.append(label)
        return images, names

    async def answer(predictor: Predictor, files: List[UploadFile], top_k: Optional[int], request: Request) -> dict:
        if top_k is None:
            raw = request.query_params.get("top_k")
            try:
                top_k = int(raw) if raw is not None else config.default_top_k
            except ValueError:
                raise HTTPException(422, f"expected an integer top_k, received {raw[:20]!r}") from None
        if top_k < 1:
            raise HTTPException(422, f"expected top_k >= 1, received top_k={top_k}")
        images, names = await read_images(predictor, files)
        try:
            rows = await batchers[predictor.name].predict(images)
        except Overloaded as err:
            raise HTTPException(503, str(err), headers={"Retry-After": str(err.retry_after)}) from None
        import torch

        probs = torch.stack(rows)
        if not bool(torch.isfinite(probs).all()):
            raise HTTPException(500, f"model {predictor.name!r} gave NaN or infinite probabilities for this input; "
                                     "no label is given")
        tops = predictor.top_k(probs, top_k)
        return {"model": predictor.name, "tta": predictor.tta,
                "predictions": [{"file": n, "label": t[0]["class"], "top": t} for n, t in zip(names, tops)]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness, the served models and the batching counters")
    async def health() -> dict:
        return {"status": "ok", "models": list(by_name), "default_model": default, "auth": api_key is not None,
                "batching": config.batching, "explain": _explain_available(),
                "stats": {name: b.stats.as_dict() for name, b in batchers.items()}}

    @app.get("/models", summary="Every served model")
    async def models() -> dict:
        return {"default": default, "models": [p.info() for p in predictors]}

    @app.get("/models/{name}", summary="One model: classes, input size, metrics")
    async def model_info(name: str) -> dict:
        return model_or_404(name).info()

    @app.post("/predict", summary="Classify images with the default model")
    async def predict(request: Request, file: List[UploadFile] = File(..., description="image(s), repeatable"),
                      top_k: Optional[int] = Form(None, description="classes per image (default 5)")) -> dict:
        return await answer(by_name[default], file, top_k, request)

    @app.post("/models/{name}/predict", summary="Classify images with one model")
    async def predict_with(name: str, request: Request,
                           file: List[UploadFile] = File(..., description="image(s), repeatable"),
                           top_k: Optional[int] = Form(None, description="classes per image (default 5)")) -> dict:
        return await answer(model_or_404(name), file, top_k, request)

    @app.post("/explain",
              summary="Grad-CAM overlay (PNG, base64) for the top class of one image")
    async def explain(file: UploadFile = File(...), model: Optional[str] = Form(None),
                      target: Optional[int] = Form(None)) -> dict:
        predictor = model_or_404(model or default)
        images, names = await read_images(predictor, [file])
        try:  # the same queue bound as /predict, run on the same single inference thread
            return await batchers[predictor.name].run_alone(gradcam_overlay, predictor, images[0], target,
                                                            weight=config.explain_weight)
        except Overloaded as err:
            raise HTTPException(503, str(err), headers={"Retry-After": str(err.retry_after)}) from None
        except ExplainUnavailable as err:
            raise HTTPException(501, str(err)) from None

    return app


def _explain_available() -> bool:
    return explain_available()
