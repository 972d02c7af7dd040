"""TensorFlow shim: gradients (``tf.GradientTape``), devices, the TFLite converter, the fit input pipeline."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf


def gradients(head, features: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    x = tf.convert_to_tensor(features)
    with tf.GradientTape() as tape:
        tape.watch(x)
        probs = head(x, training=False)
        score = tf.reduce_sum(tf.gather(tf.cast(probs, tf.float32), class_indices, axis=1, batch_dims=1))
    return tape.gradient(score, x).numpy()


def pydataset_without_autotuning() -> Callable[[], None] | None:
    """Turn off tf.data autotuning in the pipelines Keras builds from a ``PyDataset``; returns the undo.

    Keras has no option for it, so its adapter's ``get_tf_dataset`` is wrapped (see
    ``cnnkit._backends.fit_input`` for why). None, with nothing changed, where Keras has moved it.
    """
    try:
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    except ImportError:
        return None
    original = PyDatasetAdapter.__dict__.get("get_tf_dataset")
    if original is None or getattr(original, "_without_autotuning", False):
        return None

    def get_tf_dataset(self):
        options = tf.data.Options()
        options.autotune.enabled = False
        return original(self).with_options(options)

    get_tf_dataset._without_autotuning = True

    def undo() -> None:
        PyDatasetAdapter.get_tf_dataset = original

    PyDatasetAdapter.get_tf_dataset = get_tf_dataset
    return undo


def version() -> str:
    return tf.__version__


def onednn() -> bool | None:
    """Whether TensorFlow runs on oneDNN in this process (decided when it was imported); None if it won't say."""
    try:  # TensorFlow's own answer, from a private module (tf.sysconfig has only the build's)
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


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


def list_devices(count: int | None = None) -> tuple[str, list[str]]:
    """The kind ("gpu" or "cpu") and full names of the logical devices a strategy can use.

    Without GPUs and with ``count`` > 1, the CPU is first split into ``count`` logical devices,
    which TensorFlow allows only before it initialises (before the first model or tensor); after
    that the CPU stays one device and the caller reports it.
    """
    if tf.config.list_physical_devices("GPU"):
        return "gpu", [device.name for device in tf.config.list_logical_devices("GPU")]
    if count is not None and count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        if len(tf.config.get_logical_device_configuration(cpu) or []) < count:
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
            except RuntimeError:  # already initialised: the device count tells the caller
                pass
    return "cpu", [device.name for device in tf.config.list_logical_devices("CPU")]


def mirrored_strategy(names: list[str]) -> tf.distribute.Strategy:
    """``tf.distribute.MirroredStrategy`` over the named logical devices (one replica each)."""
    return tf.distribute.MirroredStrategy(devices=names)
