
import numpy as np
import pytest
from PIL import Image

from cnnkit.data.scan import expand_inputs, natural_key, scan_folder, stratified_split
from cnnkit.errors import DataError
from tests.conftest import add_bad_files, write_class_folder


def test_class_layout_is_split_stratified_and_seeded(image_folder):
    folder = scan_folder(image_folder, val_split=0.25, seed=7)
    assert folder.class_names == ["blue", "green", "red"]
    assert folder.layout == "classes"
    counts = folder.counts()
    assert counts["validation"] == {"blue": 5, "green": 5, "red": 5}
    assert counts["train"] == {"blue": 15, "green": 15, "red": 15}
    again = scan_folder(image_folder, val_split=0.25, seed=7)
    assert [f.path for f in again.split("validation")] == [f.path for f in folder.split("validation")]
    other = scan_folder(image_folder, val_split=0.25, seed=8)
    assert {f.path for f in other.split("validation")} != {f.path for f in folder.split("validation")}


def test_validation_split_of_class_sorted_data_is_not_a_tail_slice(tmp_path):
    # Keras' validation_split takes the last files; on class-sorted data that is one class only.
    write_class_folder(tmp_path, per_class=50, classes={"a": (0, 0, 0), "b": (9, 9, 9), "c": (99, 9, 9)})
    folder = scan_folder(tmp_path, val_split=0.2)
    val = folder.counts()["validation"]
    assert val == {"a": 10, "b": 10, "c": 10}


def test_split_layout_uses_folders(split_folder):
    (split_folder / "val" / "red").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(split_folder / "val" / "red" / "x.png")
    folder = scan_folder(split_folder, val_split=0.2)
    assert folder.layout == "splits"
    assert folder.split_source == {"train": "folder", "validation": "folder", "test": "folder"}
    assert folder.counts()["train"]["red"] == 24  # nothing split off: val/ exists
    assert folder.counts()["validation"] == {"blue": 0, "green": 0, "red": 1}


def test_split_layout_without_validation_splits_train_only(split_folder):
    folder = scan_folder(split_folder, val_split=0.25)
    assert folder.split_source["validation"] == "split"
    assert folder.counts()["test"] == {"blue": 8, "green": 8, "red": 8}
    assert folder.counts()["validation"] == {"blue": 6, "green": 6, "red": 6}


def test_natural_sort_of_class_names(tmp_path):
    for name in ("class10", "class2", "Class1"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    assert scan_folder(tmp_path, val_split=0).class_names == ["Class1", "class2", "class10"]
    assert sorted(["img10", "img9"], key=natural_key) == ["img9", "img10"]


def test_extensions_any_case_and_stray_files_skipped(image_folder):
    Image.new("RGB", (8, 8)).save(image_folder / "red" / "UPPER.JPG")
    Image.new("RGB", (8, 8)).save(image_folder / "red" / "photo.Jpeg", format="JPEG")
    reasons = add_bad_files(image_folder / "red")
    folder = scan_folder(image_folder, val_split=0)
    names = {f.path.name for f in folder.files}
    assert {"UPPER.JPG", "photo.Jpeg", "empty.jpg", "truncated.jpg"} <= names  # decode finds the bad ones
    skipped = {s.path.name: s.reason for s in folder.skipped}
    for name in (".DS_Store", "._red_000.png", "notes.txt"):
        assert reasons[name] in skipped[name]


def test_empty_class_folder_is_a_clear_error(image_folder):
    (image_folder / "purple").mkdir()
    with pytest.raises(DataError, match="purple.*has no images"):
        scan_folder(image_folder)


def test_single_class_is_a_clear_error(tmp_path):
    write_class_folder(tmp_path, classes={"only": (1, 2, 3)}, per_class=3)
    with pytest.raises(DataError, match="single class.*only.*at least 2"):
        scan_folder(tmp_path)


def test_no_images_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        scan_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_folder(empty)


def test_test_folder_with_unknown_class_is_an_error(split_folder):
    (split_folder / "test" / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(split_folder / "test" / "purple" / "x.png")
    with pytest.raises(DataError, match="purple"):
        scan_folder(split_folder)


def test_stratified_split_keeps_a_training_image_per_class():
    labels = np.array([0] * 2 + [1] * 100)
    assigned = stratified_split(labels, {"validation": 0.5, "test": 0.4}, seed=0)
    assert (assigned[:2] == "train").sum() >= 1
    assert (assigned[2:] == "validation").sum() == 50
    assert (assigned[2:] == "test").sum() == 40


def test_expand_inputs_files_folders_globs(image_folder):
    paths, skipped = expand_inputs([image_folder / "red" / "red_000.png", image_folder / "green",
                                    str(image_folder / "blue" / "blue_00*.png"), image_folder / "missing.png"])
    assert paths[0].name == "red_000.png"
    assert sum(p.parent.name == "green" for p in paths) == 20
    assert sum(p.parent.name == "blue" for p in paths) == 10
    assert [s.reason for s in skipped] == ["no such file or folder"]


def test_a_class_named_train_or_test_is_a_class(tmp_path):
    write_class_folder(tmp_path, per_class=3, classes={"bus": (1, 1, 1), "train": (2, 2, 2), "test": (3, 3, 3)})
    folder = scan_folder(tmp_path, val_split=0)
    assert folder.layout == "classes" and folder.class_names == ["bus", "test", "train"]


def test_val_and_test_without_train_is_an_error(tmp_path):
    write_class_folder(tmp_path / "val", per_class=2)
    write_class_folder(tmp_path / "test", per_class=2)
    with pytest.raises(DataError, match="no training folder"):
        scan_folder(tmp_path)
