"""JAX gradient shim (``jax.grad`` through the Keras model; its variables are read, never updated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gradients(head, features: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    index = jnp.asarray(class_indices)

    def score(x):
        probs = head(x, training=False).astype(jnp.float32)
        return jnp.take_along_axis(probs, index[:, None], axis=1).sum()

    return np.asarray(jax.grad(score)(jnp.asarray(features)))


def version() -> str:
    return jax.__version__


def devices() -> list[str]:
    return [f"{d.platform}:{d.id}" for d in jax.devices()] + (
        [f"cpu:{d.id}" for d in jax.devices("cpu")] if jax.default_backend() != "cpu" else [])


def accelerators() -> list[str]:
    return [f"{d.platform}:{d.id}" for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
