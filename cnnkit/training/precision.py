"""Training stage: the dtype policy (mixed precision where the hardware has it).

float16 is the fast path on NVIDIA tensor cores; CPUs have no fast float16, but recent ones
(AVX512-BF16, AMX) run bfloat16 through oneDNN, and bfloat16 needs no loss scaling. Other CPUs
stay float32, and a run that asked for mixed precision says so (on screen and in ``run.json``).
The decision is ``cnnkit._backends.devices.choose_precision`` (it asks the backend for GPUs).
Layers are built under the policy (``dtype_policy``), and the global policy is restored after, so
it never leaks into later models.
"""

from __future__ import annotations

import contextlib

import keras

from cnnkit._backends.devices import Precision, choose_precision, cpu_has_bfloat16

__all__ = ["Precision", "choose_precision", "cpu_has_bfloat16", "dtype_policy", "precision_policy"]


def precision_policy(mixed_precision: bool) -> str:
    """The dtype policy: float32, or mixed_float16 on a GPU and mixed_bfloat16 on a CPU that has it.

    bfloat16 gave 1.3-1.5x float32's speed for the ``fast`` model on a 2-core AVX512-BF16 CPU.
    ``choose_precision`` gives the same decision with its reason (run.json keeps both).
    """
    return choose_precision(mixed_precision).policy


@contextlib.contextmanager
def dtype_policy(policy: str):
    """Build layers under ``policy``, then restore the global one (it would leak into later models)."""
    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(saved)
