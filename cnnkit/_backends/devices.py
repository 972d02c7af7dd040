"""What this machine offers the active Keras backend: CPU features, accelerators, mixed precision.

The CPU side is read from ``/proc/cpuinfo`` (Linux; elsewhere the flags are unknown and treated as
absent, the safe side). The accelerator side asks the active backend through its shim
(``cnnkit/_backends/<backend>.py``: ``accelerators()``, ``devices()``, ``version()``), because Keras
has no portable device list: ``keras.distribution.list_devices`` exists on TensorFlow and JAX only.

``choose_precision`` decides the dtype policy once, with the reason in words:

* a GPU -> ``mixed_float16`` (tensor cores; Keras adds loss scaling);
* a CPU with bfloat16 arithmetic (AVX512-BF16 or AMX on x86-64, BF16 on Arm) -> ``mixed_bfloat16``;
* any other CPU -> ``float32``: bfloat16 would be emulated there, slower than float32.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from dataclasses import asdict, dataclass

BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86-64 (AVX512-BF16, AMX); Arm's "bf16" feature
# The vector extensions worth reporting (cnnkit info): what oneDNN, XLA and PyTorch dispatch on.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")
_SHIMS = {"tensorflow": "cnnkit._backends.tensorflow", "jax": "cnnkit._backends.jax", "torch": "cnnkit._backends.torch"}


# Plays another CPU for every CPU-dependent decision and report (tests, CI): "sse4_2 avx avx2 fma" is
# an AVX2-only CPU. Read by cpu_flags() alone, so `cnnkit info` and the precision agree.
PLAYED_FLAGS_ENV = "CNNKIT_CPU_FLAGS"


# TensorFlow runs its convolutions on oneDNN by default only on CPUs it counts as built for neural
# networks (AVX512-VNNI, AVX512-BF16, AVX-VNNI, AMX: ``IsMklEnabled`` in tensorflow/core/util/port.cc);
# on every other x86-64 CPU, AVX2-only ones included, they run as Eigen contractions over small GEMMs.
# On a 2-core AVX2-only EPYC (Zen 3), oneDNN trained ``fast`` 1.9x (small) and 1.6x (medium) as fast and
# predicted 1.6x / 1.4x as fast (bench/onednn.py). TensorFlow reads this switch once, when it is imported,
# so ``import cnnkit`` sets it first; a value the user set (0 turns oneDNN off) is kept. x86-64 Linux only:
# TensorFlow's Arm builds choose oneDNN per CPU themselves, and other platforms' builds lack it.
TF_ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn() -> None:
    """Ask TensorFlow for its oneDNN kernels on any x86-64 Linux CPU (unless ``TF_ENABLE_ONEDNN_OPTS`` is set)."""
    if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault(TF_ONEDNN_ENV, "1")


def onednn(backend: str | None = None) -> bool | None:
    """Whether the active backend runs on oneDNN: TensorFlow's own answer; None for other backends."""
    shim = _shim(backend)
    return getattr(shim, "onednn", lambda: None)() if shim is not None else None


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (``flags`` on x86-64, ``Features`` on Arm); empty where unknown.

    Without ``cpuinfo``: this machine's (``/proc/cpuinfo``), or the CPU played by ``CNNKIT_CPU_FLAGS``.

    >>> "avx512_bf16" in cpu_flags() or "avx512_bf16" not in cpu_flags()
    True
    """
    if cpuinfo is None:
        played = os.environ.get(PLAYED_FLAGS_ENV)
        if played is not None:
            return frozenset(played.replace(",", " ").split())
        cpuinfo = "/proc/cpuinfo"
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()  # not Linux: no cheap portable way to know; "absent" is the safe answer


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo), else what the platform says."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int:
    """The CPUs this process may run on, at least 1: its affinity, so a container's cpuset,
    ``taskset``, ``numactl`` or a batch scheduler's binding counts (``os.cpu_count()`` is the whole
    host's). A CPU quota (``docker --cpus``) is not an affinity and is not seen. cnnkit sizes its
    decode processes, the doctor's and the built-in sets' writers, ``Predictor``'s decode threads and
    ONNX Runtime's threads by it (a Ray actor by its own share instead). The Keras backends size
    their own thread pools.

    >>> 1 <= usable_cpus() <= (os.cpu_count() or 1)
    True
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_has_bfloat16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX): elsewhere it is emulated, slower."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BFLOAT16_FLAGS)


def backend_name() -> str:
    import keras

    return keras.backend.backend()


def _shim(backend: str | None = None):
    backend = backend or backend_name()
    if backend not in _SHIMS:
        return None
    return importlib.import_module(_SHIMS[backend])


def accelerators(backend: str | None = None) -> list[str]:
    """The GPUs the active backend can use (names such as ``cuda:0``); [] on a CPU-only machine."""
    shim = _shim(backend)
    return list(shim.accelerators()) if shim is not None else []


def devices(backend: str | None = None) -> list[str]:
    """Every device the active backend sees, CPU included (``["cpu:0"]`` on this kind of machine)."""
    shim = _shim(backend)
    return list(shim.devices()) if shim is not None else ["cpu:0"]


def backend_version(backend: str | None = None) -> str:
    """The version of the active backend's library (TensorFlow, JAX or PyTorch)."""
    shim = _shim(backend)
    return shim.version() if shim is not None else "unknown"


@dataclass(frozen=True)
class Precision:
    """The dtype policy a run trains under, whether mixed precision was asked for, and why this policy."""

    policy: str
    requested: bool
    reason: str

    @property
    def fell_back(self) -> bool:
        """Mixed precision was asked for but this machine trains in float32."""
        return self.requested and self.policy == "float32"

    def as_dict(self) -> dict:
        return asdict(self)


def choose_precision(requested: bool, backend: str | None = None, flags: frozenset[str] | None = None,
                     gpus: list[str] | None = None) -> Precision:
    """The dtype policy for training: float16 on a GPU, bfloat16 on a CPU that has it, else float32.

    ``flags`` and ``gpus`` default to this machine's (given in tests to play another machine).

    >>> choose_precision(True, flags=frozenset({"avx2"}), gpus=[]).policy
    'float32'
    >>> choose_precision(True, flags=frozenset({"avx512_bf16"}), gpus=[]).policy
    'mixed_bfloat16'
    """
    if not requested:
        return Precision("float32", False, "mixed precision not requested")
    gpus = accelerators(backend) if gpus is None else gpus
    if gpus:
        return Precision("mixed_float16", True, f"{gpus[0]} found: float16 on the GPU (with loss scaling)")
    flags = cpu_flags() if flags is None else flags
    present = [flag for flag in BFLOAT16_FLAGS if flag in flags]
    if present:
        return Precision("mixed_bfloat16", True, f"no GPU; this CPU has bfloat16 ({', '.join(present)})")
    return Precision("float32", True, "no GPU, and this CPU has no bfloat16 (no avx512_bf16/amx_bf16): "
                                      "bfloat16 would be emulated, slower than float32, so training stays float32")
