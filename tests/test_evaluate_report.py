"""Issue 5: metrics equal scikit-learn's, the report's files have the right content, TTA, calibration,
review and compare, through the API and the CLI."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cnnkit
from cnnkit.evaluation import calibrate
from cnnkit.metrics import (
    apply_temperature,
    choose_min_confidence,
    cross_entropy,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from cnnkit.cli import app
from cnnkit.evaluation import compare
from cnnkit.errors import ConfigError, DataError
from cnnkit.data.batches import tta_views
from cnnkit.data.decode import load_image
from cnnkit.evaluation.labelled import predict_labelled, run_split_files
from cnnkit.evaluation.scoring import compute_metrics, most_confused
from cnnkit.models.saving import ModelMeta, read_meta
from cnnkit.predict import Predictor
from cnnkit.evaluation import review
from tests.conftest import write_class_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    write_class_folder(base / "data" / "train", per_class=30, seed=3)
    write_class_folder(base / "data" / "test", per_class=10, seed=4)
    result = cnnkit.train(base / "data", base / "run", model="simple", epochs=4, image_size=16, batch_size=16, learning_rate=3e-3,
                          cache_root=base / "cache")
    return base, result


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """A run that still makes mistakes: colours 15 levels apart under +-40 noise, 8 epochs (about 2/3 right;
    after 5 it was still at chance with some shuffle orders)."""
    base = tmp_path_factory.mktemp("weak")
    colours = {"red": (125, 110, 110), "green": (110, 125, 110), "blue": (110, 110, 125)}
    write_class_folder(base / "data" / "train", per_class=30, seed=3, classes=colours)
    write_class_folder(base / "data" / "test", per_class=20, seed=4, classes=colours)
    result = cnnkit.train(base / "data", base / "run", model="simple", epochs=8, image_size=16, batch_size=16, learning_rate=3e-3,
                          cache_root=base / "cache")
    return base, result


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_equal_scikit_learns_on_a_fixed_prediction_set():
    from sklearn import metrics as skm

    rng = np.random.default_rng(42)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 2.0 * np.eye(4)[labels] * rng.random((300, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = ["cat", "dog", "fox", "owl"]
    report = compute_metrics(labels, probs, names, top_k=2)
    predicted = probs.argmax(axis=1)
    assert report.accuracy == pytest.approx(skm.accuracy_score(labels, predicted))
    assert report.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert report.top_k_accuracy == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=2))
    assert report.loss == pytest.approx(skm.log_loss(labels, probs), rel=1e-5)
    np.testing.assert_array_equal(report.confusion_matrix, skm.confusion_matrix(labels, predicted))
    p, r, f, s = skm.precision_recall_fscore_support(labels, predicted, zero_division=0)
    for i, name in enumerate(names):
        assert report.per_class[name]["precision"] == pytest.approx(p[i])
        assert report.per_class[name]["recall"] == pytest.approx(r[i])
        assert report.per_class[name]["f1-score"] == pytest.approx(f[i])
        assert report.per_class[name]["support"] == s[i]
    assert report.macro_avg["f1-score"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    assert report.weighted_avg["f1-score"] == pytest.approx(skm.f1_score(labels, predicted, average="weighted"))
    assert report.ece == pytest.approx(expected_calibration_error(probs, labels))
    # a folder without one of the model's classes ("owl", never predicted either): averages over the rest,
    # as scikit-learn's do without labels=, so macro recall and balanced accuracy agree
    probs[:, 3] = 0
    kept = labels != 3
    report = compute_metrics(labels[kept], probs[kept], names, top_k=2)
    predicted = probs[kept].argmax(axis=1)
    sk = skm.classification_report(labels[kept], predicted, output_dict=True, zero_division=0)["macro avg"]
    for key in ("precision", "recall", "f1-score"):
        assert report.macro_avg[key] == pytest.approx(sk[key])
    assert report.macro_avg["recall"] == pytest.approx(report.balanced_accuracy)
    assert report.per_class["owl"]["support"] == 0


def test_ece_and_reliability_bins_on_a_hand_computed_case():
    # 4 images: two at confidence 0.9 (one right), two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    bins = reliability_bins(probs, labels, bins=10)
    # bin 0.8-0.9: acc 0.5 vs conf 0.9; bin 0.5-0.6: acc 1.0 vs conf 0.6 -> ECE = 0.5*0.4 + 0.5*0.4
    assert bins["ece"] == pytest.approx(0.4)
    assert sum(bins["count"]) == 4


def test_most_confused_is_sorted_and_counts_off_diagonal_only():
    cm = np.array([[5, 3, 0], [1, 6, 0], [4, 0, 2]])
    pairs = most_confused(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("c", "a", 4), ("a", "b", 3), ("b", "a", 1)]
    assert pairs[0]["fraction_of_true"] == pytest.approx(4 / 6)


# --- calibration maths --------------------------------------------------------------------------


def test_temperature_scaling_recovers_a_known_over_confidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=1.5, size=(4000, 5))
    true_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in true_probs])
    over = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)  # a model 3x too confident
    temperature = fit_temperature(over, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    scaled = apply_temperature(over, temperature)
    assert (scaled.argmax(axis=1) == over.argmax(axis=1)).all()  # accuracy unchanged
    assert expected_calibration_error(scaled, labels) < expected_calibration_error(over, labels) / 2
    threshold, precision, coverage = choose_min_confidence(scaled, labels, target_precision=0.8)
    assert precision >= 0.8 and 0 < coverage < 1
    accepted = scaled.max(axis=1) >= threshold
    assert (scaled.argmax(axis=1) == labels)[accepted].mean() == pytest.approx(precision)


def test_predictor_applies_temperature_and_abstains_the_same_way_for_one_image_and_many(tmp_path):
    import keras

    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    dense = keras.layers.Dense(3, activation="softmax", kernel_initializer="zeros")
    model = keras.Model(inputs, dense(x))
    dense.bias.assign(np.array([1.0, 0.2, -0.5], "float32"))  # raw probabilities 0.61 / 0.27 / 0.13
    raw = np.asarray(model.predict(np.zeros((1, 4, 4, 3), "float32"), verbose=0))
    meta = ModelMeta(["a", "b", "c"], (4, 4), extra={"temperature": 2.0, "min_confidence": 0.5})
    predictor = Predictor.from_model(model, meta)
    probs = predictor.predict_arrays(np.zeros((2, 4, 4, 3), np.uint8))
    np.testing.assert_allclose(probs, np.repeat(apply_temperature(raw, 2.0), 2, axis=0), rtol=1e-5)
    assert probs[0, 0] < raw[0, 0] - 0.1  # T = 2 softened the 61% to about 47%: below min_confidence 50%
    Image.new("RGB", (4, 4), (0, 0, 0)).save(tmp_path / "x.png")
    for p in (predictor.predict([tmp_path / "x.png"])[0], predictor.predict_image(tmp_path / "x.png"),
              predictor.predict_image(np.zeros((4, 4, 3), np.uint8))):
        assert p.label == "unknown" and p.top_k[0] == ("a", pytest.approx(float(probs[0, 0]), abs=1e-6))
    predictor.min_confidence = None
    assert predictor.predict([tmp_path / "x.png"])[0].label == predictor.predict_image(tmp_path / "x.png").label == "a"


def test_report_files_exist_and_have_the_content(weak):
    base, result = weak
    report = cnnkit.evaluate(result.run_dir, base / "data" / "test", cache_root=base / "cache", tta=True)
    out = report.out_dir
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "accuracy", "top_2_accuracy", "balanced_accuracy", "macro_avg", "weighted_avg", "per_class",
                "confusion_matrix", "ece", "tta", "data_hash", "most_confused", "mistakes"):
        assert key in metrics, key
    assert metrics["tta"]["mode"] == "flip" and metrics["tta"]["views"] == 2
    cm = np.array(metrics["confusion_matrix"])
    with open(out / "most_confused.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["count"]) for r in rows) == cm.sum() - np.trace(cm)

    page = (out / "report.html").read_text()
    for name in result.class_names:
        assert name in page
    assert f"{report.accuracy:.2%}" in page and "with TTA" in page
    assert report.data_hash[:16] in page and '"learning_rate"' in page  # data summary and run config
    assert metrics["mistakes"] and "Grad-CAM overlay for the predicted class" in page
    assert metrics["mistakes"][0]["path"] in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 5  # curves, per-class, confusion matrix, mistakes, calibration
    assert "src=\"http" not in page and "<script" not in page  # self-contained, nothing to fetch
    for data in embedded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.verify()

    expected_min = {"confusion_matrix.png": (800, 400), "per_class.png": (500, 250), "calibration.png": (450, 550),
                    "mistakes.png": (150, 150)}
    for name, (width, height) in expected_min.items():
        with Image.open(out / name) as img:
            img.load()
            assert img.format == "PNG" and img.size[0] >= width and img.size[1] >= height, (name, img.size)
    with Image.open(out / "confusion_matrix.png") as img:
        assert 1.6 < img.size[0] / img.size[1] < 2.6  # counts and normalised side by side


def test_confusion_matrix_is_readable_at_100_classes(tmp_path):
    from cnnkit.plots import plot_confusion_matrix

    names = [f"class{i}" for i in range(100)]
    cm = np.random.default_rng(0).integers(0, 5, (100, 100)) + np.eye(100, dtype=int) * 50
    plot_confusion_matrix(cm, names, tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as img:
        assert img.size[0] >= 3000 and img.size[1] >= 1500  # about 30 px per class row


def test_tta_does_not_reduce_accuracy_on_a_flip_invariant_set(weak):
    base, result = weak
    report = cnnkit.evaluate(result.run_dir, base / "data" / "test", cache_root=base / "cache", tta="flip+crop",
                             name="tta")
    assert report.tta["views"] == 6 and report.accuracy < 1.0
    assert report.tta["accuracy"] >= report.accuracy
    # Averaging aligned views can only help the log-loss on average (Jensen); misaligned rows would wreck it.
    assert report.tta["loss"] <= report.loss + 1e-3
    # The TTA numbers are those of the probabilities averaged over the six views, computed here on their own.
    predictor = Predictor(result.run_dir)
    assert predictor.temperature == 1.0
    files = sorted((base / "data" / "test").glob("*/*.png"))
    images = np.stack([load_image(f, (16, 16)) for f in files])
    labels = np.array([predictor.class_names.index(f.parent.name) for f in files])
    plain = predictor.predict_arrays(images)
    averaged = np.mean([predictor.predict_arrays(view) for view in tta_views(images, "flip+crop")], axis=0)

    def log_loss(probs):
        return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))))

    assert report.num_images == len(files) == 60
    assert report.loss == pytest.approx(log_loss(plain), rel=1e-4)
    assert report.accuracy == pytest.approx(float(np.mean(plain.argmax(axis=1) == labels)))
    assert report.tta["loss"] == pytest.approx(log_loss(averaged), rel=1e-4)
    assert report.tta["accuracy"] == pytest.approx(float(np.mean(averaged.argmax(axis=1) == labels)))
    assert abs(report.tta["loss"] - report.loss) > 1e-4  # the views were averaged, not the plain pass reported twice
    views = tta_views(np.arange(2 * 16 * 16 * 3, dtype=np.uint8).reshape(2, 16, 16, 3), "flip+crop")
    assert len(views) == 6 and all(v.shape == (2, 16, 16, 3) for v in views)
    np.testing.assert_array_equal(views[1][:, :, 0], views[0][:, :, -1])
    with pytest.raises(ConfigError, match="flip\\+crop"):
        cnnkit.evaluate(result.run_dir, base / "data" / "test", tta="rotate")


def test_cli_evaluate_with_tta_prints_both(run):
    base, result = run
    proc = runner.invoke(app, ["evaluate", str(result.run_dir), str(base / "data" / "test"), "--tta", "--name", "cli"])
    assert proc.exit_code == 0, proc.output
    assert "with TTA (flip, 2 views)" in proc.output and "ECE" in proc.output
    assert (result.run_dir / "eval" / "cli" / "report.html").exists()
    for escape in ("../../escape", str(base / "abs"), ".."):  # a report stays under RUN/eval/
        proc = runner.invoke(app, ["evaluate", str(result.run_dir), str(base / "data" / "test"), "--name", escape])
        assert proc.exit_code == 2 and "--name is the report's folder name" in proc.output, proc.output
    assert not (result.run_dir.parent / "escape").exists() and not (base / "abs").exists()
    mine = base / "mine"  # from Python, out= names any folder: a user's is never replaced
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="is not a cnnkit evaluation report"):
        cnnkit.evaluate(result.run_dir, base / "data" / "test", out=mine)
    assert (mine / "notes.txt").read_text() == "precious"
    # one class's images: a trained model's recall on them, not "a classifier needs 2 classes"
    first = sorted(p for p in (base / "data" / "test").iterdir() if p.is_dir())[0]
    shutil.copytree(first, base / "one" / first.name)
    proc = runner.invoke(app, ["evaluate", str(result.run_dir), str(base / "one"), "--format", "json"])
    assert proc.exit_code == 0, proc.output
    scored = json.loads(proc.stdout)
    assert scored["num_images"] == len(list(first.iterdir())) and scored["per_class"][first.name]["support"] > 0


# --- calibration end to end ---------------------------------------------------------------------


def test_calibrate_stores_temperature_in_run_and_model(weak, tmp_path):
    # The weak run: its validation probabilities are far from 0 and 1, so the log-loss has a clear minimum in T
    # (the strong run's are all right at ~100%, where every T < 1 scores a log-loss of 0).
    base, result = weak
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    uncalibrated = Predictor(copy)
    assert uncalibrated.temperature == 1.0
    raw = uncalibrated.predict_arrays(np.full((1, 16, 16, 3), 200, np.uint8))
    validation = predict_labelled(uncalibrated, run_split_files(copy, "validation", uncalibrated.class_names),
                                  cache_root=base / "cache")
    cal = calibrate(copy, min_confidence=0.999, cache_root=base / "cache")
    assert cal.num_images == len(validation.labels) == 18
    assert cal.temperature > 0 and cal.ece_after <= cal.ece_before + 1e-6
    # The stored T minimises the validation log-loss: neither a lower nor a higher temperature does better.
    def nll(t):
        return cross_entropy(validation.probs, validation.labels, t)

    assert nll(cal.temperature) <= nll(cal.temperature * 1.25) and nll(cal.temperature) <= nll(cal.temperature / 1.25)
    assert nll(cal.temperature) < nll(1.0) - 1e-3  # and it is a real change from the raw model
    assert cal.loss_before == pytest.approx(nll(1.0), rel=1e-6) and cal.loss_after == pytest.approx(nll(cal.temperature), rel=1e-6)
    assert read_meta(copy / "model.keras").extra == {"temperature": cal.temperature, "min_confidence": 0.999}
    record = json.loads((copy / "run.json").read_text())
    assert record["calibration"]["temperature"] == cal.temperature
    assert record["calibration"]["plot"] == cal.plot == str(copy / "calibration.png") and (copy / "calibration.png").is_file()
    predictor = Predictor(copy)
    np.testing.assert_allclose(predictor.predict_arrays(np.full((1, 16, 16, 3), 200, np.uint8)),
                               apply_temperature(raw, cal.temperature), atol=1e-6)
    for p in predictor.predict([base / "data" / "test"]):
        assert (p.label == "unknown") == (p.confidence < 0.999)
    report = cnnkit.evaluate(copy, base / "data" / "test", cache_root=base / "cache")
    assert report.calibration["temperature"] == cal.temperature
    assert "ece_uncalibrated" in report.calibration


def test_calibrate_errors_name_the_fix(run, tmp_path):
    base, result = run
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    (copy / "split.csv").write_text("path,class,split,sha256\n")
    with pytest.raises(DataError, match="--data DIR"):
        calibrate(copy)
    with pytest.raises(ConfigError, match="min_confidence=2"):
        calibrate(copy, min_confidence=2)
    proc = runner.invoke(app, ["calibrate", str(copy), "--data", str(base / "data" / "test"), "--target-precision",
                               "0.9"])
    assert proc.exit_code == 0, proc.output
    assert "ECE" in proc.output and "abstain below confidence" in proc.output


# --- review and compare -------------------------------------------------------------------------


def _digests(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_review_puts_mislabelled_images_first_and_changes_nothing(run, tmp_path):
    base, result = run
    dirty = tmp_path / "dirty"
    shutil.copytree(base / "data" / "test", dirty)
    for i in range(3):  # three red images filed under blue
        (dirty / "red" / f"red_{i:03d}.png").rename(dirty / "blue" / f"wrong_{i}.png")
    before = _digests(dirty)
    queue = review(result.run_dir, dirty, top=10, cache_root=base / "cache")
    assert _digests(dirty) == before
    top3 = {item.path.split("/")[-1] for item in queue.items[:3]}
    assert top3 == {"wrong_0.png", "wrong_1.png", "wrong_2.png"}
    assert all(item.given == "blue" and item.predicted == "red" for item in queue.items[:3])
    with open(queue.out_dir / "queue.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["rank"] == "1" and rows[0]["split"] == "not in run"
    page = (queue.out_dir / "gallery.html").read_text()
    assert page.count("data:image/png;base64,") == len(queue.items) and "wrong_0.png" in page
    proc = runner.invoke(app, ["review", str(result.run_dir), str(dirty), "--top", "5", "--held-out-only"])
    assert proc.exit_code == 0, proc.output
    assert "wrong_" in proc.output


def test_compare_runs_side_by_side(run, tmp_path):
    base, result = run
    other = cnnkit.train(base / "data", tmp_path / "short", model="simple", epochs=1, image_size=16, batch_size=16,
                         cache_root=base / "cache")
    reports = [cnnkit.evaluate(r.run_dir, base / "data" / "test", name="same", cache_root=base / "cache")
               for r in (result, other)]
    cnnkit.evaluate(other.run_dir, base / "data" / "train", name="later", cache_root=base / "cache")  # not "same"
    table = compare([result.run_dir, other.run_dir], eval_name="same")
    assert [r.epochs for r in table.runs] == [4, 1] and table.runs[0].model == "simple"
    assert table.runs[0].data_hash == table.runs[1].data_hash and not table.warnings
    assert table.class_names == result.class_names
    for row, report in zip(table.runs, reports):  # each row holds what evaluate() reported for that run
        assert row.eval_name == "same" and row.accuracy == pytest.approx(report.accuracy)
        assert row.macro_f1 == pytest.approx(report.macro_avg["f1-score"])
        assert row.per_class_f1 == pytest.approx({c: report.per_class[c]["f1-score"] for c in result.class_names})
    for c in result.class_names:
        first, second = (report.per_class[c]["f1-score"] for report in reports)
        assert table.f1_delta[c] == [0.0, pytest.approx(second - first)]
    proc = runner.invoke(app, ["compare", str(result.run_dir), str(other.run_dir), "--eval", "same", "--format", "json"])
    assert proc.exit_code == 0, proc.output
    assert json.loads(proc.output)["runs"][1]["epochs"] == 1
    proc = runner.invoke(app, ["compare", str(result.run_dir), "--eval", "nope"])
    assert proc.exit_code == 2 and "has no evaluation 'nope'" in proc.output


def test_cli_explain_writes_side_by_side_pngs_and_refuses_unknown_class(run, tmp_path):
    base, result = run
    image = base / "data" / "test" / "red" / "red_000.png"
    proc = runner.invoke(app, ["explain", str(result.run_dir), str(image), "--out", str(tmp_path / "x")])
    assert proc.exit_code == 0, proc.output
    (png,) = list((tmp_path / "x").glob("*.png"))
    with Image.open(png) as img:
        assert img.size[0] > 2.2 * img.size[1]
    proc = runner.invoke(app, ["explain", str(result.run_dir), str(image), "--class", "rde"])
    assert proc.exit_code == 2 and "Did you mean 'red'" in proc.output
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    proc = runner.invoke(app, ["explain", str(result.run_dir), str(tmp_path / "broken.jpg")])
    assert proc.exit_code == 2 and "No image to explain" in proc.output and "broken.jpg" in proc.output
    proc = runner.invoke(app, ["explain", str(result.run_dir), str(image), "--layer", "predictions"])
    assert proc.exit_code == 2 and "Choose a convolutional layer" in proc.output


def test_evaluation_holds_one_batch_of_floats_not_the_dataset(run, tmp_path):
    """Streaming: peak numpy memory of the prediction pass stays far below the dataset as float32."""
    import tracemalloc

    from cnnkit.evaluation.labelled import _predict_rows

    _, result = run
    images = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(4000, 16, 16, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    rows = np.random.default_rng(1).permutation(4000)
    predictor = Predictor(result.run_dir, batch_size=256)
    predictor.predict_arrays(images[:256])  # warm up (graph tracing allocates once)
    tracemalloc.start()
    probs, tta_probs = _predict_rows(predictor, images, rows, "flip+crop")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    all_floats = 4000 * 16 * 16 * 3 * 4  # 12 MB: what holding every decoded image as float32 would take
    assert peak < all_floats / 3, f"peak {peak / 1e6:.1f} MB"
    assert probs.shape == tta_probs.shape == (4000, 3)
    np.testing.assert_allclose(probs[:5], predictor.predict_arrays(np.asarray(images[rows[:5]])), atol=1e-5)


def test_cli_train_with_calibrate_stores_the_temperature(image_folder, tmp_path):
    proc = runner.invoke(app, ["train", str(image_folder), "--out", str(tmp_path / "r"), "--epochs", "1",
                               "--image-size", "16", "--calibrate"])
    assert proc.exit_code == 0, proc.output
    assert "temperature" in proc.output and "ECE" in proc.output
    assert "temperature" in read_meta(tmp_path / "r" / "model.keras").extra


def test_review_out_of_fold_scores_every_image_with_a_model_that_did_not_see_it(run, tmp_path):
    base, result = run
    dirty = tmp_path / "dirty"
    shutil.copytree(base / "data" / "train", dirty)
    for i in range(3):  # three red training images filed under green
        (dirty / "red" / f"red_{i:03d}.png").rename(dirty / "green" / f"wrong_{i}.png")
    before = _digests(dirty)
    queue = review(result.run_dir, dirty, folds=2, top=5, cache_root=base / "cache")
    assert _digests(dirty) == before
    assert {item.path.split("/")[-1] for item in queue.items[:3]} == {"wrong_0.png", "wrong_1.png", "wrong_2.png"}
    assert all(item.split == "out-of-fold" for item in queue.items)
    with pytest.raises(ConfigError, match="Use fewer folds"):
        review(result.run_dir, dirty, folds=100, cache_root=base / "cache")
