"""TensorFlow shim: gradients (``tf.GradientTape``), devices, the TFLite converter."""

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


def version() -> str:
    return tf.__version__


def devices() -> list[str]:
    return [f"{d.device_type.lower()}:{d.name.rsplit(':', 1)[-1]}" for d in tf.config.list_physical_devices()]


def accelerators() -> list[str]:
    return [f"gpu:{d.name.rsplit(':', 1)[-1]}" for d in tf.config.list_physical_devices("GPU")]


def tflite_from_saved_model(saved_model: str, optimize: bool) -> bytes:
    """A TFLite flatbuffer from a SavedModel; ``optimize``: dynamic-range int8 weights."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()
