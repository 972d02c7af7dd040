"""Loader benchmark: cnnkit's decode cache vs keras.utils.image_dataset_from_directory.

Measured in one run, each step repeated and the median kept:
  cold: cnnkit decoding every image into a fresh cache (hash + decode, worker processes) vs one
        pass of image_dataset_from_directory (decode + resize) over the same folder;
  warm: one shuffled epoch of batches from cnnkit's memory-mapped cache vs a second pass of the
        same tf.data pipeline with .cache() (decoded tensors held in memory).
on the CIFAR-10 train folder (50,000 JPEGs, 32x32) and on a folder of large photos (3000x4000
JPEGs generated here) resized to 224x224.

Usage: python bench/loader.py [--quick]      (results: bench/results/loader.json)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench._common import DATA, cifar_folder, print_table, timed, write_result  # noqa: E402


def make_photos(count: int, folder: Path) -> Path:
    """``count`` 3000x4000 JPEGs in 2 classes (smooth gradients + noise, ~1-2 MB each), made once."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / ("a" if i % 2 else "b") / f"photo_{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BICUBIC)
        img.save(path, quality=85)
    return folder


def cnnkit_cold(folder: Path, image_size: tuple[int, int]) -> None:
    from cnnkit.config import DataConfig
    from cnnkit.data import load_image_folder

    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        data = load_image_folder(folder, DataConfig(image_size=image_size, val_split=0.0), cache_root=cache)
        assert data.cache.decoded == len(data.files) + len(data.skipped) - len(data.folder.skipped)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def cnnkit_warm_epoch(data, batch_size: int = 256) -> None:
    from cnnkit.data.batches import ArrayBatches

    rows, labels = data.split_rows("train")
    batches = ArrayBatches(data.cache.images, rows, labels, batch_size, shuffle=True, seed=0)
    batches.on_epoch_begin()
    for i in range(len(batches)):
        x, y = batches[i]


def keras_pipeline(folder: Path, image_size: tuple[int, int], batch_size: int = 256):
    import keras

    return keras.utils.image_dataset_from_directory(folder, image_size=image_size, batch_size=batch_size,
                                                    shuffle=True, seed=0, verbose=False)


def one_pass(ds) -> int:
    n = 0
    for x, _ in ds:
        n += int(x.shape[0])
    return n


def bench_folder(name: str, folder: Path, image_size: tuple[int, int], repeat: int) -> dict:
    from cnnkit import _progress
    from cnnkit.config import DataConfig
    from cnnkit.data import load_image_folder

    _progress.set_progress(False)
    count = sum(1 for _ in folder.rglob("*.jpg"))
    keras_cold, keras_cold_all = timed(lambda: one_pass(keras_pipeline(folder, image_size)), repeat)
    ours_cold, ours_cold_all = timed(lambda: cnnkit_cold(folder, image_size), repeat)
    cached = keras_pipeline(folder, image_size).cache()
    one_pass(cached)
    keras_warm, keras_warm_all = timed(lambda: one_pass(cached), repeat)
    cache_root = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        data = load_image_folder(folder, DataConfig(image_size=image_size, val_split=0.0), cache_root=cache_root)
        ours_warm, ours_warm_all = timed(lambda: cnnkit_warm_epoch(data), repeat)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return {
        "folder": name, "images": count, "image_size": list(image_size),
        "keras_cold_s": keras_cold, "cnnkit_cold_s": ours_cold, "cold_ratio": keras_cold / ours_cold,
        "keras_warm_s": keras_warm, "cnnkit_warm_s": ours_warm, "warm_ratio": keras_warm / ours_warm,
        "all_runs": {"keras_cold": keras_cold_all, "cnnkit_cold": ours_cold_all,
                     "keras_warm": keras_warm_all, "cnnkit_warm": ours_warm_all},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2-minute version: fewer photos, one repeat")
    parser.add_argument("--photos", type=int, default=None, help="number of large photos (default 2000, quick 100)")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    photos = args.photos or (100 if args.quick else 2000)
    cifar = cifar_folder() / "train"
    if args.quick:  # 10,000 of the 50,000 train images, all classes
        quick = DATA / "cifar10-quick"
        if not quick.exists():
            for cls in sorted(os.listdir(cifar)):
                (quick / cls).mkdir(parents=True)
                for f in sorted(os.listdir(cifar / cls))[:1000]:
                    os.link(cifar / cls / f, quick / cls / f)
        cifar = quick
    results = [bench_folder("cifar10-train", cifar, (32, 32), repeat)]
    results.append(bench_folder(f"photos-3000x4000-x{photos}", make_photos(photos, DATA / f"photos-{photos}"),
                                (224, 224), repeat))
    rows = [(r["folder"], r["images"], f"{r['keras_cold_s']:.1f}", f"{r['cnnkit_cold_s']:.1f}",
             f"{r['cold_ratio']:.1f}x", f"{r['keras_warm_s']:.2f}", f"{r['cnnkit_warm_s']:.2f}",
             f"{r['warm_ratio']:.1f}x") for r in results]
    print_table(rows, ("folder", "images", "keras cold s", "cnnkit cold s", "cold ratio", "keras warm s",
                       "cnnkit warm s", "warm ratio"))
    path = write_result("loader", {"quick": args.quick, "repeat": repeat, "results": results})
    print(f"results: {path}")
    print(f"headline: cold decode {results[0]['cold_ratio']:.1f}x (CIFAR-10) and {results[1]['cold_ratio']:.1f}x "
          f"(large photos) faster than image_dataset_from_directory; warm epoch {results[0]['warm_ratio']:.1f}x")


if __name__ == "__main__":
    main()
