"""The REST service: ``create_app(source)`` -> a FastAPI app speaking TensorFlow Serving's REST API.

Routes (``{name}`` is the served model's name, ``{v}`` its version):

    GET  /v1/models/{name}                  status (TF Serving's model_version_status)
    GET  /v1/models/{name}/metadata         signature: input shape/dtype, class names, input scale
    POST /v1/models/{name}:predict          {"instances": [...]} or {"inputs": ...} -> {"predictions"} / {"outputs"}
    POST /v1/models/{name}/versions/{v}:predict
    POST /v1/models/{name}:classify         -> {"results": [[[label, score], ...], ...]} (top-k, best first)
    POST /v1/models/{name}:explain          Grad-CAM PNGs (base64) via cnnkit.explain; 501 where it is absent
    POST /predict                           multipart image files (?top_k=) -> label, confidence, top-k
    GET  /healthz  /readyz  /metrics  /docs

The model is loaded and warmed in the lifespan (``/readyz`` answers 503 until then). Images are
decoded on worker threads by ``Predictor.load`` (the training decode); model calls go through a
``MicroBatcher`` unless batching is off. Every bad request is a 4xx ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnnkit.errors import CnnkitError, ConfigError, DataError, RegistryError
from cnnkit.serve.batching import MicroBatcher
from cnnkit.serve.inputs import RequestError


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs. Read from ``CNNKIT_*`` environment variables by ``create_app`` when not given.

    Attributes:
        max_batch_size: most images per model call (``CNNKIT_MAX_BATCH_SIZE``).
        max_wait_ms: how long a request may wait for others to share its batch (``CNNKIT_MAX_WAIT_MS``).
        batching: gather concurrent requests into one model call (``CNNKIT_BATCHING``, 1/0).
        max_body_bytes: larger request bodies get 413 (``CNNKIT_MAX_BODY_BYTES``).
        max_instances: most images in one request (``CNNKIT_MAX_INSTANCES``).
        max_pixels: images with more pixels are refused as decompression bombs (``CNNKIT_MAX_PIXELS``;
            default: the model's own limit).
        top_k: classes listed by ``:classify`` and ``/predict`` by default.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batching: bool = True
    max_body_bytes: int = 20 * 1024 * 1024
    max_instances: int = 256
    max_pixels: int | None = None
    top_k: int = 5

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_body_bytes", "max_instances", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"Serve setting {key} must be >= 1. Received: {key}={getattr(self, key)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"Serve setting max_wait_ms must be >= 0. Received: max_wait_ms={self.max_wait_ms}")

    @classmethod
    def from_env(cls, **given: Any) -> ServeSettings:
        """Settings from ``given`` (None = not given), then ``CNNKIT_<FIELD>`` variables, then defaults."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if given.get(f.name) is not None:
                values[f.name] = given[f.name]
            elif os.environ.get(f"CNNKIT_{f.name.upper()}"):
                raw = os.environ[f"CNNKIT_{f.name.upper()}"]
                try:
                    values[f.name] = raw.lower() in ("1", "true", "yes", "on") if f.name == "batching" else (
                        float(raw) if f.name == "max_wait_ms" else int(raw))
                except ValueError:
                    raise ConfigError(f"Environment variable CNNKIT_{f.name.upper()} must be a number. "
                                      f"Received: {raw!r}") from None
        return cls(**values)


@dataclass
class ModelSource:
    """Where the served model comes from: its ``.keras`` file, URL name, version and run directory."""

    path: Path
    name: str
    version: str
    run_dir: Path | None
    sha256: str | None = None


