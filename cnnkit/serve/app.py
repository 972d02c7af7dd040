"""Serve stage: ``create_app(source)`` -> a FastAPI app speaking TensorFlow Serving's REST API.

Routes (``cnnkit.serve.routes``; ``{name}`` is the served model's name, ``{v}`` its version):

    GET  /v1/models/{name}                  status (TF Serving's model_version_status)
    GET  /v1/models/{name}/metadata         signature: input shape/dtype, class names, input scale
    POST /v1/models/{name}:predict          {"instances": [...]} or {"inputs": ...} -> {"predictions"} / {"outputs"}
    POST /v1/models/{name}/versions/{v}:predict
    POST /v1/models/{name}:classify         -> {"results": [[[label, score], ...], ...]} (top-k, best first)
    POST /v1/models/{name}:explain          Grad-CAM PNGs (base64)
    POST /predict                           multipart image files (?top_k=) -> label, confidence, top-k
    GET  /healthz  /readyz  /metrics  /docs
    GET  /   /v1/models/{name}/card   /v1/models/{name}/reports/{report}   the web page (``cnnkit.serve.page``)

The model is loaded and warmed by ``create_app``, before a server opens its port, so a model that
cannot load or run is one error there (``cnnkit serve`` and ``python -m cnnkit.serve`` print it and
exit 2), not a traceback from the server's start-up; ``/readyz`` answers 503 while the model queue
is not running (shutting down). Images are
decoded on worker threads by ``Predictor.load`` (the training decode); every model call goes
through one bounded queue on one thread (``MicroBatcher``: 429 when full, 504 past the deadline,
503 while shutting down). Every bad request is a 4xx ``{"error": "..."}``, mapped here in one
place. The ``CNNKIT_*`` variables are read here, once.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnnkit.errors import CnnkitError, ConfigError, DataError, ModelError
from cnnkit.registry import ModelSource, resolve_source
from cnnkit.serve.inputs import RequestError
from cnnkit.serve.page import router as page_router
from cnnkit.serve.prometheus import MeasureRequests, Metrics
from cnnkit.serve.routes import router
from cnnkit.serve.settings import ServeSettings
from cnnkit.serve.state import Served


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
        ModelError: the model cannot be loaded or run on the chosen engine (it loads and warms up here).

    Example:
        >>> app = create_app("runs/first", max_batch_size=16)   # then: uvicorn.run(app)
    """
    source = source or os.environ.get("CNNKIT_MODEL")
    if not source:
        raise ConfigError("No model to serve: pass a run directory, a .keras file or NAME@production "
                          "(or set CNNKIT_MODEL).")
    settings = settings or ServeSettings.from_env(**setting_overrides)
    registry_url = registry_url or os.environ.get("CNNKIT_REGISTRY_URL")
    resolved = resolve_source(source, name or os.environ.get("CNNKIT_MODEL_NAME"), registry_url)
    served = _load(resolved, settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await served.start(on_batch=metrics.batch_size.observe)
        app.state.served, served.ready = served, True
        yield
        await served.stop()  # answers what is queued (up to shutdown_timeout_s), refuses the rest with 503
        app.state.served, served.ready = None, False

    app = FastAPI(title=f"cnnkit: {resolved.name}", version=resolved.version, lifespan=lifespan,
                  description="TensorFlow-Serving-compatible REST API for a cnnkit image classifier.")
    app.state.served = None
    app.state.source, app.state.settings, app.state.metrics = resolved, settings, metrics
    app.state.registry_url = registry_url  # the page's model card reads the version's row (and its stage)
    _add_error_handlers(app)
    app.add_middleware(MeasureRequests, metrics=metrics)
    app.include_router(router)
    app.include_router(page_router)
    return app


def _load(resolved: ModelSource, settings: ServeSettings) -> Served:
    """The model, loaded and warmed (one image and a full batch) before any server starts.

    Raises:
        ModelError: it cannot load (a damaged file, an engine not installed) or cannot run.
    """
    served = Served(resolved, settings)
    try:
        served.warm_up()
    except CnnkitError:
        raise
    except Exception as exc:  # the engines raise their own types for a model that loads but cannot run
        raise ModelError(f"The model '{resolved.path}' loaded but cannot run on the {served.engine} engine "
                         f"({type(exc).__name__}: {exc}). Export or train it again, or serve it with the other "
                         f"--engine. Received: engine={served.engine!r}") from exc
    return served


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        response = _error(exc.status, exc.message)
        response.headers.update(exc.headers or {})
        return response

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
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, keep serving
        return _error(500, f"Internal error ({type(exc).__name__}): {exc}")
