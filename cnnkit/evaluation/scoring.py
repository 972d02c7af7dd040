"""Evaluation stage: a model + a labelled folder -> metrics, plots, worst mistakes and one HTML report.

``evaluate()`` decodes the folder with the model's own settings (through the same cache as
training), streams it through the model one batch at a time (only the uint8 cache and the
(N, num_classes) probabilities are kept), optionally with test-time augmentation (flips and
crops averaged in probability space), and computes every metric with scikit-learn. It writes
``<run>/eval/<name>/`` atomically (a temporary folder renamed into place):

    metrics.json          loss, accuracy, top-k, balanced accuracy, macro/weighted P/R/F1, per class,
                          confusion matrix, ECE; the same without/with TTA; calibration
    predictions.csv       path,true,predicted,confidence      most_confused.csv  true,predicted,count
    confusion_matrix.png  per_class.png  calibration.png  mistakes.png (with Grad-CAM overlays)
    report.html           everything above in one self-contained page, plus the training curves,
                          the data summary and the run's config
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit._progress import esc, progress_task, say, warn
from cnnkit.data.batches import TTA_MODES, tta_views
from cnnkit.data.scan import SkippedFile
from cnnkit.errors import ConfigError
from cnnkit.evaluation.labelled import (
    LabelledPredictions,
    folder_files,
    predict_labelled,
    run_split_files,
    seen_in_training,
)
from cnnkit.metrics import apply_temperature, reliability_bins
from cnnkit.predict import Predictor
from cnnkit.rundir import atomic_directory, check_replaceable, output_folder, write_json, write_rows


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
        ece: expected calibration error (15 bins) of the probabilities the Predictor returns.
        tta: the same metrics with test-time augmentation (None without ``tta``).
        calibration: temperature and ECE without/with it, when the run is calibrated.
        data_hash: hash of the evaluated images (content + labels + decode settings).
        seconds: wall time of the prediction pass.
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
    ece: float = 0.0
    tta: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    data_hash: str = ""
    seconds: float = 0.0
    skipped: list[SkippedFile] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images, "accuracy": self.accuracy, "loss": self.loss,
            f"top_{self.k}_accuracy": self.top_k_accuracy, "top_k_accuracy": self.top_k_accuracy, "top_k": self.k,
            "balanced_accuracy": self.balanced_accuracy, "macro_avg": self.macro_avg,
            "weighted_avg": self.weighted_avg, "ece": self.ece, "per_class": self.per_class,
            "class_names": self.class_names, "confusion_matrix": self.confusion_matrix.tolist(),
            "tta": self.tta, "calibration": self.calibration, "data_hash": self.data_hash,
            "seconds": round(self.seconds, 2), "skipped": len(self.skipped),
            "in_training_data": len(self.leaked), "in_training_data_examples": self.leaked[:20],
        }



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
    tta: bool | str = False,
    gradcam: bool = True,
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
        tta: test-time augmentation: ``True`` or ``"flip"`` (image + horizontal mirror), or
            ``"flip+crop"`` (also four shifted crops); probabilities are averaged. Metrics are
            reported both without (top level) and with TTA (``report.tta``).
        gradcam: draw Grad-CAM overlays beside the mistakes.

    Returns:
        An EvalReport.

    Example:
        >>> report = cnnkit.evaluate("runs/first", "dataset/test", tta=True)
        >>> plain, with_tta = report.accuracy, report.tta["accuracy"]
    """
    mode = _tta_mode(tta)
    run = Path(run)
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a whole number >= 1. Received: top_k={top_k!r}")
    if name is not None and (name.strip() in ("", ".", "..") or "/" in name or "\\" in name):
        raise ConfigError("--name is the report's folder name under RUN/eval/: a plain name such as 'holdout', "
                          f"without '/' or '..' (from Python, out= writes a report elsewhere). Received: name={name!r}")
    if out is not None:  # before any work: a user's folder there is never replaced
        check_replaceable(out, ("metrics.json",), "cnnkit evaluation report")
    predictor = Predictor(run, batch_size=batch_size)
    temperature = predictor.temperature
    if data_dir is None:
        files, skipped = run_split_files(run, "test", predictor.class_names), []
    else:
        files, skipped = folder_files(Path(data_dir), predictor.class_names)
    predictor.temperature = 1.0  # raw probabilities, so ECE can be reported without and with calibration
    labelled = predict_labelled(predictor, files, cache_root=cache_root, tta=mode)
    predictor.temperature = temperature
    probs = apply_temperature(labelled.probs, temperature)
    report = compute_metrics(labelled.labels, probs, predictor.class_names, top_k)
    report.skipped = skipped + labelled.skipped
    report.leaked = seen_in_training(run, labelled.paths, labelled.digests)
    report.data_hash, report.seconds = labelled.data_hash, labelled.seconds
    if temperature != 1.0:
        report.calibration = {"temperature": temperature, "min_confidence": predictor.min_confidence,
                              "ece_uncalibrated": reliability_bins(labelled.probs, labelled.labels)["ece"],
                              "ece": report.ece}
    if labelled.tta_probs is not None:
        tta_probs = apply_temperature(labelled.tta_probs, temperature)
        with_tta = compute_metrics(labelled.labels, tta_probs, predictor.class_names, top_k)
        report.tta = {"mode": mode, "views": len(tta_views(np.zeros((1, 4, 4, 1), np.uint8), mode)),
                      **{k: v for k, v in with_tta.to_dict().items() if k not in _TTA_OMIT}}
    default_name = name or (Path(data_dir).name if data_dir else "test")
    out_dir = Path(out) if out else output_folder(run, "eval", default_name)
    report.out_dir = _write_report(report, out_dir, labelled, probs, predictor if gradcam else None, run, max_mistakes)
    say(f"[bold green]accuracy {report.accuracy:.2%}[/], top-{report.k} {report.top_k_accuracy:.2%}, "
        f"loss {report.loss:.4f}, ECE {report.ece:.3f} on {report.num_images} images in {report.seconds:.1f}s"
        + (f"; with TTA ({mode}) accuracy {report.tta['accuracy']:.2%}" if report.tta else "")
        + f" -> {esc(report.out_dir)}")
    return report


