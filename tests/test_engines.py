"""Inference engines: ONNX Runtime answers like Keras (within 1e-4) on the shipped digits' test split,
through Predictor, the CLI and the server, and the onnxruntime server imports no Keras or TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.demo import extract_demo_data
from cnnkit.engines import (
    AUTO,
    DEFAULT_ENGINE,
    ENGINES,
    PARITY,
    KerasEngine,
    OnnxEngine,
    engine_for,
    evaluation_images,
    measure_parity,
    onnx_export,
)
from cnnkit.errors import ConfigError, ModelError
from cnnkit.registry import resolve_source
from cnnkit.rundir import ONNX_MODEL, SOURCE_SHA256, is_onnx_export

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[export]')")
pytest.importorskip("tf2onnx", reason="tf2onnx not installed (pip install -e '.[export]')")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="ONNX export runs on TensorFlow here")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # the bar for an engine to be used at all (README, "Inference engines")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """(a `fast` run trained one epoch on the shipped digits, their test folder)."""
    root = tmp_path_factory.mktemp("engines")
    data = extract_demo_data(root / "data")
    cnnkit.train(data, root / "digits", model="fast", epochs=1, image_size=16, cache_root=root / "cache")
    return root / "digits", data / "test"


def probabilities(predictions: list[cnnkit.Prediction], classes: list[str]) -> np.ndarray:
    return np.array([[dict(p.top_k)[name] for name in classes] for p in predictions])


def test_onnxruntime_equals_keras_on_the_evaluation_set(digits):
    run, test = digits
    keras_predictor = cnnkit.Predictor(run, engine="keras")
    onnx_predictor = cnnkit.Predictor(run, engine="onnxruntime")
    assert isinstance(keras_predictor.engine, KerasEngine) and isinstance(onnx_predictor.engine, OnnxEngine)
    classes = keras_predictor.class_names
    expected = keras_predictor.predict([test], top_k=len(classes))
    got = onnx_predictor.predict([test], top_k=len(classes))
    assert len(got) == len(expected) > 300 and [p.path for p in got] == [p.path for p in expected]
    diff = np.abs(probabilities(got, classes) - probabilities(expected, classes))
    assert diff.max() <= TOLERANCE, f"onnxruntime differs from keras by {diff.max():.2e} on {test}"
    assert [p.label for p in got] == [p.label for p in expected]
    # and the comparison can fail: a different model's answers are far apart
    assert np.abs(probabilities(got, classes) - probabilities(got, classes)[::-1]).max() > TOLERANCE


def test_onnxruntime_equals_keras_for_the_time_budget_model(digits, tmp_path):
    """The model a --time-budget trains: fast with the frozen whitening stem (and here progressive
    resizing's layer, a no-op at inference) exports to ONNX with the same answers."""
    _, test = digits
    run = tmp_path / "budget-recipe"
    cnnkit.train(test.parent, run, model="fast", epochs=2, image_size=16, stem="whiten", progressive=0.75,
                 cache_root=tmp_path / "cache")
    keras_predictor = cnnkit.Predictor(run, engine="keras")
    classes = keras_predictor.class_names
    expected = probabilities(keras_predictor.predict([test], top_k=len(classes)), classes)
    got = probabilities(cnnkit.Predictor(run, engine="onnxruntime").predict([test], top_k=len(classes)), classes)
    assert len(got) > 300
    diff = np.abs(got - expected)
    # The frozen whitening stem multiplies pixel differences (by ~6x on these noisy digits), and with them
    # the two engines' float32 round-off: TensorFlow on oneDNN's AVX2 kernels differed from ONNX Runtime by
    # 1.8e-4 here (an AVX2-only EPYC; under 1e-4 with AVX-512). Same top label everywhere; bar 1e-3.
    assert diff.max() <= 10 * TOLERANCE, f"onnxruntime differs from keras by {diff.max():.2e} on {test}"
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_predictor_uses_the_default_engine(digits):
    run, _ = digits
    assert DEFAULT_ENGINE in ENGINES
    assert cnnkit.Predictor(run).engine.name == DEFAULT_ENGINE


def test_auto_runs_onnxruntime_once_the_export_is_ready(digits):
    """--engine auto (cnnkit predict's default): Keras until the export is cached and matched Keras, when it was
    written, on the run's own test images."""
    run, test = digits
    assert engine_for(run, AUTO) == "keras"  # nothing exported yet in this test's CNNKIT_HOME
    folder = onnx_export(run)
    parity = json.loads((folder / PARITY).read_text())
    assert parity["split"] == "test" and parity["images"] == min(512, len(list(test.rglob("*.png")))) > 300
    assert 0 <= parity["max_abs_prob_diff"] <= TOLERANCE and parity["within"], parity
    assert engine_for(run, AUTO) == "onnxruntime" and cnnkit.Predictor(run, engine=AUTO).engine.name == "onnxruntime"
    assert cnnkit.Predictor(run).engine.name == DEFAULT_ENGINE == "keras"  # evaluate, calibrate, Grad-CAM: Keras
    # an export that did not match Keras is not used in its place
    (folder / PARITY).write_text(json.dumps({**parity, "max_abs_prob_diff": 2 * TOLERANCE}))
    assert engine_for(run, AUTO) == "keras"
    assert engine_for(run / "missing.keras", AUTO) == "keras"  # the keras loader then says what is missing
    # an export from before parity.json gets one the next time it is used
    (folder / PARITY).unlink()
    assert engine_for(run, AUTO) == "keras"
    assert onnx_export(run) == folder and json.loads((folder / PARITY).read_text())["within"]
    assert engine_for(run, AUTO) == "onnxruntime"


def test_parity_is_measured_on_the_runs_images_and_catches_a_small_change(digits):
    """The comparison sees what a user would: a model whose weights moved by 0.3% is not the same model."""
    run, _ = digits
    reference = KerasEngine.load(run)
    images, split = evaluation_images(run, reference.meta)
    assert split == "test" and len(images) > 300 and images.dtype == np.uint8
    assert measure_parity(reference, OnnxEngine(onnx_export(run)), images)["within"]
    nudged = keras.models.clone_model(reference.model)
    rng = np.random.default_rng(0)
    nudged.set_weights([w * (1 + 3e-3 * rng.standard_normal(w.shape)) for w in reference.model.get_weights()])
    parity = measure_parity(reference, KerasEngine(nudged, reference.meta), images)
    assert parity["max_abs_prob_diff"] > TOLERANCE and not parity["within"], parity


def test_parity_images_fall_back_to_validation_then_training_images(digits, tmp_path):
    run, _ = digits
    meta = KerasEngine.load(run).meta
    lines = (run / "split.csv").read_text().splitlines()
    for kept, expected in ((("validation", "train"), "validation"), (("train",), "train")):
        folder = tmp_path / expected
        folder.mkdir()
        (folder / "model.keras").write_bytes((run / "model.keras").read_bytes())
        rows = [line for line in lines[1:] if line.split(",")[2] in kept]
        (folder / "split.csv").write_text("\n".join([lines[0], *rows]) + "\n")
        images, split = evaluation_images(folder, meta)
        assert split == expected and len(images) == min(512, sum(line.split(",")[2] == expected for line in rows))


def test_auto_keeps_keras_for_a_model_moved_alone_and_when_the_export_cannot_run(digits, tmp_path):
    run, test = digits
    alone = tmp_path / "moved.keras"  # no split.csv beside it: nothing to compare on
    alone.write_bytes((run / "model.keras").read_bytes())
    parity = json.loads((onnx_export(alone) / PARITY).read_text())
    assert parity["max_abs_prob_diff"] is None and "split.csv" in parity["reason"]
    assert engine_for(alone, AUTO) == "keras"
    folder = onnx_export(run)
    (folder / ONNX_MODEL).write_bytes(b"damaged")  # ready by its files, but ONNX Runtime cannot load it
    predictor = cnnkit.Predictor(run, engine=AUTO)
    assert predictor.engine.name == "keras"
    assert predictor.predict([sorted(test.rglob("*.png"))[0]])[0].error is None
    with pytest.raises(ModelError, match="cannot load"):
        cnnkit.Predictor(run, engine="onnxruntime")  # asked for by name: the error, not a quiet fallback


def test_export_is_cached_by_the_model_file_hash(digits, monkeypatch):
    run, test = digits
    folder = onnx_export(run)
    assert folder.parent == Path(os.environ["CNNKIT_HOME"]) / "onnx" and is_onnx_export(folder)
    assert (folder / SOURCE_SHA256).read_text().split()[0] == folder.name
    import cnnkit.engines as engines

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the .keras file did not change")

    monkeypatch.setattr(engines, "write_onnx_export", no_export)
    assert onnx_export(run) == folder  # reused
    image = sorted(test.rglob("*.png"))[0]
    assert cnnkit.Predictor(run, engine="onnxruntime").predict_image(image).label


def test_calibration_travels_with_the_export(digits, tmp_path):
    from cnnkit.models.saving import update_meta

    run, test = digits
    model = tmp_path / "calibrated.keras"
    model.write_bytes((run / "model.keras").read_bytes())
    update_meta(model, temperature=2.5)
    images = sorted(test.rglob("*.png"))[:20]
    onnx = cnnkit.Predictor(model, engine="onnxruntime")
    assert onnx.temperature == 2.5
    pixels = np.stack([onnx.load(p) for p in images])
    np.testing.assert_allclose(onnx.predict_arrays(pixels), cnnkit.Predictor(model).predict_arrays(pixels),
                               atol=TOLERANCE, rtol=0)


def test_an_onnx_export_folder_is_a_source(digits):
    run, test = digits
    folder = cnnkit.export(run, "onnx").out_dir
    assert engine_for(folder) == "onnxruntime" and engine_for(run) == DEFAULT_ENGINE
    source = resolve_source(folder)
    assert source.name == run.name and source.run_dir == run.resolve() and source.path == folder
    predictor = cnnkit.Predictor(folder)
    assert predictor.engine.name == "onnxruntime" and predictor.class_names == cnnkit.Predictor(run).class_names
    with pytest.raises(ConfigError, match="is an ONNX export"):
        cnnkit.Predictor(folder, engine="keras")
    with pytest.raises(ConfigError, match="Engines: keras, onnxruntime, or auto"):
        cnnkit.Predictor(run, engine="tensorrt")
    with pytest.raises(ModelError, match="engine='keras'"):
        predictor.model  # noqa: B018  (Grad-CAM needs the Keras model)


AFFINITY_PROBE = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as a container's cpuset or taskset does
import cnnkit
predictor = cnnkit.Predictor(sys.argv[1], engine="onnxruntime")
print(predictor.workers, predictor.engine.session.get_session_options().intra_op_num_threads)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux notion")
@pytest.mark.skipif(hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < 2,
                    reason="one CPU: the old and new thread counts are the same")
def test_prediction_threads_follow_the_cpus_this_process_may_use(digits):
    """Pinned to one CPU of a bigger host, predict starts one decode thread and one ONNX Runtime thread, not
    one per host core all fighting over that CPU."""
    run, _ = digits
    onnx_export(run)
    probe = subprocess.run([sys.executable, "-c", AFFINITY_PROBE, str(run)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-2:] == ["1", "1"]


def test_cli_predict_engine(digits):
    from cnnkit.cli import app

    run, test = digits
    images = [str(p) for p in sorted(test.rglob("*.png"))[:30]]
    answers = {}
    for engine in ENGINES:
        result = CliRunner().invoke(app, ["predict", str(run), *images, "--format", "json", "--top-k", "10",
                                          "--engine", engine])
        assert result.exit_code == 0, result.output
        answers[engine] = json.loads(result.stdout)
    for a, b in zip(answers["keras"], answers["onnxruntime"]):
        assert a["label"] == b["label"]
        pa = {t["label"]: t["probability"] for t in a["top_k"]}
        for t in b["top_k"]:
            assert abs(pa[t["label"]] - t["probability"]) <= TOLERANCE


def test_serve_settings_engine(monkeypatch):
    from cnnkit.serve import ServeSettings

    assert ServeSettings.from_env().engine is None
    monkeypatch.setenv("CNNKIT_ENGINE", "onnxruntime")
    assert ServeSettings.from_env().engine == "onnxruntime"
    monkeypatch.setenv("CNNKIT_ENGINE", "tflite")
    with pytest.raises(ConfigError, match="Received: engine='tflite'"):
        ServeSettings.from_env()


def test_serve_keeps_keras_unless_told(digits, monkeypatch):
    """A cached export does not move the server off Keras (its :explain needs Keras); CNNKIT_ENGINE=auto does."""
    from fastapi.testclient import TestClient

    from cnnkit.serve import create_app

    run, _ = digits
    onnx_export(run)
    for setting, expected in ((None, "keras"), ("auto", "onnxruntime")):
        if setting:
            monkeypatch.setenv("CNNKIT_ENGINE", setting)
        with TestClient(create_app(run)) as client:
            assert client.get("/v1/models/digits/metadata").json()["cnnkit"]["engine"] == expected


# Run first in a subprocess: importing keras, tensorflow, jax or torch raises.
WITHOUT_KERAS = r"""
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "tensorflow", "jax", "torch"):
            raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, Blocked())
"""

SERVE_WITHOUT_KERAS = WITHOUT_KERAS + r"""
import base64, json
from fastapi.testclient import TestClient
from cnnkit.serve import create_app
folder, image = sys.argv[1], sys.argv[2]
body = {"instances": [{"b64": base64.b64encode(open(image, "rb").read()).decode()}]}
with TestClient(create_app(folder, engine="onnxruntime")) as client:
    predicted = client.post("/v1/models/digits:predict", json=body)
    explained = client.post("/v1/models/digits:explain", json=body)
    engine = client.get("/v1/models/digits/metadata").json()["cnnkit"]["engine"]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow", "jax", "torch"))
print(json.dumps({"predict": [predicted.status_code, predicted.json()], "engine": engine,
                  "explain": [explained.status_code, explained.json()], "heavy": heavy}))
"""


PREDICT_WITHOUT_KERAS = WITHOUT_KERAS + r"""
import json
from typer.testing import CliRunner
from cnnkit.cli import app
result = CliRunner().invoke(app, ["predict", *sys.argv[1:], "--format", "json"])
print(json.dumps({"exit_code": result.exit_code, "output": result.output}))
"""


def test_cli_predict_on_onnxruntime_imports_no_keras(digits, tmp_path):
    """`cnnkit predict` on an ONNX export, or on a run whose export is cached, starts without Keras."""
    run, test = digits
    image = sorted(test.rglob("*.png"))[3]
    expected = cnnkit.Predictor(run, engine="keras").predict([image])[0].label
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNNKIT_HOME": str(tmp_path / "home")}
    onnx_export(run, tmp_path / "home" / "onnx")  # what a first --engine onnxruntime run leaves in the cache
    folder = cnnkit.export(run, "onnx", tmp_path / "export").out_dir
    for args in ([str(folder), str(image)], [str(run), str(image), "--engine", "onnxruntime"],
                 [str(run), str(image)]):  # the default, auto: the cached export matched Keras
        done = subprocess.run([sys.executable, "-c", PREDICT_WITHOUT_KERAS, *args], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["exit_code"] == 0, result["output"]
        assert json.loads(result["output"][result["output"].index("["):])[0]["label"] == expected


def test_onnxruntime_server_imports_no_keras(digits):
    run, test = digits
    folder = cnnkit.export(run, "onnx").out_dir
    image = sorted(test.rglob("*.png"))[3]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_KERAS, str(folder), str(image)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["heavy"] == [] and answer["engine"] == "onnxruntime"
    status, body = answer["predict"]
    assert status == 200, body
    predictor = cnnkit.Predictor(run, engine="keras")
    local = dict(predictor.predict([image], top_k=len(predictor.class_names))[0].top_k)
    expected = [local[name] for name in predictor.class_names]
    np.testing.assert_allclose(body["predictions"][0], expected, atol=TOLERANCE, rtol=0)
    status, body = answer["explain"]
    assert status == 501 and "--engine keras" in body["error"] and body["error"].endswith("Received: engine='onnxruntime'")


def test_slim_docker_context(digits, tmp_path):
    from cnnkit.deploy.docker import write_build_context

    run, _ = digits
    context = write_build_context(run, tmp_path / "ctx", engine="onnxruntime")
    assert context.tag == "cnnkit-digits:1-slim" and context.engine == "onnxruntime"
    model = context.path / "model"
    assert is_onnx_export(model) and (model / "run.json").is_file() and not (model / "model.keras").exists()
    requirements = {line.split("==")[0] for line in (context.path / "requirements.txt").read_text().split()}
    assert {"onnxruntime", "numpy", "pillow", "fastapi", "uvicorn", "python-multipart"} <= requirements
    assert not requirements & {"tensorflow", "tensorflow-cpu", "keras", "jax", "torch", "scikit-learn", "matplotlib"}
    dockerfile = (context.path / "Dockerfile").read_text()
    assert "CNNKIT_ENGINE=onnxruntime" in dockerfile and "KERAS_BACKEND" not in dockerfile
    assert "--no-deps" in dockerfile and "pip uninstall -y -q pip setuptools" in dockerfile
    assert '"python3", "-m", "cnnkit.serve"' in dockerfile and "CNNKIT_MODEL=/model" in dockerfile
    assert "runs/other/export/onnx:/model" in dockerfile  # what to mount in its place: an ONNX export
    # a mounted or exported ONNX folder is served by resolving it like the image's CMD does
    assert resolve_source(model, "digits").path == model and (model / ONNX_MODEL).stat().st_size > 1000


def test_cli_docker_and_serve_engine_options(digits, tmp_path):
    from cnnkit.cli import app

    run, _ = digits
    result = CliRunner().invoke(app, ["docker", str(run), "--engine", "onnxruntime", "--out", str(tmp_path / "ctx"),
                                      "--no-build"])
    assert result.exit_code == 0, result.output
    assert "tag cnnkit-digits:1-slim" in result.output and is_onnx_export(tmp_path / "ctx" / "model")
    result = CliRunner().invoke(app, ["serve", str(run), "--engine", "tensorrt"])
    assert result.exit_code != 0 and "onnxruntime" in result.output
    # an ONNX export folder builds the slim image without --engine
    export = onnx_export(run, tmp_path / "onnx-cache")
    result = CliRunner().invoke(app, ["docker", str(export), "--out", str(tmp_path / "ctx2"), "--no-build"])
    assert result.exit_code == 0, result.output
    assert "-slim" in result.output and is_onnx_export(tmp_path / "ctx2" / "model")


def test_the_slim_entry_names_what_cannot_be_served(digits, tmp_path):
    """`python -m cnnkit.serve` (the slim image's CMD): a model that cannot be served is one line and exit 2."""
    run, _ = digits
    broken = tmp_path / "broken"
    export = onnx_export(run, tmp_path / "onnx-cache")
    broken.mkdir()
    for member in export.iterdir():
        (broken / member.name).write_bytes(member.read_bytes())
    (broken / ONNX_MODEL).write_bytes((export / ONNX_MODEL).read_bytes()[:300])  # a truncated copy
    # As in the slim image: no Keras or TensorFlow to import. Port 0 (a free one, bound before the
    # model loads): were the model served after all, the run would time out instead of exiting 2.
    code = ("import runpy, sys\n"
            "sys.modules.update(keras=None, tensorflow=None)\n"
            "sys.argv = ['cnnkit.serve', *sys.argv[1:]]\n"
            "runpy.run_module('cnnkit.serve', run_name='__main__')")
    port = "0"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNNKIT_ENGINE": "onnxruntime",
           "CNNKIT_HOME": str(tmp_path / "home")}
    for source, says in ((broken, f"error: ONNX Runtime cannot load '{broken / ONNX_MODEL}'"),
                         (run, "error: '")):  # a run folder: Keras would be needed to export it
        proc = subprocess.run([sys.executable, "-c", code, str(source), "--port", port], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(says) and proc.stderr.count("\n") == 1, proc.stderr
    assert "this install has no Keras" in proc.stderr and "cnnkit export RUN -f onnx" in proc.stderr
    # `cnnkit serve` on the damaged export: the same one line, exit 2, before any server starts
    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["serve", str(broken), "--port", port])
    assert result.exit_code == 2 and "ONNX Runtime cannot load" in result.output, result.output
