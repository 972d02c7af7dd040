"""Helpers shared by the benchmarks: data location, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
DATA = ROOT / "bench" / ".data"
RESULTS = ROOT / "bench" / "results"


def cifar_folder() -> Path:
    """The CIFAR-10 JPEG folders (train/, test/), extracted once from ../shared."""
    target = DATA / "cifar10-jpg"
    if not (target / "train").is_dir():
        if not SHARED_CIFAR.exists():
            raise SystemExit(f"need {SHARED_CIFAR} (the CIFAR-10 JPEG archive) to run this benchmark")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_CIFAR) as tar:
            tar.extractall(target, filter="data")
    return target


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, cores, Python, and the CPU facts that change
    speed (cnnkit's own reading of them: ``cnnkit.info``'s, so a played CPU is recorded as played)."""
    from cnnkit._backends.devices import PLAYED_FLAGS_ENV, TF_ONEDNN_ENV, cpu_flags, cpu_has_bfloat16, cpu_model

    flags = cpu_flags()
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                            "bfloat16": cpu_has_bfloat16(flags), "avx512": "avx512f" in flags}
    info["tf_enable_onednn_opts"] = os.environ.get(TF_ONEDNN_ENV)  # what TensorFlow was asked for (cnnkit sets 1)
    if os.environ.get(PLAYED_FLAGS_ENV) is not None:
        info["cpu_flags_played"] = True
    try:  # CPUs that share a model name (AMD EPYC) differ: family/model tell the generations apart
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["family_model"] = f"{fields['cpu family']}/{fields['model']}"
    except (OSError, KeyError):
        pass
    gpus = _nvidia_gpus()
    if gpus:
        info["gpus"] = gpus
    return info


def _nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs' names and memory, as nvidia-smi gives them ([] without one)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def timed(fn, repeat: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``repeat`` calls of ``fn`` and every measurement."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def write_result(name: str, data: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"  # a name may hold a folder: "gpu/backends"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def forward_flops(model) -> int:
    """Floating-point operations (2 per multiply-add) of one image's forward pass through ``model``'s
    convolutions and dense layers (nested models included; BatchNorm, activations and pooling, a few
    percent of the total, are left out). What a CPU's peak FLOP/s is compared with.
    """
    import keras

    from cnnkit.models.saving import all_layers

    total = 0
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            out = layer.output.shape
            total += 2 * out[1] * out[2] * out[3] * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            out = layer.output.shape
            cin = layer.input.shape[-1]
            total += 2 * out[1] * out[2] * out[3] * kh * kw * cin // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
    return int(total)