_TTA_OMIT = ("per_class", "class_names", "confusion_matrix", "tta", "calibration", "data_hash", "skipped",
             "num_images", "seconds")


def _tta_mode(tta: bool | str | None) -> str | None:
    if tta is None or tta is False or tta == "none":
        return None
    if tta is True:
        return "flip"
    if tta not in TTA_MODES:
        raise ConfigError(f"Unknown TTA mode '{tta}'. Available: none, {', '.join(TTA_MODES)}. Received: tta={tta!r}")
    return str(tta)



def _macro_average(per_class: dict[str, dict[str, float]], confusion: np.ndarray,
                   class_names: list[str]) -> dict[str, float]:
    """Precision, recall and F1 averaged over the classes in the folder or among the predictions
    (scikit-learn's macro average without ``labels``): a class the model knows but the folder lacks,
    and never predicted, has no recall to count as 0, as balanced accuracy leaves it out too."""
    present = [name for i, name in enumerate(class_names) if confusion[i].sum() or confusion[:, i].sum()]
    average = {key: float(np.mean([per_class[name][key] for name in present])) if present else 0.0
               for key in ("precision", "recall", "f1-score")}
    return {**average, "support": float(confusion.sum())}


def _balanced_accuracy(confusion: np.ndarray) -> float:
    """The mean recall over the classes present (scikit-learn's ``balanced_accuracy_score``, from the
    confusion matrix): a folder of some classes (or one) scores only those, without its warnings."""
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present])) if present.any() else 0.0


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str], top_k: int = 5) -> EvalReport:
    """Every metric of an EvalReport from true labels (N,) and probabilities (N, C), with scikit-learn.

    Example:
        >>> compute_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.4, 0.6]]), ["a", "b"]).accuracy
        1.0
    """
    from sklearn import metrics as skm

    n = len(class_names)
    all_labels = list(range(n))
    predicted = probs.argmax(axis=1)
    k = max(1, min(top_k, n - 1)) if n > 2 else 1
    report = skm.classification_report(labels, predicted, labels=all_labels, target_names=class_names,
                                       output_dict=True, zero_division=0)
    per_class = {name: {key: float(v) for key, v in report[name].items()} for name in class_names}
    confusion = skm.confusion_matrix(labels, predicted, labels=all_labels)
    clipped = np.clip(probs, 1e-7, 1.0)
    return EvalReport(
        accuracy=float(skm.accuracy_score(labels, predicted)),
        loss=float(skm.log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=all_labels)),
        top_k_accuracy=float(skm.top_k_accuracy_score(labels, probs, k=k, labels=all_labels)) if n > 2
        else float(skm.accuracy_score(labels, predicted)),
        balanced_accuracy=_balanced_accuracy(confusion),
        k=k,
        per_class=per_class,
        confusion_matrix=confusion,
        class_names=class_names,
        num_images=len(labels),
        macro_avg=_macro_average(per_class, confusion, class_names),
        weighted_avg={k2: float(v) for k2, v in report["weighted avg"].items()},
        ece=reliability_bins(probs, labels)["ece"],
    )


