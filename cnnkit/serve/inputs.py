"""Serve stage: request bodies -> uint8 images, with a 4xx ``RequestError`` for every way a request can be wrong.

A TensorFlow Serving ``:predict`` body is ``{"instances": [...]}`` (row format) or ``{"inputs": ...}``
(columnar). Each instance is an image as ``{"b64": "<base64 of JPEG/PNG/... bytes>"}``, or a nested
pixel array (height, width, channels) of raw 0-255 values; a named input (``{"image": ...}``) is
unwrapped. Encoded images are decoded by ``Predictor.load`` (the training decode and resize path).

Pixel arrays plainly pre-scaled to [0, 1] (fractional values, none above 1) are refused unless the
body states its scale with ``"input_scale": "0-1"`` (then multiplied by 255) or ``"0-255"``: cnnkit
models scale raw pixels themselves, so silently accepting [0, 1] input would be scaled twice and
answered with a confident wrong guess.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from cnnkit.data.decode import DecodeError
from cnnkit.predict import Predictor

INPUT_SCALES = ("0-255", "0-1")
# A pixel-array body nests 5 deep ({"instances": [image [row [pixel [channel]]]]}), a columnar one 6;
# past 32 it is no image. Bounding the depth before parsing keeps the decoder far from Python's
# recursion limit: a body nested 5,000 deep made json.loads raise RecursionError (a 500).
MAX_JSON_DEPTH = 32
_BRACKETS_ONLY = bytes(c for c in range(256) if c not in b"[]{}")
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[list(b"[{")], _DEPTH_STEP[list(b"]}")] = 1, -1
_KEYS = {"instances", "inputs", "signature_name", "input_scale", "top_k"}
SIGNATURE = "serving_default"  # the one signature the metadata lists ("" or no signature_name: this one)
_EXAMPLE = '{"instances": [{"b64": "<base64 JPEG/PNG bytes>"}]}'


class RequestError(Exception):
    """A request the service cannot answer: ``status`` (4xx, or 503/504), a message saying what to do, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class PredictRequest:
    """A parsed ``:predict`` / ``:classify`` body (images not decoded yet)."""

    instances: list[Any]
    columnar: bool
    input_scale: str | None
    top_k: int | None


def parse_body(body: bytes, max_instances: int) -> PredictRequest:
    """Parse and check the JSON shape of a ``:predict`` body.

    Raises:
        RequestError: 400 for invalid JSON, JSON nested deeper than ``MAX_JSON_DEPTH``, a wrong shape,
            no or too many instances.
    """
    _check_depth(body)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"The request body is not valid JSON ({exc}). Send e.g. {_EXAMPLE}") from None
    except RecursionError:  # the depth check counts brackets; this is the decoder's own limit, never a 500
        raise _too_deep(None) from None
    if not isinstance(data, dict):
        raise RequestError(400, f"The request body must be a JSON object, e.g. {_EXAMPLE}. "
                                f"Received: a JSON {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise RequestError(400, f"Unknown field(s) {unknown} in the request. Allowed: {sorted(_KEYS)}.")
    signature = data.get("signature_name", SIGNATURE)
    if signature not in ("", SIGNATURE):  # as TF Serving: a signature the model lacks is the client's error
        raise RequestError(400, f"Serving signature name: {signature!r} not found in signature def: this model "
                                f"has one, '{SIGNATURE}' (or leave signature_name out).")
    if ("instances" in data) == ("inputs" in data):
        raise RequestError(400, f"Send exactly one of 'instances' (row format) or 'inputs' (columnar), e.g. {_EXAMPLE}.")
    columnar = "inputs" in data
    instances = _columns_to_rows(data["inputs"]) if columnar else data["instances"]
    if not isinstance(instances, list):
        raise RequestError(400, f"'instances' must be a list of images, e.g. {_EXAMPLE}. "
                                f"Received: {type(instances).__name__}")
    if not instances:
        raise RequestError(400, "The request has no instances: send at least one image.")
    if len(instances) > max_instances:
        raise RequestError(400, f"Too many instances in one request: {len(instances)} > {max_instances} "
                                "(the server's max_instances). Split the request.")
    scale = data.get("input_scale")
    if scale is not None and scale not in INPUT_SCALES:
        raise RequestError(400, f"'input_scale' is \"0-255\" (raw pixels) or \"0-1\" (pixels divided by 255). "
                                f"Received: input_scale={scale!r}")
    top_k = data.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise RequestError(400, f"'top_k' must be a positive integer. Received: top_k={top_k!r}")
    return PredictRequest(instances, columnar, scale, top_k)


def _check_depth(body: bytes) -> None:
    """400 when ``body``'s brackets nest deeper than ``MAX_JSON_DEPTH`` (counted in C, before any parsing).

    Brackets inside strings count too: a valid request's strings (base64, "0-1") hold none, so this
    can only refuse a malformed body sooner.
    """
    brackets = body.translate(None, _BRACKETS_ONLY)
    if len(brackets) <= MAX_JSON_DEPTH:
        return
    depth = int(np.cumsum(_DEPTH_STEP[np.frombuffer(brackets, np.uint8)], dtype=np.int64).max())
    if depth > MAX_JSON_DEPTH:
        raise _too_deep(depth)


def _too_deep(depth: int | None) -> RequestError:
    return RequestError(400, f"The request body nests JSON {depth or 'too many'} levels deep; an image request needs "
                             f"at most 6 and the server reads at most {MAX_JSON_DEPTH}. Send e.g. {_EXAMPLE}. "
                             f"Received: depth={depth or 'over the decoder limit'}")


def _columns_to_rows(inputs: Any) -> Any:
    """Columnar ``inputs``: a list of images, one image, or ``{input_name: that}``."""
    if isinstance(inputs, dict) and "b64" not in inputs:
        if len(inputs) != 1:
            raise RequestError(400, f"This model has one input; 'inputs' names {len(inputs)}: {sorted(inputs)}.")
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, dict):
        return [inputs]
    return inputs


