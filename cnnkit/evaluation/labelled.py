"""Evaluation stage: labelled images -> probabilities, streamed from the uint8 cache.

Shared by ``evaluate``, ``calibrate`` and ``review``: which images to score (a labelled folder, or
a split the run recorded in ``split.csv``), and their probabilities, one batch at a time, with
optional test-time augmentation (``cnnkit.data.batches.tta_views``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit._progress import progress_task, warn
from cnnkit.data.batches import tta_views
from cnnkit.data.cache import build_cache
from cnnkit.data.dataset import describe_skipped
from cnnkit.data.scan import ImageFile, SkippedFile, scan_folder
from cnnkit.errors import DataError
from cnnkit.predict import Predictor
from cnnkit.rundir import read_split_csv


@dataclass
class LabelledPredictions:
    """Probabilities for labelled images, streamed from the uint8 cache.

    Attributes:
        paths, labels: the decodable images and their class indices.
        probs: (N, num_classes) float32 from the Predictor (its calibration applied).
        tta_probs: the same averaged over the TTA views, or None.
        images, rows: the cache memmap and each image's row in it (nothing decoded is held in RAM).
        skipped: inputs that could not be decoded.
        data_hash: the cache's data hash.
        seconds: wall time of the prediction pass.
        digests: each image's SHA-256.
    """

    paths: list[Path]
    labels: np.ndarray
    probs: np.ndarray
    images: np.ndarray
    rows: np.ndarray
    skipped: list[SkippedFile]
    data_hash: str
    tta_probs: np.ndarray | None = None
    seconds: float = 0.0
    digests: list[str] = field(default_factory=list)


def run_split_files(run: Path, split: str, class_names: list[str]) -> list[ImageFile]:
    """The images of one split (``test``, ``validation``) as the run recorded them in ``split.csv``.

    Raises:
        DataError: the run has no split.csv, or no image in that split; the message says what to pass instead.
    """
    rows = read_split_csv(run) if run.is_dir() else None
    usage = {"test": "Pass the folder to evaluate on, e.g. dataset/test.",
             "validation": "Pass a labelled folder the model was not trained on: cnnkit calibrate RUN --data DIR."}[split]
    if rows is None:
        raise DataError(f"'{run}' has no split.csv, so its {split} images are unknown. {usage}")
    index = {n: i for i, n in enumerate(class_names)}
    files = [ImageFile(r.path, index[r.class_name], split) for r in rows if r.split == split and r.class_name in index]
    if not files:
        raise DataError(f"Run '{run}' set no images aside as its {split} split (its split.csv lists none: the data had "
                        f"no {split}/ folder{' and --test-split was 0' if split == 'test' else ''}). {usage}")
    return files


def folder_files(data_dir: Path, class_names: list[str], split: str | None = "test") -> tuple[list[ImageFile], list[SkippedFile]]:
    """The images of a labelled folder, labelled with the model's class indices.

    A dataset root with train/ (and test/) folders gives its ``split`` folder; ``split=None`` takes
    every image of the folder, whatever its split.

    Raises:
        DataError: no such split folder, or classes the model does not know.
    """
    folder = scan_folder(data_dir, val_split=0.0, test_split=0.0, min_classes=1)  # one class: its recall
    files = folder.files
    if folder.layout == "splits" and split is not None:
        files = folder.split(split)
        if not files:
            raise DataError(f"'{data_dir}' has train/ but no {split}/ folder. Pass the folder to evaluate on, "
                            f"e.g. '{data_dir}/{split}' or '{data_dir}/validation'.")
    unknown = sorted({folder.class_names[f.label] for f in files} - set(class_names))
    if unknown:
        raise DataError(f"'{data_dir}' has classes the model was not trained on: {', '.join(unknown)}. "
                        f"The model knows: {', '.join(class_names)}.")
    index = {n: i for i, n in enumerate(class_names)}
    return [ImageFile(f.path, index[folder.class_names[f.label]], f.split) for f in files], list(folder.skipped)


def seen_in_training(run: Path, paths: list[Path], digests: list[str]) -> list[str]:
    """Evaluated files whose bytes the model was trained or validated on (from the run's split.csv)."""
    rows = read_split_csv(run) if run.is_dir() else None
    if not rows:
        return []
    seen = {r.sha256 for r in rows if r.split in ("train", "validation")}
    leaked = [str(p) for p, d in zip(paths, digests) if d in seen]
    if leaked:
        warn(f"{len(leaked)} of the {len(paths)} evaluated images are byte-identical to images this model was "
             f"trained or validated on (e.g. '{leaked[0]}'): the accuracy below is inflated. Evaluate on images "
             "the run never saw, e.g. the dataset's test/ folder.")
    return leaked


def predict_labelled(predictor: Predictor, files: list[ImageFile], *, cache_root: Path | None = None,
                     tta: str | None = None, description: str = "Evaluating") -> LabelledPredictions:
    """Decode ``files`` through the cache and predict them batch by batch.

    Memory: the uint8 cache is a memmap; one batch (times the TTA views) is converted to floats at a
    time; only the (N, num_classes) probabilities are kept.

    Raises:
        DataError: no file could be decoded.
    """
    meta = predictor.meta
    paths = [f.path for f in files]
    cache, rows, digests = build_cache(paths, [meta.class_names[f.label] for f in files], meta.image_size,
                                       meta.color_mode, meta.resize_mode, meta.max_pixels, cache_root=cache_root)
    skipped = [SkippedFile(p, cache.reasons.get(int(r), "could not be decoded")) for p, r in zip(paths, rows)
               if not cache.ok[r]]
    keep = [i for i, r in enumerate(rows) if cache.ok[r]]
    if not keep:
        raise DataError(f"No decodable image to evaluate among {len(paths)} files: {describe_skipped(skipped)}.")
    rows, labels = rows[keep], np.array([files[i].label for i in keep], dtype=np.int64)
    started = time.perf_counter()
    probs, tta_probs = _predict_rows(predictor, cache.images, rows, tta, description)
    return LabelledPredictions([paths[i] for i in keep], labels, probs, cache.images, rows, skipped,
                               cache.data_hash, tta_probs, time.perf_counter() - started, [digests[i] for i in keep])


def _predict_rows(predictor: Predictor, images: np.ndarray, rows: np.ndarray, tta: str | None = None,
                  description: str = "Evaluating") -> tuple[np.ndarray, np.ndarray | None]:
    plain, averaged = [], []
    with progress_task(description + (f" (TTA {tta})" if tta else ""), len(rows)) as advance:
        for start in range(0, len(rows), predictor.batch_size):
            chunk = rows[start : start + predictor.batch_size]
            order = np.argsort(chunk)  # memmap reads in increasing row order are sequential on disk
            batch = np.empty((len(chunk), *images.shape[1:]), images.dtype)
            batch[order] = images[chunk[order]]
            views = [predictor.predict_arrays(view) for view in tta_views(batch, tta)]
            plain.append(views[0])
            if tta:
                averaged.append(np.mean(views, axis=0))
            advance(len(chunk))
    return np.concatenate(plain), (np.concatenate(averaged) if tta else None)
