"""Transfer-learning benchmark: EfficientNet-Lite0 with ImageNet weights vs ``fast`` from scratch, CIFAR-10 JPEGs.

Every run is ``cnnkit.train`` on a folder laid out ``train/ validation/ test/``, as a user would run
it; the images are 32x32 and the backbone upscales them inside the model (``upscale_size``):

  head:       efficientnetlite0, ``--weights imagenet`` (the installed package, converted once),
              backbone frozen, the new head trained ``--head-epochs``;
  fine-tuned: the same, then ``--ft-epochs`` with the whole backbone unfrozen (BatchNorm kept in
              inference mode) at a tenth of the rate;
  fast:       ``--model fast`` from scratch at 32 px with its own recipe and a ``--time-budget``
              equal to the fine-tuned run's training time (same images, same wall clock).

Sets: ``--per-class`` training images per class (default 100) with 20 other validation images per
class, at each of ``--sizes`` (default 96,128); and the full 50,000 (``--full-minutes``, one
``--time-budget`` run per model at ``--full-size``; a time budget fits one phase, so transfer
trains the head there). Test accuracy on ``--test-per-class`` test images per class (default 200),
flip TTA reported beside it. Also measured: the first-use conversion of the checkpoint and
EfficientNet-Lite0's inference speed at 96 and 224 px.

Usage: python bench/transfer.py [--quick] [--sizes 96,128] [--full-minutes 10] [--skip-full]
(results: bench/results/transfer.json). Needs ``pip install "cnnkit[pretrained]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench._common import RESULTS, cifar_folder, print_table, write_result  # noqa: E402


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_folder(cifar: Path, out: Path, per_class: int | None, val_per_class: int, test_per_class: int) -> Path:
    """``out/train`` (first ``per_class`` per class, all when None), ``out/validation``, ``out/test`` (hard links)."""
    for cls in sorted(p.name for p in (cifar / "train").iterdir()):
        files = sorted((cifar / "train" / cls).iterdir())
        picks = {"train": files[:per_class] if per_class else files}
        if per_class:
            picks["validation"] = files[per_class:per_class + val_per_class]
        picks["test"] = sorted((cifar / "test" / cls).iterdir())[:test_per_class]
        for split, chosen in picks.items():
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                _link(f, out / split / cls / f.name)
    return out


def conversion_seconds() -> dict:
    """First use (read the .pth, build, save .weights.h5) and reuse, in a fresh CNNKIT_HOME."""
    from cnnkit.models import efficientnet_lite

    home = Path(tempfile.mkdtemp(prefix="bench-transfer-home-"))
    old = os.environ.get("CNNKIT_HOME")
    os.environ["CNNKIT_HOME"] = str(home)
    try:
        started = time.perf_counter()
        efficientnet_lite.checkpoint_weights("efficientnetlite0")
        first = time.perf_counter() - started
        started = time.perf_counter()
        efficientnet_lite.checkpoint_weights("efficientnetlite0")
        again = time.perf_counter() - started
    finally:
        if old is None:
            os.environ.pop("CNNKIT_HOME", None)
        else:
            os.environ["CNNKIT_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)
    print(f"first-use conversion {first:.2f}s, reuse {again:.3f}s", flush=True)
    return {"first_use_seconds": round(first, 2), "reuse_seconds": round(again, 3)}


def inference_speed(seconds: float = 10.0) -> dict:
    """Images per second of efficientnetlite0 (``predict_on_batch``, batch 64, float32) at 96 and 224 px."""
    from cnnkit.models import build_model

    speeds = {}
    for size in (96, 224):
        model = build_model("efficientnetlite0", 10, (size, size))
        x = np.random.default_rng(0).integers(0, 256, (64, size, size, 3)).astype("uint8")
        model.predict_on_batch(x)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.predict_on_batch(x)
            count += len(x)
        speeds[str(size)] = round(count / (time.perf_counter() - started), 1)
        print(f"efficientnetlite0 inference at {size}px: {speeds[str(size)]} images/s", flush=True)
    return speeds


def run(folder: Path, label: str, **options) -> dict:
    import keras

    import cnnkit

    class Clock(keras.callbacks.Callback):
        """Stamps the end of each phase: training time without the final scoring."""

        ended = 0.0

        def on_train_end(self, logs=None) -> None:
            Clock.ended = time.perf_counter()

    cache = Path(tempfile.mkdtemp(prefix="bench-transfer-cache-"))
    out = Path(tempfile.mkdtemp(prefix="bench-transfer-run-")) / "run"
    started = time.perf_counter()
    try:
        result = cnnkit.train(folder, out, cache_root=cache, callbacks=[Clock()], **options)
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)
    metrics = result.metrics
    row = {"run": label, "options": {k: v for k, v in options.items()}, "train_seconds": round(Clock.ended - started, 1),
           "total_seconds": round(total, 1), "epochs": len(result.history["loss"]),
           "val_accuracy": metrics.get("val_accuracy"), "test_accuracy": metrics["test_accuracy"],
           "test_accuracy_tta": metrics.get("test_accuracy_tta")}
    print(f"  {label}: train {row['train_seconds']:.0f}s (total {total:.0f}s), {row['epochs']} epochs, "
          f"test {row['test_accuracy']:.2%} (flip TTA {row['test_accuracy_tta']:.2%})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 images per class, 1+1 epochs, 96 px")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--sizes", default="96,128")
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--ft-epochs", type=int, default=6)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--full-minutes", default="10", help="budgets of the full-set runs, e.g. 10,30")
    parser.add_argument("--full-size", type=int, default=96)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--full-skip-fast", action="store_true",
                        help="full set: transfer only (fast's budgets: bench/time_to_accuracy.py)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs of bench/results/transfer.json that this invocation does not redo")
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.sizes, args.head_epochs, args.ft_epochs, args.test_per_class = 10, "96", 1, 1, 10
        args.skip_full = True

    from cnnkit._progress import set_progress

    set_progress(False)
    cifar = cifar_folder()
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-data-"))
    results: dict = {"conversion": conversion_seconds(), "inference_images_per_second": inference_speed(
        3.0 if args.quick else 10.0), "small": [], "full": [], "settings": vars(args)}
    previous = RESULTS / "transfer.json"
    if args.merge and previous.exists():  # runs done by an earlier invocation (one set at a time on a busy CPU)
        earlier = json.loads(previous.read_text())
        sizes = set() if args.skip_small else {int(s) for s in args.sizes.split(",")}
        budgets = set() if args.skip_full else {float(m) for m in args.full_minutes.split(",")}
        results["small"] = [b for b in earlier.get("small", []) if b["size"] not in sizes]
        results["full"] = [b for b in earlier.get("full", []) if b["minutes"] not in budgets]
        results["earlier"] = {k: earlier.get(k) for k in ("conversion", "inference_images_per_second", "settings")}
    common = {"augment": "flip-translate", "overwrite": True}
    try:
        if not args.skip_small:
            small = make_folder(cifar, work / "small", args.per_class, 20, args.test_per_class)
            for size in (int(s) for s in args.sizes.split(",")):
                print(f"{args.per_class} images per class, {size} px:", flush=True)
                lite = {"model": "efficientnetlite0", "weights": "imagenet", "image_size": 32, "upscale_size": size,
                        "epochs": args.head_epochs, **common}
                block = {"size": size, "runs": []}
                results["small"].append(block)
                block["runs"].append(run(small, f"efficientnetlite0 head @{size}", **lite))
                write_result("transfer", results)  # after every run: a busy machine may not finish them all
                tuned = run(small, f"efficientnetlite0 fine-tuned @{size}", fine_tune_epochs=args.ft_epochs, **lite)
                block["runs"].append(tuned)
                write_result("transfer", results)
                block["runs"].append(run(small, f"fast from scratch, {tuned['train_seconds']:.0f}s budget",
                                         model="fast", time_budget=max(tuned["train_seconds"], 10.0), **common))
                write_result("transfer", results)
        if not args.skip_full:
            full = make_folder(cifar, work / "full", None, 0, args.test_per_class)
            for minutes in (float(m) for m in args.full_minutes.split(",")):
                print(f"full training set, {minutes:g} min budget:", flush=True)
                lite = run(full, f"efficientnetlite0 head @{args.full_size}, {minutes:g} min", model="efficientnetlite0",
                           weights="imagenet", image_size=32, upscale_size=args.full_size, time_budget=minutes * 60,
                           **common)
                block = {"minutes": minutes, "runs": [lite]}
                results["full"].append(block)
                write_result("transfer", results)
                if not args.full_skip_fast:
                    block["runs"].append(run(full, f"fast, {minutes:g} min", model="fast", time_budget=minutes * 60,
                                             **common))
                    write_result("transfer", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for block in results["small"]:
        for r in block["runs"]:
            rows.append((f"{args.per_class}/class", r["run"], f"{r['train_seconds']:.0f}s", r["epochs"],
                         f"{r['test_accuracy']:.2%}", f"{r['test_accuracy_tta']:.2%}"))
        if len(block["runs"]) == 3:
            lite_best = max(r["test_accuracy"] for r in block["runs"][:2])
            block["transfer_minus_fast_points"] = round(100 * (lite_best - block["runs"][2]["test_accuracy"]), 1)
    for block in results["full"]:
        for r in block["runs"]:
            rows.append(("50,000", r["run"], f"{r['train_seconds']:.0f}s", r["epochs"], f"{r['test_accuracy']:.2%}",
                         f"{r['test_accuracy_tta']:.2%}"))
    print()
    print_table(rows, ("train set", "run", "training time", "epochs", "test accuracy", "flip TTA"))
    for block in (b for b in results["small"] if "transfer_minus_fast_points" in b):
        print(f"{block['size']} px: transfer beats fast from scratch by {block['transfer_minus_fast_points']:+.1f} points "
              f"(target: +25)")
    path = write_result("transfer", results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
