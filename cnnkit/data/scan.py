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

from cnnkit.data.builtin import builtin_names, data_folder
from cnnkit.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# The split folders people name (tutorials, Kaggle, university course sets), matched case-insensitively.
SPLIT_FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training", "training_set", "train_set", "trainset"),
    "validation": ("validation", "val", "valid", "validation_set", "val_set", "dev"),
    "test": ("test", "testing", "test_set", "testset", "eval", "evaluation"),
}


@dataclass(frozen=True)
class ImageFile:
    """One image of the folder: its path, class index and split."""

    path: Path
    label: int
    split: str


@dataclass(frozen=True)
class SkippedFile:
    """A file or folder that was left out, and why (in words a user can act on).

    Attributes:
        path: as found under the data folder.
        reason: why it was left out, and what to do about it.
        kind: a short category: "hidden", "not-image", "stray", "link-outside", "link-loop",
            "link-duplicate", "link-other-class", "link-broken", "unreadable", "decode".
    """

    path: Path
    reason: str
    kind: str = "other"


LINK_KINDS = ("link-outside", "link-loop", "link-duplicate", "link-other-class", "link-broken")


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
        split_folders: split name -> the folder it was read from (the "splits" layout).
        links_followed: symbolic links inside the data folder that were followed.
        nested: why the layout looks one level too deep, and what to pass instead (None: it does not).
        problems: what ``strict=False`` let through instead of raising (a nested layout, classes
            missing from train), in words.
    """

    root: Path
    class_names: list[str]
    files: list[ImageFile]
    skipped: list[SkippedFile] = field(default_factory=list)
    layout: str = "classes"
    split_source: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    split_folders: dict[str, Path] = field(default_factory=dict)
    links_followed: int = 0
    nested: str | None = None
    problems: list[str] = field(default_factory=list)

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


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class _Found:
    path: Path          # as reached under the data folder
    real: str           # its real path (links resolved)
    via_link: bool      # reached through a symbolic link (of the file or of a folder above it)
    owner: tuple[str, str] | None  # (split, class) whose folder really holds it


class _Walker:
    """Walks class folders safely: every real folder once, links only inside the data folder (or when
    asked), loops and second paths to the same file listed as skipped, never followed or counted twice.

    Keras's ``image_dataset_from_directory`` does not follow links by default; cnnkit follows the
    ones that stay inside the data folder (synced and hand-arranged folders use them) and lists the
    others with the reason.
    """

    def __init__(self, root: Path, follow_links: bool, skipped: list[SkippedFile]) -> None:
        self.root, self.root_real = root, os.path.realpath(root)
        self.follow_links, self.skipped = follow_links, skipped
        self.owners: dict[str, tuple[str, str]] = {}   # real class folder -> (split, class)
        self.visited: dict[str, Path] = {}              # real folder -> the path it was first walked as
        self.links_followed = 0

    def register(self, folder: Path, split: str, name: str) -> None:
        self.owners[os.path.realpath(folder)] = (split, name)

    def owner_of(self, real: str) -> tuple[str, str] | None:
        best = None
        for folder, owner in self.owners.items():
            if _inside(real, folder) and (best is None or len(folder) > len(best[0])):
                best = (folder, owner)
        return best[1] if best else None

    def _link_allowed(self, path: Path, real: str) -> bool:
        if not os.path.exists(real):
            self.skipped.append(SkippedFile(path, f"broken link (its target '{os.readlink(path)}' does not exist)",
                                            "link-broken"))
            return False
        if not _inside(real, self.root_real) and not self.follow_links:
            self.skipped.append(SkippedFile(
                path, f"link to '{real}', outside the data folder: not followed (pass --follow-links to use it, "
                      "or copy the files in)", "link-outside"))
            return False
        self.links_followed += 1
        return True

    def walk(self, folder: Path, key: tuple[str, str] = ("", ""), via_link: bool = False,
             ancestors: tuple[str, ...] = ()) -> list[_Found]:
        """Candidate images below the class folder ``folder`` of ``key`` (recursively, in natural order).

        The rest goes to ``skipped``: hidden and non-image files, and folders that must not be
        walked from here: a loop back to a folder above, the data folder itself, another class's
        folder, or a folder already walked.
        """
        real = os.path.realpath(folder)
        refusal = self._refuse_folder(folder, real, key, ancestors)
        if refusal is not None:
            self.skipped.append(refusal)
            return []
        self.visited[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
        except OSError as exc:
            self.skipped.append(SkippedFile(folder, f"cannot list the folder ({exc.strerror})", "unreadable"))
            return []
        found: list[_Found] = []
        for entry in entries:
            path = Path(entry.path)  # folder/name, parsed once
            if _is_hidden(entry.name):
                reason = ("hidden file (macOS resource fork)" if entry.name.startswith("._") else
                          "hidden folder" if entry.is_dir() else "hidden file")
                self.skipped.append(SkippedFile(path, reason, "hidden"))
                continue
            link = entry.is_symlink()
            if link:
                target = os.path.realpath(path)
                if not self._link_allowed(path, target):
                    continue
                is_dir = os.path.isdir(target)
            else:  # not a link: its real path is its real folder's plus its name (no lstat per part)
                target = os.path.join(real, entry.name)
                is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir:
                found += self.walk(path, key, via_link or link, ancestors + (real,))
            elif not is_image_name(entry.name):
                self.skipped.append(SkippedFile(
                    path, f"not an image extension (supported: {', '.join(IMAGE_EXTENSIONS)})", "not-image"))
            else:
                found.append(_Found(path, target, via_link or link, self.owner_of(target)))
        return found

    def _refuse_folder(self, folder: Path, real: str, key: tuple[str, str], ancestors: tuple[str, ...]) -> SkippedFile | None:
        """Why the folder ``folder`` (real path ``real``) is not walked as part of ``key``'s class, or None."""
        if real in ancestors:
            return SkippedFile(folder, f"link loop: leads back to '{self.visited.get(real, real)}', which contains it; "
                                       "not followed", "link-loop")
        if ancestors and (real == self.root_real or any(_inside(owned, real) and owned != real for owned in self.owners)):
            return SkippedFile(folder, f"link loop: leads back to '{real}', which holds the class folders; not "
                                       "followed", "link-loop")
        owner = self.owner_of(real)
        if owner is not None and owner != key:
            return SkippedFile(folder, f"a link to the folder of {_where(owner)} ('{real}'): its images are counted "
                                       f"there, never also under {_where(key)}", "link-other-class")
        if real in self.visited:
            return SkippedFile(folder, f"the same folder as '{self.visited[real]}' (reached again through a link); "
                                       "its images are counted once", "link-duplicate")
        return None

    def claim(self, found: dict[tuple[str, str], list[_Found]]) -> dict[tuple[str, str], list[Path]]:
        """Each real file counted once, under the class folder that really holds it.

        A file reached twice (a link beside its target, two links to one folder) is kept where it
        really lives; a link from one class (or split) into another's folder is skipped, so no image
        is ever learnt under two labels, or both trained and tested on.
        """
        reached: dict[str, list[tuple[tuple[str, str], _Found]]] = {}
        for key, items in found.items():
            for item in items:
                reached.setdefault(item.real, []).append((key, item))
        out: dict[tuple[str, str], list[Path]] = {key: [] for key in found}
        for real, candidates in reached.items():
            # where it lives, reached directly > where it lives > reached directly > first found
            key, item = min(candidates, key=lambda c: (c[1].owner not in (None, c[0]), c[1].via_link))
            counted = item.owner in (None, key)  # else only reached from another class's folder: not counted
            if counted:
                out[key].append(item.path)
            home = key if counted else item.owner
            for other_key, other in candidates:
                if counted and other is item:
                    continue
                if counted and other_key == key:
                    reason, kind = f"the same file as '{item.path}' (reached again through a link); counted once", \
                        "link-duplicate"
                else:
                    reason, kind = (f"a link to an image of {_where(home)} ('{real}'): an image is counted once, "
                                    f"under its own class, never also under {_where(other_key)}"), "link-other-class"
                self.skipped.append(SkippedFile(other.path, reason, kind))
        for key in out:
            out[key].sort(key=lambda p: natural_key(str(p)))
        return out