def resolve_source(source: str | Path, name: str | None = None, registry_url: str | None = None) -> ModelSource:
    """``RUN`` dir, ``model.keras`` or ``NAME@production`` (``NAME@3``) -> a ModelSource.

    Raises:
        RunNotFoundError / VersionNotFoundError: nothing there.
        RegistryError: the registered artifact changed since registration (its sha256 differs).
    """
    from cnnkit.models.saving import resolve_model_path

    text = str(source)
    if "@" in text and not Path(text).exists():
        from cnnkit.registry import Registry, sha256_file

        with Registry(registry_url) as registry:
            version = registry.get(text)
        path = Path(version.artifact_path)
        if not path.is_file() or sha256_file(path) != version.sha256:
            raise RegistryError(f"The artifact of {version.ref} ({path}) is missing or changed since it was registered; "
                                "refusing to serve it. Run 'cnnkit registry verify' and register the run again.")
        return ModelSource(path, name or version.name, str(version.version),
                           Path(version.run_dir) if version.run_dir else None, version.sha256)
    path = resolve_model_path(text)
    run_dir = path.parent if (path.parent / "run.json").exists() else None
    default = path.parent.name if path.stem == "model" else path.stem
    return ModelSource(path, name or _url_name(default), "1", run_dir)


def _url_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _calibration(meta_extra: dict[str, Any], run_dir: Path | None) -> tuple[float, float | None]:
    """(temperature, abstain threshold) stored with the run by calibration, else (1.0, None).

    Looked up in the model's metadata (``extra["temperature"]``, ``extra["min_confidence"]``), then in
    ``run.json``'s ``calibration`` section.
    """
    found = {k: meta_extra[k] for k in ("temperature", "min_confidence") if meta_extra.get(k) is not None}
    found = found or dict(meta_extra.get("calibration") or {})
    if not found and run_dir is not None and (run_dir / "run.json").exists():
        found = dict(json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("calibration") or {})
    temperature = float(found.get("temperature") or 1.0)
    threshold = found.get("min_confidence", found.get("threshold"))
    return temperature, (float(threshold) if threshold is not None else None)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling on probabilities: softmax(log(p) / T) (T = 1 leaves them unchanged)."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class _Served:
    """The loaded model and everything a request needs (lives in ``app.state.served``)."""

    def __init__(self, source: ModelSource, settings: ServeSettings) -> None:
        from cnnkit.models.saving import load_model
        from cnnkit.predict import Predictor

        model, meta = load_model(source.path)
        if settings.max_pixels is not None:
            meta = dataclasses.replace(meta, max_pixels=min(meta.max_pixels, settings.max_pixels))
        self.source, self.settings = source, settings
        self.predictor = Predictor.from_model(model, meta, batch_size=max(settings.max_batch_size, 1))
        if hasattr(self.predictor, "temperature"):  # a Predictor that calibrates its own outputs
            self.temperature, self.min_confidence = self.predictor.temperature, self.predictor.min_confidence
            self._apply_temperature = False
        else:
            self.temperature, self.min_confidence = _calibration(meta.extra, source.run_dir)
            self._apply_temperature = True
        self.batcher: MicroBatcher | None = None
        self.ready = False

    def warm_up(self) -> None:
        """Trace the model for a single image and a full batch, so the first requests are not slow."""
        for n in sorted({1, self.settings.max_batch_size}):
            self.predictor.predict_arrays(np.zeros((n, *self.predictor.input_shape), np.uint8))

    async def predict(self, images: np.ndarray) -> np.ndarray:
        if self.batcher is not None:
            probs = await self.batcher.predict(images)
        else:
            probs = await run_in_threadpool(self.predictor.predict_arrays, images)
        return apply_temperature(probs, self.temperature) if self._apply_temperature else probs


