import hashlib

from PIL import Image

import cnnkit
from tests.conftest import add_bad_files, write_class_folder


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_counts_sizes_modes_and_no_problems_on_clean_data(split_folder):
    report = cnnkit.doctor(split_folder)
    assert report.layout == "splits"
    assert report.counts["train"] == {"blue": 24, "green": 24, "red": 24}
    assert report.counts["test"] == {"blue": 8, "green": 8, "red": 8}
    assert report.imbalance_ratio == 1.0
    assert report.sizes["most_common"] == {"16x16": 96}
    assert report.modes == {"RGB": 96}
    assert report.problems == []


def test_leakage_exact_and_near_duplicates_across_splits(split_folder):
    src = split_folder / "train" / "red" / "red_003.png"
    (split_folder / "test" / "red" / "copy.png").write_bytes(src.read_bytes())  # exact copy
    photo = Image.open(split_folder / "train" / "green" / "green_005.png").resize((64, 64))
    photo.save(split_folder / "test" / "green" / "resized.jpg", quality=90)  # resized, re-encoded copy
    report = cnnkit.doctor(split_folder)
    exact = [d for d in report.exact_duplicates if len(d["splits"]) > 1]
    near = [d for d in report.near_duplicates if len(d["splits"]) > 1]
    assert len(exact) == 1 and "copy.png" in " ".join(exact[0]["paths"]) and "leakage" in exact[0]["kind"]
    assert any("resized.jpg" in " ".join(d["paths"]) for d in near)
    assert any("leakage" in p for p in report.problems)


def test_label_conflict_unreadable_tiny_class_and_imbalance(image_folder):
    (image_folder / "green" / "dup.png").write_bytes((image_folder / "red" / "red_001.png").read_bytes())
    add_bad_files(image_folder / "red")
    write_class_folder(image_folder, per_class=2, classes={"tiny": (5, 5, 5)})
    before = _tree_digest(image_folder)
    report = cnnkit.doctor(image_folder)
    text = " ".join(report.problems)
    assert "label conflict" in text and "unreadable" in text and "'tiny' has only 2" in text
    assert "imbalanced" in text
    unreadable = {u["path"].split("/")[-1] for u in report.unreadable}
    assert {"empty.jpg", "truncated.jpg", "text.png", "corrupt.png"} <= unreadable
    assert _tree_digest(image_folder) == before  # never modifies a file


def test_empty_class_is_reported_not_raised(image_folder):
    (image_folder / "purple").mkdir()
    report = cnnkit.doctor(image_folder)
    assert any("'purple' has no readable" in p for p in report.problems)


def test_near_duplicates_are_grouped_not_listed_pair_by_pair(image_folder):
    photo = Image.open(image_folder / "red" / "red_004.png").resize((64, 64))
    for i, fmt in enumerate(("jpg", "webp", "bmp", "tif")):
        photo.save(image_folder / "blue" / f"same_{i}.{fmt}")
    report = cnnkit.doctor(image_folder)
    groups = [g for g in report.near_duplicates if any("same_" in p for p in g["paths"])]
    assert len(groups) == 1 and len(groups[0]["paths"]) >= 4
    assert "label conflict" in groups[0]["kind"]  # red_004 is in red, the copies in blue


def test_the_imbalance_advice_does_not_suggest_what_the_run_already_does():
    from cnnkit.data.rules import class_size_problems

    counts = {"big": 120, "small": 6, "mid": 30}
    plain, weighted = class_size_problems(counts), class_size_problems(counts, class_weighted=True)
    assert any("or train with --class-weight auto" in p for p in plain)
    imbalance = [p for p in weighted if "imbalanced 20:1" in p]
    assert imbalance and "The loss is weighted by class (--class-weight auto)" in imbalance[0]
    assert not any("or train with --class-weight auto" in p for p in weighted)
