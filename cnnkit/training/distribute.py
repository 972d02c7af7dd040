"""Training stage: data-parallel training on several devices (``cnnkit train --devices N|all``).

Keras does the work; cnnkit only picks the devices and opens the right scope around building,
compiling and fitting the model:

* JAX: ``keras.distribution.DataParallel`` over the first N of ``keras.distribution.list_devices()``,
  set with ``keras.distribution.set_distribution`` for the run (the previous one is restored).
  Variables are replicated, each global batch is sharded over the devices, and XLA sums the
  gradients, so BatchNorm sees the whole batch: the result is single-device training's.
* TensorFlow: ``tf.distribute.MirroredStrategy`` over the first N GPUs, or over N logical CPU
  devices (the CPU is split when TensorFlow has not started yet). ``model.fit`` splits each
  global batch over the replicas and all-reduces the gradients. BatchNorm layers are switched to
  ``synchronized`` for the fit (their batch statistics all-reduced over the replicas, so they see
  the whole batch, as on one device) and back before the model is saved (the flag is
  TensorFlow-only, and the saved file loads on every backend). Dropout draws its masks per
  replica, so runs agree closely rather than bit for bit.
* PyTorch: Keras has no multi-device training for it; ``--devices`` above 1 is refused with what
  to use instead.

The learning-rate rule: ``batch_size`` is the global batch, and the rate is tuned for it. With N
devices each device computes ``batch_size / N`` images a step and the gradients are averaged over
the whole batch, so the step is the single-device step and the rate stays as it is; there is no
linear scaling. To use more devices for a bigger batch, raise ``--batch-size`` and scale the rate
yourself. ``batch_size`` must divide by N (``TrainConfig`` says so), and every batch must split
evenly: the last, partial batch of an epoch is cut to a multiple of N (at most N - 1 images of an
epoch left out, different ones each epoch as the order is reshuffled; the final metrics use every
image, on one device).

After fitting, the model is copied to one device (``single_device_copy``) for the final metrics and
the saved file, which is the same as a single-device run's and loads anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import keras

from cnnkit._backends import list_devices, tensorflow_strategy
from cnnkit.errors import ConfigError

JAX_STRATEGY = "keras.distribution.DataParallel"
TENSORFLOW_STRATEGY = "tf.distribute.MirroredStrategy"


@dataclass(frozen=True)
class Devices:
    """The devices a run trains on, as run.json records them (``devices``).

    Attributes:
        count: how many devices share each batch.
        kind: "cpu", "gpu" or "tpu".
        names: the devices, e.g. ``("cpu:0", "cpu:1")``.
        strategy: the Keras or TensorFlow API that distributes the batches, or "none" (one device).
    """

    count: int
    kind: str
    names: tuple[str, ...]
    strategy: str = "none"

    def record(self) -> dict[str, Any]:
        return {"count": self.count, "kind": self.kind, "names": list(self.names), "strategy": self.strategy}


@contextmanager
def distributed(requested: int | str, batch_size: int) -> Iterator[Devices]:
    """Open the scope in which the model is built, compiled and fitted on ``requested`` devices.

    Args:
        requested: a number of devices, or "all" (every accelerator, else every CPU device).
        batch_size: the global batch, which must split evenly over the devices.

    Raises:
        ConfigError: more devices than the backend sees (with how to get virtual CPU devices), a
            batch that does not split, or several devices on PyTorch.

    Example:
        >>> with distributed(1, 64) as devices:
        ...     devices.count
        1
    """
    backend = keras.backend.backend()
    kind, names = list_devices(requested if isinstance(requested, int) else None)
    count = len(names) if requested == "all" else int(requested)
    if count == 1:
        yield Devices(1, kind, (_short(names[0]),))
        return
    if backend not in ("jax", "tensorflow"):
        raise ConfigError(
            f"Training on several devices needs the JAX or TensorFlow backend: Keras 3 has no multi-device training "
            f"for '{backend}' (keras.distribution supports JAX, tf.distribute TensorFlow). Run with KERAS_BACKEND=jax "
            "or tensorflow (the saved model loads on any backend), or pass --devices 1 to train on one device (a resumed "
            "run keeps the device count it was started with until you do). "
            f"Received: devices={requested!r}, backend={backend!r}")
    _check_count(backend, requested, count, kind, names, batch_size)
    devices = Devices(count, kind, tuple(_short(name) for name in names[:count]),
                      JAX_STRATEGY if backend == "jax" else TENSORFLOW_STRATEGY)
    if backend == "jax":
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=names[:count]))
        try:
            yield devices
        finally:
            keras.distribution.set_distribution(previous)
    else:
        with tensorflow_strategy(names[:count]).scope():
            yield devices


def _check_count(backend: str, requested: int | str, count: int, kind: str, names: list[str], batch_size: int) -> None:
    if count > len(names):
        how = (f"start with XLA_FLAGS=--xla_force_host_platform_device_count={count} in the environment (it must be "
               "set before JAX starts)" if backend == "jax" else
               "pass --devices before anything in the process has used TensorFlow (cnnkit splits the CPU into "
               "logical devices only then)")
        raise ConfigError(
            f"--devices {count} asks for more devices than {backend} sees: {len(names)} "
            f"({', '.join(map(_short, names))}). "
            f"Use --devices {len(names)} or 'all'; for virtual devices on a CPU (tests, trials), {how}. "
            f"Received: devices={requested!r}")
    if batch_size % count:
        raise ConfigError(
            f"[train] batch_size is the global batch, split evenly over the devices: {batch_size} does not divide by "
            f"{count} {kind} devices. Use --batch-size {batch_size // count * count or count} or "
            f"{(batch_size // count + 1) * count}. Received: batch_size={batch_size}, devices={requested!r}")


def synchronize_batchnorm(model: keras.Model, devices: Devices, on: bool) -> None:
    """Under ``MirroredStrategy``, make BatchNorm use the whole global batch (``on``), or undo it.

    Anywhere else BatchNorm is left unsynchronized, also when ``on``: a run trained on several
    TensorFlow devices and resumed on one comes back from its checkpoint with synchronized
    BatchNorm, which its saved model must not keep.
    """
    from cnnkit.models.saving import all_layers

    synchronized = on and devices.strategy == TENSORFLOW_STRATEGY
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.synchronized != synchronized:
            layer.synchronized = synchronized


def single_device_copy(model: keras.Model) -> keras.Model:
    """A copy of ``model`` (same config and weights) whose variables live on one device.

    Call it outside ``distributed``: the copy then computes anywhere, on any batch size.
    """
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def _short(name: str) -> str:
    """``/job:localhost/replica:0/task:0/device:CPU:1`` -> ``cpu:1``; ``cpu:0`` stays."""
    parts = name.split("/")[-1].split(":")
    return f"{parts[-2].lower()}:{parts[-1]}" if len(parts) >= 2 else name.lower()
