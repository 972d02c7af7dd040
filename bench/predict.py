"""Prediction benchmark: `cnnkit predict` over the 10,000 CIFAR-10 test JPEGs vs the tutorials' loop.

The tutorials predict one image at a time (keras.utils.load_img -> img_to_array -> expand_dims ->
model.predict). That loop is timed on a sample of images and extrapolated to 10,000 (stated as
such); cnnkit's Predictor (decode threads overlapping batched inference) runs on all 10,000.
Both use the same trained model (``--model``, default ``fast``, cnnkit's default; one quick epoch on
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
    predictor = cnnkit.Predictor(result.run_dir, batch_size=256)
    predictor.predict(test_paths[:256])  # warm-up: graph tracing is a one-off cost for both
    start = time.perf_counter()
    predictions = predictor.predict([cifar / "test"])
    ours = time.perf_counter() - start
    assert len(predictions) == len(test_paths) and not any(p.error for p in predictions)
    sample = test_paths[:: max(1, len(test_paths) // (100 if args.quick else 500))]
    tutorial_loop(result.model, sample[:5])  # warm-up
    loop = tutorial_loop(result.model, sample)
    loop_rate = len(sample) / loop
    ours_rate = len(test_paths) / ours
    rows = [("tutorial one-image loop", len(sample), f"{loop:.1f}", f"{loop_rate:.0f}",
             f"{len(test_paths) / loop_rate:.0f} (extrapolated)"),
            ("cnnkit predict (folder)", len(test_paths), f"{ours:.1f}", f"{ours_rate:.0f}", f"{ours:.1f}")]
    print_table(rows, ("method", "images timed", "seconds", "images/s", "seconds for 10,000"))
    path = write_result("predict", {"quick": args.quick, "model": args.model, "loop_images": len(sample), "loop_s": loop,
                                    "loop_images_per_s": loop_rate, "cnnkit_images": len(test_paths),
                                    "cnnkit_s": ours, "cnnkit_images_per_s": ours_rate,
                                    "ratio": ours_rate / loop_rate})
    print(f"results: {path}")
    print(f"headline: cnnkit predict is {ours_rate / loop_rate:.0f}x the tutorials' one-image loop ({args.model} model)")


if __name__ == "__main__":
    main()
