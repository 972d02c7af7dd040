"""Prediction benchmark: `cnnkit predict` over the 10,000 CIFAR-10 test JPEGs vs the tutorials' loop, per engine.

The tutorials predict one image at a time (keras.utils.load_img -> img_to_array -> expand_dims ->
model.predict). That loop is timed on a sample of images and extrapolated to 10,000 (stated as
such); cnnkit's Predictor (decode threads overlapping batched inference) runs on all 10,000, once
per inference engine (keras, onnxruntime) and batch size. A second table times the forward pass
alone on the 10,000 decoded images (what the engine costs, without decoding), and the largest
difference between the two engines' probabilities over all 10,000 images (the bar is 1e-4).
All use the same trained model (``--model``, default ``fast``, cnnkit's default; one quick epoch on
1,000 images: accuracy is not the point here).

Usage: python bench/predict.py [--quick]      (results: bench/results/predict.json)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench._common import cifar_folder, print_table, write_result  # noqa: E402


def tutorial_loop(model, paths: list[Path]) -> float:
    import keras

    start = time.perf_counter()
    for path in paths:
        img = keras.utils.load_img(path, target_size=(32, 32))
        x = np.expand_dims(keras.utils.img_to_array(img), 0)
        model.predict(x, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sample 100 images for the loop instead of 500")
    parser.add_argument("--model", default="fast", help="the model both predict with (default fast)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="Predictor batch sizes to time")
    args = parser.parse_args()
    import cnnkit
    from cnnkit import _progress

    _progress.set_progress(False)
    cifar = cifar_folder()
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    subset = work / "small"
    for cls in sorted(os.listdir(cifar / "train")):
        (subset / cls).mkdir(parents=True)
        for f in sorted(os.listdir(cifar / "train" / cls))[:100]:
            os.link(cifar / "train" / cls / f, subset / cls / f)
    result = cnnkit.train(subset, work / "run", model=args.model, epochs=1, cache_root=work / "cache")
    test_paths = sorted((cifar / "test").rglob("*.jpg"))
    from cnnkit.engines import DEFAULT_ENGINE, ENGINES

    rows, engines, probs = [], {}, {}
    load_before = os.getloadavg()[0]  # other jobs on the machine slow every row (the one-image loop most)
    sample = test_paths[:: max(1, len(test_paths) // (100 if args.quick else 500))]
    tutorial_loop(result.model, sample[:5])  # warm-up
    loop = tutorial_loop(result.model, sample)
    loop_rate = len(sample) / loop
    rows.append(("tutorial one-image loop", "-", "1", len(sample), f"{loop:.1f}", f"{loop_rate:.0f}", "1x"))
    pixels = None
    for engine in ENGINES:
        for batch_size in args.batch_sizes:
            predictor = cnnkit.Predictor(result.run_dir, batch_size=batch_size, engine=engine)
            predictor.predict(test_paths[:batch_size * 2])  # warm-up: tracing / session set-up are one-off costs
            start = time.perf_counter()
            predictions = predictor.predict([cifar / "test"])
            seconds = time.perf_counter() - start
            assert len(predictions) == len(test_paths) and not any(p.error for p in predictions)
            rate = len(test_paths) / seconds
            engines[f"{engine}@{batch_size}"] = {"engine": engine, "batch_size": batch_size, "seconds": seconds,
                                                 "images_per_s": rate, "ratio": rate / loop_rate}
            rows.append((f"cnnkit predict (folder), {engine}", engine, str(batch_size), len(test_paths),
                         f"{seconds:.1f}", f"{rate:.0f}", f"{rate / loop_rate:.0f}x"))
        if pixels is None:
            pixels = np.stack([predictor.load(p) for p in test_paths])
    forward_rows = []
    for engine in ENGINES:
        for batch_size in args.batch_sizes:
            predictor = cnnkit.Predictor(result.run_dir, batch_size=batch_size, engine=engine)
            predictor.predict_arrays(pixels[: batch_size * 2])
            start = time.perf_counter()
            probs[engine] = predictor.predict_arrays(pixels)
            seconds = time.perf_counter() - start
            engines[f"{engine}@{batch_size}"]["forward_images_per_s"] = len(pixels) / seconds
            forward_rows.append((engine, str(batch_size), f"{seconds:.2f}", f"{len(pixels) / seconds:.0f}"))
    max_diff = float(np.abs(probs["onnxruntime"] - probs["keras"]).max())
    same_labels = float((probs["onnxruntime"].argmax(1) == probs["keras"].argmax(1)).mean())
    print_table(rows, ("method", "engine", "batch", "images timed", "seconds", "images/s", "vs loop"))
    print()
    print_table(forward_rows, ("forward pass only (10,000 decoded images)", "batch", "seconds", "images/s"))
    print(f"\nmax |p_onnxruntime - p_keras| over {len(pixels)} images x {probs['keras'].shape[1]} classes: "
          f"{max_diff:.2e} (bar 1e-4); same top label: {same_labels:.2%}")
    default = engines[f"{DEFAULT_ENGINE}@64"] if 64 in args.batch_sizes else max(
        (v for v in engines.values() if v["engine"] == DEFAULT_ENGINE), key=lambda v: v["images_per_s"])
    best = max(engines.values(), key=lambda v: v["images_per_s"])
    path = write_result("predict", {"quick": args.quick, "model": args.model, "loop_images": len(sample), "loop_s": loop,
                                    "loop_images_per_s": loop_rate, "cnnkit_images": len(test_paths),
                                    "default_engine": DEFAULT_ENGINE, "engines": engines,
                                    "max_abs_prob_diff": max_diff, "same_top_label": same_labels,
                                    "cnnkit_images_per_s": default["images_per_s"], "ratio": default["ratio"],
                                    "best": best, "load_average": [load_before, os.getloadavg()[0]]})
    print(f"results: {path} (1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {os.cpu_count()} cores)")
    print(f"headline: cnnkit predict ({DEFAULT_ENGINE}, batch {default['batch_size']}) is {default['ratio']:.0f}x the "
          f"tutorials' one-image loop ({args.model} model); fastest: {best['engine']} at batch {best['batch_size']}, "
          f"{best['ratio']:.0f}x")


if __name__ == "__main__":
    main()
