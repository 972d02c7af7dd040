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

import contextlib
import gc
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cnnkit.errors import ModelError

if TYPE_CHECKING:
    import numpy as np

# The backends Keras 3 can run, and the module each needs (``KERAS_BACKEND``); cnnkit supports the first three.
KERAS_BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy", "openvino": "openvino"}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (imports of it blocked)
        return False


def backend_problem() -> str | None:
    """What is wrong with ``KERAS_BACKEND``, in words (None: unset, or a backend that is installed).

    Keras reports a misspelt backend (``pytorch``, ``TensorFlow``) as a ValueError at import, and one
    not installed as a ModuleNotFoundError: checked first, they are a user's setting, named with the fix.
    """
    name = os.environ.get("KERAS_BACKEND")
    if not name or not _importable("keras"):  # no Keras here (an ONNX Runtime install): no backend is imported
        return None
    if name not in KERAS_BACKENDS:
        near = {"pytorch": "torch", "tf": "tensorflow", "tensorflow2": "tensorflow"}.get(name.lower(), name.lower())
        hint = f" Did you mean KERAS_BACKEND={near}?" if near in KERAS_BACKENDS else ""
        return (f"KERAS_BACKEND={name!r} is not a Keras backend: use tensorflow (the default), jax or torch "
                f"(lower case).{hint}")
    if not _importable(KERAS_BACKENDS[name]):
        extra = f" (pip install 'cnnkit[{name}]')" if name in ("jax", "torch") else ""
        return (f"KERAS_BACKEND={name} but {KERAS_BACKENDS[name]} is not installed here: install it{extra}, or "
                "unset KERAS_BACKEND for TensorFlow.")
    return None

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


@contextlib.contextmanager
def fit_input() -> Iterator[None]:
    """Wrap every ``model.fit`` on our batches: the input pipeline set up to start, and torn down, at once.

    On TensorFlow, Keras feeds a ``PyDataset`` through ``tf.data`` (``from_generator`` +
    ``prefetch(AUTOTUNE)``), which starts tf.data's autotuning thread. That thread sleeps between
    tunings for a period that doubles up to 60 s, and dropping the iterator (Keras makes a new one
    each epoch; ``fit`` ends) can wait for it: an epoch's first step, or ``fit``'s return, stalled
    3-35 s in some epochs (4 of 12 in a test; a 3-minute budget in CI ended 15 s late). Inside this
    block, the pipelines Keras builds from a ``PyDataset`` in this thread run with autotuning off
    (prefetching stays); measured: no stall in 24 epochs and 10 fits, at the same speed.

    On the way out, a garbage collection frees the iterator a ``fit`` stopped mid-epoch leaves in a
    reference cycle (a time budget, the range test, Ctrl-C), which otherwise lingers to interpreter
    exit, where its destructor can hang. Nothing to set up on the other backends, whose iterators
    are plain Python.
    """
    import keras

    with contextlib.ExitStack() as stack:
        if keras.backend.backend() == "tensorflow":
            stack.enter_context(importlib.import_module(_MODULES["tensorflow"]).fit_input_without_autotuning())
        try:
            yield
        finally:
            gc.collect()


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
    import numpy as np

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


_CHILD = """
import importlib, json, sys
from cnnkit.errors import CnnkitError
module, _, name = sys.argv[1].partition(":")
try:
    result = getattr(importlib.import_module(module), name)(*sys.argv[2:])
except CnnkitError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(2)
print(json.dumps({"result": result}, default=str))
"""


def call_in_tensorflow(function: str, *args: str, what: str, received: str) -> Any:
    """``module:function(*args)`` in a subprocess on the TensorFlow backend; its JSON-able result.

    TensorFlow's conversions (SavedModel, TFLite, ONNX through tf2onnx) need the TensorFlow backend;
    a JAX or PyTorch process runs them this way on the ``.keras`` file, which loads on any backend.

    Raises:
        ModelError: the subprocess failed (its cnnkit error, or the last line it wrote), with ``what``
            it was doing and ``received`` (the values concerned).
    """
    import keras

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, function, *args], env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode != 0 or "result" not in answer:
        reason = answer.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"{what} runs TensorFlow in a subprocess (this process uses the '{keras.backend.backend()}' "
                         f"backend), and it failed: {reason} Check that TensorFlow imports (python -c 'import "
                         f"tensorflow'), or run with KERAS_BACKEND=tensorflow. Received: {received}")
    return answer["result"]
