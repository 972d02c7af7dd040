"""Scan stage: a folder of images -> an ``ImageFolder`` (files, labels, split, skipped files).

Two layouts are understood:

* ``root/train/<class>/...`` with optional ``root/validation/`` (or ``val/``) and ``root/test/``;
* ``root/<class>/...`` alone, split here.

Class names are the class folder names in natural order (``class2`` before ``class10``), the same
order everywhere and stored with the model. A split made here is stratified per class with a fixed
seed, never a slice of disk order, so a validation fraction of class-sorted data is still correct.
Nothing here opens an image: files that cannot be images (hidden files, other extensions) are
listed as skipped with a reason; undecodable ones are found by the decode stage.
"""

from __future__ import annotations

import glob
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}


@dataclass(frozen=True)
class ImageFile:
    """One image of the folder: its path, class index and split."""

    path: Path
    label: int
    split: str


@dataclass(frozen=True)
class SkippedFile:
    """A file that was left out, and why (in words a user can act on)."""

    path: Path
    reason: str


@dataclass
class ImageFolder:
    """The result of scanning: class names, labelled files per split, and what was skipped.

    Attributes:
        root: the folder given.
        class_names: class folder names, naturally sorted; ``label`` indexes into it.
        files: every image file, each with its label and split.
        skipped: files left out, with reasons.
        layout: "splits" (train/validation/test folders) or "classes" (class folders alone).
        split_source: for each split, "folder" (given on disk), "split" (made here) or "none".
        seed: the seed of the split made here.
    """

    root: Path
    class_names: list[str]
    files: list[ImageFile]
    skipped: list[SkippedFile] = field(default_factory=list)
    layout: str = "classes"
    split_source: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def split(self, name: str) -> list[ImageFile]:
        return [f for f in self.files if f.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class_name: count}}`` for every split that has files."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            counter = Counter(f.label for f in self.files if f.split == split)
            if counter:
                out[split] = {name: counter.get(i, 0) for i, name in enumerate(self.class_names)}
        return out


def natural_key(text: str) -> list[object]:
    """Sort key putting 'class2' before 'class10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(folder: Path, skipped: list[SkippedFile]) -> list[Path]:
    """Every candidate image below ``folder`` (recursively, sorted); others go to ``skipped``."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        hidden_dirs = [d for d in dirnames if _is_hidden(d)]
        for d in hidden_dirs:
            skipped.append(SkippedFile(Path(dirpath) / d, "hidden folder"))
        dirnames[:] = sorted((d for d in dirnames if not _is_hidden(d)), key=natural_key)
        for name in sorted(filenames, key=natural_key):
            path = Path(dirpath) / name
            if _is_hidden(name):
                reason = "hidden file (macOS resource fork)" if name.startswith("._") else "hidden file"
                skipped.append(SkippedFile(path, reason))
            elif not is_image_name(name):
                skipped.append(
                    SkippedFile(path, f"not an image extension (supported: {', '.join(IMAGE_EXTENSIONS)})")
                )
            else:
                found.append(path)
    return found


def _class_dirs(folder: Path, skipped: list[SkippedFile]) -> list[Path]:
    dirs = []
    for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if entry.is_dir():
            if _is_hidden(entry.name):
                skipped.append(SkippedFile(entry, "hidden folder"))
            else:
                dirs.append(entry)
        elif is_image_name(entry.name) and not _is_hidden(entry.name):
            skipped.append(SkippedFile(entry, f"image not inside a class folder of '{folder}'"))
        else:
            skipped.append(SkippedFile(entry, "not a class folder"))
    return dirs


def _scan_classes(folder: Path, skipped: list[SkippedFile]) -> dict[str, list[Path]]:
    """``{class_name: [paths]}`` for one folder of class folders."""
    dirs = _class_dirs(folder, skipped)
    if not dirs:
        raise DataError(
            f"Found no class folders in '{folder}'. Put one sub-folder per class, "
            f"e.g. '{folder}/cat/001.jpg' and '{folder}/dog/001.jpg'."
        )
    return {d.name: _walk_files(d, skipped) for d in dirs}


def _find_split_folders(root: Path) -> dict[str, Path]:
    """train/validation/test folders that hold class folders (a class named 'train' holding images is a class)."""
    found: dict[str, Path] = {}
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for split, names in _SPLIT_FOLDERS.items():
        for name in names:
            if name in children and _looks_like_split(children[name]):
                found[split] = children[name]
                break
    return found


def _check_classes(per_class: dict[str, list[Path]], folder: Path) -> None:
    empty = [name for name, paths in per_class.items() if not paths]
    if empty:
        where = ", ".join(f"'{folder / name}'" for name in empty)
        raise DataError(
            f"Class folder {where} has no images. Add images (supported: {', '.join(IMAGE_EXTENSIONS)}) "
            "or remove the folder."
        )
    if len(per_class) < 2:
        only = next(iter(per_class), "")
        raise DataError(
            f"Found a single class ('{only}') in '{folder}': a classifier needs at least 2 classes. "
            f"Add a folder per class, e.g. '{folder}/other/'."
        )


def stratified_split(
    labels: np.ndarray, fractions: dict[str, float], seed: int
) -> np.ndarray:
    """Assign each index a split name, stratified per class, with a fixed seed.

    Each class keeps at least one training image; a split with a non-zero fraction gets at least
    one image of every class that has 3 or more.
    """
    rng = np.random.default_rng(seed)
    assignment = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for split, fraction in fractions.items():
            if fraction <= 0:
                continue
            take = int(round(fraction * len(idx)))
            if take == 0 and len(idx) >= 3:
                take = 1
            take = min(take, len(idx) - start - 1)
            assignment[idx[start : start + take]] = split
            start += max(take, 0)
    return assignment


