"""Recipe ablation: each airbench technique added to ``fast`` alone, then the ones that paid together.

Every row is ``cnnkit.train(CIFAR-10 JPEG folders, model="fast", time_budget=B, **options)`` with
the baseline recipe plus one change (the baseline is the recipe as it was before this table: the
trained 3x3 stem, ``BASELINE``; the whitening stem it measured is ``fast``'s default since), in this process, one after the other, on the same cores (decoding included;
the cache is shared, so only the first run decodes cold). Each row runs with ``--seeds`` seeds and
reports the median test accuracy, with and without test-time augmentation (the view set each row's
``tta`` gives), the width the budget chose and the epochs it ran. The baseline row is measured in
the same run, and every row prints its difference from it.

Techniques (options of ``cnnkit train``):
  whiten        --stem whiten: a frozen 2x2 patch-whitening first layer fitted to the data
  ema           --ema 0.99: keep an exponential moving average of the weights
  tta-crop      --tta flip+crop: flip and 4 shifted views in the final metrics (costs eval time)
  lr-0.6        --lr 0.6: a lower peak rate (the default is 1.2)
  batch-256     --batch-size 256: a smaller batch (more steps; cache-friendlier)
  combined      every technique whose median beat the baseline

Usage: python bench/recipe_ablation.py [--budget 10m] [--seeds 2] [--only whiten,ema]
(results: bench/results/recipe_ablation.json; the full table is (6 + 1) x seeds x budget long).
Each finished run is appended to bench/results/recipe_ablation.partial.jsonl, and a rerun with the
same budget skips the runs found there, so a long table can be measured in parts or resumed after
a kill. The decoded cache lives in bench/.data/ablation-cache and is reused across invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import DATA, RESULTS, cifar_folder, print_table, write_result  # noqa: E402

PARTIAL = RESULTS / "recipe_ablation.partial.jsonl"

# The recipe every row starts from: fast's recipe with the trained 3x3 stem (its default until this
# table showed the whitening stem paying; the partial file's rows were measured against it).
BASELINE: dict = {"stem": "conv"}
TECHNIQUES: dict[str, dict] = {
    "whiten": {"stem": "whiten"},
    "ema": {"ema": 0.99},
    "tta-crop": {"tta": "flip+crop"},
    "lr-0.6": {"learning_rate": 0.6},
    "batch-256": {"batch_size": 256},
}


def parse_minutes(text: str) -> float:
    from cnnkit.cli import _parse_duration

    return _parse_duration(text)


def run(folder: Path, cache: Path, budget: float, seed: int, options: dict) -> dict:
    import cnnkit

    out = Path(tempfile.mkdtemp(prefix="ablation-"))
    try:
        started = time.monotonic()
        result = cnnkit.train(folder, out / "run", model="fast", time_budget=budget, seed=seed, cache_root=cache,
                              **{**BASELINE, **options})
        wall = time.monotonic() - started
        record = json.loads((out / "run" / "run.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seed": seed, "test_accuracy": result.metrics["test_accuracy"],
            "test_accuracy_tta": result.metrics.get("test_accuracy_tta"), "wall_seconds": round(wall, 1),
            "epochs": len(result.history.get("loss", [])), "width": record["time_budget"]["width"]}


def measured(name: str, budget: float, seed: int, folder: Path, cache: Path, options: dict) -> dict:
    """One run of one row, read from the partial file when an earlier invocation finished it."""
    if PARTIAL.exists():
        for line in PARTIAL.read_text().splitlines():
            record = json.loads(line)
            if record["name"] == name and record["budget"] == budget and record["seed"] == seed:
                return record["run"]
    result = run(folder, cache, budget, seed, options)
    PARTIAL.parent.mkdir(parents=True, exist_ok=True)
    with PARTIAL.open("a") as handle:  # one line per finished run: a kill loses at most the run under way
        handle.write(json.dumps({"name": name, "budget": budget, "seed": seed, "options": options,
                                 "run": result}) + "\n")
    print(f"  {name} seed {seed}: {result}", flush=True)
    return result


def summarise(name: str, options: dict, runs: list[dict]) -> dict:
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {"name": name, "options": options, "runs": runs, "test_accuracy": median("test_accuracy"),
            "test_accuracy_tta": median("test_accuracy_tta"), "wall_seconds": median("wall_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default=",".join(TECHNIQUES), help="comma-separated techniques")
    parser.add_argument("--no-combined", action="store_true")
    args = parser.parse_args()
    budget = parse_minutes(args.budget)
    folder = cifar_folder()
    cache = DATA / "ablation-cache"
    seeds = list(range(args.seeds))
    rows: list[dict] = []
    baseline = summarise("baseline", {}, [measured("baseline", budget, s, folder, cache, {}) for s in seeds])
    rows.append(baseline)
    print(f"baseline: {baseline['test_accuracy']:.4f} ({baseline['test_accuracy_tta']:.4f} TTA)", flush=True)
    for name in [n for n in args.only.split(",") if n]:
        options = TECHNIQUES[name]
        row = summarise(name, options, [measured(name, budget, s, folder, cache, options) for s in seeds])
        rows.append(row)
        print(f"{name}: {row['test_accuracy']:.4f} ({row['test_accuracy_tta']:.4f} TTA)", flush=True)
    paid = [r for r in rows[1:] if r["test_accuracy_tta"] > baseline["test_accuracy_tta"]]
    if len(paid) > 1 and not args.no_combined:
        options = {k: v for r in paid for k, v in r["options"].items()}
        rows.append(summarise("combined", options,
                              [measured("combined", budget, s, folder, cache, options) for s in seeds]))
    table = [(r["name"], json.dumps(r["options"]), f"{r['test_accuracy']:.4f}", f"{r['test_accuracy_tta']:.4f}",
              f"{r['test_accuracy_tta'] - baseline['test_accuracy_tta']:+.4f}", r["wall_seconds"],
              ",".join(str(x["epochs"]) for x in r["runs"]), ",".join(x["width"] for x in r["runs"])) for r in rows]
    print(f"\nfast, --time-budget {args.budget}, median of {len(seeds)} seed(s), CIFAR-10 JPEG folders:")
    print_table(table, ("technique", "options", "test acc", "test acc TTA", "vs baseline (TTA)", "wall s",
                        "epochs", "width"))
    path = write_result("recipe_ablation", {"budget_seconds": budget, "seeds": seeds, "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
