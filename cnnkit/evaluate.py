"""Evaluation stage: a model + a labelled folder -> metrics, confusion matrix and worst mistakes.

``evaluate()`` decodes the folder with the model's own settings (through the same cache as
training), predicts in batches, and computes every metric with scikit-learn. It writes
``<run>/eval/<name>/``: ``metrics.json``, ``confusion_matrix.png``, ``mistakes.png`` and
``predictions.csv`` (atomically: a temporary folder renamed into place).
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit._progress import esc, progress_task, say, warn
from cnnkit._rundir import make_public, replace_directory, write_json
from cnnkit.data.cache import build_cache
from cnnkit.data.dataset import atomic_write_rows, describe_skipped
from cnnkit.data.scan import ImageFile, SkippedFile, scan_folder
from cnnkit.errors import ConfigError, DataError
from cnnkit.models.saving import resolve_model_path
from cnnkit.predict import Predictor


@dataclass
class EvalReport:
    """What ``evaluate()`` returns (everything also written to ``out_dir/metrics.json``).

    Attributes:
        accuracy, loss, top_k_accuracy, balanced_accuracy: headline metrics.
        k: the k of top-k accuracy.
        per_class: class name -> precision, recall, f1-score, support.
        confusion_matrix: (num_classes, num_classes) counts, rows = true class.
        class_names: the model's classes.
        num_images: images evaluated.
        skipped: files that could not be evaluated.
        out_dir: where the report was written.
    """

    accuracy: float
    loss: float
    top_k_accuracy: float
    balanced_accuracy: float
    k: int
    per_class: dict[str, dict[str, float]]
    confusion_matrix: np.ndarray
    class_names: list[str]
    num_images: int
    macro_avg: dict[str, float] = field(default_factory=dict)
    weighted_avg: dict[str, float] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images, "accuracy": self.accuracy, "loss": self.loss,
            f"top_{self.k}_accuracy": self.top_k_accuracy, "top_k_accuracy": self.top_k_accuracy, "top_k": self.k,
            "balanced_accuracy": self.balanced_accuracy, "macro_avg": self.macro_avg,
            "weighted_avg": self.weighted_avg, "per_class": self.per_class, "class_names": self.class_names,
            "confusion_matrix": self.confusion_matrix.tolist(), "skipped": len(self.skipped),
            "in_training_data": len(self.leaked), "in_training_data_examples": self.leaked[:20],
        }


def _labelled_files(run: Path, data_dir: Path | None, class_names: list[str]) -> tuple[list[ImageFile], list[SkippedFile]]:
    """Files to evaluate, labelled with the model's class indices."""
    if data_dir is None:
        split_csv = run / "split.csv" if run.is_dir() else None
        if split_csv is None or not split_csv.exists():
            raise DataError(f"No data folder given and '{run}' has no split.csv. Pass the folder to evaluate on.")
        with open(split_csv, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
        if not rows:
            raise DataError(f"Run '{run}' has no test split. Pass a folder to evaluate on, e.g. dataset/test.")
        index = {n: i for i, n in enumerate(class_names)}
        return [ImageFile(Path(r["path"]), index[r["class"]], "test") for r in rows], []
    folder = scan_folder(data_dir, val_split=0.0, test_split=0.0)
    files = folder.files
    if folder.layout == "splits":
        files = folder.split("test")
        if not files:
            raise DataError(f"'{data_dir}' has train/ but no test/ folder. Pass the folder to evaluate on, "
                            f"e.g. '{data_dir}/test' or '{data_dir}/validation'.")
    unknown = sorted({folder.class_names[f.label] for f in files} - set(class_names))
    if unknown:
        raise DataError(f"'{data_dir}' has classes the model was not trained on: {', '.join(unknown)}. "
                        f"The model knows: {', '.join(class_names)}.")
    index = {n: i for i, n in enumerate(class_names)}
    return [ImageFile(f.path, index[folder.class_names[f.label]], f.split) for f in files], list(folder.skipped)


def _seen_in_training(run: Path, paths: list[Path], digests: list[str]) -> list[str]:
    """Evaluated files whose bytes the model was trained or validated on (from the run's split.csv)."""
    split_csv = run / "split.csv" if run.is_dir() else None
    if split_csv is None or not split_csv.exists():
        return []
    with open(split_csv, newline="", encoding="utf-8") as fh:
        seen = {r["sha256"] for r in csv.DictReader(fh) if r["split"] in ("train", "validation")}
    leaked = [str(p) for p, d in zip(paths, digests) if d in seen]
    if leaked:
        warn(f"{len(leaked)} of the {len(paths)} evaluated images are byte-identical to images this model was "
             f"trained or validated on (e.g. '{leaked[0]}'): the accuracy below is inflated. Evaluate on images "
             "the run never saw, e.g. the dataset's test/ folder.")
    return leaked


def evaluate(
    run: str | Path,
    data_dir: str | Path | None = None,
    *,
    top_k: int = 5,
    name: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 256,
    max_mistakes: int = 24,
    cache_root: Path | None = None,
) -> EvalReport:
    """Evaluate a trained model on a labelled folder and write a report.

    Args:
        run: a run directory or a ``.keras`` file.
        data_dir: a folder of class folders (e.g. ``dataset/test``), or a dataset root with a
            ``test/`` folder; ``None`` uses the run's own test split (from ``split.csv``).
        top_k: k of the top-k accuracy (capped at the number of classes).
        name: the report's folder name under ``<run>/eval/`` (default: the data folder's name).
        out: write the report here instead of ``<run>/eval/<name>``.
        batch_size: images per model call.
        max_mistakes: how many of the most confident wrong predictions to draw.

    Returns:
        An EvalReport.

    Example:
        >>> report = cnnkit.evaluate("runs/first", "dataset/test")
        >>> report.accuracy
    """
    run = Path(run)
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a whole number >= 1. Received: top_k={top_k!r}")
    predictor = Predictor(run, batch_size=batch_size)
    meta = predictor.meta
    files, skipped = _labelled_files(run, Path(data_dir) if data_dir else None, meta.class_names)
    paths = [f.path for f in files]
    cache, rows, digests = build_cache(paths, [meta.class_names[f.label] for f in files], meta.image_size,
                                       meta.color_mode, meta.resize_mode, meta.max_pixels, cache_root=cache_root)
    leaked = _seen_in_training(run, paths, digests)
    skipped += [SkippedFile(p, cache.reasons.get(int(r), "could not be decoded"))
                for p, r in zip(paths, rows) if not cache.ok[r]]
    keep = [i for i, r in enumerate(rows) if cache.ok[r]]
    if not keep:
        raise DataError(f"No decodable image to evaluate in '{data_dir or run}': {describe_skipped(skipped)}.")
    rows, labels = rows[keep], np.array([files[i].label for i in keep])
    probs = _predict_rows(predictor, cache.images, rows)
    report = _metrics(labels, probs, meta.class_names, top_k)
    report.skipped = skipped
    report.leaked = leaked
    default_name = name or (Path(data_dir).name if data_dir else "test")
    out_dir = Path(out) if out else (run if run.is_dir() else resolve_model_path(run).parent) / "eval" / default_name
    report.out_dir = _write_report(report, out_dir, [paths[i] for i in keep], labels, probs, cache.images, rows,
                                   max_mistakes)
    say(f"[bold green]accuracy {report.accuracy:.2%}[/], top-{report.k} {report.top_k_accuracy:.2%}, "
        f"loss {report.loss:.4f} on {report.num_images} images -> {esc(report.out_dir)}")
    return report


def _predict_rows(predictor: Predictor, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = []
    with progress_task("Evaluating", len(rows)) as advance:
        for start in range(0, len(rows), predictor.batch_size):
            batch = np.sort(rows[start : start + predictor.batch_size])
            order = np.argsort(np.argsort(rows[start : start + predictor.batch_size]))
            out.append(predictor.predict_arrays(np.asarray(images[batch]))[order])
            advance(len(batch))
    return np.concatenate(out)


def _metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str], top_k: int) -> EvalReport:
    from sklearn import metrics as skm

    n = len(class_names)
    all_labels = list(range(n))
    predicted = probs.argmax(axis=1)
    k = max(1, min(top_k, n - 1)) if n > 2 else 1
    report = skm.classification_report(labels, predicted, labels=all_labels, target_names=class_names,
                                       output_dict=True, zero_division=0)
    per_class = {name: {key: float(v) for key, v in report[name].items()} for name in class_names}
    clipped = np.clip(probs, 1e-7, 1.0)
    return EvalReport(
        accuracy=float(skm.accuracy_score(labels, predicted)),
        loss=float(skm.log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=all_labels)),
        top_k_accuracy=float(skm.top_k_accuracy_score(labels, probs, k=k, labels=all_labels)) if n > 2
        else float(skm.accuracy_score(labels, predicted)),
        balanced_accuracy=float(skm.balanced_accuracy_score(labels, predicted)),
        k=k,
        per_class=per_class,
        confusion_matrix=skm.confusion_matrix(labels, predicted, labels=all_labels),
        class_names=class_names,
        num_images=len(labels),
        macro_avg={k2: float(v) for k2, v in report["macro avg"].items()},
        weighted_avg={k2: float(v) for k2, v in report["weighted avg"].items()},
    )


