"""Serve stage: ``ServeSettings``, how the service runs (batching, limits), from arguments or ``CNNKIT_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from cnnkit.engines import check_engine
from cnnkit.errors import ConfigError


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
        max_queue: most images waiting for the model; a request that would pass it gets 429 with
            ``Retry-After`` at once (``CNNKIT_MAX_QUEUE``). 512 is about two seconds of a small CNN on
            two CPU cores; raise it for fast models, lower it to shed load sooner.
        request_timeout_s: a request not answered this many seconds after its images were queued for
            the model gets 504 (``CNNKIT_REQUEST_TIMEOUT_S``).
        shutdown_timeout_s: on shutdown, how long queued requests are still answered; the rest get
            503 (``CNNKIT_SHUTDOWN_TIMEOUT_S``).
        engine: what runs the model: "keras", "onnxruntime" or "auto" (``CNNKIT_ENGINE``; default:
            onnxruntime for an ONNX export folder, else ``cnnkit.engines.DEFAULT_ENGINE``). On
            onnxruntime the server imports no Keras, and ``:explain`` answers 501.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batching: bool = True
    max_body_bytes: int = 20 * 1024 * 1024
    max_instances: int = 256
    max_pixels: int | None = None
    top_k: int = 5
    max_queue: int = 512
    request_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    engine: str | None = None

    def __post_init__(self) -> None:
        check_engine(self.engine)
        for key in ("max_batch_size", "max_body_bytes", "max_instances", "top_k", "max_queue"):
            if getattr(self, key) < 1:
                raise ConfigError(f"Serve setting {key} must be >= 1. Received: {key}={getattr(self, key)}")
        for key in ("max_wait_ms", "shutdown_timeout_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"Serve setting {key} must be >= 0. Received: {key}={getattr(self, key)}")
        if not self.request_timeout_s > 0:
            raise ConfigError("Serve setting request_timeout_s must be > 0 seconds. "
                              f"Received: request_timeout_s={self.request_timeout_s}")

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
                        raw if f.name == "engine" else float(raw) if f.type == "float" else int(raw))
                except ValueError:
                    raise ConfigError(f"Environment variable CNNKIT_{f.name.upper()} must be a number. "
                                      f"Received: {raw!r}") from None
        return cls(**values)
