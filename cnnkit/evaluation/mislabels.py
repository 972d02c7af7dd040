"""Evaluation stage: review. A model + a labelled folder -> a queue of likely-mislabelled images. Never modifies a file.

``review(run, data_dir)`` predicts every labelled image of ``data_dir`` and ranks those whose
folder (the given label) the model most confidently disagrees with: margin = p(predicted) -
p(given). Each row says which split of the run the image was in (from ``split.csv``): the model
has seen its training images and may have memorised a wrong label, so disagreement on a *held-out*
image (validation, test or not in the run) is the stronger signal; ``held_out_only`` keeps only those.
With ``folds=K`` every image is scored out-of-fold instead: K models are trained with the run's
config, each on the other K-1 folds (symlinks in a temporary folder; the originals are untouched),
so no image is judged by a model that saw it.

Writes ``<run>/review/<name>/queue.csv`` and ``gallery.html`` (the images as the model saw them,
embedded, with given and predicted class) atomically.
"""

from __future__ import annotations

import html
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit._progress import say
from cnnkit.config import load_config
from cnnkit.data.scan import SkippedFile
from cnnkit.errors import ConfigError, DataError
from cnnkit.evaluation.labelled import LabelledPredictions, folder_files, predict_labelled
from cnnkit.plots import png_base64
from cnnkit.predict import Predictor
from cnnkit.rundir import (
    RUN_JSON,
    atomic_directory,
    check_replaceable,
    output_folder,
    read_split_csv,
    write_rows,
    write_text,
)

_COLUMNS = ["rank", "path", "given", "predicted", "p_given", "p_predicted", "margin", "split"]

_REPLACES, _WHAT = ("queue.csv",), "cnnkit review queue"  # what an --out may already hold


@dataclass
class ReviewItem:
    """One image the model disagrees with: its given label, the model's class and how sure it is."""

    path: str
    given: str
    predicted: str
    p_given: float
    p_predicted: float
    margin: float
    split: str

    def row(self, rank: int) -> list[Any]:
        return [rank, self.path, self.given, self.predicted, f"{self.p_given:.6f}", f"{self.p_predicted:.6f}",
                f"{self.margin:.6f}", self.split]


@dataclass
class ReviewQueue:
    """What ``review()`` returns: the ranked queue and where it was written."""

    items: list[ReviewItem]
    num_images: int
    disagreements: int
    skipped: list[SkippedFile] = field(default_factory=list)
    out_dir: Path | None = None


def _run_splits(run: Path) -> dict[str, str]:
    """Resolved image path -> the split the run put it in (empty for a loose .keras file)."""
    rows = read_split_csv(run) if run.is_dir() else None
    return {str(r.path.resolve()): r.split for r in rows or []}


def review(
    run: str | Path,
    data_dir: str | Path,
    *,
    top: int = 100,
    held_out_only: bool = False,
    folds: int | None = None,
    name: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 256,
    cache_root: Path | None = None,
) -> ReviewQueue:
    """Rank the images of ``data_dir`` whose label the model most confidently disagrees with.

    Args:
        run: a run directory or ``.keras`` file.
        data_dir: a labelled folder (class folders, or train/validation/test folders: all are reviewed).
        top: how many images to list (the CSV and the gallery).
        held_out_only: only images the run did not train on (see the module docstring).
        folds: score out-of-fold with this many retrained models (K >= 2; costs K trainings).
        name, out: the output folder (default ``<run>/review/<data folder name>``).

    Returns:
        A ReviewQueue.

    Example:
        >>> queue = cnnkit.review("runs/first", "dataset")
        >>> worst = [(item.path, item.given, item.predicted) for item in queue.items[:5]]
    """
    if top < 1:
        raise ConfigError(f"--top must be >= 1. Received: top={top}")
    if folds is not None and folds < 2:
        raise ConfigError(f"--folds must be >= 2 (each model leaves one fold out). Received: folds={folds}")
    run, data_dir = Path(run), Path(data_dir)
    out_dir = Path(out) if out else output_folder(run, "review", name or data_dir.resolve().name)
    check_replaceable(out_dir, _REPLACES, _WHAT)  # before the scoring (and any --folds retraining)
    predictor = Predictor(run, batch_size=batch_size)
    names = predictor.class_names
    files, folder_skipped = folder_files(data_dir, names, split=None)
    labelled = predict_labelled(predictor, files, cache_root=cache_root, description="Reviewing")
    splits = _run_splits(run)
    probs, labels = labelled.probs, labelled.labels
    if folds:
        probs = _out_of_fold(run, labelled, names, folds, cache_root)
        splits = {str(Path(p).resolve()): "out-of-fold" for p in labelled.paths}
    predicted = probs.argmax(axis=1)
    p_given = probs[np.arange(len(labels)), labels]
    p_pred = probs.max(axis=1)
    split_of = [splits.get(str(Path(p).resolve()), "not in run") for p in labelled.paths]
    candidates = np.flatnonzero(predicted != labels)
    if held_out_only:
        candidates = np.array([i for i in candidates if split_of[i] != "train"], dtype=np.int64)
    order = candidates[np.argsort(-(p_pred[candidates] - p_given[candidates]), kind="stable")]
    items = [ReviewItem(str(labelled.paths[i]), names[labels[i]], names[predicted[i]], float(p_given[i]),
                        float(p_pred[i]), float(p_pred[i] - p_given[i]), split_of[i]) for i in order[:top]]
    queue = ReviewQueue(items, len(labels), len(candidates), folder_skipped + labelled.skipped)
    thumbs = [np.asarray(labelled.images[labelled.rows[i]]) for i in order[:top]]
    queue.out_dir = _write(queue, thumbs, out_dir, run)
    say(f"{queue.disagreements} of {queue.num_images} images disagree with their folder; top {len(items)} "
        f"-> {out_dir / 'queue.csv'} and gallery.html (no file was changed)")
    return queue


