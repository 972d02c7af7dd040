"""Calibration: temperature scaling, expected calibration error, and an abstain threshold.

A classifier is *calibrated* when, of the images it predicts with 80% confidence, about 80% are
right. CNNs trained with cross-entropy are usually over-confident. Temperature scaling (Guo et al.
2017) divides the logits by one number T > 0 fitted on held-out data (the run's validation split) by
minimising the log-loss; it never changes which class wins, so accuracy is unchanged. cnnkit models
output softmax probabilities, and ``log p`` equals the logits up to a per-image constant, which
softmax ignores, so the model itself is not modified: ``Predictor`` applies T to its outputs.

``calibrate(run)`` fits T (and optionally an abstain threshold ``min_confidence``: predictions less
confident than it come back as ``unknown``) and stores both in ``run.json`` and in the ``extra``
metadata inside ``model.keras``, so predict and serve pick them up.

This module imports only numpy at the top, so ``predict.py`` can use ``apply_temperature``.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

UNKNOWN_LABEL = "unknown"
_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log(probs) / T): T > 1 softens over-confident probabilities, T = 1 is the identity."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or probs.size == 0:
        return probs.astype(np.float32)
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def _nll(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = apply_temperature(probs, temperature).astype(np.float64)
    return float(-np.mean(np.log(np.clip(scaled[np.arange(len(labels)), labels], _EPS, 1.0)))) + 0.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the log-loss of ``probs`` (N, C) against ``labels`` (N,), in [0.05, 20]."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    result = minimize_scalar(lambda log_t: _nll(probs, labels, float(np.exp(log_t))), bounds=(np.log(0.05), np.log(20.0)),
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Per confidence bin: mean confidence, accuracy and count of the predicted class; plus the ECE.

    ECE (expected calibration error) = sum over bins of (count / N) * |accuracy - confidence|,
    with ``bins`` equal-width bins over [0, 1] (15, as in Guo et al. 2017).
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(float), minlength=bins)
    mean_conf = np.divide(conf_sum, count, out=np.zeros(bins), where=count > 0)
    accuracy = np.divide(acc_sum, count, out=np.zeros(bins), where=count > 0)
    ece = float(np.sum(count * np.abs(accuracy - mean_conf)) / max(len(labels), 1))
    return {"edges": edges.tolist(), "confidence": mean_conf.tolist(), "accuracy": accuracy.tolist(),
            "count": count.astype(int).tolist(), "ece": ece}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the predicted class's confidence (see ``reliability_bins``)."""
    return reliability_bins(probs, labels, bins)["ece"]