def decode_instance(instance: Any, index: int, predictor: Predictor, input_scale: str | None) -> np.ndarray:
    """One instance -> uint8 (height, width, channels) exactly as the model was trained on.

    Raises:
        RequestError: 400 naming ``instances[index]`` and what is wrong with it.
    """
    where = f"instances[{index}]"
    if isinstance(instance, dict) and "b64" not in instance and len(instance) == 1:
        instance = next(iter(instance.values()))  # a named input: {"image": ...}
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise RequestError(400, f"{where}: an encoded image is {{\"b64\": \"<base64 string>\"}}. "
                                    f"Received keys: {sorted(instance)}")
        data = _b64decode(instance["b64"], where)
        try:
            return predictor.load(data, name=where)
        except DecodeError as exc:
            raise RequestError(400, f"{where}: cannot use the image: {exc.reason}.") from None
    if isinstance(instance, list):
        return _pixels(instance, where, predictor.input_shape, input_scale)
    raise RequestError(400, f"{where}: an image is {{\"b64\": \"...\"}} or a nested pixel array "
                            f"{_shape_text(predictor.input_shape)}. Received: a JSON {type(instance).__name__}")


def _b64decode(text: str, where: str) -> bytes:
    try:
        if "-" in text or "_" in text:  # URL-safe alphabet
            text = text.replace("-", "+").replace("_", "/")
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"{where}: 'b64' is not valid base64 ({exc}); was it truncated?") from None


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"({', '.join(map(str, shape))}) (height, width, channels)"


def _pixels(rows: list, where: str, shape: tuple[int, int, int], input_scale: str | None) -> np.ndarray:
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(400, f"{where}: the pixel array is not a rectangular array of numbers; this model "
                                f"takes {_shape_text(shape)}.") from None
    if arr.ndim == 2 and shape[2] == 1:
        arr = arr[:, :, None]
    if arr.shape != shape:
        raise RequestError(400, f"{where}: pixel array of shape {arr.shape}, but this model takes images of "
                                f"shape {_shape_text(shape)} with raw 0-255 pixels; resize it first, or send the "
                                "encoded file as {\"b64\": ...} and the server resizes it as in training.")
    if not np.all(np.isfinite(arr)):
        raise RequestError(400, f"{where}: the pixel array holds NaN or infinite values.")
    low, high = float(arr.min()), float(arr.max())
    if input_scale == "0-1":
        if low < 0 or high > 1:
            raise RequestError(400, f"{where}: 'input_scale' is \"0-1\" but pixels range {low:g}..{high:g}.")
        arr = arr * 255.0
    else:
        if low < 0 or high > 255:
            raise RequestError(400, f"{where}: pixels must be raw values 0-255; received {low:g}..{high:g}.")
        if input_scale is None and high <= 1.0 and np.any(arr != np.round(arr)):
            raise RequestError(400, f"{where}: the pixels look pre-scaled to [0, 1] (max {high:g}), but this model "
                                    "takes raw 0-255 pixels and scales them itself. Send the raw pixels, or state "
                                    "the scale with \"input_scale\": \"0-1\" in the request body.")
    return np.rint(arr).astype(np.uint8)  # the model was trained on uint8 pixels


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
    """415 unless the request's content type is one of ``allowed`` (a missing type is let through)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in allowed:
        raise RequestError(415, f"Content type '{kind}' is not accepted here; send {' or '.join(allowed[:1])}, "
                                f"e.g. {example}.")


async def decode_all(items: list[Any], decode) -> np.ndarray:
    """Decode every item on worker threads (off the event loop); stack to (N, H, W, C) uint8."""
    arrays = await asyncio.gather(*(run_in_threadpool(decode, item, i) for i, item in enumerate(items)))
    return np.stack(arrays)


async def uploaded_files(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file in a multipart form; 400 for a broken form, none, or too many."""
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


def decode_file(item: tuple[str, bytes], predictor: Predictor) -> np.ndarray:
    """An uploaded file -> uint8 pixels as the model was trained on; 400 naming the file when it is unusable."""
    filename, data = item
    try:
        return predictor.load(data, name=filename)
    except DecodeError as exc:
        raise RequestError(400, f"'{filename}': cannot use the image: {exc.reason}.") from None