def _where(key: tuple[str, str]) -> str:
    split, name = key
    return f"class '{name}'" + (f" in {split}/" if split != "train" else "")


def _class_dirs(folder: Path, skipped: list[SkippedFile]) -> list[Path]:
    dirs = []
    for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if _is_hidden(entry.name):
            skipped.append(SkippedFile(entry, "hidden folder" if entry.is_dir() else "hidden file", "hidden"))
        elif entry.is_dir():
            dirs.append(entry)
        elif is_image_name(entry.name):
            skipped.append(SkippedFile(entry, f"image not inside a class folder of '{folder}'", "stray"))
        else:
            skipped.append(SkippedFile(entry, "not a class folder", "stray"))
    return dirs


def _scan_classes(folder: Path, split: str, walker: _Walker) -> dict[str, list[_Found]]:
    """``{class_name: [candidates]}`` for one folder of class folders."""
    dirs = _class_dirs(folder, walker.skipped)
    if not dirs:
        raise DataError(
            f"Found no class folders in '{folder}'. Put one sub-folder per class, "
            f"e.g. '{folder}/cat/001.jpg' and '{folder}/dog/001.jpg'."
        )
    for d in dirs:
        walker.register(d, split, d.name)
    return {d.name: walker.walk(d, (split, d.name)) for d in dirs}