def _write_report(report: EvalReport, out_dir: Path, paths: list[Path], labels: np.ndarray, probs: np.ndarray,
                  images: np.ndarray, rows: np.ndarray, max_mistakes: int) -> Path:
    from cnnkit.plots import plot_confusion_matrix, plot_mistakes

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    make_public(tmp, directory=True)
    try:
        names = report.class_names
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        wrong = np.flatnonzero(predicted != labels)
        worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_mistakes]
        mistakes = [{"path": str(paths[i]), "true": names[labels[i]], "predicted": names[predicted[i]],
                     "confidence": float(confidence[i])} for i in worst]
        write_json(tmp / "metrics.json", {**report.to_dict(), "mistakes": mistakes})
        atomic_write_rows(tmp / "predictions.csv", ["path", "true", "predicted", "confidence"],
                          [[str(p), names[t], names[q], f"{c:.6f}"] for p, t, q, c in
                           zip(paths, labels, predicted, confidence)])
        plot_confusion_matrix(report.confusion_matrix, names, tmp / "confusion_matrix.png")
        plot_mistakes(np.asarray(images[rows[worst]]) if len(worst) else np.zeros((0, 1, 1, 3), np.uint8),
                      [m["true"] for m in mistakes], [m["predicted"] for m in mistakes],
                      [m["confidence"] for m in mistakes], tmp / "mistakes.png")
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


from cnnkit._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, evaluate)
