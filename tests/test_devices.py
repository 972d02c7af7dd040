"""Data-parallel training (``--devices``): the same result as one device, on 2 virtual CPU devices.

JAX gets its 2 devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; TensorFlow
from cnnkit splitting the CPU into logical devices before TensorFlow starts. Each backend runs in
a subprocess (the device count is fixed when the backend starts).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from cnnkit.config import resolve_config
from cnnkit.data.batches import ArrayBatches
from cnnkit.errors import ConfigError
from tests.conftest import write_class_folder

# Trains the same run on 2 devices and on 1 (and on 1 with another seed, to show the tolerance
# tells runs apart), then prints losses, weights and the run.json devices record.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import cnnkit
    from cnnkit import _progress
    _progress.set_progress(False)
    data, base = sys.argv[1], sys.argv[2]
    out = {}
    for name, devices, seed in (("two", 2, 5), ("one", 1, 5), ("other_seed", 1, 6)):
        # fast (BatchNorm, no dropout: dropout masks are drawn per replica on TensorFlow), small width,
        # float32 on every CPU: under bfloat16 (fast's recipe where the CPU has it) the summation order's
        # rounding grows through BatchNorm's moving statistics (1.7% on the validation loss measured).
        result = cnnkit.train(data, f"{base}/{name}", model="fast", width="small", image_size=16, epochs=3,
                              batch_size=16, learning_rate=3e-3, optimizer="adam", schedule="plateau", augment="none",
                              label_smoothing=0.0, seed=seed, val_split=0.2, devices=devices,
                              mixed_precision=False)
        record = json.load(open(f"{base}/{name}/run.json"))
        out[name] = {"loss": result.history["loss"], "val_loss": result.history["val_loss"],
                     "weights": float(sum(np.abs(w).sum() for w in result.model.get_weights())),
                     "val_accuracy": result.metrics["val_accuracy"], "devices": record["devices"],
                     "seconds": record["train_seconds"], "precision": record["precision"]["policy"]}
    # --resume RUN --devices N: the 2-device run goes on for one more epoch on 1 device.
    resumed = cnnkit.train(resume=f"{base}/two", epochs=1, devices=1)
    record = json.load(open(f"{base}/two/run.json"))
    out["resumed"] = {"loss": resumed.history["loss"], "devices": record["devices"]}
    print(json.dumps(out))
""")


def _train_on_devices(backend: str, tmp_path) -> dict:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install 'cnnkit[{backend}]')")
    write_class_folder(tmp_path / "data", per_class=20, seed=11)  # 48 training images: 3 batches of 16
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_jax_data_parallel_matches_one_device(tmp_path):
    out = _train_on_devices("jax", tmp_path)
    two, one, other = out["two"], out["one"], out["other_seed"]
    assert two["devices"] == {"count": 2, "kind": "cpu", "names": ["cpu:0", "cpu:1"],
                              "strategy": "keras.distribution.DataParallel"}
    assert one["devices"]["count"] == 1 and one["devices"]["strategy"] == "none"
    assert two["precision"] == one["precision"] == "float32"
    # The global batch is sharded and the gradients summed over it (BatchNorm too): the same maths,
    # summed in another order. In float32 the losses agree to 2e-7 and the validation loss to 4e-6
    # (measured on an AVX512 EPYC); the bounds leave room for other CPUs' kernels and summation orders.
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=3e-3)
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-2)
    np.testing.assert_allclose(two["weights"], one["weights"], rtol=1e-3)
    assert abs(two["val_accuracy"] - one["val_accuracy"]) <= 1 / 12 + 1e-9  # at most one of 12 images
    # The tolerance tells different runs apart: another seed is far outside it.
    assert not np.allclose(other["loss"], one["loss"], rtol=3e-3)
    resumed = out["resumed"]  # --resume on another number of devices: the history goes on, the record follows
    assert resumed["loss"][:3] == two["loss"] and len(resumed["loss"]) == 4
    assert resumed["devices"]["count"] == 1 and resumed["devices"]["strategy"] == "none"