def _find_split_folders(root: Path) -> dict[str, Path]:
    """train/validation/test folders (by any of their usual names) that hold class folders.

    A class named 'train' holding images is a class, not a split.
    """
    found: dict[str, Path] = {}
    children = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir() and not _is_hidden(p.name)}
    for split, names in SPLIT_FOLDER_NAMES.items():
        for name in names:
            if name in children and _looks_like_split(children[name]):
                found[split] = children[name]
                break
    return found


def _check_classes(per_class: dict[str, list[Path]], folder: Path, min_classes: int = 2) -> None:
    empty = [name for name, paths in per_class.items() if not paths]
    if empty:
        where = ", ".join(f"'{folder / name}'" for name in empty)
        raise DataError(
            f"Class folder {where} has no images. Add images (supported: {', '.join(IMAGE_EXTENSIONS)}) "
            "or remove the folder."
        )
    if len(per_class) < min_classes:
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
    root: str | Path, *, val_split: float | None = None, test_split: float = 0.0, seed: int = 1337,
    strict: bool = True, follow_links: bool = False, min_classes: int = 2,
) -> ImageFolder:
    """Find the images, classes and splits of ``root``.

    Args:
        root: ``root/train/<class>/`` (+ optional validation/ or val/, test/; any of the names in
            ``SPLIT_FOLDER_NAMES``, e.g. ``training_set/`` and ``test_set/``) or ``root/<class>/``.
        val_split: fraction of each class held out for validation when there is no validation folder;
            ``None``: 20%, but at most ``AUTO_VAL_MAX_IMAGES`` images in all.
        test_split: fraction of each class held out for testing when there is no test folder.
        seed: seed of the stratified split.
        min_classes: fewer class folders is an error under ``strict`` (1 to score a trained model on
            one class's images, as ``cnnkit evaluate`` does).
        strict: raise on an empty class folder, a single class or a nested layout (``cnnkit doctor``
            reports them instead).
        follow_links: also follow symbolic links that leave ``root`` (links inside it are always
            followed; loops and second paths to one file never are).

    Returns:
        An ImageFolder.

    Raises:
        DataError: the folder is missing, empty, nested one level too deep, has an empty class
            folder or a single class, or a validation/test folder names a class that train lacks.
    """
    root = data_folder(root)  # a built-in set's name (cifar10): its folder, written on first use
    if not root.exists():
        named = f" or a built-in dataset's name ({builtin_names()})" if len(root.parts) == 1 else ""
        raise DataError(f"Data folder '{root}' does not exist. Pass a folder with one sub-folder per class{named}.")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file, not a folder. Pass a folder with one sub-folder per class.")
    walker = _Walker(root, follow_links, [])
    split_folders = _find_split_folders(root)
    if split_folders and "train" not in split_folders and len(split_folders) == len(_visible(root)):
        names = " and ".join(p.name + "/" for p in split_folders.values())
        raise DataError(f"'{root}' has {names} but no training folder. Add '{root}/train/<class>/' (or training/, "
                        "training_set/) or pass a folder of class folders.")
    layout = "splits" if "train" in split_folders else "classes"
    sources = split_folders if layout == "splits" else {"train": root}
    nested = None
    for split, folder in sources.items():
        nested = nested or _nested_hint(folder, root, layout)
    if nested and strict:
        raise DataError(nested)
    found = {(split, name): items for split, folder in sources.items()
             for name, items in _scan_classes(folder, split, walker).items()}
    per_split: dict[str, dict[str, list[Path]]] = {}
    for (split, name), paths in walker.claim(found).items():
        per_split.setdefault(split, {})[name] = paths
    class_names = list(per_split["train"])
    if strict:
        _check_classes(per_split["train"], sources["train"], min_classes)
    problems = [nested] if nested else []
    for split, per_class in per_split.items():
        extra = sorted(set(per_class) - set(class_names))
        if extra:
            message = (f"'{sources[split]}' has class folders that '{sources['train']}' lacks: {', '.join(extra)}. "
                       "Every class needs training images; rename or remove them.")
            if strict:
                raise DataError(message)
            problems.append(message)
            for name in extra:
                del per_class[name]
    class_names = sorted(class_names, key=natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    files = [ImageFile(path, index[name], split) for split, per_class in per_split.items()
             for name in class_names for path in per_class.get(name, [])]
    if not files and strict:
        raise DataError(f"Found 0 images under '{root}'. Supported: {', '.join(IMAGE_EXTENSIONS)}.")
    split_source = {s: ("folder" if s in per_split else "none") for s in SPLITS}
    _split_here(files, split_source, val_split, test_split, seed)
    return ImageFolder(root, class_names, files, walker.skipped, layout, split_source, seed,
                       dict(split_folders), walker.links_followed, nested, problems)


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not _is_hidden(p.name)]