def most_confused(matrix: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Off-diagonal (true, predicted) pairs with at least one image, most frequent first."""
    support = matrix.sum(axis=1)
    pairs = [(int(matrix[i, j]), i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j and matrix[i, j]]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": class_names[i], "predicted": class_names[j], "count": c,
             "fraction_of_true": float(c / support[i]) if support[i] else 0.0} for c, i, j in pairs]


def _mistake_heatmaps(predictor: Predictor | None, images: np.ndarray, predicted: np.ndarray) -> np.ndarray | None:
    """Grad-CAM of the predicted class for each mistake; None (with a warning) when it cannot be computed."""
    if predictor is None or not len(images):
        return None
    try:
        from cnnkit.gradcam import compute_gradcam

        heatmaps, _, _ = compute_gradcam(predictor.model, images, predicted)
        return heatmaps
    except Exception as exc:  # a report without heatmaps beats no report (e.g. a model without feature maps)
        warn(f"Grad-CAM overlays left out of mistakes.png: {exc}")
        return None


def _write_report(report: EvalReport, out_dir: Path, labelled: LabelledPredictions, probs: np.ndarray,
                  predictor: Predictor | None, run: Path, max_mistakes: int) -> Path:
    from cnnkit.plots import plot_confusion_matrix, plot_mistakes, plot_per_class, plot_reliability
    from cnnkit.evaluation.html import write_html_report

    with atomic_directory(out_dir, ("metrics.json",), "cnnkit evaluation report") as tmp:
        names, labels, paths = report.class_names, labelled.labels, labelled.paths
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        wrong = np.flatnonzero(predicted != labels)
        worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_mistakes]
        mistakes = [{"path": str(paths[i]), "true": names[labels[i]], "predicted": names[predicted[i]],
                     "confidence": float(confidence[i])} for i in worst]
        confused = most_confused(report.confusion_matrix, names)
        write_json(tmp / "metrics.json", {**report.to_dict(), "mistakes": mistakes, "most_confused": confused[:50]})
        write_rows(tmp / "predictions.csv", ["path", "true", "predicted", "confidence"],
                          [[str(p), names[t], names[q], f"{c:.6f}"] for p, t, q, c in
                           zip(paths, labels, predicted, confidence)])
        write_rows(tmp / "most_confused.csv", ["true", "predicted", "count", "fraction_of_true"],
                          [[c["true"], c["predicted"], c["count"], f"{c['fraction_of_true']:.4f}"] for c in confused])
        with progress_task("Drawing report", 5) as advance:
            plot_confusion_matrix(report.confusion_matrix, names, tmp / "confusion_matrix.png")
            advance(1)
            plot_per_class(report.per_class, tmp / "per_class.png")
            curves = {"uncalibrated": reliability_bins(labelled.probs, labels)} if report.calibration else {}
            label = f"temperature {report.calibration['temperature']:.2f}" if report.calibration else "model"
            curves[label] = reliability_bins(probs, labels)
            plot_reliability(curves, tmp / "calibration.png")
            advance(1)
            worst_images = np.asarray(labelled.images[labelled.rows[worst]]) if len(worst) else np.zeros((0, 1, 1, 3), np.uint8)
            heatmaps = _mistake_heatmaps(predictor, worst_images, predicted[worst])
            advance(1)
            plot_mistakes(worst_images, [m["true"] for m in mistakes], [m["predicted"] for m in mistakes],
                          [m["confidence"] for m in mistakes], tmp / "mistakes.png", heatmaps=heatmaps)
            advance(1)
            write_html_report(tmp / "report.html", report, run=run, mistakes=mistakes, most_confused=confused,
                              gradcam=heatmaps is not None)
            advance(1)
    return out_dir
