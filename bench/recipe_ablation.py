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
  width-large   --width large: the widest fast where the budget's rule (large needs 16 epochs) picks
                medium; on a fast CPU medium gets 16-18 epochs in 10 minutes and large 10-11
  bn-bias-64    --bn-bias-lr 64: BatchNorm's shifts learn 64x faster (airbench; fast's BatchNorm has
                no scale, airbench's frozen weights, already)
  bn-bias-8     --bn-bias-lr 8: the same, raised less (64 lost 0.5; 8 tied: +0.07 with TTA)
  progressive   --progressive 0.75: progressive resizing, 24 then 28 px over the first half of the
                budget, 32 px after (a 24 px step costs ~56% of a 32 px one: more epochs in the time);
                it paid, and is fast's schedule under --time-budget since (the rows above say
                --progressive 1: they were measured without it)
  combined      every technique whose median beat its reference, on the whitening stem

Usage: python bench/recipe_ablation.py --session NAME [--budget 10m] [--seeds 2] [--only lr-0.6,dirac]
(results: bench/results/recipe_ablation.json, every session's table at each budget it measured;
each row is seeds x budget long).
A session is one machine at one time: rows are compared only with rows of their own session (the
same code on another day's machine ran 8 epochs in a budget where this one ran 10), and a row's
reference is measured in the session when it is not there yet. Each finished run is appended to
bench/results/recipe_ablation.partial.jsonl, and a rerun of the same session skips the runs found
there (same row, options, budget and seed), so a session can be measured in parts or resumed after
a kill; the results file holds every session's table.
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
# Options that became budget defaults after rows were measured: a row recorded before without them
# ran with these values (``full_options`` fills them in when runs are matched).
LATER_DEFAULTS: dict = {"progressive": 1.0}
WHITEN: dict = {"stem": "whiten", "progressive": 1.0}  # fast's first layer under --time-budget since the first two rows
ROWS: dict[str, tuple[dict, str | None]] = {
    "trained-stem": ({"stem": "conv", "progressive": 1.0}, None),
    "whiten": (WHITEN, "trained-stem"),
    "ema": ({"stem": "conv", "progressive": 1.0, "ema": 0.99}, "trained-stem"),
    "lr-0.6": ({**WHITEN, "learning_rate": 0.6}, "whiten"),
    "tta-crop": ({**WHITEN, "tta": "flip+crop"}, "whiten"),
    "batch-256": ({**WHITEN, "batch_size": 256}, "whiten"),
    "dirac": ({**WHITEN, "init": "dirac"}, "whiten"),
    "width-large": ({**WHITEN, "width": "large"}, "whiten"),
    "bn-bias-64": ({**WHITEN, "bn_bias_lr": 64.0}, "whiten"),
    "bn-bias-8": ({**WHITEN, "bn_bias_lr": 8.0}, "whiten"),
    "progressive": ({**WHITEN, "progressive": 0.75}, "whiten"),
}
REFERENCE = "whiten"  # the row the combined techniques are added to


def parse_minutes(text: str) -> float:
    from cnnkit.cli import _parse_duration

    return _parse_duration(text)


def run(folder: Path, cache: Path, budget: float, seed: int, options: dict) -> dict:
    import cnnkit

    load_before = os.getloadavg()[0]
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
            "epochs": len(result.history.get("loss", [])),
            "width": record["time_budget"]["width"] or options.get("width"),  # None: named, not the budget's
            "steps": record["time_budget"].get("steps"), "load_average": [round(load_before, 2),
                                                                         round(os.getloadavg()[0], 2)]}


def records() -> list[dict]:
    return [json.loads(line) for line in PARTIAL.read_text().splitlines()] if PARTIAL.exists() else []


def full_options(options: dict) -> dict:
    """A row's options with the defaults adopted since filled in (what the run was given, in effect)."""
    return {**LATER_DEFAULTS, **options}


def finished(session: str, name: str, budget: float, seed: int, options: dict) -> dict | None:
    """The run of this row and seed that an earlier invocation of the session finished, if any."""
    for record in records():
        if (record["session"], record["name"], record["budget"], record["seed"], full_options(record["options"])) == \
                (session, name, budget, seed, full_options(options)):
            return record["run"]
    return None


def measured(session: str, name: str, budget: float, seed: int, folder: Path, cache: Path, options: dict) -> dict:
    """One run of one row, read from the partial file when an earlier invocation finished it."""
    done = finished(session, name, budget, seed, options)
    if done is not None:
        return done
    result = run(folder, cache, budget, seed, options)
    PARTIAL.parent.mkdir(parents=True, exist_ok=True)
    with PARTIAL.open("a") as handle:  # one line per finished run: a kill loses at most the run under way
        handle.write(json.dumps({"session": session, "name": name, "budget": budget, "seed": seed,
                                 "options": options, "run": result}) + "\n")
    print(f"  {name} seed {seed}: {result}", flush=True)
    return result