def _split_here(files: list[ImageFile], split_source: dict[str, str], val_split: float | None, test_split: float,
                seed: int) -> None:
    """Hold out validation and test images from train (stratified, seeded) where no folder gives them."""
    if val_split is None:
        val_split = auto_val_split(sum(1 for f in files if f.split == "train"))
    fractions = {
        "validation": val_split if split_source["validation"] == "none" else 0.0,
        "test": test_split if split_source["test"] == "none" else 0.0,
    }
    if not any(fractions.values()):
        return
    train_idx = [i for i, f in enumerate(files) if f.split == "train"]
    labels = np.array([files[i].label for i in train_idx])
    for i, split in zip(train_idx, stratified_split(labels, fractions, seed)):
        if split != "train":
            files[i] = ImageFile(files[i].path, files[i].label, str(split))
    for split, fraction in fractions.items():
        if fraction > 0:
            split_source[split] = "split"


def _nested_hint(folder: Path, root: Path, layout: str) -> str | None:
    """What to pass instead when the class folders of ``folder`` hold no images, only class-like folders.

    That is a layout one level too deep: one folder wrapping the classes (``data/<class>/``), or
    split folders under names cnnkit does not know (``part1/<class>/``, ``part2/<class>/``).
    """
    dirs = sorted((d for d in _visible(folder) if d.is_dir()), key=lambda d: natural_key(d.name))
    if not dirs or any(_has_images(d) for d in dirs):
        return None
    inner = [sorted((c.name for c in _visible(d) if c.is_dir()), key=natural_key) for d in dirs]
    if not all(inner) or (len(dirs) > 1 and (any(names != inner[0] for names in inner) or len(inner[0]) < 2)):
        return None
    where = f"'{folder}'" + ("" if layout == "classes" else f" (the {folder.name}/ split of '{root}')")
    if len(dirs) == 1:
        return (f"{where} holds a single folder, '{dirs[0].name}', whose sub-folders look like the classes "
                f"({', '.join(inner[0][:6])}): the layout is nested one level too deep. Pass the folder that holds "
                f"the class folders: cnnkit train '{dirs[0]}'"
                + ("" if layout == "classes" else f", or move the class folders up into '{folder}'") + ".")
    return (f"{where} holds the folders {', '.join(d.name for d in dirs)}, each with the same sub-folders "
            f"({', '.join(inner[0][:6])}) and no images of their own: they look like splits under names cnnkit "
            f"does not know, not classes. Rename them train/ and test/ (or validation/), or pass one of them: "
            f"cnnkit train '{dirs[0]}'.")


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and is_image_name(p.name) for p in _visible(folder))


