"""Recipe ablation: each airbench technique added to ``fast`` alone, then the ones that paid together.

Every row is ``cnnkit.train(CIFAR-10 JPEG folders, model="fast", time_budget=B, **options)`` with
the row's full options (so a row means the same whatever ``fast``'s defaults become), in this
process, one after the other, on the same cores (decoding included; the cache is shared, so only
the first run decodes cold). Each row runs with ``--seeds`` seeds and reports the median test
accuracy, with and without test-time augmentation (the view set each row's ``tta`` gives), the width
the budget chose and the epochs it ran, and its difference from the row it adds one change to.

Rows (options of ``cnnkit train``), in the order they were measured:
  trained-stem  --stem conv: a trained 3x3 first layer (fast's stem before this table)
  whiten        --stem whiten: a frozen 2x2 patch-whitening first layer fitted to the data
                (it paid, and is fast's stem under --time-budget since: the reference of the rows below)
  ema           --ema 0.99 on the trained stem: keep an exponential moving average of the weights
  lr-0.6        --lr 0.6: a lower peak rate for a short schedule (the default is 1.2)
  tta-crop      --tta flip+crop: flip and 4 shifted views in the final metrics (their time counts)
  batch-256     --batch-size 256: a smaller batch (twice the steps; cache-friendlier)
  dirac         --init dirac: identity-initialised convolutions (airbench)
  combined      every technique whose median beat its reference, on the whitening stem

Usage: python bench/recipe_ablation.py [--budget 10m] [--seeds 2] [--only lr-0.6,tta-crop]
(results: bench/results/recipe_ablation.json; each row is seeds x budget long).
Each finished run is appended to bench/results/recipe_ablation.partial.jsonl, and a rerun with the
same budget skips the runs found there (same row, options and seed), so a long table can be measured
in parts or resumed after a kill; the table printed and written holds every row measured so far.
The decoded cache lives in bench/.data/ablation-cache and is reused across invocations.
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

# Each row: its full options and the row it adds one change to (None: the first table's baseline).
WHITEN: dict = {"stem": "whiten"}  # fast's first layer under --time-budget since the first two rows
ROWS: dict[str, tuple[dict, str | None]] = {
    "trained-stem": ({"stem": "conv"}, None),
    "whiten": (WHITEN, "trained-stem"),
    "ema": ({"stem": "conv", "ema": 0.99}, "trained-stem"),
    "lr-0.6": ({**WHITEN, "learning_rate": 0.6}, "whiten"),
    "tta-crop": ({**WHITEN, "tta": "flip+crop"}, "whiten"),
    "batch-256": ({**WHITEN, "batch_size": 256}, "whiten"),
    "dirac": ({**WHITEN, "init": "dirac"}, "whiten"),
}
REFERENCE = "whiten"  # the row the combined techniques are added to


def parse_minutes(text: str) -> float:
    from cnnkit.cli import _parse_duration

    return _parse_duration(text)


def run(folder: Path, cache: Path, budget: float, seed: int, options: dict) -> dict:
    import cnnkit

    out = Path(tempfile.mkdtemp(prefix="ablation-"))
    try:
        started = time.monotonic()
        result = cnnkit.train(folder, out / "run", model="fast", time_budget=budget, seed=seed, cache_root=cache,
                              **options)
        wall = time.monotonic() - started
        record = json.loads((out / "run" / "run.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seed": seed, "test_accuracy": result.metrics["test_accuracy"],
            "test_accuracy_tta": result.metrics.get("test_accuracy_tta"), "wall_seconds": round(wall, 1),
            "epochs": len(result.history.get("loss", [])), "width": record["time_budget"]["width"]}


def finished(name: str, budget: float, seed: int, options: dict) -> dict | None:
    """The run of this row and seed that an earlier invocation finished, if any."""
    if PARTIAL.exists():
        for line in PARTIAL.read_text().splitlines():
            record = json.loads(line)
            if (record["name"], record["budget"], record["seed"], record["options"]) == (name, budget, seed, options):
                return record["run"]
    return None


def measured(name: str, budget: float, seed: int, folder: Path, cache: Path, options: dict) -> dict:
    """One run of one row, read from the partial file when an earlier invocation finished it."""
    done = finished(name, budget, seed, options)
    if done is not None:
        return done
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
            "test_accuracy_tta": median("test_accuracy_tta"), "wall_seconds": round(median("wall_seconds"), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows to measure (the rows "
                        "they are compared with are measured too); the table also shows every row finished earlier")
    parser.add_argument("--no-combined", action="store_true")
    args = parser.parse_args()
    budget = parse_minutes(args.budget)
    seeds = list(range(args.seeds))
    wanted = [n for n in args.only.split(",") if n]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    folder, cache = cifar_folder(), DATA / "ablation-cache"
    rows: dict[str, dict] = {}

    def row(name: str, options: dict) -> dict:
        if name not in rows:
            rows[name] = summarise(name, options, [measured(name, budget, s, folder, cache, options) for s in seeds])
            print(f"{name}: {rows[name]['test_accuracy']:.4f} ({rows[name]['test_accuracy_tta']:.4f} TTA)", flush=True)
        return rows[name]

    for name, (options, reference) in ROWS.items():
        earlier = all(finished(name, budget, s, options) is not None for s in seeds)
        if name in wanted or earlier:
            if reference is not None:
                row(reference, ROWS[reference][0])
            row(name, options)
    paid = [n for n, (_, ref) in ROWS.items() if ref == REFERENCE and n in rows
            and rows[n]["test_accuracy_tta"] > rows[REFERENCE]["test_accuracy_tta"]]
    if len(paid) > 1 and not args.no_combined:
        options = {k: v for n in paid for k, v in ROWS[n][0].items()}
        ROWS["combined"] = (options, REFERENCE)
        row("combined", options)
    table = []
    for name, r in rows.items():
        reference = ROWS[name][1]
        delta = "" if reference is None else f"{r['test_accuracy_tta'] - rows[reference]['test_accuracy_tta']:+.4f}"
        table.append((name, json.dumps(r["options"]), f"{r['test_accuracy']:.4f}", f"{r['test_accuracy_tta']:.4f}",
                      reference or "", delta, r["wall_seconds"], ",".join(str(x["epochs"]) for x in r["runs"]),
                      ",".join(x["width"] for x in r["runs"])))
    print(f"\nfast, --time-budget {args.budget}, median of {len(seeds)} seed(s), CIFAR-10 JPEG folders:")
    print_table(table, ("row", "options", "test acc", "test acc TTA", "against", "vs it (TTA)", "wall s",
                        "epochs", "width"))
    path = write_result("recipe_ablation", {"budget_seconds": budget, "seeds": seeds,
                                            "rows": [{**r, "against": ROWS[n][1]} for n, r in rows.items()]})
    print(f"written {path}")


if __name__ == "__main__":
    main()
