"""Memory benchmark: peak resident memory (RSS) of training, each case in a fresh process.

  cifar:  ``cnnkit.train`` on the CIFAR-10 JPEG folders (50,000 train + 10,000 test images) with
          the defaults (``fast``), for one epoch (quick: a 60 s time budget), from a fresh cache.
  large:  a uint8 cache of 200,000 images at 128x128 (9.8 GB = 9.2 GiB on disk: more than many laptops' RAM)
          written as cnnkit's memory-mapped .npy, trained through cnnkit's loader
          (``ArrayBatches``) and the ``fast`` model for a few shuffled steps: only the batches
          touched are paged in, so RSS stays far below the cache's size.

Peak RSS is the kernel's high-water mark (VmHWM), split at the end into anonymous memory (the
process's own) and file-backed pages (the memory map, which the kernel can drop under pressure).
Usage: python bench/memory.py [--quick] [--images 200000]   (results: bench/results/memory.json)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DATA, cifar_folder, print_table, write_result  # noqa: E402

LIMIT_GB = 3.0


def memory_status() -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS, RssAnon and RssFile of this process, in GiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024**2
    return values


def child_cifar(quick: bool) -> dict:
    import cnnkit

    cache = Path(tempfile.mkdtemp(prefix="bench-mem-cache-"))
    out = Path(tempfile.mkdtemp(prefix="bench-mem-run-")) / "run"
    try:
        options = {"time_budget": 60} if quick else {"epochs": 1}
        result = cnnkit.train(cifar_folder(), out, cache_root=cache, **options)
        return {"epochs": len(result.history["loss"]),
                "test_accuracy": result.metrics.get("test_accuracy"), **memory_status()}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)


def write_large_cache(path: Path, count: int, side: int) -> Path:
    """A cnnkit-style uint8 .npy cache of ``count`` images (random blocks), written chunk by chunk."""
    import numpy as np

    if path.exists() and np.load(path, mmap_mode="r").shape == (count, side, side, 3):
        return path
    tmp = path.with_suffix(".tmp.npy")
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, side, side, 3))
    rng = np.random.default_rng(0)
    chunk = 2000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        blocks = rng.integers(0, 256, (n, side // 8, side // 8, 3), dtype=np.uint8)
        images[start : start + n] = blocks.repeat(8, axis=1).repeat(8, axis=2)
    images.flush()
    del images
    os.replace(tmp, path)
    return path


def child_large(cache_path: str, steps: int) -> dict:
    import cnnkit  # noqa: F401  first: it asks TensorFlow for oneDNN before TensorFlow is imported
    import keras
    import numpy as np

    from cnnkit._backends import fit_input
    from cnnkit.data.batches import ArrayBatches
    from cnnkit.training.fitting import batch_augment
    from cnnkit.training.precision import precision_policy
    from cnnkit.models import build_model

    images = np.load(cache_path, mmap_mode="r")
    labels = np.arange(len(images)) % 10
    batches = ArrayBatches(images, np.arange(len(images)), labels, 64, shuffle=True, seed=0,
                           augment=batch_augment("flip-translate"))
    keras.config.set_dtype_policy(precision_policy(True))
    model = build_model("fast", 10, images.shape[1:3])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    with fit_input():  # stopped mid-epoch: tf.data's iterator is freed on the way out, not at exit
        model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
    return {"images": len(images), "cache_gb": round(images.nbytes / 1024**3, 2), "steps": steps, "batch_size": 64,
            "seconds": round(time.perf_counter() - started, 1), **memory_status()}


def in_child(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    line = next((ln for ln in output.stdout.splitlines()[::-1] if ln.startswith("{")), None)
    if output.returncode or line is None:
        raise SystemExit(f"child {args} failed:\n{output.stderr[-3000:]}")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~2 minutes: 40,000 large images, 60 s of CIFAR")
    parser.add_argument("--images", type=int, default=None, help="images in the large cache (default 200,000)")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the large cache in bench/.data for later runs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind = args.child[0]
        result = child_cifar(args.child[1] == "quick") if kind == "cifar" else child_large(args.child[1], int(args.child[2]))
        print(json.dumps(result))
        return
    count = args.images or (40_000 if args.quick else 200_000)
    cifar = in_child("cifar", "quick" if args.quick else "full")
    cache_path = DATA / f"large-{count}x{args.side}.npy"
    DATA.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_large_cache(cache_path, count, args.side)
    written = time.perf_counter() - started
    try:
        large = in_child("large", str(cache_path), str(args.steps))
    finally:
        if not args.keep:
            cache_path.unlink(missing_ok=True)
    rows = [
        ("CIFAR-10 train (fast, " + ("60 s budget)" if args.quick else "1 epoch)"), "60,000 JPEGs, 0.17 GiB cache",
         f"{cifar['VmHWM']:.2f}", f"{cifar['RssAnon']:.2f}", f"{cifar['RssFile']:.2f}"),
        (f"large cache ({large['steps']} steps of 64)", f"{large['images']:,} x {args.side}px, {large['cache_gb']:.1f} GiB",
         f"{large['VmHWM']:.2f}", f"{large['RssAnon']:.2f}", f"{large['RssFile']:.2f}"),
    ]
    print_table(rows, ("case", "data", "peak RSS GiB", "anon GiB (end)", "file-backed GiB (end)"))
    path = write_result("memory", {"cifar": cifar, "large": large, "large_cache_write_seconds": round(written, 1),
                                   "limit_gb": LIMIT_GB})
    print(f"results: {path}")
    worst = max(cifar["VmHWM"], large["VmHWM"])
    print(f"headline: peak RSS {large['VmHWM']:.2f} GiB training on a {large['cache_gb']:.1f} GiB cache, "
          f"{cifar['VmHWM']:.2f} GiB on CIFAR-10; {worst / LIMIT_GB:.2f}x of the {LIMIT_GB:.0f} GB limit")


if __name__ == "__main__":
    main()
