import json

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit.data import load_image_folder
from cnnkit.errors import DataError
from cnnkit.predict import Predictor
from tests.conftest import write_class_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pe")
    write_class_folder(base / "data" / "train", per_class=30, seed=3)
    write_class_folder(base / "data" / "test", per_class=10, seed=4)
    result = cnnkit.train(base / "data", base / "run", epochs=6, image_size=16, batch_size=16, learning_rate=3e-3,
                          cache_root=base / "cache")
    return base, result


def test_predict_raw_uint8_equals_evaluate_path(run):
    base, result = run
    report = cnnkit.evaluate(result.run_dir, base / "data" / "test", cache_root=base / "cache")
    rows = {}
    import csv

    with open(report.out_dir / "predictions.csv") as fh:
        for r in csv.DictReader(fh):
            rows[r["path"]] = r
    predictor = Predictor(result.run_dir)
    for path in sorted((base / "data" / "test" / "red").glob("*.png"))[:5]:
        pixels = np.asarray(Image.open(path).convert("RGB"))  # raw uint8, already 16x16
        probs = predictor.predict_arrays(pixels)[0]
        assert predictor.class_names[int(probs.argmax())] == rows[str(path)]["predicted"]
        assert float(rows[str(path)]["confidence"]) == pytest.approx(float(probs.max()), abs=1e-5)
        by_file = predictor.predict([path])[0]
        assert by_file.confidence == pytest.approx(float(probs.max()), abs=1e-6)


def test_evaluate_writes_metrics_plots_and_matches_accuracy(run):
    base, result = run
    report = cnnkit.evaluate(result.run_dir, base / "data", top_k=2, cache_root=base / "cache")  # uses test/
    assert report.out_dir == result.run_dir / "eval" / "data"
    metrics = json.loads((report.out_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 30
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 30
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / 30)
    assert set(metrics["per_class"]) == {"blue", "green", "red"}
    assert metrics["top_2_accuracy"] >= metrics["accuracy"]
    for name in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(report.out_dir / name) as img:
            assert img.size[0] > 200 and img.size[1] > 100
    assert report.accuracy > 0.8


def test_evaluate_without_folder_uses_the_runs_test_split(image_folder, tmp_path):
    result = cnnkit.train(image_folder, tmp_path / "run", epochs=1, image_size=16, test_split=0.2)
    report = cnnkit.evaluate(result.run_dir)
    assert report.num_images == 12 and report.out_dir.name == "test"


def test_evaluate_refuses_classes_the_model_does_not_know(run, tmp_path):
    _, result = run
    write_class_folder(tmp_path / "other", per_class=2, classes={"red": (200, 0, 0), "purple": (100, 0, 100)})
    with pytest.raises(DataError, match="not trained on: purple"):
        cnnkit.evaluate(result.run_dir, tmp_path / "other")


def test_evaluate_subset_of_classes(run, tmp_path):
    _, result = run
    write_class_folder(tmp_path / "reds", per_class=4, classes={"red": (200, 30, 30), "blue": (30, 30, 200)})
    report = cnnkit.evaluate(result.run_dir, tmp_path / "reds")
    assert report.num_images == 8 and report.per_class["green"]["support"] == 0


def test_predict_reports_unreadable_files_and_predicts_the_rest(run, tmp_path):
    base, result = run
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (50, 30), (30, 30, 200)).save(folder / "blue.jpg")
    Image.new("RGBA", (20, 20), (200, 30, 30, 255)).save(folder / "red.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "notes.txt").write_text("not an input")
    results = Predictor(result.run_dir).predict([folder, tmp_path / "missing.jpg"], top_k=2)
    assert [r.path.split("/")[-1] for r in results] == ["blue.jpg", "broken.jpg", "red.png", "missing.jpg"]
    by_name = {r.path.split("/")[-1]: r for r in results}
    assert by_name["missing.jpg"].error == "no such file or folder"
    assert "corrupt or truncated JPEG" in by_name["broken.jpg"].error
    assert by_name["blue.jpg"].label == "blue" and by_name["red.png"].label == "red"
    assert len(by_name["blue.jpg"].top_k) == 2 and by_name["blue.jpg"].top_k[0][0] == "blue"


def test_predict_batches_keep_order_when_a_whole_batch_fails(run, tmp_path):
    # Batches decode on threads, several in flight: the answers come back in input order, a batch of
    # nothing but bad files included, and equal one-image predictions.
    base, result = run
    folder = tmp_path / "batches"
    folder.mkdir()
    names = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), None, None, (30, 200, 30), (200, 30, 30), (30, 30, 200)]):
        name = f"img{i}.jpg"
        if colour is None:
            (folder / name).write_bytes(b"\xff\xd8\xff not a jpeg")
        else:
            Image.new("RGB", (24, 24), colour).save(folder / name)
        names.append(name)
    # batches of 2 on 2 threads; one batch of 8 split across 3 threads (a small job, a Ray block)
    for batch_size, workers in ((2, 2), (8, 3)):
        predictor = Predictor(result.run_dir, batch_size=batch_size, workers=workers)
        results = predictor.predict([folder], top_k=3)
        assert [r.path.split("/")[-1] for r in results] == names
        assert [r.error is not None for r in results] == [False, False, True, True, False, False, False]
        for r in results:
            if r.error is None:
                alone = predictor.predict_image(r.path, top_k=3)
                assert r.label == alone.label
                assert [c for c, _ in r.top_k] == [c for c, _ in alone.top_k]
                np.testing.assert_allclose([p for _, p in r.top_k], [p for _, p in alone.top_k], atol=1e-6)


