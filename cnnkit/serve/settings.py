"""Serve stage: ``ServeSettings``, how the service runs (batching, limits), from arguments or ``CNNKIT_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

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
