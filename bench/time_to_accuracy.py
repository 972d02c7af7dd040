"""Time-to-accuracy benchmark: cnnkit's ``fast`` recipe vs the tutorials' recipe on CIFAR-10 JPEGs.

Both run on the same cores, one after the other, in this process, from the JPEG folders:

  cnnkit:    ``cnnkit.train(folder, time_budget=...)`` with every other setting at its default
             (``--model fast``: the recipe of cnnkit.models.fast), timed from the call, so
             decoding the 60,000 JPEGs into a fresh cache is included. A callback scores a fixed
             2,000-image sample of the test split after each epoch (mid-schedule, an estimate); the
             final model (BatchNorm re-estimated) is scored on all 10,000 test images, with and
             without flip test-time augmentation.
  tutorial:  the tutorials' code: ``keras.utils.image_dataset_from_directory`` (batch 64, 20%
             validation split), their BatchNorm CNN (cnnkit's ``vgg`` is the same network) with
             RandomFlip + RandomTranslation(0.1) layers, Adam 1e-3, float32; all 10,000 test
             images scored after each epoch (scoring time excluded from its clock).

cnnkit runs once per budget (default 2m and 10m: each budget is its own run, as a user would ask
for it). Prints per-epoch logs, the time each reaches 70/76/80/85/89/90%, and the headline last.
Usage: python bench/time_to_accuracy.py [--quick] [--budgets 2m,10m] [--tutorial-minutes 3]
(results: bench/results/time_to_accuracy.json). The full version takes about 16 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench._common import cifar_folder, print_table, write_result  # noqa: E402

THRESHOLDS = (0.70, 0.76, 0.80, 0.85, 0.89, 0.90)
PROBE_IMAGES = 2000


def test_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split as uint8 arrays (decoded by cnnkit, the same pixels both recipes see)."""
    from cnnkit.config import DataConfig
    from cnnkit.data import load_image_folder

    data = load_image_folder(folder / "test", DataConfig(image_size=(32, 32), val_split=0.0))
    rows, labels = data.split_rows("train")
    return np.asarray(data.cache.images[rows]), labels


def run_cnnkit(folder: Path, budget: float, probe: tuple[np.ndarray, np.ndarray]) -> dict:
    import keras

    import cnnkit

    class Probe(keras.callbacks.Callback):
        """Test accuracy on a fixed sample after each epoch; its own time is reported, not hidden."""

        def __init__(self) -> None:
            super().__init__()
            self.log: list[dict] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            begin = time.perf_counter()
            probs = self.model.predict(probe[0], batch_size=500, verbose=0)
            accuracy = float(np.mean(probs.argmax(1) == probe[1]))
            self.log.append({"epoch": epoch + 1, "seconds": round(begin - started, 1),
                             "test_accuracy_sample": round(accuracy, 4), "probe_seconds": round(time.perf_counter() - begin, 2)})
            print(f"  cnnkit epoch {epoch + 1}: {begin - started:6.1f}s  test (2k sample, mid-schedule) {accuracy:.2%}",
                  flush=True)

    cache = Path(tempfile.mkdtemp(prefix="bench-tta-cache-"))
    out = Path(tempfile.mkdtemp(prefix="bench-tta-run-")) / "run"
    probe_cb = Probe()
    started = time.perf_counter()
    try:
        result = cnnkit.train(folder, out, cache_root=cache, callbacks=[probe_cb], time_budget=budget)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    metrics = result.metrics
    shutil.rmtree(out.parent, ignore_errors=True)
    final = {"seconds": round(seconds, 1), "test_accuracy": metrics["test_accuracy"],
             "test_accuracy_tta": metrics.get("test_accuracy_tta"), "epochs": len(result.history["loss"])}
    print(f"  cnnkit final: {seconds:.1f}s  test {final['test_accuracy']:.2%} "
          f"({final['test_accuracy_tta']:.2%} with flip TTA), {final['epochs']} epochs", flush=True)
    return {"budget_seconds": budget, "epochs": probe_cb.log, "final": final}


def run_tutorial(folder: Path, minutes: float, test: tuple[np.ndarray, np.ndarray]) -> dict:
    import keras
    from keras import layers

    from cnnkit._backends import fit_input

    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float32")
    started = time.perf_counter()
    train_ds = keras.utils.image_dataset_from_directory(
        folder / "train", validation_split=0.2, subset="training", seed=123, image_size=(32, 32), batch_size=64,
        verbose=False)
    val_ds = keras.utils.image_dataset_from_directory(
        folder / "train", validation_split=0.2, subset="validation", seed=123, image_size=(32, 32), batch_size=64,
        verbose=False)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.RandomFlip("horizontal"),
        layers.RandomTranslation(0.1, 0.1),
        layers.Rescaling(1.0 / 255),
        *[layer for filters in (32, 64, 128) for layer in (
            layers.Conv2D(filters, 3, padding="same", activation="relu"), layers.BatchNormalization(),
            layers.Conv2D(filters, 3, padding="same", activation="relu"), layers.BatchNormalization(),
            layers.MaxPooling2D(2), layers.Dropout(0.25))],
        layers.Flatten(),
        layers.Dense(256, activation="relu"), layers.BatchNormalization(), layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log: list[dict] = []
    excluded = 0.0

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            nonlocal excluded
            begin = time.perf_counter()
            elapsed = begin - started - excluded
            probs = self.model.predict(test[0], batch_size=500, verbose=0)
            accuracy = float(np.mean(probs.argmax(1) == test[1]))
            log.append({"epoch": epoch + 1, "seconds": round(elapsed, 1), "test_accuracy": round(accuracy, 4)})
            print(f"  tutorial epoch {epoch + 1}: {elapsed:6.1f}s  test {accuracy:.2%}", flush=True)
            excluded += time.perf_counter() - begin
            if elapsed >= minutes * 60:
                self.model.stop_training = True

    with fit_input():  # stopped mid-epoch: tf.data's iterator is freed on the way out, not at exit
        model.fit(train_ds, validation_data=val_ds, epochs=1000, callbacks=[Score()], verbose=0)
    return {"minutes": minutes, "epochs": log}


