"""TensorFlow with and without oneDNN: training and inference images/s of ``fast``, float32 and the run's policy.

TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX512-VNNI/BF16, AVX-VNNI or AMX; on
an AVX2-only CPU its convolutions run as Eigen contractions unless ``TF_ENABLE_ONEDNN_OPTS=1`` is set
before it is imported, which ``import cnnkit`` does (``cnnkit._backends.devices.prefer_onednn``). This
bench measures what that switch is worth on this CPU.

Each setting runs in its own subprocess (TensorFlow reads the switch once, at import), and the settings
take turns, ``--rounds`` times, so a noisy neighbour slows both alike. In each: ``fast`` (whitening
stem, as under ``--time-budget``) at each width, batch 512, 32x32, SGD, ``train_on_batch`` and
``predict_on_batch`` on one batch of random pixels (the kernels' speed, not the input pipeline's),
``--steps`` timed steps after two that compile. Figures are medians over the rounds; the ratio is
oneDNN on over off, measured in this run.

Usage: python bench/onednn.py [--rounds 3] [--steps 6] [--widths small,medium]
(results: bench/results/onednn.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, print_table, write_result  # noqa: E402

BATCH = 512
CHILD = """
import json, sys, time
import numpy as np
import cnnkit  # sets TF_ENABLE_ONEDNN_OPTS=1 unless the environment holds a value
import keras
from cnnkit._backends.devices import onednn
from cnnkit.models.zoo import build_model

widths, steps, batch = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (batch, 32, 32, 3)).astype("float32")
y = rng.integers(0, 10, batch)
out = {"onednn": onednn()}
for width in widths:
    model = build_model("fast", 10, (32, 32), width=width, stem="whiten")
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss="sparse_categorical_crossentropy")
    for step in (model.train_on_batch, lambda a, b: model.predict_on_batch(a)):
        step(x, y), step(x, y)
    tick = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    train = batch * steps / (time.perf_counter() - tick)
    tick = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    out[width] = {"train": train, "predict": batch * steps / (time.perf_counter() - tick)}
print(json.dumps(out))
"""


def measure(setting: str, widths: str, steps: int) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": setting, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, widths, str(steps), str(BATCH)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"TF_ENABLE_ONEDNN_OPTS={setting}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--widths", default="small,medium")
    args = parser.parse_args()
    widths = args.widths.split(",")
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for round_ in range(args.rounds):
        for setting in runs:
            runs[setting].append(measure(setting, args.widths, args.steps))
            print(f"round {round_ + 1}, TF_ENABLE_ONEDNN_OPTS={setting}: {json.dumps(runs[setting][-1])}", flush=True)
    rows, table = [], []
    for width in widths:
        for kind in ("train", "predict"):
            off = statistics.median(run[width][kind] for run in runs["0"])
            on = statistics.median(run[width][kind] for run in runs["1"])
            rows.append({"width": width, "step": kind, "off": round(off, 1), "on": round(on, 1),
                         "ratio": round(on / off, 2)})
            table.append((width, kind, f"{off:.0f}", f"{on:.0f}", f"{on / off:.2f}x"))
    print_table(table, ("width", "step", "oneDNN off img/s", "oneDNN on img/s", "on / off"))
    path = write_result("onednn", {"batch": BATCH, "rounds": args.rounds, "steps": args.steps,
                                   "onednn_really": {setting: [run["onednn"] for run in results]
                                                     for setting, results in runs.items()},
                                   "rows": rows, "runs": runs})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
