"""Evaluation stage: compare. Run directories -> one table: model, data hash, epochs, accuracy, top-k, ECE, per-class F1 deltas.

Reads only files (``run.json`` and ``eval/<name>/metrics.json``); loads no model, so it is instant.
Per-class F1 deltas are against the first run. A row's evaluation is the one named by
``eval_name``, else the run's most recent one; a warning says when runs were evaluated on
different data (different data hashes), because their numbers are then not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.errors import DataError, RunNotFoundError
from cnnkit.rundir import RUN_JSON, read_json, read_run_json


@dataclass
class RunSummary:
    """One run's row in the comparison."""

    run: str
    model: str
    data_hash: str
    epochs: int | None
    val_accuracy: float | None
    eval_name: str | None
    eval_data_hash: str | None
    accuracy: float | None
    top_k_accuracy: float | None
    top_k: int | None
    balanced_accuracy: float | None
    macro_f1: float | None
    ece: float | None
    tta_accuracy: float | None
    per_class_f1: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    """What ``compare()`` returns: rows, per-class F1 deltas vs the first run, warnings."""

    runs: list[RunSummary]
    class_names: list[str]
    f1_delta: dict[str, list[float | None]]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"runs": [asdict(r) for r in self.runs], "class_names": self.class_names,
                "f1_delta_vs_first": self.f1_delta, "warnings": self.warnings}


def _latest_eval(run: Path, eval_name: str | None) -> Path | None:
    if eval_name is not None:
        path = run / "eval" / eval_name / "metrics.json"
        if not path.exists():
            have = sorted(p.parent.name for p in (run / "eval").glob("*/metrics.json"))
            raise DataError(f"Run '{run}' has no evaluation '{eval_name}'. It has: {', '.join(have) or 'none'}. "
                            f"Run 'cnnkit evaluate {run} DIR --name {eval_name}'. Received: eval={eval_name!r}")
        return path
    found = sorted((run / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def summarise_run(run: str | Path, eval_name: str | None = None) -> RunSummary:
    """The comparison row of one run directory."""
    run = Path(run)
    if not (run / RUN_JSON).is_file():
        raise RunNotFoundError(f"No run.json in '{run}'. Pass run directories written by 'cnnkit train'.")
    record = read_run_json(run)
    metrics_path = _latest_eval(run, eval_name)
    m = read_json(metrics_path) if metrics_path else {}
    k = m.get("top_k")
    return RunSummary(
        run=str(run), model=str(record.get("config", {}).get("model", {}).get("name", "?")),
        data_hash=str(record.get("data_hash", "")), epochs=record.get("epochs_run"),
        val_accuracy=record.get("metrics", {}).get("val_accuracy"),
        eval_name=metrics_path.parent.name if metrics_path else None, eval_data_hash=m.get("data_hash"),
        accuracy=m.get("accuracy"), top_k_accuracy=m.get(f"top_{k}_accuracy") if k else None, top_k=k,
        balanced_accuracy=m.get("balanced_accuracy"), macro_f1=m.get("macro_avg", {}).get("f1-score"),
        ece=m.get("ece"), tta_accuracy=(m.get("tta") or {}).get("accuracy"),
        per_class_f1={c: v["f1-score"] for c, v in m.get("per_class", {}).items()},
    )


def compare(runs: list[str | Path], eval_name: str | None = None) -> Comparison:
    """Summarise runs side by side (see the module docstring).

    Example:
        >>> table = cnnkit.compare(["runs/first", "runs/second"])
        >>> accuracies = [r.accuracy for r in table.runs]
    """
    if not runs:
        raise DataError("compare needs at least one run directory, e.g. cnnkit compare runs/a runs/b.")
    rows = [summarise_run(r, eval_name) for r in runs]
    warnings = [f"'{r.run}' has no evaluation yet: run 'cnnkit evaluate {r.run} DIR'." for r in rows if r.eval_name is None]
    hashes = {r.eval_data_hash for r in rows if r.eval_data_hash}
    if len(hashes) > 1:
        warnings.append("The runs were evaluated on different data (different data hashes): their metrics are not "
                        "directly comparable. Evaluate every run on the same folder (and --name).")
    classes: list[str] = []
    for r in rows:
        classes += [c for c in r.per_class_f1 if c not in classes]
    base = rows[0].per_class_f1
    delta = {c: [None if c not in r.per_class_f1 or c not in base else r.per_class_f1[c] - base[c] for r in rows]
             for c in classes}
    return Comparison(rows, classes, delta, warnings)