@pytest.mark.slow
def test_tensorflow_mirrored_strategy_matches_one_device(tmp_path):
    out = _train_on_devices("tensorflow", tmp_path)
    two, one = out["two"], out["one"]
    assert two["devices"]["count"] == 2 and two["devices"]["names"] == ["cpu:0", "cpu:1"]
    assert two["devices"]["strategy"] == "tf.distribute.MirroredStrategy"
    # BatchNorm is synchronized over the replicas for the fit; the all-reduce sums in another order,
    # so the runs agree closely, not bit for bit. Measured: the weights within 0.1%; the losses within
    # 0.3-4% with one data order and within 0.02 (up to 12% of a loss near 0.13) with another. With
    # per-replica BatchNorm the first epoch's loss was 22% off (0.15) and val accuracy 67% vs 100%.
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=0.1, atol=0.03)
    np.testing.assert_allclose(two["weights"], one["weights"], rtol=0.01)
    assert abs(two["val_accuracy"] - one["val_accuracy"]) <= 0.15
    # The saved model is plain: synchronized BatchNorm (TensorFlow only) was switched off before saving.
    assert '"synchronized": true' not in zipfile.ZipFile(tmp_path / "runs" / "two" / "model.keras").read(
        "config.json").decode()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_cli_devices_trains_on_two_devices(backend, tmp_path):
    """``cnnkit train --devices 2`` as typed: the CLI must not start the backend before the devices are set."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install 'cnnkit[{backend}]')")
    write_class_folder(tmp_path / "data", per_class=8)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-m", "cnnkit.cli", "train", str(tmp_path / "data"), "--out",
                           str(tmp_path / "run"), "--model", "simple", "--image-size", "16", "--epochs", "1",
                           "--batch-size", "8", "--devices", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    devices = json.loads((tmp_path / "run" / "run.json").read_text())["devices"]
    assert devices["count"] == 2 and devices["names"] == ["cpu:0", "cpu:1"]
    assert "training on 2 cpu devices" in proc.stdout + proc.stderr


def test_torch_refuses_several_devices_with_what_to_use(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install 'cnnkit[torch]')")
    write_class_folder(tmp_path / "data", per_class=6)
    script = ("import cnnkit, sys\n"
              "try:\n"
              "    cnnkit.train(sys.argv[1], sys.argv[2], model='simple', image_size=16, epochs=1, devices=2)\n"
              "except cnnkit.ConfigError as exc:\n"
              "    print(exc)\n")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KERAS_BACKEND=jax" in proc.stdout and "Received: devices=2, backend='torch'" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_devices_option_is_validated_with_the_fix():
    assert resolve_config(None, devices="all").train.devices == "all"
    assert resolve_config(None, devices="2", batch_size=64).train.devices == 2
    for bad in (0, -1, "two", True):
        with pytest.raises(ConfigError, match="devices must be a number of devices >= 1 or 'all'"):
            resolve_config(None, devices=bad)
    with pytest.raises(ConfigError, match="Use --batch-size 63 or 66. Received: batch_size=64, devices=3"):
        resolve_config(None, devices=3, batch_size=64)


@pytest.mark.backends  # runs where it means something: .ci/backends on JAX
def test_more_devices_than_the_backend_sees_says_how_to_get_them():
    import keras

    from cnnkit.training.distribute import distributed

    if keras.backend.backend() != "jax":
        pytest.skip(f"the message names JAX's XLA_FLAGS; on {keras.backend.backend()} it does not apply "
                    "(TensorFlow splits the CPU itself, PyTorch refuses --devices above 1)")
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=64"):
        with distributed(64, 64):
            pass


@pytest.mark.parametrize("rows, expected", [(10, [4, 4, 2]), (11, [4, 4, 2]), (9, [4, 4]), (8, [4, 4])])
def test_batches_split_evenly_over_devices(rows, expected):
    images = np.zeros((rows, 2, 2, 3), np.uint8)
    batches = ArrayBatches(images, np.arange(rows), np.zeros(rows), 4, shuffle=True, multiple_of=2)
    assert [len(batches[i][0]) for i in range(len(batches))] == expected
    one_device = ArrayBatches(images, np.arange(rows), np.zeros(rows), 4)
    assert sum(len(one_device[i][0]) for i in range(len(one_device))) == rows
