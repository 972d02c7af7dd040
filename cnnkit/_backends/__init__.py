"""Backend shims: the only modules that import TensorFlow, JAX or PyTorch.

Everything else in cnnkit uses ``keras.ops`` and numpy. The one thing Keras has no portable API for
is a gradient with respect to an intermediate activation (Grad-CAM needs it), so each backend gets a
small module with the same function, picked by ``keras.backend.backend()``:

    gradients(head, features, class_indices) -> numpy (N, H', W', C)

where ``head`` is a Keras model mapping the feature maps to class scores (logits). Multi-device
training also needs what Keras leaves to the backend on TensorFlow and PyTorch: the devices there
are (``list_devices``) and TensorFlow's ``MirroredStrategy`` (``tensorflow_strategy``).
"""

from __future__ import annotations

import importlib

import numpy as np

from cnnkit.errors import ModelError

_MODULES = {"tensorflow": "cnnkit._backends.tensorflow", "jax": "cnnkit._backends.jax",
            "torch": "cnnkit._backends.torch"}


def require_gradients(command: str) -> None:
    """Refuse ``command`` (train, lr-find, explain...) on a Keras backend that cannot differentiate.

    Keras' ``numpy`` and ``openvino`` backends run inference only: predict, evaluate and serve work on
    them, training and Grad-CAM do not.
    """
    import keras

    backend = keras.backend.backend()
    if backend not in _MODULES:
        raise ModelError(f"'{command}' needs gradients, which the '{backend}' Keras backend cannot compute (it runs "
                         f"inference only). Set KERAS_BACKEND to one of {', '.join(_MODULES)}. "
                         f"Received: backend={backend!r}")


def gradients(head, features: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    """d score[class_indices[i]] / d features[i], for each image i, as float32 numpy.

    Args:
        head: a Keras model from the feature maps to class scores (N, num_classes).
        features: (N, H', W', C) feature maps, as the layer produced them.
        class_indices: (N,) the class whose score is differentiated, per image.

    Raises:
        ModelError: the active Keras backend has no gradient shim (e.g. "numpy").
    """
    import keras

    require_gradients("explain")
    backend = keras.backend.backend()
    module = importlib.import_module(_MODULES[backend])
    grads = module.gradients(head, np.asarray(features, dtype=np.float32), np.asarray(class_indices, dtype=np.int64))
    return np.asarray(grads, dtype=np.float32)


def list_devices(count: int | None = None) -> tuple[str, list[str]]:
    """The kind ("gpu", "tpu" or "cpu") and names of the devices the active backend trains on.

    On TensorFlow without GPUs, asking for ``count`` > 1 splits the CPU into that many logical
    devices when TensorFlow has not initialised yet. JAX's are ``keras.distribution.list_devices()``.
    """
    import keras

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "torch"):
        names = keras.distribution.list_devices() if backend == "jax" else ["cpu:0"]
        return names[0].split(":")[0], names
    return importlib.import_module(_MODULES[backend]).list_devices(count)


def tensorflow_strategy(names: list[str]):
    """A ``tf.distribute.MirroredStrategy`` over the named TensorFlow devices."""
    return importlib.import_module(_MODULES["tensorflow"]).mirrored_strategy(names)