def choose_min_confidence(probs: np.ndarray, labels: np.ndarray, target_precision: float) -> tuple[float, float, float]:
    """The lowest confidence threshold whose accepted predictions reach ``target_precision``.

    Returns:
        ``(threshold, precision, coverage)``: coverage is the fraction of images still answered.
        When no threshold reaches the target, the threshold of the best precision is returned.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = np.argsort(-confidence, kind="stable")
    precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # Accepting the top-n most confident: the largest n with precision >= target (ties share a threshold).
    ok = np.flatnonzero(precision >= target_precision)
    n = int(ok[-1]) + 1 if len(ok) else int(np.argmax(precision)) + 1
    threshold = float(confidence[order[n - 1]])
    accepted = confidence >= threshold
    return threshold, float(correct[accepted].mean()), float(accepted.mean())


@dataclass
class CalibrationResult:
    """What ``calibrate()`` returns (also stored as ``run.json["calibration"]``).

    Attributes:
        temperature: the fitted T (1.0 = unchanged).
        ece_before, ece_after: expected calibration error on the validation images, before/after.
        loss_before, loss_after: their log-loss before/after.
        min_confidence: the abstain threshold (None: always answer).
        coverage, precision_at_threshold: on validation, the fraction answered and its precision.
        num_images: validation images used.
        reliability: bins before/after (for the plot).
    """

    temperature: float
    ece_before: float
    ece_after: float
    loss_before: float
    loss_after: float
    num_images: int
    min_confidence: float | None = None
    target_precision: float | None = None
    coverage: float | None = None
    precision_at_threshold: float | None = None
    accuracy: float = 0.0
    plot: str | None = None
    reliability: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("reliability")
        return out


def _validation_files(run: Path, class_names: list[str]):
    from cnnkit.data.scan import ImageFile
    from cnnkit.errors import DataError

    split_csv = run / "split.csv"
    if not split_csv.exists():
        raise DataError(f"'{run}' has no split.csv, so its validation images are unknown. Pass a labelled folder "
                        "to fit on: cnnkit calibrate RUN --data DIR.")
    index = {n: i for i, n in enumerate(class_names)}
    with open(split_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "validation" and r["class"] in index]
    if not rows:
        raise DataError(f"Run '{run}' has no validation split (split.csv). Pass a labelled folder the model was "
                        "not trained on: cnnkit calibrate RUN --data DIR.")
    return [ImageFile(Path(r["path"]), index[r["class"]], "validation") for r in rows]


def calibrate(
    run: str | Path,
    data_dir: str | Path | None = None,
    *,
    min_confidence: float | None = None,
    target_precision: float | None = None,
    batch_size: int = 256,
    cache_root: Path | None = None,
) -> CalibrationResult:
    """Fit a temperature on held-out images and store it (and an abstain threshold) in the run.

    Args:
        run: a run directory (``model.keras`` and ``run.json`` are updated atomically).
        data_dir: a labelled folder to fit on; default: the run's validation split (``split.csv``).
        min_confidence: abstain threshold in [0, 1]: calibrated confidences below it predict ``unknown``.
        target_precision: instead of ``min_confidence``, choose the lowest threshold that reaches
            this precision on the validation images.

    Returns:
        A CalibrationResult (ECE before and after, temperature, threshold and its coverage).

    Example:
        >>> cnnkit.calibrate("runs/first", target_precision=0.95).temperature
    """
    from cnnkit._rundir import read_json, write_json
    from cnnkit.errors import ConfigError, DataError
    from cnnkit.evaluate import _labelled_files, predict_labelled
    from cnnkit.models.saving import resolve_model_path, update_meta
    from cnnkit.plots import plot_reliability
    from cnnkit.predict import Predictor

    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1]. Received: min_confidence={min_confidence}")
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise ConfigError(f"--target-precision must be in (0, 1]. Received: target_precision={target_precision}")
    if min_confidence is not None and target_precision is not None:
        raise ConfigError("Pass --min-confidence or --target-precision, not both.")
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"calibrate needs a run directory (it updates run.json and model.keras). Received: run='{run}'")
    predictor = Predictor(run, batch_size=batch_size)
    predictor.temperature, predictor.min_confidence = 1.0, None  # fit on the raw model
    if data_dir is None:
        files = _validation_files(run, predictor.class_names)
    else:
        files, _ = _labelled_files(run, Path(data_dir), predictor.class_names)
    labelled = predict_labelled(predictor, files, cache_root=cache_root, description="Calibrating")
    result = _fit(labelled.probs, labelled.labels, min_confidence, target_precision)
    result.plot = str(plot_reliability({"uncalibrated": result.reliability["before"],
                                        f"temperature {result.temperature:.2f}": result.reliability["after"]},
                                       run / "calibration.png"))
    update_meta(resolve_model_path(run), temperature=result.temperature, min_confidence=result.min_confidence)
    record_path = run / "run.json"
    if record_path.exists():
        record = read_json(record_path)
        record["calibration"] = result.to_dict()
        write_json(record_path, record)
    return result


def _fit(raw: np.ndarray, labels: np.ndarray, min_confidence: float | None,
         target_precision: float | None) -> CalibrationResult:
    """Temperature, ECE before/after and the abstain threshold, from uncalibrated probabilities."""
    temperature = fit_temperature(raw, labels)
    scaled = apply_temperature(raw, temperature)
    before, after = reliability_bins(raw, labels), reliability_bins(scaled, labels)
    result = CalibrationResult(
        temperature=temperature, ece_before=before["ece"], ece_after=after["ece"],
        loss_before=_nll(raw, labels, 1.0), loss_after=_nll(raw, labels, temperature), num_images=len(labels),
        accuracy=float((raw.argmax(axis=1) == labels).mean()), reliability={"before": before, "after": after},
    )
    if target_precision is not None:
        threshold, precision, coverage = choose_min_confidence(scaled, labels, target_precision)
        result.min_confidence, result.target_precision = threshold, target_precision
        result.precision_at_threshold, result.coverage = precision, coverage
    elif min_confidence is not None:
        accepted = scaled.max(axis=1) >= min_confidence
        result.min_confidence, result.coverage = min_confidence, float(accepted.mean())
        if accepted.any():
            result.precision_at_threshold = float((scaled.argmax(axis=1) == labels)[accepted].mean())
    return result
