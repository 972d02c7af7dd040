"""Seconds per epoch on each Keras backend: ``fast``, ``simple`` and ``vgg``, float32 and mixed precision.

Each backend runs in its own subprocess (``KERAS_BACKEND`` is read once, at ``import keras``), one after
the other on the same cores. In each, every model trains with ``cnnkit.train`` (its own recipe: optimizer,
batch size, augmentation; 32x32; no validation split) on the first ``--images`` images of the CIFAR-10
JPEG train folder (the same number per class), ``--epochs`` epochs (default 3). The first epoch includes
compilation (XLA, torch's first calls) and is reported apart; the per-epoch time is the median of the
later epochs, and the time for the full 50,000-image epoch is **extrapolated** linearly from it
(``* 50000 / images``): a full epoch on 2 shared cores takes minutes per cell, 18 cells in all
(3 backends x 3 models x 2 precisions).
"mixed" is ``--mixed-precision``: whatever ``choose_precision`` picks here (bfloat16 on a CPU that has
it, float32 on one that has not: the policy is recorded in each row).

Usage: python bench/backends.py [--images 2000] [--epochs 3] [--backends tensorflow,jax,torch]
       [--models fast,simple,vgg] (results: bench/results/backends.json, written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, cifar_folder, print_table, write_result  # noqa: E402

FULL_EPOCH = 50_000  # CIFAR-10's train folder
PARTIAL = ROOT / "bench" / "results" / "backends.partial.jsonl"  # each row as it is measured


def subset(train: Path, images: int, out: Path) -> int:
    """Copy the first images/10 files of each class folder (sorted names) into ``out``; the count copied."""
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    per_class = max(images // len(classes), 2)
    copied = 0
    for folder in classes:
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copyfile(path, out / folder.name / path.name)
            copied += 1
    return copied


def child(data: Path, models: list[str], epochs: int, images: int) -> list[dict]:
    """In a process on one backend: each model, float32 then mixed; seconds per epoch."""
    import cnnkit  # first: it asks TensorFlow for oneDNN before TensorFlow is imported
    import keras

    from cnnkit import _progress

    _progress.set_progress(False)
    rows = []
    for model in models:
        for mixed in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                result = cnnkit.train(data, Path(tmp) / "run", model=model, image_size=32, epochs=epochs,
                                      mixed_precision=mixed, val_split=0.0, test_split=0.0,
                                      cache_root=Path(tmp) / "cache")
                record = json.loads((Path(tmp) / "run" / "run.json").read_text())
            seconds = result.history["seconds"]
            steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            rows.append({"backend": keras.backend.backend(), "model": model, "precision": "mixed" if mixed else "float32",
                         "policy": record["dtype_policy"], "images": images, "epochs": len(seconds),
                         "first_epoch_s": round(seconds[0], 2), "epoch_s": round(steady, 3),
                         "images_per_s": round(images / steady, 1),
                         "full_epoch_s_extrapolated": round(steady * FULL_EPOCH / images, 1),
                         "run_s": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
            with open(PARTIAL, "a", encoding="utf-8") as f:  # visible while the run goes on (hours on a busy machine)
                f.write(json.dumps(rows[-1]) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="train images (the same number per class)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per cell; the first includes compilation")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--models", default="fast,simple,vgg")
    parser.add_argument("--name", default="backends", help="results file bench/results/NAME.json (gpu/backends)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the subset folder, in a backend's subprocess
    args = parser.parse_args()
    models = args.models.split(",")
    if args.child:
        for row in child(Path(args.child), models, args.epochs, args.images):
            print("ROW " + json.dumps(row), flush=True)
        return

    rows, started = [], time.perf_counter()
    PARTIAL.parent.mkdir(parents=True, exist_ok=True)
    PARTIAL.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = subset(cifar_folder() / "train", args.images, Path(tmp) / "train")
        for backend in args.backends.split(","):
            # the repo first, then whatever else the caller's path holds (bench/gpu.sh's staged wheels)
            env = {**os.environ, "KERAS_BACKEND": backend,
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "train"), "--images",
                                   str(images), "--epochs", str(args.epochs), "--models", args.models],
                                  env=env, capture_output=True, text=True)
            found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0 or not found:
                print(f"{backend}: failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}", file=sys.stderr)
                rows.append({"backend": backend, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            rows += found
    ok = [r for r in rows if "error" not in r]
    print(f"\nseconds per epoch, CIFAR-10 JPEG train subset of {images} images at 32x32 (the first epoch, with "
          f"compilation, apart); full 50,000-image epoch EXTRAPOLATED linearly from the subset:")
    print_table([(r["backend"], r["model"], r["precision"], r["policy"], r["epoch_s"], r["images_per_s"],
                  r["full_epoch_s_extrapolated"], r["first_epoch_s"]) for r in ok],
                ("backend", "model", "precision", "policy", f"s/epoch ({images})", "img/s", "s/epoch (50k, extrap.)",
                 "first epoch s"))
    path = write_result(args.name, {"images": images, "epochs": args.epochs, "image_size": [32, 32],
                                     "extrapolated_to": FULL_EPOCH, "seconds": round(time.perf_counter() - started, 1),
                                     "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
