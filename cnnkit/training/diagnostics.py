"""Training stage: the classic training mistakes, in words, for the log and run.json ``warnings``.

``data_warnings`` reads the decoded folder (tiny and imbalanced classes by ``cnnkit.data.rules``,
the same rules ``cnnkit doctor`` applies; held-out images that are byte copies of training images;
a validation folder missing a class). ``diagnose_history`` reads the per-epoch metrics
(overfitting with the epoch it began, accuracy stuck at chance, loss not falling with whether the
learning rate looks too high or too low).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnkit.data.dataset import LoadedData
from cnnkit.data.rules import class_size_problems


def data_warnings(data: LoadedData, class_weighted: bool = False) -> list[str]:
    """What is wrong with the training data, in words (empty list: nothing); ``class_weighted``: the
    loss is weighted by class already, so the imbalance advice does not suggest it."""
    warnings = class_size_problems(data.class_counts("train"), class_weighted)
    leak = _cross_split_copies(data)
    if leak:
        example = leak[0]
        warnings.append(
            f"{len(leak)} validation/test images are byte-identical copies of training images (e.g. '{example[0]}' = "
            f"'{example[1]}'): their accuracy is inflated. Remove the copies from one split; "
            f"'cnnkit doctor {data.folder.root}' also finds near-duplicates.")
    if data.folder.split_source.get("validation") == "folder":
        missing = [n for n, c in data.class_counts("validation").items() if c == 0]
        if missing:
            warnings.append(f"The validation folder has no images of: {', '.join(missing)}.")
    return warnings


def _cross_split_copies(data: LoadedData) -> list[tuple[Path, Path]]:
    """(held-out file, training file) pairs with the same bytes."""
    training = {d: f.path for f, d in zip(data.files, data.digests) if f.split == "train"}
    return [(f.path, training[d]) for f, d in zip(data.files, data.digests) if f.split != "train" and d in training]


def diagnose_history(history: dict[str, list[float]], num_classes: int, overfit_gap: float = 0.15) -> list[str]:
    """The classic training mistakes, in words, from per-epoch metrics.

    * overfitting: validation accuracy trails training accuracy by more than ``overfit_gap`` at the
      end, with the epoch where the gap first opened;
    * accuracy stuck near chance (1/num_classes): labels or inputs are broken;
    * training loss not falling (or NaN) in the first epochs: the learning rate is too high or
      too low, told apart by the loss rising and by the rate itself (the ``learning_rate`` column).
    """
    found: list[str] = []
    acc, val_acc, loss = history.get("accuracy", []), history.get("val_accuracy", []), history.get("loss", [])
    if acc and val_acc:
        gaps = np.array(acc) - np.array(val_acc)
        if gaps[-1] > overfit_gap:
            start = int(np.argmax(gaps > overfit_gap)) + 1
            found.append(
                f"Overfitting: validation accuracy ({val_acc[-1]:.1%}) trails training accuracy ({acc[-1]:.1%}) by "
                f"{gaps[-1]:.0%} (over {overfit_gap:.0%} since epoch {start}). EarlyStopping restored the best epoch; "
                "to generalise better try --augment standard, more images per class, a smaller model, or fewer epochs."
            )
    chance = 1.0 / max(num_classes, 1)
    best_acc = max(val_acc) if val_acc else (max(acc) if acc else None)  # the epoch EarlyStopping keeps
    if best_acc is not None and len(loss) >= 3 and best_acc < chance + 0.05:
        found.append(
            f"Accuracy is stuck near chance (best {best_acc:.1%} with {num_classes} classes = {chance:.1%}): check that the "
            "class folders hold the right images, that images are not blank, and try a lower --learning-rate."
        )
    found += _learning_rate_hints(loss, history.get("learning_rate", []))
    return found


def _learning_rate_hints(loss: list[float], rates: list[float]) -> list[str]:
    """Loss not falling in the first epochs, read as a learning rate too high or too low."""
    first = loss[:3]
    rate = rates[0] if rates else None
    at = f" (learning rate {rate:.2g})" if rate else ""
    bad = next((i for i, value in enumerate(loss) if not np.isfinite(value)), None)
    if bad is not None:
        return [f"Training loss became {loss[bad]} at epoch {bad + 1}{at}: the learning rate is far too high (or "
                "float16 overflowed). Lower it 10x, or find one with 'cnnkit lr-find' / --lr auto."]
    if len(first) < 3 or min(first[1:]) < first[0] * 0.98:
        return []
    rising = first[-1] > first[0] * 1.02
    if rate is not None and rate <= 1e-5:  # too small a step to make the loss rise: noise
        cause = "the learning rate is probably too low: try 10x higher"
    elif rising or (rate is not None and rate >= 1e-2):
        cause = "the learning rate is probably too high: try 10x lower"
    else:
        cause = "the learning rate may be too high or too low (or the data too hard for this model)"
    return [f"Training loss did not fall in the first {len(first)} epochs ({first[0]:.3f} -> {first[-1]:.3f}"
            f"{', rising' if rising else ''}){at}: {cause}, or run 'cnnkit lr-find' (--lr auto)."]