def create_app(
    source: str | Path | None = None,
    *,
    name: str | None = None,
    registry_url: str | None = None,
    settings: ServeSettings | None = None,
    **setting_overrides: Any,
) -> FastAPI:
    """Build the service for one model.

    Args:
        source: a run directory, a ``.keras`` file, or ``NAME@production`` / ``NAME@VERSION`` from the
            registry (default: ``CNNKIT_MODEL``).
        name: the model's name in URLs (default: the registry name, or the run directory's name;
            ``CNNKIT_MODEL_NAME``).
        registry_url: the registry for ``NAME@...`` sources (default ``CNNKIT_REGISTRY_URL``).
        settings: ServeSettings; or give its fields as keywords (``max_batch_size=16``).

    Raises:
        ConfigError: no source given. RunNotFoundError / VersionNotFoundError: nothing there.

    Example:
        >>> app = create_app("runs/first", max_batch_size=16)   # then: uvicorn.run(app)
    """
    source = source or os.environ.get("CNNKIT_MODEL")
    if not source:
        raise ConfigError("No model to serve: pass a run directory, a .keras file or NAME@production "
                          "(or set CNNKIT_MODEL).")
    settings = settings or ServeSettings.from_env(**setting_overrides)
    resolved = resolve_source(source, name or os.environ.get("CNNKIT_MODEL_NAME"),
                              registry_url or os.environ.get("CNNKIT_REGISTRY_URL"))
    metrics = _Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served = await run_in_threadpool(_Served, resolved, settings)
        await run_in_threadpool(served.warm_up)
        if settings.batching:
            served.batcher = MicroBatcher(served.predictor.predict_arrays, settings.max_batch_size,
                                          settings.max_wait_ms, on_batch=metrics.batch_size.observe)
            await served.batcher.start()
        app.state.served, served.ready = served, True
        yield
        if served.batcher is not None:
            await served.batcher.stop()

    app = FastAPI(title=f"cnnkit: {resolved.name}", version=resolved.version, lifespan=lifespan,
                  description="TensorFlow-Serving-compatible REST API for a cnnkit image classifier.")
    app.state.served = None
    app.state.source = resolved
    _add_error_handlers(app)
    _add_metrics(app, metrics)
    from cnnkit.serve.routes import add_routes

    add_routes(app, resolved, settings, metrics)
    return app


# -- errors: one place maps every failure to a 4xx {"error": ...} ----------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(CnnkitError)
    async def _cnnkit_error(request: Request, exc: CnnkitError) -> JSONResponse:
        status = 404 if isinstance(exc, LookupError) else 422 if isinstance(exc, DataError) else 400
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
        return _error(400, "Invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, keep serving
        return _error(500, f"Internal error ({type(exc).__name__}): {exc}")


# -- metrics ----------------------------------------------------------------------------------------


class _Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cnnkit_requests", "HTTP requests.", ["endpoint", "method", "status"],
                                registry=self.registry)
        self.errors = Counter("cnnkit_errors", "Requests answered with a 4xx or 5xx status.", ["endpoint", "status"],
                              registry=self.registry)
        self.latency = Histogram("cnnkit_request_latency_seconds", "Request latency.", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("cnnkit_batch_size", "Images per model call.", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.images = Counter("cnnkit_images", "Images predicted.", registry=self.registry)


def _add_metrics(app: FastAPI, metrics: _Metrics) -> None:
    app.add_middleware(_MeasureRequests, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


class _MeasureRequests:
    """Pure ASGI middleware counting requests, errors and latency per route template.

    (Not ``@app.middleware("http")``: its BaseHTTPMiddleware costs about a millisecond per request.)
    """

    def __init__(self, app, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            if status[0] >= 400:
                self.metrics.errors.labels(endpoint, str(status[0])).inc()


# -- request bodies ---------------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 past ``max_bytes`` (checked on Content-Length and while streaming)."""
    declared = request.headers.get("content-length")
    too_big = RequestError(413, f"The request body is over the server's limit of {max_bytes:,} bytes "
                                "(max_body_bytes / CNNKIT_MAX_BODY_BYTES). Send smaller or fewer images.")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads the cached body in request.form()
    return body


def check_content_type(request: Request, allowed: tuple[str, ...], example: str) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in allowed:
        raise RequestError(415, f"Content type '{kind}' is not accepted here; send {' or '.join(allowed[:1])}, "
                                f"e.g. {example}.")


async def decode_all(items: list[Any], decode) -> np.ndarray:
    """Decode every item on worker threads (off the event loop); stack to (N, H, W, C) uint8."""
    arrays = await asyncio.gather(*(run_in_threadpool(decode, item, i) for i, item in enumerate(items)))
    return np.stack(arrays)


__all__ = ["ModelSource", "ServeSettings", "apply_temperature", "create_app", "resolve_source"]
