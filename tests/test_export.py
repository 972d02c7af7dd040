"""Exports (SavedModel, ONNX, TFLite float and int8) answer like the Keras model on 20 images."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.errors import ConfigError
from cnnkit.deploy.formats import export, read_export_meta
from tests.conftest import write_class_folder

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports need the TensorFlow backend")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-run")
    data = write_class_folder(root / "data", per_class=8)
    cnnkit.train(data, root / "run", epochs=1, image_size=16, cache_root=root / "cache")
    return root / "run"


@pytest.fixture(scope="module")
def pixels_and_expected(run_dir):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    return pixels.astype(np.float32), cnnkit.Predictor(run_dir).predict_arrays(pixels)


def test_savedmodel_matches_keras(run_dir, pixels_and_expected):
    import tensorflow as tf

    pixels, expected = pixels_and_expected
    result = export(run_dir, "savedmodel")
    assert result.out_dir == run_dir / "export" / "savedmodel" and (result.out_dir / "1" / "saved_model.pb").is_file()
    loaded = tf.saved_model.load(str(result.out_dir / "1"))
    np.testing.assert_allclose(loaded.serve(pixels).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert read_export_meta(result.out_dir).class_names == ["blue", "green", "red"]


def test_onnx_matches_keras(run_dir, pixels_and_expected):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[export]')")
    pytest.importorskip("tf2onnx", reason="tf2onnx not installed (pip install -e '.[export]')")
    pixels, expected = pixels_and_expected
    result = export(run_dir, "onnx")
    session = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _tflite_predict(path: Path, pixels: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def test_tflite_float_and_int8_match_keras(run_dir, pixels_and_expected):
    pixels, expected = pixels_and_expected
    result = export(run_dir, "tflite")
    assert [f.name for f in result.files] == ["model.tflite", "model_int8.tflite"]
    np.testing.assert_allclose(_tflite_predict(result.files[0], pixels), expected, rtol=1e-4, atol=1e-5)
    int8 = _tflite_predict(result.files[1], pixels)
    np.testing.assert_allclose(int8, expected, atol=0.05)  # int8 weights: close, not equal
    assert result.files[1].stat().st_size < result.files[0].stat().st_size


def test_export_errors_and_cli(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="Formats: savedmodel, onnx, tflite"):
        export(run_dir, "pickle")
    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "savedmodel", "--out", str(tmp_path / "sm")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sm" / "1" / "saved_model.pb").is_file()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "none"), "--format", "onnx"])
    assert result.exit_code == 2 and "No run directory" in result.output
    # an --out that holds something else is never replaced: a user's folder, or a file
    mine = tmp_path / "models"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (tmp_path / "file.txt").write_text("keep")
    for out in (mine, tmp_path / "file.txt"):
        result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx", "--out", str(out)])
        assert result.exit_code == 2 and "Choose another --out" in result.output, result.output
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub").is_dir()
    assert (tmp_path / "file.txt").read_text() == "keep"
    # an earlier export there is replaced (its cnnkit.json says what it is)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "SavedModel", "--out", str(tmp_path / "sm")])
    assert result.exit_code == 0 and (tmp_path / "sm" / "1" / "saved_model.pb").is_file(), result.output