def scan_folder(
    root: str | Path, *, val_split: float | None = None, test_split: float = 0.0, seed: int = 1337, strict: bool = True
) -> ImageFolder:
    """Find the images, classes and splits of ``root``.

    Args:
        root: ``root/train/<class>/`` (+ optional validation/ or val/, test/) or ``root/<class>/``.
        val_split: fraction of each class held out for validation when there is no validation folder;
            ``None``: 20%, but at most ``AUTO_VAL_MAX_IMAGES`` images in all.
        test_split: fraction of each class held out for testing when there is no test folder.
        seed: seed of the stratified split.
        strict: raise on an empty class folder or a single class (``cnnkit doctor`` reports them instead).

    Returns:
        An ImageFolder.

    Raises:
        DataError: the folder is missing, empty, has an empty class folder or a single class, or
            a validation/test folder names a class that train lacks.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"Data folder '{root}' does not exist. Pass a folder with one sub-folder per class.")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file, not a folder. Pass a folder with one sub-folder per class.")
    skipped: list[SkippedFile] = []
    split_folders = _find_split_folders(root)
    if "train" in split_folders:
        layout = "splits"
        per_split = {s: _scan_classes(p, skipped) for s, p in split_folders.items()}
        if strict:
            _check_classes(per_split["train"], split_folders["train"])
        class_names = list(per_split["train"])
        for split, per_class in per_split.items():
            extra = sorted(set(per_class) - set(class_names))
            if extra:
                raise DataError(
                    f"'{split_folders[split]}' has class folders that '{split_folders['train']}' lacks: "
                    f"{', '.join(extra)}. Every class needs training images; rename or remove them."
                )
    elif split_folders and len(split_folders) == sum(1 for p in root.iterdir() if not _is_hidden(p.name)):
        raise DataError(
            f"'{root}' has {' and '.join(p.name + '/' for p in split_folders.values())} but no train/ folder. "
            f"Add '{root}/train/<class>/' or pass a folder of class folders."
        )
    else:
        layout = "classes"
        per_split = {"train": _scan_classes(root, skipped)}
        if strict:
            _check_classes(per_split["train"], root)
        class_names = list(per_split["train"])

    class_names = sorted(class_names, key=natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    files = [
        ImageFile(path, index[name], split)
        for split, per_class in per_split.items()
        for name in class_names
        for path in per_class.get(name, [])
    ]
    if not files and strict:
        raise DataError(f"Found 0 images under '{root}'. Supported: {', '.join(IMAGE_EXTENSIONS)}.")

    split_source = {s: ("folder" if s in per_split else "none") for s in SPLITS}
    if val_split is None:
        val_split = auto_val_split(sum(1 for f in files if f.split == "train"))
    fractions = {
        "validation": val_split if split_source["validation"] == "none" else 0.0,
        "test": test_split if split_source["test"] == "none" else 0.0,
    }
    if any(fractions.values()):
        train_idx = [i for i, f in enumerate(files) if f.split == "train"]
        labels = np.array([files[i].label for i in train_idx])
        assigned = stratified_split(labels, fractions, seed)
        for i, split in zip(train_idx, assigned):
            if split != "train":
                files[i] = ImageFile(files[i].path, files[i].label, str(split))
        for split, fraction in fractions.items():
            if fraction > 0:
                split_source[split] = "split"
    return ImageFolder(root, class_names, files, skipped, layout, split_source, seed)


# The automatic validation split: 20% of the training folder, but no more than this many images.
# 5,000 images measure accuracy to about +-1.2% (95%); beyond that, images are better spent on training.
AUTO_VAL_SPLIT = 0.2
AUTO_VAL_MAX_IMAGES = 5000


def auto_val_split(num_train: int) -> float:
    """The validation fraction used when none is given: 20%, capped at 5,000 images."""
    if num_train <= 0:
        return AUTO_VAL_SPLIT
    return min(AUTO_VAL_SPLIT, AUTO_VAL_MAX_IMAGES / num_train)


def _looks_like_split(path: Path) -> bool:
    """A train/, val/ or test/ folder holding class folders and no images of its own (not a class named 'test')."""
    children = list(path.iterdir())
    return any(c.is_dir() and not _is_hidden(c.name) for c in children) and not any(
        c.is_file() and is_image_name(c.name) and not _is_hidden(c.name) for c in children)


def expand_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[SkippedFile]]:
    """Images named by files, folders (recursive) and glob patterns, in the order given.

    Returns the image paths and the inputs that were left out (missing, not an image name).
    """
    paths: list[Path] = []
    skipped: list[SkippedFile] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(_walk_files(p, skipped))
        elif p.is_file():
            if _is_hidden(p.name):
                skipped.append(SkippedFile(p, "hidden file"))
            else:
                paths.append(p)  # an explicitly named file is tried whatever its extension
        elif glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True), key=natural_key)
            if not matches:
                skipped.append(SkippedFile(p, "no such file or folder (as a glob pattern it matched nothing)"))
            for m in matches:
                sub, sub_skipped = expand_inputs([m])
                paths.extend(sub)
                skipped.extend(sub_skipped)
        else:
            skipped.append(SkippedFile(p, "no such file or folder"))
    return paths, skipped
