"""TensorFlow shim: gradients (``tf.GradientTape``), devices, the TFLite converter, the fit input pipeline."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import numpy as np
import tensorflow as tf


def gradients(head, features: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    x = tf.convert_to_tensor(features)
    with tf.GradientTape() as tape:
        tape.watch(x)
        probs = head(x, training=False)
        score = tf.reduce_sum(tf.gather(tf.cast(probs, tf.float32), class_indices, axis=1, batch_dims=1))
    return tape.gradient(score, x).numpy()


# Fits in progress in each thread (fit_input_without_autotuning); Keras builds a fit's pipelines in
# the thread that calls fit.
_FITTING = threading.local()
_INSTALL = threading.Lock()


@contextlib.contextmanager
def fit_input_without_autotuning() -> Iterator[None]:
    """Inside, the ``tf.data`` pipelines Keras builds from a ``PyDataset`` in this thread run without
    autotuning (see ``cnnkit._backends.fit_input`` for why); other threads' fits are left alone.

    Keras has no option for it, so its adapter's ``get_tf_dataset`` is wrapped, once, by a function that
    adds the option only inside this block. Nothing changes where Keras has moved it.
    """
    _install_autotuning_switch()
    _FITTING.depth = getattr(_FITTING, "depth", 0) + 1
    try:
        yield
    finally:
        _FITTING.depth -= 1


def _install_autotuning_switch() -> None:
    try:
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    except ImportError:
        return
    with _INSTALL:
        original = PyDatasetAdapter.__dict__.get("get_tf_dataset")
        if original is None or getattr(original, "_cnnkit_switch", False):
            return

        @functools.wraps(original)
        def get_tf_dataset(self):
            dataset = original(self)
            if getattr(_FITTING, "depth", 0) > 0:
                options = tf.data.Options()
                options.autotune.enabled = False
                dataset = dataset.with_options(options)
            return dataset

        get_tf_dataset._cnnkit_switch = True
        PyDatasetAdapter.get_tf_dataset = get_tf_dataset


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
