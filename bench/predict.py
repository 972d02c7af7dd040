"""Prediction benchmark: `cnnkit predict` over the 10,000 CIFAR-10 test JPEGs vs the tutorials' loop, per engine.

The tutorials predict one image at a time (keras.utils.load_img -> img_to_array -> expand_dims ->
model.predict). That loop is timed on a sample of images and extrapolated to 10,000 (stated as
such); cnnkit's Predictor (decode threads overlapping batched inference) runs on all 10,000, once
per inference engine (keras, onnxruntime) and batch size. A second table times the forward pass
alone on the 10,000 decoded images (what the engine costs, without decoding), and the largest
difference between the two engines' probabilities over all 10,000 images (the bar is 1e-4).
All use the same trained model (``--model``, default ``fast``, cnnkit's default; one quick epoch on
1,000 images: accuracy is not the point here). Every method runs once per round (``--repeat``,
default 3), so a busy moment of a shared machine hits all of them alike; each figure is the median
of the rounds. The forward pass is also given in GFLOP/s (the model's convolution and dense
multiply-adds), to compare with what the CPU can do at most.

Usage: python bench/predict.py [--quick] [--repeat 3]      (results: bench/results/predict.json)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench._common import cifar_folder, forward_flops, print_table, write_result  # noqa: E402


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
    parser.add_argument("--repeat", type=int, default=3, help="rounds; every figure is the median (default 3)")
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
    from cnnkit.engines import AUTO, DEFAULT_ENGINE, ENGINES, engine_for

    rows, engines, probs = [], {}, {}
    load_before = os.getloadavg()[0]  # other jobs on the machine slow every row (the one-image loop most)
    sample = test_paths[:: max(1, len(test_paths) // (100 if args.quick else 500))]
    tutorial_loop(result.model, sample[:5])  # warm-up
    predictors = {}
    for engine in ENGINES:
        for batch_size in args.batch_sizes:
            predictor = cnnkit.Predictor(result.run_dir, batch_size=batch_size, engine=engine)
            predictor.predict(test_paths[:batch_size * 2])  # warm-up: tracing / session set-up are one-off costs
            predictors[engine, batch_size] = predictor
    pixels = np.stack([predictors[ENGINES[0], args.batch_sizes[0]].load(p) for p in test_paths])
    # Rounds: every method once per round, so a busy moment of the shared machine hits all of them alike;
    # each figure is the median over the rounds.
    loop_times, e2e, forward = [], {key: [] for key in predictors}, {key: [] for key in predictors}
    for _ in range(args.repeat):
        loop_times.append(tutorial_loop(result.model, sample))
        for key, predictor in predictors.items():
            start = time.perf_counter()
            predictions = predictor.predict([cifar / "test"])
            e2e[key].append(time.perf_counter() - start)
            assert len(predictions) == len(test_paths) and not any(p.error for p in predictions)
            predictor.predict_arrays(pixels[: key[1] * 2])
            start = time.perf_counter()
            probs[key[0]] = predictor.predict_arrays(pixels)
            forward[key].append(time.perf_counter() - start)
    loop = statistics.median(loop_times)
    loop_rate = len(sample) / loop
    flops = forward_flops(result.model)
    rows.append(("tutorial one-image loop", "-", "1", len(sample), f"{loop:.1f}", f"{loop_rate:.0f}", "1x"))
    forward_rows = []
    for (engine, batch_size), times in e2e.items():
        seconds = statistics.median(times)
        rate = len(test_paths) / seconds
        fwd = len(pixels) / statistics.median(forward[engine, batch_size])
        engines[f"{engine}@{batch_size}"] = {
            "engine": engine, "batch_size": batch_size, "seconds": seconds, "images_per_s": rate,
            "ratio": rate / loop_rate, "rounds_images_per_s": [round(len(test_paths) / t, 1) for t in times],
            "forward_images_per_s": fwd, "forward_gflop_per_s": fwd * flops / 1e9,
            "forward_rounds_images_per_s": [round(len(pixels) / t, 1) for t in forward[engine, batch_size]]}
        rows.append((f"cnnkit predict (folder), {engine}", engine, str(batch_size), len(test_paths),
                     f"{seconds:.1f}", f"{rate:.0f}", f"{rate / loop_rate:.0f}x"))
        forward_rows.append((engine, str(batch_size), f"{statistics.median(forward[engine, batch_size]):.2f}",
                             f"{fwd:.0f}", f"{fwd * flops / 1e9:.0f}"))
    max_diff = float(np.abs(probs["onnxruntime"] - probs["keras"]).max())
    same_labels = float((probs["onnxruntime"].argmax(1) == probs["keras"].argmax(1)).mean())
    print(f"medians of {args.repeat} rounds")
    print_table(rows, ("method", "engine", "batch", "images timed", "seconds", "images/s", "vs loop"))
    print()
    print_table(forward_rows, ("forward pass only (10,000 decoded images)", "batch", "seconds", "images/s", "GFLOP/s"))
    print(f"\n{args.model}: {flops / 1e6:.1f} MFLOP per image (convolutions and dense layers, 2 per multiply-add)")
    print(f"max |p_onnxruntime - p_keras| over {len(pixels)} images x {probs['keras'].shape[1]} classes: "
          f"{max_diff:.2e} (bar 1e-4); same top label: {same_labels:.2%}")
    default_batch = cnnkit.Predictor(result.run_dir).batch_size  # what a user gets without --batch-size

    def at_default_batch(engine: str) -> dict:
        return engines.get(f"{engine}@{default_batch}") or max(
            (v for v in engines.values() if v["engine"] == engine), key=lambda v: v["images_per_s"])

    # cnnkit predict's default, --engine auto: keras for a model's first use, onnxruntime once its export is
    # cached and matched Keras (the onnxruntime rounds above cached it)
    default_engine = engine_for(result.run_dir, AUTO)
    default, first_use = at_default_batch(default_engine), at_default_batch(DEFAULT_ENGINE)
    best = max(engines.values(), key=lambda v: v["images_per_s"])
    path = write_result("predict", {"quick": args.quick, "repeat": args.repeat, "model": args.model,
                                    "forward_flops_per_image": flops, "loop_images": len(sample), "loop_s": loop,
                                    "loop_rounds_s": loop_times,
                                    "loop_images_per_s": loop_rate, "cnnkit_images": len(test_paths),
                                    "default_engine": default_engine, "first_use_engine": DEFAULT_ENGINE,
                                    "first_use_ratio": first_use["ratio"], "engines": engines,
                                    "max_abs_prob_diff": max_diff, "same_top_label": same_labels,
                                    "cnnkit_images_per_s": default["images_per_s"], "ratio": default["ratio"],
                                    "best": best, "load_average": [load_before, os.getloadavg()[0]]})
    print(f"results: {path} (1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {os.cpu_count()} cores)")
    print(f"headline: cnnkit predict (auto: {default_engine}, batch {default['batch_size']}) is {default['ratio']:.0f}x "
          f"the tutorials' one-image loop ({args.model} model; {first_use['ratio']:.0f}x on {DEFAULT_ENGINE}, a model's "
          f"first use); fastest: {best['engine']} at batch {best['batch_size']}, {best['ratio']:.0f}x")


if __name__ == "__main__":
    main()
