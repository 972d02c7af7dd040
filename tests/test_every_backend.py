"""Every command, every zoo model, the default recipe and the .keras round trip on *this* process's backend.

These tests use whatever ``KERAS_BACKEND`` the process runs (TensorFlow in the whole suite); `.ci/run` runs
them again with ``KERAS_BACKEND=jax`` and ``KERAS_BACKEND=torch``: ``pytest -m backends``. Data is tiny
(16x16 colour classes, one or two epochs): they check that each path works on each backend, not accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.models import available_models
from cnnkit.training.precision import choose_precision
from tests.conftest import write_class_folder

pytestmark = pytest.mark.backends

BACKEND = keras.backend.backend()
BACKENDS = ("tensorflow", "jax", "torch")
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["-q", *map(str, args)])
    assert result.exit_code == 0, f"cnnkit {' '.join(map(str, args))} on {BACKEND}:\n{result.output}"
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backend-data")
    write_class_folder(root / "train", per_class=12, seed=1)
    write_class_folder(root / "test", per_class=4, seed=2)
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A run trained by the CLI on this backend, with --mixed-precision (bfloat16 where the CPU has it)."""
    out = tmp_path_factory.mktemp("backend-runs") / "simple"
    cli("train", data / "train", "--out", out, "--model", "simple", "--image-size", "16", "--epochs", "1",
        "--batch-size", "8", "--mixed-precision")
    return out


def test_train_mixed_precision_resume_and_time_budget(run, data, tmp_path):
    record = json.loads((run / "run.json").read_text())
    assert record["versions"]["backend"] == BACKEND
    assert record["precision"] == choose_precision(True).as_dict()  # the decision and its reason, in words
    cli("train", "--resume", run, "--epochs", "1", "--out", tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["epochs_run"] == 2
    cli("train", data / "train", "--out", tmp_path / "budget", "--model", "simple", "--image-size", "16",
        "--time-budget", "20s", "--batch-size", "8")
    budget = json.loads((tmp_path / "budget" / "run.json").read_text())
    assert budget["time_budget"]["seconds"] == 20 and budget["status"] == "completed"


def test_every_command_on_a_run(run, data, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run, work)  # calibrate edits its run
    assert "suggested learning rate" in cli("lr-find", data / "train", "--model", "simple", "--image-size", "16",
                                            "--steps", "12", "--batch-size", "8", "--out", tmp_path / "lr")
    cli("evaluate", work, data / "test")
    predictions = json.loads(cli("predict", work, data / "test" / "red", "--format", "json"))
    assert len(predictions) == 4 and all(p["label"] in ("red", "green", "blue", "unknown") for p in predictions)
    cli("explain", work, data / "test" / "red" / "red_000.png", "--out", tmp_path / "explain")
    assert list((tmp_path / "explain").glob("*.png"))
    cli("calibrate", work)
    assert "temperature" in json.loads((work / "run.json").read_text())["calibration"]
    cli("review", work, data / "train", "--top", "5", "--out", tmp_path / "review")
    cli("compare", work, run)
    cli("doctor", data / "train")
    facts = json.loads(cli("info", "--format", "json"))
    assert facts["backend"] == BACKEND and facts["backend_version"] and facts["devices"]
    assert facts["mixed_precision"]["policy"] in ("float32", "mixed_bfloat16", "mixed_float16")
    assert facts["mixed_precision"]["reason"] and isinstance(facts["mixed_precision"]["cpu_bfloat16"], bool)
    from cnnkit._backends.devices import VECTOR_FLAGS, cpu_flags

    assert facts["cpu"]["cores"] >= 1
    # oneDNN: TensorFlow's own answer on TensorFlow (a bool), nothing on the other backends
    assert isinstance(facts["onednn"], bool) if BACKEND == "tensorflow" else facts["onednn"] is None
    assert facts["cpu"]["vector_extensions"] == [flag for flag in VECTOR_FLAGS if flag in cpu_flags()]
    assert all(facts[key] for key in ("home", "cache", "registry", "artifacts"))
    assert set(facts["extras"]) == {"jax", "torch", "serve", "export", "postgres", "ray", "pretrained"}
    assert facts["extras"][BACKEND] if BACKEND != "tensorflow" else facts["extras"]["export"]
    table = cli("info")
    for label in ("backend", "devices", "mixed precision", "vector extensions", "cache", "registry", "extras"):
        assert label in table
    cli("registry", "add", work, "--name", "colours")
    assert "colours" in cli("registry", "list")
    cli("registry", "show", "colours@1")
    cli("registry", "promote", "colours@1", "--stage", "production")
    cli("registry", "verify", "colours")
    cli("docker", "colours@1", "--out", tmp_path / "context", "--no-build")
    cli("registry", "add", work, "--name", "colours")
    cli("registry", "delete", "colours@2")


def test_onnx_export_and_engine_on_this_backend(run, data, tmp_path, monkeypatch):
    """ONNX through tf2onnx from any backend (a TensorFlow subprocess on JAX and PyTorch), and
    `predict --engine onnxruntime` giving Keras's answers."""
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))  # a fresh export cache
    cli("export", run, "--format", "onnx", "--out", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "cnnkit.json").is_file()
    folder = data / "test" / "blue"
    by_keras = json.loads(cli("predict", run, folder, "--format", "json", "--engine", "keras"))
    for source in (run, tmp_path / "onnx"):  # the run (exported on first use) and the export folder
        by_onnx = json.loads(cli("predict", source, folder, "--format", "json", "--engine", "onnxruntime"))
        assert [p["path"] for p in by_onnx] == [p["path"] for p in by_keras]
        assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(by_onnx, by_keras)) < 1e-4