def _out_of_fold(run: Path, labelled: LabelledPredictions, names: list[str], folds: int,
                 cache_root: Path | None) -> np.ndarray:
    """Probabilities of each image from a model trained (with the run's config) without its fold."""
    from sklearn.model_selection import StratifiedKFold

    from cnnkit.training import train

    if not (run / RUN_JSON).exists():
        raise DataError(f"--folds retrains with the run's config, but '{run}' has no run.json. Pass a run directory.")
    counts = np.bincount(labelled.labels, minlength=len(names))
    if counts.min() < folds:
        raise ConfigError(f"--folds {folds} needs at least {folds} images of every class the model knows; "
                          f"'{names[int(counts.argmin())]}' has {int(counts.min())}. Use fewer folds. Received: folds={folds}")
    # the folds are folders of symbolic links to the user's files, which live outside them
    config = load_config(run / RUN_JSON, {"data.test_split": 0.0, "data.follow_links": True})
    out = np.zeros((len(labelled.labels), len(names)), np.float32)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=config.data.seed)
    with tempfile.TemporaryDirectory(prefix="cnnkit-folds-") as tmp:
        for k, (train_idx, held_idx) in enumerate(splitter.split(np.zeros(len(out)), labelled.labels)):
            root = Path(tmp) / f"fold{k + 1}" / "data"
            for i in train_idx:
                path = Path(labelled.paths[i]).resolve()
                (root / names[labelled.labels[i]]).mkdir(parents=True, exist_ok=True)
                os.symlink(path, root / names[labelled.labels[i]] / f"{i:07d}{path.suffix}")
            say(f"[bold]fold {k + 1}/{folds}[/]: training on {len(train_idx)} images, scoring {len(held_idx)}")
            result = train(root, Path(tmp) / f"fold{k + 1}" / "run", config, cache_root=cache_root)
            predictor = Predictor(result.run_dir)
            for start in range(0, len(held_idx), 256):  # streamed from the uint8 cache, one batch at a time
                chunk = held_idx[start : start + 256]
                out[chunk] = predictor.predict_arrays(np.asarray(labelled.images[labelled.rows[chunk]]))
    return out


def _write(queue: ReviewQueue, thumbs: list[np.ndarray], out_dir: Path, run: Path) -> Path:
    with atomic_directory(out_dir, _REPLACES, _WHAT) as tmp:
        write_rows(tmp / "queue.csv", _COLUMNS, [item.row(n + 1) for n, item in enumerate(queue.items)])
        cards = []
        for n, (item, thumb) in enumerate(zip(queue.items, thumbs)):
            cards.append(
                f'<div class="c"><img src="data:image/png;base64,{png_base64(thumb)}" alt="{html.escape(item.path)}">'
                f"<div><b>#{n + 1}</b> folder: <b>{html.escape(item.given)}</b> ({item.p_given:.1%})<br>"
                f'model: <b class="p">{html.escape(item.predicted)}</b> ({item.p_predicted:.1%})<br>'
                f'<span class="s">{html.escape(item.split)}</span><br><span class="f">{html.escape(item.path)}</span>'
                "</div></div>")
        page = (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cnnkit review</title><style>'
            "body{font-family:Helvetica,Arial,sans-serif;margin:24px}.g{display:flex;flex-wrap:wrap;gap:12px}"
            ".c{width:200px;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}"
            ".c img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;background:#eee}"
            ".p{color:#b00}.s{color:#555}.f{color:#888;word-break:break-all;font-size:10px}</style></head><body>"
            f"<h1>Likely mislabelled: {html.escape(run.name)}</h1>"
            f"<p>{queue.disagreements} of {queue.num_images} images disagree with their folder; the {len(queue.items)}"
            " most confident disagreements first. Images the run trained on (<i>train</i>) may have had their label "
            "memorised, so a disagreement on a held-out image is the stronger signal. Nothing was moved or "
            f"changed: check each one and fix the folder by hand.</p><div class=\"g\">{''.join(cards)}</div>"
            "</body></html>\n")
        write_text(tmp / "gallery.html", page)
    return out_dir
