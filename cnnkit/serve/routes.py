"""Serve stage: the service's routes, one ``APIRouter``; what each needs comes by ``Depends``.

The app (``create_app``) keeps the model source, settings and metrics in ``app.state``; the
dependencies below hand them to the routes, and ``get_served`` answers 503 until the model is
loaded. Response schemas are declared for the OpenAPI docs (``/docs``).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.convertors import Convertor, register_url_convertor

from cnnkit.plots import overlay, png_base64
from cnnkit.predict import UNKNOWN_LABEL
from cnnkit.registry import ModelSource
from cnnkit.serve.inputs import (
    SIGNATURE,
    RequestError,
    check_content_type,
    decode_all,
    decode_file,
    decode_instance,
    parse_body,
    read_body,
    uploaded_files,
)
from cnnkit.serve.prometheus import Metrics, exposition
from cnnkit.serve.settings import ServeSettings
from cnnkit.serve.state import Served

_PREDICT_EXAMPLE = '{"instances": [{"b64": "<base64 JPEG/PNG bytes>"}]}'
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {
                "instances": {"type": "array", "description": "Row format: images as {\"b64\": ...} or pixel arrays "
                              "(height, width, channels) of raw 0-255 values."},
                "inputs": {"description": "Columnar format: a list of images, or {input_name: list}."},
                "input_scale": {"type": "string", "enum": ["0-255", "0-1"], "description": "State the scale of "
                                "pixel arrays; without it, arrays that look scaled to [0, 1] are refused."},
                "top_k": {"type": "integer", "description": ":classify only: classes per image."},
            },
            "example": {"instances": [{"b64": "iVBORw0KGgo..."}]},
        }}},
    }
}


_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {"file": {"type": "string", "format": "binary", "description": "An image file; send "
                                    "several files under any field names."}},
            "required": ["file"],
        }}},
    }
}


class ErrorResponse(BaseModel):
    """Every error: what is wrong and what to send instead."""

    error: str


# Declared for every route, so clients (and the schema tests) know each status a route may answer.
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Bad request: invalid JSON (or nested too deeply), base64, image, shape or parameter",
    404: "No such model or version here",
    405: "Method not allowed",
    413: "Request body over max_body_bytes",
    415: "Unsupported content type",
    422: "The request's images cannot be used",
    429: "Overloaded: the model queue is full; retry after the Retry-After header's seconds",
    500: "A bug in the server (never a bad request or load)",
    503: "Loading, or shutting down",
    504: "No answer within request_timeout_s",
}.items()}


class Readiness(BaseModel):
    status: str
    model: str | None = None
    version: str | None = None


class PredictResponse(BaseModel):
    predictions: list[list[float]] | None = None
    outputs: list[list[float]] | None = None


class ClassifyResponse(BaseModel):
    results: list[list[tuple[str, float]]]


class ImagePrediction(BaseModel):
    filename: str
    label: str
    confidence: float
    abstained: bool
    top_k: list[dict[str, Any]]


class FriendlyResponse(BaseModel):
    model: str
    version: str
    predictions: list[ImagePrediction]


# -- dependencies ------------------------------------------------------------------------------------


def get_source(request: Request) -> ModelSource:
    return request.app.state.source


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_served(request: Request) -> Served:
    """The loaded model; 503 while it is still loading."""
    state = request.app.state.served
    if state is None or not state.ready:
        raise RequestError(503, "The model is still loading; retry when /readyz answers 200.")
    return state


SourceDep = Annotated[ModelSource, Depends(get_source)]
SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServedDep = Annotated[Served, Depends(get_served)]


def model_named(name: str, source: SourceDep) -> None:
    """404 unless ``{name}`` is the served model."""
    if name != source.name:
        raise RequestError(404, f"Servable not found: no model '{name}' here; this server serves "
                                f"'{source.name}' (GET /v1/models/{source.name}).")


def version_served(name: str, version: str, source: SourceDep) -> None:
    """404 unless ``{name}/versions/{version}`` is the served model and version."""
    model_named(name, source)
    if version != source.version:
        raise RequestError(404, f"Servable not found: '{name}' has no version {version} here; this server "
                                f"serves version {source.version}.")


class _NoVerb(Convertor):
    """A path segment without ':', which TF Serving puts before a verb: the status routes then never
    match ``/v1/models/x:predict``, so other methods on it get 405 with ``Allow: POST``, not ``GET``."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("noverb", _NoVerb())
