"""The same train -> evaluate -> predict path on every Keras backend that is installed.

Each backend runs in a subprocess (KERAS_BACKEND is read once, at ``import keras``).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import write_class_folder

SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, cnnkit
    from cnnkit import _progress
    _progress.set_progress(False)
    data, out = sys.argv[1], sys.argv[2]
    result = cnnkit.train(data, out, model=sys.argv[3], epochs=6, image_size=16, batch_size=16, learning_rate=3e-3)
    report = cnnkit.evaluate(out, data + "/test")
    pred = cnnkit.Predictor(out).predict([data + "/test/red/red_000.png"])[0]
    print(json.dumps({"backend": keras.backend.backend(), "val": result.metrics["val_accuracy"],
                      "test": report.accuracy, "label": pred.label}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend, module", [("jax", "jax"), ("torch", "torch"), ("tensorflow", "tensorflow")])
def test_train_evaluate_predict_on_backend(backend, module, tmp_path):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'cnnkit[{backend}]')")
    write_class_folder(tmp_path / "data" / "train", per_class=30, seed=7)
    write_class_folder(tmp_path / "data" / "test", per_class=10, seed=8)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tmp_path / "run"), "vgg"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == backend
    assert out["test"] > 0.6, out  # chance is 1/3
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["versions"]["backend"] == backend


@pytest.mark.parametrize("command", [["train", "{data}", "--epochs", "1"], ["lr-find", "{data}"],
                                     ["explain", "{data}/test", "{data}/test/red/red_000.png"]])
def test_inference_only_backend_refuses_training_and_gradcam_in_words(command, tmp_path):
    """Keras' numpy backend cannot differentiate: a one-line error naming the backends that can, not a traceback."""
    write_class_folder(tmp_path / "data" / "test", per_class=3)
    args = [a.format(data=tmp_path / "data") for a in command]
    env = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "cnnkit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "inference only" in proc.stderr and "tensorflow, jax, torch" in proc.stderr
    assert "Received: backend='numpy'" in proc.stderr