def test_training_prints_no_tensorflow_start_up_lines(data, tmp_path):
    """Keras seeds TensorFlow, when installed, on every backend: its C++ start-up lines stay off the screen."""
    proc = subprocess.run([sys.executable, "-m", "cnnkit.cli", "train", str(data / "train"), "--out", str(tmp_path / "r"),
                           "--model", "simple", "--image-size", "16", "--epochs", "1", "--batch-size", "8"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "KERAS_BACKEND": BACKEND})
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if "port.cc" in line or "absl::InitializeLog" in line]
    assert not noise, noise


def test_export_from_this_backend(run, tmp_path):
    """SavedModel is a TensorFlow format: on JAX and torch the conversion runs in a TensorFlow subprocess."""
    cli("export", run, "--format", "savedmodel", "--out", tmp_path / "sm")
    assert (tmp_path / "sm" / "1" / "saved_model.pb").is_file() and (tmp_path / "sm" / "cnnkit.json").is_file()


def test_serve_answers_a_predict_request(run, data):
    import httpx

    from tests.test_serve import b64, expected_probs, free_port, wait_ready

    port, image = free_port(), data / "test" / "green" / "green_000.png"
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit.cli", "serve", str(run), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=300)  # a cold start on a loaded 2-core machine
        got = httpx.post(f"http://127.0.0.1:{port}/v1/models/simple:predict", json={"instances": [b64(image)]},
                         timeout=60)
        assert got.status_code == 200, got.text
        np.testing.assert_allclose(got.json()["predictions"], expected_probs(run, [image]), rtol=1e-5, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_default_recipe(data, tmp_path):
    """`cnnkit train DATA` as a new user types it (the fast model, its one-cycle recipe, mixed precision)."""
    result = cnnkit.train(data / "train", tmp_path / "run", epochs=2)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"] == "fast" and record["config"]["train"]["mixed_precision"] is True
    assert record["precision"]["requested"] is True and record["precision"]["reason"]
    assert np.isfinite(result.history["loss"]).all() and result.metrics["val_accuracy"] >= 0


# XLA compiles a full ImageNet backbone's training step for 1-2.5 minutes on a 2-core CPU (measured:
# efficientnetb0 142 s, resnet50 99 s, efficientnetlite2 98 s, mobilenetv2 78 s): on JAX the subset
# compiles one backbone's step (efficientnetlite0) and the from-scratch models' with XLA, and steps the
# other backbones op by op (jit_compile=False: 20-40 s each), so every model still trains a step on
# every backend. CNNKIT_ALL_BACKBONES=1 compiles them all on JAX too.
JAX_STEPPED_BACKBONES = ("efficientnetlite0",)


@pytest.mark.parametrize("name", available_models())
def test_every_zoo_model_trains_a_step(name):
    """One optimizer step and a prediction for each architecture (saving and loading: the tests above and below)."""
    from cnnkit.models import get_spec

    jit = "auto"
    if BACKEND == "jax" and get_spec(name).is_backbone and name not in JAX_STEPPED_BACKBONES \
            and not os.environ.get("CNNKIT_ALL_BACKBONES"):
        jit = False
    from cnnkit.config import TrainConfig
    from cnnkit.models import LOSS, build_model
    from cnnkit.training.optim import make_optimizer

    model = build_model(name, 3, (32, 32), weights="none")
    model.compile(optimizer=make_optimizer(TrainConfig(optimizer="sgd"), 1e-3, 10), loss=LOSS, jit_compile=jit)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    loss = model.train_on_batch(pixels, np.array([0, 1, 2, 0]))
    assert np.isfinite(loss)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "the step changed no weight"
    probs = keras.ops.convert_to_numpy(model.predict_on_batch(pixels))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


LOAD = textwrap.dedent("""
    import json, sys
    import numpy as np, keras
    from cnnkit.models.saving import load_model
    model, _ = load_model(sys.argv[1])
    pixels = np.load(sys.argv[2])
    print(json.dumps({"backend": keras.backend.backend(),
                      "probs": keras.ops.convert_to_numpy(model.predict_on_batch(pixels)).tolist()}))
""")


def test_keras_file_gives_the_same_probabilities_on_every_backend(run, tmp_path):
    """A model.keras trained here loads on the two other backends and gives the same probabilities."""
    from cnnkit.models.saving import load_model

    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    model, _ = load_model(run)
    here = keras.ops.convert_to_numpy(model.predict_on_batch(pixels))
    assert here.std() > 0  # not a constant answer that any file would match
    others = [b for b in BACKENDS if b != BACKEND]
    for other in others:
        if importlib.util.find_spec(other) is None:
            pytest.skip(f"{other} is not installed (pip install 'cnnkit[{other}]')")
        env = {**os.environ, "KERAS_BACKEND": other, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", LOAD, str(run / "model.keras"), str(tmp_path / "pixels.npy")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        assert answer["backend"] == other
        np.testing.assert_allclose(np.array(answer["probs"]), here, atol=1e-5, err_msg=f"{BACKEND} -> {other}")