def first_reaching(points: list[tuple[float, float]], threshold: float) -> float | None:
    return next((seconds for seconds, accuracy in points if accuracy >= threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~2.5 minutes: a 90 s cnnkit budget, 1 tutorial epoch")
    parser.add_argument("--budgets", default=None, help="cnnkit's --time-budget per run (default 2m,10m; quick 90s)")
    parser.add_argument("--tutorial-minutes", type=float, default=None,
                        help="stop the tutorial after the epoch that passes this (default 3; quick 0.5; 0: no "
                             "tutorial, which needs TensorFlow's tf.data, e.g. on a GPU machine without it)")
    parser.add_argument("--name", default="time_to_accuracy", help="results file bench/results/NAME.json")
    args = parser.parse_args()
    from cnnkit.cli import _parse_duration

    budgets = [_parse_duration(b) for b in (args.budgets or ("90s" if args.quick else "2m,10m")).split(",")]
    minutes = args.tutorial_minutes if args.tutorial_minutes is not None else (0.5 if args.quick else 3.0)
    folder = cifar_folder()
    test = test_arrays(folder)
    probe = (test[0][:: len(test[0]) // PROBE_IMAGES][:PROBE_IMAGES], test[1][:: len(test[1]) // PROBE_IMAGES][:PROBE_IMAGES])
    runs = []
    for budget in budgets:
        print(f"cnnkit fast, --time-budget {budget:.0f}s:", flush=True)
        runs.append(run_cnnkit(folder, budget, probe))
    tutorial = None
    if minutes > 0:
        print(f"tutorial recipe, {minutes} min:", flush=True)
        tutorial = run_tutorial(folder, minutes, test)

    # Every logged point of every budget counts: a run's final score is reachable in that many seconds.
    fast_points = sorted([(e["seconds"], e["test_accuracy_sample"]) for run in runs for e in run["epochs"]]
                         + [(run["final"]["seconds"], run["final"]["test_accuracy"]) for run in runs])
    tta_points = sorted((run["final"]["seconds"], run["final"]["test_accuracy_tta"]) for run in runs)
    tutorial_points = [(e["seconds"], e["test_accuracy"]) for e in tutorial["epochs"]] if tutorial else []
    rows = []
    reach = {}
    for threshold in THRESHOLDS:
        a = first_reaching(fast_points, threshold)
        t = first_reaching(tutorial_points, threshold)
        b = first_reaching(tta_points, threshold)
        reach[f"{threshold:.0%}"] = {"cnnkit": a, "cnnkit_tta": b, "tutorial": t}
        rows.append((f"{threshold:.0%}", f"{a:.0f}s" if a else "-", f"{b:.0f}s" if b else "-",
                     f"{t:.0f}s" if t else f"> {tutorial_points[-1][0]:.0f}s" if tutorial_points else "not run"))
    print()
    finals = [(f"{run['budget_seconds']:.0f}s budget", f"{run['final']['seconds']:.0f}s", run["final"]["epochs"],
               f"{run['final']['test_accuracy']:.2%}", f"{run['final']['test_accuracy_tta']:.2%}") for run in runs]
    print_table(finals, ("cnnkit fast run", "wall clock", "epochs", "test accuracy", "with flip TTA"))
    print()
    print_table(rows, ("test accuracy", "cnnkit fast", "cnnkit fast + flip TTA", "tutorial recipe"))
    best_tutorial = max((a for _, a in tutorial_points), default=None)
    tutorial_time = first_reaching(tutorial_points, best_tutorial) if tutorial_points else None
    ours = first_reaching(fast_points, best_tutorial) if tutorial_points else None
    ratio = tutorial_time / ours if ours else None
    path = write_result(args.name, {"cnnkit": runs, "tutorial": tutorial, "reach_seconds": reach,
                                    "headline": {"tutorial_best": best_tutorial, "tutorial_seconds": tutorial_time,
                                                 "cnnkit_seconds_to_tutorial_best": ours, "ratio": ratio}})
    print(f"results: {path}")
    last = runs[-1]["final"]
    versus = ("the tutorial recipe was not run" if not tutorial_points else
              f"the tutorial recipe's best {best_tutorial:.2%} (at {tutorial_time:.0f}s) was reached "
              + (f"in {ours:.0f}s: {ratio:.1f}x sooner" if ours else "not at all"))
    print(f"headline: cnnkit fast {last['test_accuracy']:.2%} ({last['test_accuracy_tta']:.2%} with flip TTA) in "
          f"{last['seconds']:.0f}s; {versus}")


if __name__ == "__main__":
    main()