def summarise(name: str, options: dict, runs: list[dict]) -> dict:
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {"name": name, "options": options, "runs": runs, "test_accuracy": median("test_accuracy"),
            "test_accuracy_tta": median("test_accuracy_tta"), "wall_seconds": round(median("wall_seconds"), 1)}


def session_table(session: str, budget: float, seeds: list[int], wanted: list[str], folder: Path | None,
                  cache: Path, combined: bool) -> dict[str, dict]:
    """The rows of one session: those asked for (measured when missing) and those it finished earlier."""
    rows: dict[str, dict] = {}

    def row(name: str, options: dict) -> dict:
        if name not in rows:
            runs = [measured(session, name, budget, s, folder, cache, options) for s in seeds]
            rows[name] = {**summarise(name, options, runs), "against": ROWS.get(name, (None, REFERENCE))[1]}
            print(f"{session} {name}: {rows[name]['test_accuracy']:.4f} ({rows[name]['test_accuracy_tta']:.4f} TTA)",
                  flush=True)
        return rows[name]

    def done(name: str, options: dict) -> bool:
        return all(finished(session, name, budget, s, options) is not None for s in seeds)

    for name, (options, reference) in ROWS.items():
        if name in wanted or (done(name, options) and (reference is None or done(reference, ROWS[reference][0])
                                                        or bool(wanted))):
            # A row is shown with its reference; the reference of the rows below (whiten) is measured
            # on its own when asked for: its reference (the trained stem) only when finished already.
            if reference is not None and (name != REFERENCE or done(reference, ROWS[reference][0])):
                row(reference, ROWS[reference][0])
            row(name, options)
    paid = [n for n, (_, ref) in ROWS.items() if ref == REFERENCE and n in rows
            and rows[n]["test_accuracy_tta"] > rows[REFERENCE]["test_accuracy_tta"]]
    options = {k: v for n in paid for k, v in ROWS[n][0].items()}
    if len(paid) > 1 and (combined or done("combined", options)):
        row("combined", options)
    return rows


def print_session(session: str, rows: dict[str, dict], budget_text: str, seeds: list[int]) -> None:
    table = []
    for name, r in rows.items():
        reference = r["against"] if r["against"] in rows else None
        delta = "" if reference is None else f"{r['test_accuracy_tta'] - rows[reference]['test_accuracy_tta']:+.4f}"
        table.append((name, json.dumps(r["options"]), f"{r['test_accuracy']:.4f}", f"{r['test_accuracy_tta']:.4f}",
                      reference or "", delta, r["wall_seconds"], ",".join(str(x["epochs"]) for x in r["runs"]),
                      ",".join(x["width"] or r["options"].get("width", "?") for x in r["runs"])))
    print(f"\nsession {session}: fast, --time-budget {budget_text}, median of {len(seeds)} seed(s), CIFAR-10 JPEG:")
    print_table(table, ("row", "options", "test acc", "test acc TTA", "against", "vs it (TTA)", "wall s",
                        "epochs", "width"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--session", required=True, help="this machine and time (rows compare within a session)")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default=",".join(ROWS), help="comma-separated rows to measure (their reference "
                        "rows are measured too); the table also shows the session's rows finished earlier")
    parser.add_argument("--no-combined", action="store_true")
    args = parser.parse_args()
    budget = parse_minutes(args.budget)
    seeds = list(range(args.seeds))
    wanted = [n for n in args.only.split(",") if n]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    folder, cache = cifar_folder(), DATA / "ablation-cache"
    sessions = {}
    # Every session's table at every budget it measured (the results file holds them all, whatever this
    # invocation's budget); this invocation's session at its budget is measured where it is missing.
    for session, session_budget in dict.fromkeys([(r["session"], r["budget"]) for r in records()]
                                                 + [(args.session, budget)]):
        mine = (session, session_budget) == (args.session, budget)
        rows = session_table(session, session_budget, seeds, wanted if mine else [], folder, cache,
                             mine and not args.no_combined)
        if rows:
            print_session(session, rows, f"{session_budget:g}s", seeds)
            sessions[session if session_budget == 600 else f"{session} ({session_budget:g}s)"] = {
                "budget_seconds": session_budget, "rows": list(rows.values())}
    path = write_result("recipe_ablation", {"seeds": seeds, "sessions": sessions})
    print(f"written {path}")


if __name__ == "__main__":
    main()
