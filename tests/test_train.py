import csv
import gc
import hashlib
import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.data.cache import default_cache_root
from cnnkit.data.decode import load_image
from cnnkit.errors import DataError, ModelError, RunExistsError
from cnnkit.metrics import cross_entropy
from cnnkit.models.saving import load_model
from cnnkit.predict import Predictor
from cnnkit.training import diagnose_history
from tests.conftest import add_bad_files, write_class_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small run shared by the tests below: 3 colour classes, 16x16, 8 epochs."""
    base = tmp_path_factory.mktemp("trained")
    data = write_class_folder(base / "data", per_class=30)
    add_bad_files(data / "red")
    result = cnnkit.train(data, base / "runs" / "first", model="simple", epochs=8, image_size=16, batch_size=16,
                          learning_rate=3e-3, max_pixels=20_000_000, cache_root=base / "cache")
    return data, result


def test_tiny_dataset_trains_well_above_chance(trained):
    _, result = trained
    assert result.status == "completed"
    assert result.metrics["val_accuracy"] > 0.8  # chance is 1/3


def test_run_directory_contents(trained):
    data, result = trained
    run = result.run_dir
    for name in ("model.keras", "run.json", "history.csv", "curves.png", "skipped.csv", "split.csv", "best.weights.h5",
                 "last.keras"):
        assert (run / name).is_file(), name
    assert not list(run.parent.glob(".first.partial-*"))
    record = json.loads((run / "run.json").read_text())
    assert record["class_names"] == ["blue", "green", "red"]
    assert record["image_size"] == [16, 16] and record["color_mode"] == "rgb"
    assert record["data_hash"] == result.data_hash and len(record["data_hash"]) == 64
    assert record["split_sizes"] == {"train": 72, "validation": 18, "test": 0}
    assert record["versions"]["keras"] == keras.__version__ and record["versions"]["backend"] == keras.backend.backend()
    assert record["config"]["train"]["epochs"] == 8
    assert record["metrics"]["val_accuracy"] == pytest.approx(result.metrics["val_accuracy"])
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == record["epochs_run"] and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])


def test_skipped_csv_names_every_bad_file_with_its_reason(trained):
    data, result = trained
    with open(result.run_dir / "skipped.csv") as fh:
        rows = {row["path"].split("/")[-1]: row["reason"] for row in csv.DictReader(fh)}
    for name, fragment in {"empty.jpg": "empty", "truncated.jpg": "truncated", "text.png": "not an image",
                           "bomb.png": "decompression bomb", ".DS_Store": "hidden", "notes.txt": "extension"}.items():
        assert fragment in rows[name], (name, rows.get(name))


def test_split_csv_is_the_split_used(trained):
    _, result = trained
    with open(result.run_dir / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 90
    assert {r["split"] for r in rows} == {"train", "validation"}
    assert all(len(r["sha256"]) == 64 for r in rows)
    val_classes = [r["class"] for r in rows if r["split"] == "validation"]
    assert sorted(val_classes) == ["blue"] * 6 + ["green"] * 6 + ["red"] * 6
    trained_on = {r["path"] for r in rows if r["split"] == "train"}
    assert not trained_on & {r["path"] for r in rows if r["split"] == "validation"}
    for r in rows:
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == r["sha256"], r["path"]
    # The validation rows are the images run.json's validation metrics were measured on.
    validation = [r for r in rows if r["split"] == "validation"]
    predictor = Predictor(result.run_dir)
    assert predictor.temperature == 1.0
    probs = predictor.predict_arrays(np.stack([load_image(r["path"], (16, 16)) for r in validation]))
    labels = np.array([predictor.class_names.index(r["class"]) for r in validation])
    record = json.loads((result.run_dir / "run.json").read_text())
    assert float(np.mean(probs.argmax(axis=1) == labels)) == pytest.approx(record["metrics"]["val_accuracy"], abs=1e-6)
    assert cross_entropy(probs, labels) == pytest.approx(record["metrics"]["val_loss"], rel=1e-4, abs=1e-7)


def test_model_moved_alone_predicts_identically_with_class_names(trained, tmp_path):
    data, result = trained
    moved = tmp_path / "elsewhere" / "renamed.keras"
    moved.parent.mkdir()
    shutil.copy(result.run_dir / "model.keras", moved)
    images = sorted((data / "green").glob("green_0*.png"))[:5]
    original = Predictor(result.run_dir).predict(images)
    again = Predictor(moved).predict(images)
    assert [p.label for p in again] == [p.label for p in original]
    np.testing.assert_allclose([p.confidence for p in again], [p.confidence for p in original], rtol=1e-6)
    assert Predictor(moved).class_names == ["blue", "green", "red"]


def test_existing_run_is_not_overwritten(trained):
    data, result = trained
    with pytest.raises(RunExistsError, match="--overwrite"):
        cnnkit.train(data, result.run_dir, epochs=1, image_size=16)


def test_overwrite_refuses_a_folder_that_is_not_a_run(image_folder, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(RunExistsError, match="not a cnnkit run"):
        cnnkit.train(image_folder, precious, epochs=1, image_size=16, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_unknown_model_fails_before_decoding(image_folder, tmp_path):
    cache = Path(os.environ["CNNKIT_HOME"]) / "cache"
    assert default_cache_root() == cache  # where train() would decode the folder to
    with pytest.raises(ModelError, match="Available: .*simple"):
        cnnkit.train(image_folder, tmp_path / "run", model="resnet")
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.partial-*"))  # no run directory was started
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing was decoded


def test_interrupted_run_keeps_best_checkpoint_and_says_so(image_folder, tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                # After the checkpoints of epoch 2: the weights move on (as they do mid-epoch), then Ctrl-C.
                self.model.set_weights([w + 0.5 for w in self.model.get_weights()])
                raise KeyboardInterrupt

    result = cnnkit.train(image_folder, tmp_path / "run", epochs=10, image_size=16, callbacks=[Interrupt()])
    assert result.status == "interrupted"
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "interrupted" and record["epochs_run"] == 2
    assert (tmp_path / "run" / "model.keras").exists()
    # The saved model holds the best checkpoint's weights, not those at the interruption.
    saved, _ = load_model(tmp_path / "run" / "model.keras")
    best, _ = load_model(tmp_path / "run" / "model.keras")
    best.load_weights(tmp_path / "run" / "best.weights.h5")
    for got, want in zip(saved.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(saved.predict(x, verbose=0)), np.asarray(best.predict(x, verbose=0)))


def test_a_fit_stopped_mid_epoch_leaves_no_input_iterator_to_interpreter_exit(image_folder, tmp_path):
    # A time budget, the range test or Ctrl-C stops an epoch mid-way. TensorFlow's iterator over the
    # batches then outlives fit in a reference cycle; freed at exit, its destructor could stall or hang.
    class StopMidEpoch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.model.stop_training = True

    result = cnnkit.train(image_folder, tmp_path / "run", epochs=3, image_size=16, batch_size=4,
                          callbacks=[StopMidEpoch()])
    assert result.status == "completed"
    left = [o for o in gc.get_objects() if type(o).__name__ == "OwnedIterator"]  # tf.data's iterator
    assert left == []


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data's autotuning is TensorFlow's")
def test_fits_feed_tensorflow_without_tf_data_autotuning(image_folder, tmp_path):
    # tf.data's autotuning thread made dropping an input iterator wait up to its sleep (doubling to
    # 60 s): some epochs' first step, or a fit's return, stalled 3-35 s, and budgets ran over.
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    from cnnkit.data.batches import ArrayBatches

    batches = ArrayBatches(np.zeros((8, 4, 4, 3), np.uint8), np.arange(8), np.zeros(8), 4)

    def autotuned() -> bool:
        return PyDatasetAdapter(batches).get_tf_dataset().options().autotune.enabled is not False

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            during.append(autotuned())

    during = []
    cnnkit.train(image_folder, tmp_path / "run", epochs=1, image_size=16, batch_size=4, callbacks=[Look()])
    assert during == [False]  # inside cnnkit's fit
    assert autotuned()  # a fit of the user's own, outside cnnkit, is left as Keras makes it


def test_failed_run_leaves_nothing_half_written(tmp_path):
    write_class_folder(tmp_path / "data", classes={"a": (1, 1, 1)}, per_class=3)
    with pytest.raises(DataError):
        cnnkit.train(tmp_path / "data", tmp_path / "runs" / "x", epochs=1)
    assert list((tmp_path / "runs").iterdir()) == []


def test_train_with_test_split_reports_test_accuracy(image_folder, tmp_path):
    result = cnnkit.train(image_folder, tmp_path / "run", epochs=2, image_size=16, val_split=0.2, test_split=0.2)
    assert "test_accuracy" in result.metrics
    assert json.loads((tmp_path / "run" / "run.json").read_text())["split_sizes"]["test"] == 12


def test_overfitting_warning_fires_on_memorised_noise(tmp_path):
    # Random pixels with random labels: the model can only memorise, so validation stays at chance.
    rng = np.random.default_rng(0)
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "noise" / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "noise" / c / f"{i}.png")
    result = cnnkit.train(tmp_path / "noise", tmp_path / "run", model="simple", epochs=30, image_size=16,
                          batch_size=8, learning_rate=3e-3, patience=30, val_split=0.3)
    assert any(w.startswith("Overfitting") for w in result.warnings), result.warnings
    assert any("Overfitting" in w for w in json.loads((tmp_path / "run" / "run.json").read_text())["warnings"])


def test_diagnostics_silent_on_a_healthy_history():
    healthy = {"loss": [1.0, 0.6, 0.4, 0.3], "accuracy": [0.5, 0.7, 0.8, 0.85],
               "val_loss": [0.9, 0.6, 0.5, 0.45], "val_accuracy": [0.55, 0.7, 0.78, 0.8]}
    assert diagnose_history(healthy, num_classes=3) == []


def test_diagnostics_fire_on_broken_histories():
    overfit = {"loss": [1.0, 0.5, 0.1], "accuracy": [0.5, 0.8, 0.99], "val_loss": [1, 1.2, 1.5],
               "val_accuracy": [0.5, 0.6, 0.62]}
    assert "since epoch 2" in diagnose_history(overfit, 3)[0]
    stuck = {"loss": [2.3, 2.3, 2.3], "accuracy": [0.1, 0.1, 0.1], "val_loss": [2.3] * 3, "val_accuracy": [0.1] * 3}
    messages = " ".join(diagnose_history(stuck, 10))
    assert "chance" in messages and "did not fall" in messages


def test_test_images_copied_into_train_are_flagged(split_folder, tmp_path):
    for i in range(3):
        src = split_folder / "test" / "red" / f"red_00{i}.png"
        (split_folder / "train" / "red" / f"copy_{i}.png").write_bytes(src.read_bytes())
    result = cnnkit.train(split_folder, tmp_path / "run", epochs=1, image_size=16, val_split=0, test_split=0.2)
    assert any("3 validation/test images are byte-identical" in w for w in result.warnings), result.warnings
    # test_split with a test/ folder on disk does nothing: said, with the folder named
    assert any(w.startswith(f"--test-split 0.2 has no effect: '{split_folder}' has its own test folder")
               for w in result.warnings), result.warnings
    assert not any("--val-split" in w for w in result.warnings)  # 0, and no validation folder: nothing to say
    report = cnnkit.evaluate(tmp_path / "run", split_folder / "test")
    assert len(report.leaked) == 3
    assert json.loads((report.out_dir / "metrics.json").read_text())["in_training_data"] == 3
    assert sorted(Path(p).name for p in report.leaked) == ["red_000.png", "red_001.png", "red_002.png"]
    clean = cnnkit.evaluate(tmp_path / "run", split_folder / "test" , name="again")
    assert clean.leaked == report.leaked  # deterministic
    unseen = tmp_path / "unseen"  # the test folder without the three copied images
    shutil.copytree(split_folder / "test", unseen)
    for i in range(3):
        (unseen / "red" / f"red_00{i}.png").unlink()
    fresh = cnnkit.evaluate(tmp_path / "run", unseen, name="unseen")
    assert fresh.num_images == 21 and fresh.leaked == []
    assert json.loads((fresh.out_dir / "metrics.json").read_text())["in_training_data"] == 0


def test_the_fast_recipes_model_file_loads_and_evaluates_in_plain_keras(tmp_path):
    """fast trains with cnnkit's label-smoothed loss; model.keras is compiled with Keras's own objects,
    so the tutorials' keras.models.load_model("model.keras") works without cnnkit, evaluate() included."""
    import subprocess
    import sys

    data = write_class_folder(tmp_path / "data", per_class=8, size=16)
    result = cnnkit.train(data, tmp_path / "run", model="fast", width="small", epochs=1, batch_size=8, image_size=16)
    assert result.model.loss is not None and type(result.model.loss).__name__ == "SmoothedSparseCrossentropy"
    # and with progressive resizing, whose saved model is an uncompiled full-size copy
    cnnkit.train(data, tmp_path / "prog", model="fast", width="small", epochs=2, batch_size=8, image_size=16,
                 progressive=0.75)
    load = ("import sys, keras, numpy as np; m = keras.models.load_model(sys.argv[1]); "
            "assert not any(n.startswith('cnnkit') for n in sys.modules), 'cnnkit imported'; "
            "x = np.zeros((2, 16, 16, 3), 'uint8'); print(m.predict(x, verbose=0).shape, "
            "len(m.evaluate(x, np.array([0, 1]), verbose=0)))")
    for run in ("run", "prog"):
        loaded = subprocess.run([sys.executable, "-c", load, str(tmp_path / run / "model.keras")],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert loaded.returncode == 0 and "(2, 3) 2" in loaded.stdout, (run, loaded.stderr[-2000:])
