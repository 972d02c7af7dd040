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