# The automatic validation split: 20% of the training folder, but no more than this many images.
# 5,000 images measure accuracy to about +-1.2% (95%); beyond that, images are better spent on training.
def typical_image_size(root: Path, sample: int = 32) -> tuple[int, int] | None:
    """The median (height, width) of up to ``sample`` images of the folder, from their headers only.

    Images are taken a few per class folder (of ``train/`` when the folder is split), so one odd
    class does not decide; None when no image can be read. Only headers are read: milliseconds.
    """
    from PIL import Image

    root = Path(root)
    try:
        split = _find_split_folders(root).get("train", root)
        classes = [p for p in sorted(split.iterdir(), key=lambda p: natural_key(p.name))
                   if p.is_dir() and not p.is_symlink() and not _is_hidden(p.name)]
    except OSError:
        return None
    per_class = max(1, sample // max(len(classes), 1))
    sizes: list[tuple[int, int]] = []
    for folder in classes[:sample]:
        try:
            names = sorted((n for n in os.listdir(folder) if is_image_name(n)), key=natural_key)[:per_class]
        except OSError:
            continue
        for name in names:
            try:
                with Image.open(folder / name) as image:
                    sizes.append((image.height, image.width))
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
    if not sizes:
        return None
    heights, widths = sorted(h for h, _ in sizes), sorted(w for _, w in sizes)
    return heights[len(heights) // 2], widths[len(widths) // 2]


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

    Folders are walked as the data folder is: links inside them followed, loops and second paths to
    one file skipped. Returns the image paths and the inputs that were left out (missing, not an
    image name, hidden).
    """
    paths: list[Path] = []
    skipped: list[SkippedFile] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            walker = _Walker(p, False, skipped)
            found = {("", ""): walker.walk(p)}
            paths.extend(walker.claim(found)[("", "")])
        elif p.is_file():
            if _is_hidden(p.name):
                skipped.append(SkippedFile(p, "hidden file", "hidden"))
            else:
                paths.append(p)  # an explicitly named file is tried whatever its extension
        elif glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True), key=natural_key)
            if not matches:
                skipped.append(SkippedFile(p, "no such file or folder (as a glob pattern it matched nothing)", "missing"))
            for m in matches:
                sub, sub_skipped = expand_inputs([m])
                paths.extend(sub)
                skipped.extend(sub_skipped)
        elif p.is_symlink():
            skipped.append(SkippedFile(p, f"broken link (its target '{os.readlink(p)}' does not exist)", "link-broken"))
        else:
            skipped.append(SkippedFile(p, "no such file or folder", "missing"))
    return paths, skipped