def test_prescaled_pixels_are_refused(run):
    _, result = run
    predictor = Predictor(result.run_dir)
    with pytest.raises(DataError, match="raw 0-255"):
        predictor.predict_arrays(np.random.rand(1, 16, 16, 3).astype("float32"))
    with pytest.raises(DataError, match=r"shape \(N, 16, 16, 3\)"):
        predictor.predict_arrays(np.zeros((1, 32, 32, 3), np.uint8))


def test_grayscale_run_end_to_end(image_folder, tmp_path):
    result = cnnkit.train(image_folder, tmp_path / "g", epochs=1, image_size=16, color_mode="grayscale")
    predictor = Predictor(result.run_dir)
    assert predictor.input_shape == (16, 16, 1)
    assert predictor.predict([image_folder / "red" / "red_000.png"])[0].error is None
    data = load_image_folder(image_folder, cnnkit.DataConfig(image_size=(16, 16), color_mode="grayscale"))
    assert data.cache.images.shape[-1] == 1


def test_predict_image_accepts_path_bytes_and_pixels(run):
    base, result = run
    predictor = Predictor(result.run_dir)
    path = base / "data" / "test" / "blue" / "blue_001.png"
    by_path = predictor.predict_image(path)
    by_bytes = predictor.predict_image(path.read_bytes())
    by_pixels = predictor.predict_image(predictor.load(path))
    assert by_path.label == by_bytes.label == by_pixels.label
    assert by_path.confidence == pytest.approx(by_bytes.confidence) == pytest.approx(by_pixels.confidence)
    from cnnkit.data import DecodeError

    with pytest.raises(DecodeError, match="not an image"):
        predictor.predict_image(b"not an image at all")


def test_default_batch_size_follows_the_image_size(run, tmp_path):
    """Without a batch size, small images go 256 to a model call (faster in bench/predict.py), big ones 64;
    the answers are the same as with any batch size, in input order, also for a last, partial batch."""
    from cnnkit.predict import default_batch_size

    assert [default_batch_size(s) for s in [(8, 8), (16, 16), (32, 32), (48, 48), (64, 64), (224, 224), (600, 40)]] \
        == [256, 256, 256, 64, 64, 64, 64]
    base, result = run
    predictor = Predictor(result.run_dir)  # a 16x16 model
    assert predictor.batch_size == 256
    assert Predictor(result.run_dir, batch_size=7).batch_size == 7
    with pytest.raises(Exception, match="batch_size"):
        Predictor(result.run_dir, batch_size=0)
    files = (sorted((base / "data" / "train").rglob("*.png")) * 4)[:300]  # one full call of 256 and a partial one
    assert len(files) == 300
    auto = predictor.predict(files)
    small = Predictor(result.run_dir, batch_size=7).predict(files)
    assert [p.path for p in auto] == [str(f) for f in files] == [p.path for p in small]
    assert [p.label for p in auto] == [p.label for p in small]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(auto, small)) < 1e-5


def test_python_users_do_not_see_tensorflows_retracing_advice():
    """Predictor and Grad-CAM trace one function per batch shape; TensorFlow's warning about it is not theirs."""
    import logging

    import cnnkit.predict  # noqa: F401 - importing it is what installs the filter

    record = logging.LogRecord("tensorflow", logging.WARNING, __file__, 0,
                               "5 out of the last 5 calls to <function f> triggered tf.function retracing.", None, None)
    assert not logging.getLogger("tensorflow").filter(record)
    other = logging.LogRecord("tensorflow", logging.WARNING, __file__, 0, "something else", None, None)
    assert logging.getLogger("tensorflow").filter(other)
