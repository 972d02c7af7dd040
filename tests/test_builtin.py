"""Built-in datasets: ``cnnkit train cifar10`` gets Keras's arrays once and trains on them as a folder.

Nothing downloads here: Keras's loader (``load_data``, or the ``get_file`` it downloads with) is
replaced by one that returns small arrays or fails the way an offline machine does.
"""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.data import _pool, builtin
from cnnkit.data.builtin import BUILTIN_SETS, builtin_name
from cnnkit.data.decode import load_image
from cnnkit.data.scan import natural_key, scan_folder
from cnnkit.errors import DataError
from cnnkit.rundir import hold_lock

runner = CliRunner()
CIFAR10 = BUILTIN_SETS["cifar10"].classes


def home() -> Path:
    return Path(os.environ["CNNKIT_HOME"])


def invoke(*args):
    return runner.invoke(app, ["--quiet", *map(str, args)])


def _arrays(per_class: int, seed: int):
    """CIFAR-shaped arrays: class k is a noisy colour of its own, labels shaped (n, 1) as Keras returns them."""
    rng = np.random.default_rng(seed)
    colours = np.array([[(k * 97) % 256, (k * 53 + 80) % 256, (k * 31 + 160) % 256] for k in range(10)])
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    noise = rng.integers(-30, 31, (len(labels), 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8).reshape(-1, 1)


@pytest.fixture
def fake_cifar10(monkeypatch, tmp_path):
    """keras.datasets.cifar10.load_data returning 10x8 training and 10x3 test images; counts its calls."""
    calls = []
    train, test = _arrays(8, 0), _arrays(3, 1)

    def load_data():
        calls.append(1)
        return train, test

    monkeypatch.setattr("keras.datasets.cifar10.load_data", load_data)
    monkeypatch.chdir(tmp_path)
    return calls, train, test


def test_cnnkit_train_cifar10_trains_on_the_builtin_set_written_once_as_png_folders(fake_cifar10, tmp_path):
    calls, (x_train, y_train), (x_test, y_test) = fake_cifar10
    result = invoke("train", "CIFAR10", "--model", "simple", "--epochs", "1", "--image-size", "16",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    folder = home() / "datasets" / "cifar10"
    assert sorted(p.name for p in (folder / "train").iterdir()) == list(CIFAR10)
    # Lossless, and file i is row i of Keras's array, in its label's folder.
    for i in (0, 37, 79):
        path = folder / "train" / CIFAR10[int(y_train[i, 0])] / f"{i:02d}.png"
        assert np.array_equal(np.asarray(Image.open(path)), x_train[i])
    assert sum(1 for _ in (folder / "test").rglob("*.png")) == len(x_test) == 30
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["data_dir"] == str(folder.resolve())
    assert record["class_names"] == list(CIFAR10)
    result = invoke("evaluate", tmp_path / "run", "--format", "json")  # the run's test split: the set's test/
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 30
    # A second use reads the folder; Keras is not asked again. Resuming by the name keeps the real folder.
    assert scan_folder("cifar-10").root == folder
    result = invoke("train", "cifar10", "--resume", tmp_path / "run", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data_dir"] == str(folder.resolve())
    assert len(calls) == 1


def test_a_folder_with_the_name_is_a_folder(fake_cifar10, tmp_path):
    calls, _, _ = fake_cifar10
    for name in ("cat", "dog"):
        (tmp_path / "cifar10" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "cifar10" / name / f"{i}.png")
    folder = scan_folder("cifar10")
    assert folder.class_names == ["cat", "dog"] and not calls
    (tmp_path / "mnist").write_text("not a folder")  # a file of the name is a file too
    assert builtin_name("mnist") is None


def test_offline_the_builtin_set_fails_in_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    def offline(*args, **kwargs):  # what keras.utils.get_file raises when the host cannot be reached
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("keras.src.datasets.cifar10.get_file", offline)
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "cifar10", "--epochs", "1")
    assert result.exit_code == 2
    assert "built-in dataset 'cifar10'" in result.output and "URL fetch failure" in result.output
    assert "pass a folder" in result.output and "Traceback" not in result.output
    assert [p.name for p in (home() / "datasets").iterdir()] == [".cifar10.lock"]  # the lock, no data


def test_a_write_cut_off_leaves_no_folder_that_looks_finished_and_the_next_call_completes(fake_cifar10, monkeypatch):
    calls, (x_train, _), _ = fake_cifar10
    save = Image.Image.save
    written = []

    def save_then_die(self, *args, **kwargs):
        if len(written) == 20:
            raise KeyboardInterrupt  # Ctrl-C, part way through the training images
        written.append(1)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        scan_folder("cifar10")
    datasets = home() / "datasets"
    assert [p.name for p in datasets.iterdir()] == [".cifar10.lock"]
    # A process killed hard (kill -9) leaves its partial folder; the next call removes it.
    (datasets / ".cifar10.partial-dead").mkdir()
    monkeypatch.setattr(Image.Image, "save", save)
    folder = scan_folder("cifar10")
    assert len(folder.files) == len(x_train) + 30 and len(calls) == 2
    assert sorted(p.name for p in datasets.iterdir()) == [".cifar10.lock", "cifar10"]


def test_an_unknown_name_lists_the_builtin_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "cifar", "--epochs", "1")
    assert result.exit_code == 2
    assert "Data folder 'cifar' does not exist" in result.output and "cifar10, cifar100, mnist" in result.output
    result = invoke("train", tmp_path / "missing", "--epochs", "1")
    assert result.exit_code == 2 and "built-in" not in result.output  # a path is a path


@pytest.mark.parametrize("given, name", [("cifar10", "cifar10"), ("CIFAR-10", "cifar10"), ("Cifar_100", "cifar100"),
                                         ("MNIST", "mnist"), ("fashion-mnist", "fashion_mnist"),
                                         ("FashionMNIST", "fashion_mnist"), ("cifar", None),
                                         ("./cifar10", "cifar10"), ("CIFAR10/", "cifar10"),  # what Typer passes on
                                         ("data/mnist", None), ("/cifar10", None)])
def test_builtin_names(given, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert builtin_name(given) == name


def test_class_folders_sort_in_keras_label_order_except_fashion_mnist():
    # cnnkit numbers classes by folder name (natural order): for these sets that is Keras's numbering.
    for name in ("cifar10", "cifar100", "mnist"):
        classes = BUILTIN_SETS[name].classes
        assert list(classes) == sorted(classes, key=natural_key) and len(set(classes)) == len(classes)
    assert len(BUILTIN_SETS["cifar100"].classes) == 100
    fashion = BUILTIN_SETS["fashion_mnist"].classes  # documented: named, not numbered, as Keras does
    assert sorted(fashion, key=natural_key)[0] == "Ankle_boot" == fashion[9]


def test_mnist_shaped_arrays_are_written_as_grayscale_pngs_and_decode_to_the_same_pixels(monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    y = np.tile(np.arange(10, dtype=np.uint8), 4)  # shaped (n,), as mnist.load_data returns them
    monkeypatch.setattr("keras.datasets.mnist.load_data", lambda: ((x, y), (x[:10], y[:10])))
    monkeypatch.chdir(tmp_path)
    folder = scan_folder("MNIST")
    assert folder.class_names == [str(d) for d in range(10)] and len(folder.files) == 50
    png = Image.open(folder.root / "train" / "7" / "17.png")
    assert png.mode == "L" and np.array_equal(np.asarray(png), x[17])
    assert np.array_equal(load_image(folder.root / "train" / "7" / "17.png", (28, 28), "grayscale")[..., 0], x[17])


def test_channels_first_arrays_are_written_channels_last(monkeypatch, tmp_path):
    (x, y), test = _arrays(2, 4), _arrays(1, 5)
    monkeypatch.setattr("keras.datasets.cifar10.load_data", lambda: ((x.transpose(0, 3, 1, 2), y), test))
    monkeypatch.chdir(tmp_path)
    folder = scan_folder("cifar10").root
    assert np.array_equal(np.asarray(Image.open(folder / "train" / CIFAR10[int(y[5, 0])] / "05.png")), x[5])


def test_labels_out_of_range_are_refused_and_leave_nothing(monkeypatch, tmp_path):
    (x, y), test = _arrays(2, 4), _arrays(1, 5)
    monkeypatch.setattr("keras.datasets.cifar10.load_data", lambda: ((x, y + 10), test))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="labels in 0..9"):
        scan_folder("cifar10")
    assert [p.name for p in (home() / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def test_a_second_process_waits_for_the_first_and_reads_its_folder(fake_cifar10):
    calls, _, _ = fake_cifar10
    datasets = home() / "datasets"
    datasets.mkdir(parents=True)
    first = hold_lock(datasets / ".cifar10.lock")  # another writer, holding the set's lock
    found = []
    waiting = threading.Thread(target=lambda: found.append(scan_folder("cifar10").root))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and not found  # it waits instead of writing beside the first
    for name in CIFAR10:
        (datasets / "cifar10" / "train" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (len(name) * 20, 0, 0)).save(datasets / "cifar10" / "train" / name / "0.png")
    assert not list(datasets.glob(".cifar10.partial-*")) and not (datasets / "cifar10" / "test").exists()
    first.close()
    waiting.join(30)
    assert found == [datasets / "cifar10"] and not calls  # the first one's folder, Keras not asked


def test_keras_download_messages_keep_stdout_clean(fake_cifar10, monkeypatch):
    calls, train, test = fake_cifar10

    def chatty():
        print("Downloading data from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")  # as get_file does
        return train, test

    monkeypatch.setattr("keras.datasets.cifar10.load_data", chatty)
    result = invoke("doctor", "cifar10", "--format", "json")
    assert json.loads(result.stdout)["class_names"] == list(CIFAR10)
    assert json.loads(result.stdout)["root"] == str(home() / "datasets" / "cifar10")


@pytest.fixture
def two_workers(monkeypatch):
    """The set's writer sees two usable CPUs, whatever this machine has; counts the pools it starts."""
    pools = []

    def counted(workers):
        pools.append(workers)
        return _pool.process_pool(workers)

    monkeypatch.setattr(builtin, "usable_cpus", lambda: 2)
    monkeypatch.setattr(builtin, "process_pool", counted)
    return pools


def test_a_large_set_is_written_by_worker_processes_losslessly(monkeypatch, tmp_path, two_workers):
    (x, y), test = _arrays(210, 6), _arrays(1, 7)  # 2,100 images: three chunks, so the process pool writes them
    monkeypatch.setattr("keras.datasets.cifar10.load_data", lambda: ((x, y), test))
    monkeypatch.chdir(tmp_path)
    folder = scan_folder("cifar10")
    assert two_workers == [2]  # the training images went through the pool (the 10 test images did not)
    assert sum(f.split != "test" for f in folder.files) == 2100  # train and the validation split made from it
    for i in (0, 999, 1000, 2099):
        path = folder.root / "train" / CIFAR10[int(y[i, 0])] / f"{i:04d}.png"
        assert np.array_equal(np.asarray(Image.open(path)), x[i])


def test_a_worker_that_fails_stops_the_write_and_leaves_nothing(monkeypatch, tmp_path, two_workers):
    (x, y), test = _arrays(210, 6), _arrays(1, 7)
    monkeypatch.setattr("keras.datasets.cifar10.load_data", lambda: ((x, y), test))
    monkeypatch.chdir(tmp_path)

    def disk_full(self, *args, **kwargs):  # forked workers inherit the patch
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        scan_folder("cifar10")
    assert two_workers == [2]
    assert [p.name for p in (home() / "datasets").iterdir()] == [".cifar10.lock"]