router = APIRouter(responses=ERRORS)
_MODEL = [Depends(model_named)]
_VERSION = [Depends(version_served)]


async def _decoded(request: Request, served: Served, settings: ServeSettings, metrics: Metrics) -> tuple[Any, np.ndarray]:
    # curl -d sends application/x-www-form-urlencoded: TF Serving's documented curl examples must work.
    check_content_type(request, ("application/json", "text/plain", "application/x-www-form-urlencoded"),
                       _PREDICT_EXAMPLE)
    parsed = parse_body(await read_body(request, settings.max_body_bytes), settings.max_instances)
    images = await decode_all(parsed.instances,
                              lambda item, i: decode_instance(item, i, served.predictor, parsed.input_scale))
    metrics.images.inc(len(images))
    return parsed, images


def _status(source: ModelSource) -> dict[str, Any]:
    return {"model_version_status": [{"version": source.version, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


# -- TensorFlow Serving's REST API ---------------------------------------------------------------------


@router.get("/v1/models/{name:noverb}", tags=["TensorFlow Serving"], dependencies=_MODEL)
async def model_status(source: SourceDep, served: ServedDep) -> dict[str, Any]:
    """Model status, as TF Serving reports it."""
    return _status(source)


@router.get("/v1/models/{name}/versions/{version:noverb}", tags=["TensorFlow Serving"], dependencies=_VERSION)
async def model_version_status(source: SourceDep, served: ServedDep) -> dict[str, Any]:
    return _status(source)


@router.get("/v1/models/{name}/metadata", tags=["TensorFlow Serving"], dependencies=_MODEL)
async def model_metadata(source: SourceDep, served: ServedDep) -> dict[str, Any]:
    """The serving signature (input shape and dtype, output), class names and input scale."""
    return _metadata(source, served)


@router.get("/v1/models/{name}/versions/{version}/metadata", tags=["TensorFlow Serving"], dependencies=_VERSION)
async def model_version_metadata(source: SourceDep, served: ServedDep) -> dict[str, Any]:
    return _metadata(source, served)


def _metadata(source: ModelSource, served: Served) -> dict[str, Any]:
    meta = served.predictor.meta
    height, width, channels = served.predictor.input_shape
    dims = [{"size": "-1", "name": ""}, {"size": str(height), "name": ""}, {"size": str(width), "name": ""},
            {"size": str(channels), "name": ""}]
    signature = {
        "inputs": {"image": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims, "unknown_rank": False},
                             "name": "image"}},
        "outputs": {"probabilities": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [
            {"size": "-1", "name": ""}, {"size": str(len(meta.class_names)), "name": ""}], "unknown_rank": False},
            "name": "probabilities"}},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": source.name, "signature_name": "", "version": source.version},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
        "cnnkit": {"class_names": meta.class_names, "image_size": list(meta.image_size),
                   "color_mode": meta.color_mode, "resize_mode": meta.resize_mode,
                   "input_scale": meta.input_scale, "architecture": meta.architecture,
                   "temperature": served.temperature, "min_confidence": served.min_confidence,
                   "max_pixels": meta.max_pixels, "engine": served.engine},
    }


async def _predict(request: Request, served: Served, settings: ServeSettings, metrics: Metrics) -> JSONResponse:
    parsed, images = await _decoded(request, served, settings, metrics)
    probs = await served.predict(images)
    return JSONResponse({"outputs" if parsed.columnar else "predictions": probs.tolist()})


@router.post("/v1/models/{name}:predict", tags=["TensorFlow Serving"], response_model=PredictResponse,
             openapi_extra=_BODY_DOC, dependencies=_MODEL)
async def model_predict(request: Request, served: ServedDep, settings: SettingsDep, metrics: MetricsDep) -> JSONResponse:
    """Class probabilities per image: row format answers "predictions", columnar "outputs"."""
    return await _predict(request, served, settings, metrics)


@router.post("/v1/models/{name}/versions/{version}:predict", tags=["TensorFlow Serving"],
             response_model=PredictResponse, openapi_extra=_BODY_DOC, dependencies=_VERSION)
