"""TensorFlow gradient shim (``tf.GradientTape``)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def gradients(head, features: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    x = tf.convert_to_tensor(features)
    with tf.GradientTape() as tape:
        tape.watch(x)
        probs = head(x, training=False)
        score = tf.reduce_sum(tf.gather(tf.cast(probs, tf.float32), class_indices, axis=1, batch_dims=1))
    return tape.gradient(score, x).numpy()
