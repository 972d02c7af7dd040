"""Shared maths on class probabilities, numpy only: temperature, log-loss, reliability/ECE, thresholds.

Every stage that turns probabilities into numbers (training's final metrics, ``Predictor``,
evaluation, calibration, serving) uses these functions, so a temperature or an ECE means the same
thing everywhere. Nothing here imports Keras or another cnnkit stage.

A classifier is *calibrated* when, of the images it predicts with 80% confidence, about 80% are
right. Temperature scaling (Guo et al. 2017) divides the logits by one number T > 0 fitted on
held-out images by minimising the log-loss; it never changes which class wins. cnnkit models output
softmax probabilities, and ``log p`` equals the logits up to a per-image constant that softmax
ignores, so ``softmax(log p / T)`` is exact temperature scaling without touching the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` as float32: T > 1 softens over-confident probabilities, T = 1 is the identity."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or probs.size == 0:
        return probs.astype(np.float32)
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def cross_entropy(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-probability of the true classes (no label smoothing: what the model really scores)."""
    labels = np.asarray(labels, dtype=np.int64)
    scaled = apply_temperature(probs, temperature).astype(np.float64)
    picked = scaled[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0)))) + 0.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the log-loss of ``probs`` (N, C) against ``labels`` (N,), in [0.05, 20]."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    result = minimize_scalar(lambda log_t: cross_entropy(probs, labels, float(np.exp(log_t))),
                             bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
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


def coverage_at(probs: np.ndarray, labels: np.ndarray, min_confidence: float) -> tuple[float, float | None]:
    """(fraction answered, precision of those answered) when predictions below ``min_confidence`` abstain."""
    accepted = probs.max(axis=1) >= min_confidence
    precision = float((probs.argmax(axis=1) == labels)[accepted].mean()) if accepted.any() else None
    return float(accepted.mean()), precision
