import shutil

import numpy as np
from PIL import Image

from cnnkit.config import DataConfig
from cnnkit.data import load_image, load_image_folder
from cnnkit.data.cache import build_cache
from tests.conftest import add_bad_files, write_class_folder


def test_second_run_reuses_the_cache_and_pixels_match_load_image(image_folder, tmp_path):
    cfg = DataConfig(image_size=(12, 12), val_split=0.2)
    first = load_image_folder(image_folder, cfg)
    assert first.cache.decoded == 60
    second = load_image_folder(image_folder, cfg)
    assert second.cache.decoded == 0
    assert second.data_hash == first.data_hash
    f = first.files[7]
    assert np.array_equal(first.cache.images[first.rows[7]], load_image(f.path, (12, 12)))


def test_data_hash_follows_content_and_labels_not_paths(image_folder, tmp_path):
    cfg = DataConfig(image_size=(12, 12))
    base = load_image_folder(image_folder, cfg).data_hash
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    assert load_image_folder(moved, cfg).data_hash == base
    assert load_image_folder(moved, DataConfig(image_size=(12, 12), val_split=0.3)).data_hash == base
    assert load_image_folder(moved, DataConfig(image_size=(10, 12))).data_hash != base
    assert load_image_folder(moved, DataConfig(image_size=(12, 12), color_mode="grayscale")).data_hash != base
    (moved / "red" / "red_000.png").rename(moved / "green" / "red_000.png")  # relabelled
    assert load_image_folder(moved, cfg).data_hash != base
    Image.new("RGB", (16, 16), (1, 2, 3)).save(moved / "green" / "red_000.png")  # edited
    assert load_image_folder(moved, cfg).data_hash != base


def test_bad_files_are_skipped_with_reasons_and_the_rest_used(image_folder):
    expected = add_bad_files(image_folder / "red")
    data = load_image_folder(image_folder, DataConfig(image_size=(8, 8), max_pixels=20_000_000))
    reasons = {s.path.name: s.reason for s in data.skipped}
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons.get(name))
    assert len(data.files) == 60
    assert data.cache.ok.sum() == 60


def test_worker_processes_decode_the_same_pixels(tmp_path):
    root = write_class_folder(tmp_path / "many", per_class=600, size=8, classes={"a": (10, 10, 10), "b": (200, 0, 0)})
    paths = sorted(root.rglob("*.png"))
    keys = [p.parent.name for p in paths]
    cache, rows, digests = build_cache(paths, keys, (8, 8), workers=2, cache_root=tmp_path / "c1")
    serial, serial_rows, serial_digests = build_cache(paths, keys, (8, 8), workers=1, cache_root=tmp_path / "c2")
    assert digests == serial_digests
    assert cache.decoded == 1200 and cache.ok.all()
    assert np.array_equal(cache.images[rows], serial.images[serial_rows])


def test_a_damaged_or_old_format_cache_is_rebuilt_not_trusted(image_folder, tmp_path):
    import json

    cfg = DataConfig(image_size=(12, 12))
    first = load_image_folder(image_folder, cfg, cache_root=tmp_path / "c")
    meta_file = first.cache.path / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["row_keys"]  # what an older cnnkit wrote
    meta_file.write_text(json.dumps(meta))
    again = load_image_folder(image_folder, cfg, cache_root=tmp_path / "c")
    assert again.cache.decoded == 60 and again.data_hash == first.data_hash
    np.save(again.cache.path / "ok.npy", np.ones(3, dtype=bool))  # truncated
    third = load_image_folder(image_folder, cfg, cache_root=tmp_path / "c")
    assert third.cache.decoded == 60 and len(third.cache.ok) == 60