async def model_version_predict(request: Request, served: ServedDep, settings: SettingsDep,
                                metrics: MetricsDep) -> JSONResponse:
    return await _predict(request, served, settings, metrics)


@router.post("/v1/models/{name}:classify", tags=["TensorFlow Serving"], response_model=ClassifyResponse,
             openapi_extra=_BODY_DOC, dependencies=_MODEL)
async def model_classify(request: Request, served: ServedDep, settings: SettingsDep, metrics: MetricsDep) -> JSONResponse:
    """Top-k (class name, probability) per image, best first (``top_k`` in the body, default 5)."""
    parsed, images = await _decoded(request, served, settings, metrics)
    ranked = served.predictor.top_k(await served.predict(images), parsed.top_k or settings.top_k)
    return JSONResponse({"results": [[[label, score] for label, score in row] for row in ranked]})


_NOT_IMPLEMENTED = {501: {"model": ErrorResponse, "description": "Not available on this server's inference engine "
                                                                  "(Grad-CAM needs the keras engine)"}}


@router.post("/v1/models/{name}:explain", tags=["TensorFlow Serving"], openapi_extra=_BODY_DOC, dependencies=_MODEL,
             responses=_NOT_IMPLEMENTED)
async def model_explain(request: Request, served: ServedDep, settings: SettingsDep, metrics: MetricsDep) -> JSONResponse:
    """Grad-CAM of the predicted class per image: heatmap and overlay as base64 PNGs (keras engine only: else 501)."""
    if served.engine != "keras":
        raise RequestError(501, f"Grad-CAM needs the model's gradients, which the {served.engine} engine does not "
                                "compute. Serve the run's .keras with --engine keras (CNNKIT_ENGINE=keras) for "
                                f":explain. Received: engine={served.engine!r}")
    from cnnkit.gradcam import compute_gradcam

    _, images = await _decoded(request, served, settings, metrics)
    probs = await served.predict(images)
    best = probs.argmax(axis=1)
    heatmaps, _, layer = await served.run_alone(compute_gradcam, served.predictor.model, images, best)
    results = []
    for image, heatmap, index, row in zip(images, heatmaps, best, probs):
        results.append({"class_name": served.predictor.class_names[int(index)], "class_index": int(index),
                        "probability": float(row[index]), "layer": layer,
                        "heatmap_png_b64": png_base64((heatmap * 255).round().astype(np.uint8)),
                        "overlay_png_b64": png_base64(overlay(image, heatmap))})
    return JSONResponse({"explanations": results})


# -- plain file upload ------------------------------------------------------------------------------


@router.post("/predict", tags=["friendly"], response_model=FriendlyResponse, openapi_extra=_UPLOAD_DOC)
async def predict_files(request: Request, source: SourceDep, served: ServedDep, settings: SettingsDep,
                        metrics: MetricsDep,
                        top_k: int = Query(3, ge=1, description="Classes listed per image.")) -> JSONResponse:
    """Upload image files (multipart/form-data, any field name): label, confidence and top-k per file."""
    check_content_type(request, ("multipart/form-data",), "curl -F file=@cat.jpg http://HOST/predict")
    if not request.headers.get("content-type"):
        raise RequestError(415, "Send images as multipart/form-data, e.g. curl -F file=@cat.jpg http://HOST/predict.")
    await read_body(request, settings.max_body_bytes)
    files = await uploaded_files(request, settings.max_instances)
    images = await decode_all(files, lambda item, i: decode_file(item, served.predictor))
    metrics.images.inc(len(images))
    probs = await served.predict(images)
    results = []
    for (filename, _), row in zip(files, served.predictor.top_k(probs, top_k)):
        label, confidence = row[0]
        abstained = served.predictor.abstains(confidence)
        results.append({"filename": filename, "label": UNKNOWN_LABEL if abstained else label,
                        "confidence": confidence, "abstained": abstained,
                        "top_k": [{"label": n, "probability": p} for n, p in row]})
    return JSONResponse({"model": source.name, "version": source.version, "predictions": results})


# -- operations ----------------------------------------------------------------------------------------


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request, source: SourceDep) -> JSONResponse:
    """Readiness: the model is loaded and warmed (503 before)."""
    state = request.app.state.served
    if state is None or not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model": source.name, "version": source.version})


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    content, media_type = exposition(metrics)
    return Response(content, media_type=media_type)
