"""Figures and images for people: training curves, confusion matrix, mistakes, Grad-CAM, reliability,
per-class scores, the learning-rate range test; heatmap overlays and PNG encoding.

Every figure is a private ``matplotlib.figure.Figure`` rendered straight to a PNG (written
atomically): pyplot's global state and backend are never touched, so a notebook user's backend and
open figures stay as they were, and nothing opens a window. Consumes numpy arrays and plain dicts;
imports no Keras and no other stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnkit.rundir import atomic_path


def _figure(**kwargs):
    """A Figure of our own, not registered with pyplot (no global backend, no figure manager)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return path


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (height, width) in [0, 1] in the 'jet' colour map blended over ``image`` (uint8 RGB)."""
    from matplotlib import colormaps

    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    colours = colormaps["jet"](heatmap)[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 pixels (height, width[, 1 or 3]) encoded as a PNG file's bytes."""
    import io

    from PIL import Image

    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(pixels: np.ndarray) -> str:
    """``png_bytes`` as base64 text (for JSON responses and self-contained HTML pages)."""
    import base64

    return base64.b64encode(png_bytes(pixels)).decode("ascii")


def plot_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Accuracy and loss per epoch, training vs validation; a dashed line where fine-tuning began."""
    fig = _figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
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
    n = len(class_names)
    side = min(max(5.0, 0.35 * n + 3), 40.0)
    fig = _figure(figsize=(2 * side, side))
    axes = fig.subplots(1, 2)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    font = max(4, min(10, int(200 / max(n, 1))))
    # Each cell is >= 0.35 inch (25 pt) high, so 8 pt class names stay legible up to ~100 classes.
    tick_font = 10 if n <= 30 else 8
    for ax, data, title, fmt in ((axes[0], matrix, "counts", "d"), (axes[1], normalised, "normalised by true class", ".2f")):
        shown = ax.imshow(data, cmap="Blues")
        if n > 30:  # no numbers in the cells: the colour bar gives the scale
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title, fontsize=max(12, tick_font + 4))
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=tick_font)
        ax.set_yticks(range(n), class_names, fontsize=tick_font)
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
    columns: int = 6, heatmaps: np.ndarray | None = None,
) -> Path:
    """A grid of images titled 'true -> predicted (confidence)'.

    With ``heatmaps`` (N, height, width) in [0, 1], each mistake takes two cells: the image and its
    Grad-CAM overlay for the predicted class (where the model looked when it went wrong).
    """
    per = 2 if heatmaps is not None and len(heatmaps) == len(images) else 1
    count = max(len(images), 1)
    columns = max(per, min(columns, count * per) // per * per)
    rows = int(np.ceil(count * per / columns))
    fig = _figure(figsize=(2.2 * columns, 2.5 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    cells = iter(axes.flat)
    for i, (img, t, p, c) in enumerate(zip(images, true, predicted, confidence)):
        ax = next(cells)
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"true: {t}\npred: {p} ({c:.0%})", fontsize=8, color="darkred")
        if per == 2:
            ax = next(cells)
            ax.imshow(overlay(img, heatmaps[i]))
            ax.set_title(f"Grad-CAM: {p}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_gradcam(heatmap, path: Path) -> Path:
    """Image | heatmap | overlay, side by side, for one ``cnnkit.gradcam.Heatmap``."""
    fig = _figure(figsize=(9.6, 3.6))
    axes = fig.subplots(1, 3)
    img = heatmap.image
    axes[0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=255)
    axes[0].set_title(f"predicted: {heatmap.predicted}", fontsize=9)
    shown = axes[1].imshow(heatmap.heatmap, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM ({heatmap.layer})", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay(img, heatmap.heatmap))
    axes[2].set_title(f"{heatmap.class_name}: {heatmap.probability:.1%}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(curves: dict[str, dict], path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin vs the diagonal, and how many images fall in each bin.

    Args:
        curves: label -> ``cnnkit.metrics.reliability_bins`` output (``confidence``, ``accuracy``,
            ``count``, ``edges``, ``ece``), e.g. ``{"uncalibrated": ..., "temperature 1.7": ...}``.
    """
    fig = _figure(figsize=(6, 7))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    width = None
    for n, (label, bins) in enumerate(curves.items()):
        edges = np.asarray(bins["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        width = (edges[1] - edges[0]) / (len(curves) + 0.5)
        counts = np.asarray(bins["count"])
        shown = counts > 0
        offset = (n - (len(curves) - 1) / 2) * width
        top.bar(centres[shown] + offset, np.asarray(bins["accuracy"])[shown], width=width, alpha=0.75,
                label=f"{label} (ECE {bins['ece']:.3f})", edgecolor="black", linewidth=0.5)
        bottom.bar(centres + offset, counts, width=width, alpha=0.75)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title("reliability diagram (confidence of the predicted class)")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class(per_class: dict[str, dict[str, float]], path: Path) -> Path:
    """Precision, recall and F1 per class as horizontal bars, worst F1 at the top; readable to ~100 classes."""
    names = sorted(per_class, key=lambda n: (per_class[n]["f1-score"], n), reverse=True)
    n = len(names)
    fig = _figure(figsize=(8, max(3.0, 0.28 * n + 1.2)))
    ax = fig.subplots()
    y = np.arange(n)
    for k, (key, label) in enumerate((("precision", "precision"), ("recall", "recall"), ("f1-score", "F1"))):
        ax.barh(y + (k - 1) * 0.27, [per_class[c][key] for c in names], height=0.27, label=label)
    ax.set_yticks(y, [f"{c} ({int(per_class[c]['support'])})" for c in names], fontsize=max(5, min(9, int(400 / max(n, 1)))))
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (support in brackets)")
    ax.set_title("per-class precision, recall and F1 (worst F1 at the top)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_lr_find(learning_rates: list[float], losses: list[float], suggested: float, minimum: float,
                 path: Path) -> Path:
    """The learning-rate range test: smoothed loss vs learning rate (log axis), the suggestion marked."""
    import math

    fig = _figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(learning_rates, losses)
    ax.set_xscale("log")
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.axvline(minimum, color="gray", linestyle=":", label=f"minimum {minimum:.2g}")
    finite = [x for x in losses if math.isfinite(x)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), finite[0] * 2.0) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
