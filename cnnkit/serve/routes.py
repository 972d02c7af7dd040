"""The service's routes (added to the app by ``create_app``); response schemas for the OpenAPI docs."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cnnkit.serve.app import ModelSource, ServeSettings, _Metrics, check_content_type, decode_all, read_body
from cnnkit.serve.inputs import RequestError, decode_instance, parse_body

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


def add_routes(app: FastAPI, source: ModelSource, settings: ServeSettings, metrics: _Metrics) -> None:
    def served(request: Request):
        state = request.app.state.served
        if state is None or not state.ready:
            raise RequestError(503, "The model is still loading; retry when /readyz answers 200.")
        return state

    def check_model(name: str, version: str | None = None) -> None:
        if name != source.name:
            raise RequestError(404, f"Servable not found: no model '{name}' here; this server serves "
                                    f"'{source.name}' (GET /v1/models/{source.name}).")
        if version is not None and version != source.version:
            raise RequestError(404, f"Servable not found: '{name}' has no version {version} here; this server "
                                    f"serves version {source.version}.")

    async def decode_request(request: Request) -> tuple[Any, np.ndarray]:
        state = served(request)
        # curl -d sends application/x-www-form-urlencoded: TF Serving's documented curl examples must work.
        check_content_type(request, ("application/json", "text/plain", "application/x-www-form-urlencoded"),
                           _PREDICT_EXAMPLE)
        parsed = parse_body(await read_body(request, settings.max_body_bytes), settings.max_instances)
        images = await decode_all(parsed.instances,
                                  lambda item, i: decode_instance(item, i, state.predictor, parsed.input_scale))
        metrics.images.inc(len(images))
        return parsed, images

    async def predict_probs(request: Request) -> tuple[Any, np.ndarray]:
        parsed, images = await decode_request(request)
        return parsed, await served(request).predict(images)

    def status_body(name: str) -> dict[str, Any]:
        return {"model_version_status": [{"version": source.version, "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    @app.get("/v1/models/{name}", tags=["TensorFlow Serving"])
    async def model_status(name: str, request: Request) -> dict[str, Any]:
        """Model status, as TF Serving reports it."""
        check_model(name)
        served(request)
        return status_body(name)

    @app.get("/v1/models/{name}/versions/{version}", tags=["TensorFlow Serving"])
    async def model_version_status(name: str, version: str, request: Request) -> dict[str, Any]:
        check_model(name, version)
        served(request)
        return status_body(name)

    @app.get("/v1/models/{name}/metadata", tags=["TensorFlow Serving"])
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        """The serving signature (input shape and dtype, output), class names and input scale."""
        check_model(name)
        return metadata_body(served(request))

    @app.get("/v1/models/{name}/versions/{version}/metadata", tags=["TensorFlow Serving"])
    async def model_version_metadata(name: str, version: str, request: Request) -> dict[str, Any]:
        check_model(name, version)
        return metadata_body(served(request))

    def metadata_body(state) -> dict[str, Any]:
        meta = state.predictor.meta
        height, width, channels = state.predictor.input_shape
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
            "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
            "cnnkit": {"class_names": meta.class_names, "image_size": list(meta.image_size),
                       "color_mode": meta.color_mode, "resize_mode": meta.resize_mode,
                       "input_scale": meta.input_scale, "architecture": meta.architecture,
                       "temperature": state.temperature, "min_confidence": state.min_confidence,
                       "max_pixels": meta.max_pixels},
        }

    async def predict(name: str, request: Request, version: str | None = None) -> JSONResponse:
        check_model(name, version)
        parsed, probs = await predict_probs(request)
        key = "outputs" if parsed.columnar else "predictions"
        return JSONResponse({key: probs.tolist()})

    @app.post("/v1/models/{name}:predict", tags=["TensorFlow Serving"], response_model=PredictResponse,
              openapi_extra=_BODY_DOC)
    async def model_predict(name: str, request: Request) -> JSONResponse:
        """Class probabilities per image: row format answers "predictions", columnar "outputs"."""
        return await predict(name, request)

    @app.post("/v1/models/{name}/versions/{version}:predict", tags=["TensorFlow Serving"],
              response_model=PredictResponse, openapi_extra=_BODY_DOC)
    async def model_version_predict(name: str, version: str, request: Request) -> JSONResponse:
        return await predict(name, request, version)

    @app.post("/v1/models/{name}:classify", tags=["TensorFlow Serving"], response_model=ClassifyResponse,
              openapi_extra=_BODY_DOC)
    async def model_classify(name: str, request: Request) -> JSONResponse:
        """Top-k (class name, probability) per image, best first (``top_k`` in the body, default 5)."""
        check_model(name)
        parsed, probs = await predict_probs(request)
        ranked = served(request).predictor.top_k(probs, parsed.top_k or settings.top_k)
        return JSONResponse({"results": [[[label, score] for label, score in row] for row in ranked]})

    @app.post("/v1/models/{name}:explain", tags=["TensorFlow Serving"], openapi_extra=_BODY_DOC)
    async def model_explain(name: str, request: Request) -> JSONResponse:
        """Grad-CAM of the predicted class per image: heatmap and overlay as base64 PNGs (needs cnnkit.explain)."""
        check_model(name)
        try:
            from cnnkit.explain import gradcam, overlay
        except ImportError:
            raise RequestError(501, "':explain' needs Grad-CAM (cnnkit.explain), which this cnnkit installation does "
                                    "not include. Use ':predict' or ':classify'.") from None
        state = served(request)
        _, images = await decode_request(request)
        probs = await state.predict(images)
        best = probs.argmax(axis=1)
        heatmaps, _, layer = await run_in_threadpool(gradcam, state.predictor.model, images, best)
        results = []
        for image, heatmap, index, row in zip(images, heatmaps, best, probs):
            results.append({"class_name": state.predictor.class_names[int(index)], "class_index": int(index),
                            "probability": float(row[index]), "layer": layer,
                            "heatmap_png_b64": _png_b64((heatmap * 255).round().astype(np.uint8)),
                            "overlay_png_b64": _png_b64(overlay(image, heatmap))})
        return JSONResponse({"explanations": results})

    @app.post("/predict", tags=["friendly"], response_model=FriendlyResponse)
    async def predict_files(request: Request,
                            top_k: int = Query(3, ge=1, description="Classes listed per image.")) -> JSONResponse:
        """Upload image files (multipart/form-data, any field name): label, confidence and top-k per file."""
        state = served(request)
        check_content_type(request, ("multipart/form-data",), "curl -F file=@cat.jpg http://HOST/predict")
        if not request.headers.get("content-type"):
            raise RequestError(415, "Send images as multipart/form-data, e.g. curl -F file=@cat.jpg http://HOST/predict.")
        await read_body(request, settings.max_body_bytes)
        files = await _uploaded_files(request, settings.max_instances)
        images = await decode_all(files, lambda item, i: _decode_file(item, state.predictor))
        metrics.images.inc(len(images))
        probs = await state.predict(images)
        results = []
        for (filename, _), row in zip(files, state.predictor.top_k(probs, top_k)):
            label, confidence = row[0]
            abstained = state.min_confidence is not None and confidence < state.min_confidence
            results.append({"filename": filename, "label": "unknown" if abstained else label,
                            "confidence": confidence, "abstained": abstained,
                            "top_k": [{"label": n, "probability": p} for n, p in row]})
        return JSONResponse({"model": source.name, "version": source.version, "predictions": results})

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: the model is loaded and warmed (503 before)."""
        state = request.app.state.served
        if state is None or not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": source.name, "version": source.version})


def _png_b64(pixels: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def _uploaded_files(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=max_files + 1, max_fields=100)
    except Exception as exc:  # python-multipart / Starlette raise several types for a broken form
        raise RequestError(400, f"Cannot parse the multipart form ({exc}). Send e.g. "
                                "curl -F file=@cat.jpg http://HOST/predict") from None
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not uploads:
        raise RequestError(400, "No image files in the form: send e.g. curl -F file=@cat.jpg http://HOST/predict")
    if len(uploads) > max_files:
        raise RequestError(400, f"Too many files in one request (max {max_files}). Split the request.")
    return [(u.filename or f"file{i}", await u.read()) for i, u in enumerate(uploads)]


def _decode_file(item: tuple[str, bytes], predictor) -> np.ndarray:
    from cnnkit.data.decode import DecodeError

    filename, data = item
    try:
        return predictor.load(data, name=filename)
    except DecodeError as exc:
        raise RequestError(400, f"'{filename}': cannot use the image: {exc.reason}.") from None
