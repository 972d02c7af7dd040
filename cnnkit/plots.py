"""Plots: training curves, confusion matrix, the worst mistakes. PNGs written atomically.

matplotlib is imported here only, with the non-interactive Agg backend, so nothing opens a window.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from cnnkit._rundir import make_public


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    make_public(tmp)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _pyplot().close(fig)
    return path


def plot_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Accuracy and loss per epoch, training vs validation; a dashed line where fine-tuning began."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    phases = history.get("phase", [])
    starts = [i + 1 for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if history.get(key):
                ax.plot(epochs, history[key], marker="o", label=label)
        for start in starts:
            ax.axvline(start - 0.5, color="gray", linestyle="--", label="fine-tuning starts")
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side; readable from 2 to ~100 classes."""
    plt = _pyplot()
    n = len(class_names)
    side = min(max(5.0, 0.35 * n + 3), 40.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    font = max(4, min(10, int(200 / max(n, 1))))
    for ax, data, title, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], normalised, "normalised by true class", ".2f")):
        ax.imshow(data, cmap="Blues")
        ax.set_title(title)
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=font)
        ax.set_yticks(range(n), class_names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 30:
            top = data.max() if data.size else 0
            for i in range(n):
                for j in range(n):
                    value = data[i, j]
                    ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=font,
                            color="white" if top and value > top / 2 else "black")
    fig.tight_layout()
    return _save(fig, path)


def plot_mistakes(
    images: np.ndarray, true: list[str], predicted: list[str], confidence: list[float], path: Path,
    columns: int = 6,
) -> Path:
    """A grid of images titled 'true -> predicted (confidence)'."""
    plt = _pyplot()
    count = max(len(images), 1)
    columns = min(columns, count)
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    for ax, img, t, p, c in zip(axes.flat, images, true, predicted, confidence):
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"true: {t}\npred: {p} ({c:.0%})", fontsize=8, color="darkred")
    fig.tight_layout()
    return _save(fig, path)
