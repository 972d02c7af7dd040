"""Evaluation stage: calibration. A run + held-out images -> a temperature and an abstain threshold.

``calibrate(run)`` fits temperature scaling (``cnnkit.metrics``) on the run's validation split (or
a labelled folder), optionally chooses an abstain threshold ``min_confidence`` (predictions less
confident than it come back as ``unknown``), and stores both in ``run.json`` and in the metadata
inside ``model.keras``, so ``Predictor`` (predict, serve) applies them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import ConfigError, DataError
from cnnkit.evaluation.labelled import folder_files, predict_labelled, run_split_files
from cnnkit.metrics import (
    apply_temperature,
    choose_min_confidence,
    coverage_at,
    cross_entropy,
    fit_temperature,
    reliability_bins,
)
from cnnkit.models.saving import update_meta
from cnnkit.plots import plot_reliability
from cnnkit.predict import Predictor
from cnnkit.rundir import RUN_JSON, editing_run, model_path, read_json, write_json


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
        run: a run directory: ``model.keras``, ``run.json`` and ``calibration.png`` are replaced in one
            atomic swap of the folder, so no reader sees one updated without the others.
        data_dir: a labelled folder to fit on; default: the run's validation split (``split.csv``).
        min_confidence: abstain threshold in [0, 1]: calibrated confidences below it predict ``unknown``.
        target_precision: instead of ``min_confidence``, choose the lowest threshold that reaches
            this precision on the validation images.

    Returns:
        A CalibrationResult (ECE before and after, temperature, threshold and its coverage).

    Example:
        >>> temperature = cnnkit.calibrate("runs/first", target_precision=0.95).temperature
    """
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
        files = run_split_files(run, "validation", predictor.class_names)
    else:
        files, _ = folder_files(Path(data_dir), predictor.class_names)
    labelled = predict_labelled(predictor, files, cache_root=cache_root, description="Calibrating")
    result = _fit(labelled.probs, labelled.labels, min_confidence, target_precision)
    curves = {"uncalibrated": result.reliability["before"],
              f"temperature {result.temperature:.2f}": result.reliability["after"]}
    result.plot = str(run / "calibration.png")  # before run.json records the result
    with editing_run(run) as staged:  # model.keras, run.json and the plot change together or not at all
        plot_reliability(curves, staged / "calibration.png")
        update_meta(model_path(staged), temperature=result.temperature, min_confidence=result.min_confidence)
        if (staged / RUN_JSON).exists():
            record = read_json(staged / RUN_JSON)
            record["calibration"] = result.to_dict()
            write_json(staged / RUN_JSON, record)
    return result


def _fit(raw: np.ndarray, labels: np.ndarray, min_confidence: float | None,
         target_precision: float | None) -> CalibrationResult:
    """Temperature, ECE before/after and the abstain threshold, from uncalibrated probabilities."""
    temperature = fit_temperature(raw, labels)
    scaled = apply_temperature(raw, temperature)
    before, after = reliability_bins(raw, labels), reliability_bins(scaled, labels)
    result = CalibrationResult(
        temperature=temperature, ece_before=before["ece"], ece_after=after["ece"],
        loss_before=cross_entropy(raw, labels), loss_after=cross_entropy(raw, labels, temperature), num_images=len(labels),
        accuracy=float((raw.argmax(axis=1) == labels).mean()), reliability={"before": before, "after": after},
    )
    if target_precision is not None:
        threshold, precision, coverage = choose_min_confidence(scaled, labels, target_precision)
        result.min_confidence, result.target_precision = threshold, target_precision
        result.precision_at_threshold, result.coverage = precision, coverage
    elif min_confidence is not None:
        result.min_confidence = min_confidence
        result.coverage, result.precision_at_threshold = coverage_at(scaled, labels, min_confidence)
    return result
