"""The data stage end to end: scan a folder, hash and decode it into the cache, list what was skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.config import DataConfig
from cnnkit.data.cache import ImageCache, build_cache
from cnnkit.data.scan import ImageFile, ImageFolder, SkippedFile, scan_folder
from cnnkit.errors import DataError
from cnnkit.rundir import SplitRow, write_rows


@dataclass
class LoadedData:
    """A scanned and decoded folder, ready for batching.

    Attributes:
        folder: what the scan found (classes, splits, files skipped by name).
        cache: the decoded uint8 images.
        files: the usable images (decoded), each with label and split.
        rows: ``rows[i]`` is the cache row of ``files[i]``.
        digests: ``digests[i]`` is the SHA-256 of ``files[i]``.
        skipped: every file left out, by the scan (hidden, not an image) or the decoder (corrupt...).
    """

    folder: ImageFolder
    cache: ImageCache
    files: list[ImageFile]
    rows: np.ndarray
    digests: list[str]
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return self.folder.class_names

    @property
    def data_hash(self) -> str:
        return self.cache.data_hash

    def split_rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Cache rows and labels of one split's usable images."""
        idx = [i for i, f in enumerate(self.files) if f.split == split]
        return self.rows[idx], np.array([self.files[i].label for i in idx], dtype=np.int64)

    def split_sizes(self) -> dict[str, int]:
        return {s: sum(1 for f in self.files if f.split == s) for s in ("train", "validation", "test")}

    def class_counts(self, split: str) -> dict[str, int]:
        counts = np.bincount([f.label for f in self.files if f.split == split], minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist()))


def load_image_folder(
    root: str | Path, config: DataConfig | None = None, image_size: tuple[int, int] | None = None,
    cache_root: Path | None = None,
) -> LoadedData:
    """Scan ``root``, decode every image once into the cache, and return the usable files.

    Args:
        root: a folder of class folders, or of train/ (validation/, test/) folders.
        config: data settings (split fractions, seed, colour mode, resize mode, ...).
        image_size: (height, width); overrides ``config.image_size`` (one of them must be set).
        cache_root: where decoded caches live (default ``$CNNKIT_HOME/cache``).

    Raises:
        DataError: the folder is unusable, or a class has no decodable image left.
    """
    config = config or DataConfig()
    size = image_size or config.image_size
    if size is None:
        raise DataError("load_image_folder needs an image_size (height, width). Received: image_size=None")
    folder = scan_folder(root, val_split=config.val_split, test_split=config.test_split, seed=config.seed,
                         follow_links=config.follow_links)
    paths = [f.path for f in folder.files]
    keys = [folder.class_names[f.label] for f in folder.files]
    cache, rows, digests = build_cache(
        paths, keys, tuple(size), config.color_mode, config.resize_mode, config.max_pixels,
        cache_root=cache_root, workers=config.workers,
    )
    keep = [i for i in range(len(paths)) if cache.ok[rows[i]]]
    skipped = list(folder.skipped) + [
        SkippedFile(paths[i], cache.reasons.get(int(rows[i]), "could not be decoded"))
        for i in range(len(paths)) if not cache.ok[rows[i]]
    ]
    files = [folder.files[i] for i in keep]
    data = LoadedData(folder, cache, files, rows[keep], [digests[i] for i in keep], skipped)
    _check_usable(data)
    return data


def describe_skipped(skipped: list[SkippedFile], limit: int = 3) -> str:
    """'a.jpg: truncated file; b.png: empty file (0 bytes); ... and 7 more' for error messages."""
    listed = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:limit])
    return listed + (f"; ... and {len(skipped) - limit} more" if len(skipped) > limit else "")


def _check_usable(data: LoadedData) -> None:
    train_counts = data.class_counts("train")
    empty = [name for name, n in train_counts.items() if n == 0]
    if empty:
        broken = [s for s in data.skipped if s.path.parent.name in empty or any(n in s.path.parts for n in empty)]
        raise DataError(
            f"No usable training image left in class {', '.join(repr(n) for n in empty)} of "
            f"'{data.folder.root}': every file there was skipped ({describe_skipped(broken)}). "
            f"Replace the broken files or remove the class; 'cnnkit doctor {data.folder.root}' lists every problem."
        )


def write_skipped_csv(skipped: list[SkippedFile], path: Path) -> None:
    """``path,reason`` per skipped file (header always written, so an empty file means none)."""
    write_rows(path, ["path", "reason"], [[str(s.path.absolute()), s.reason] for s in skipped])


def split_rows(data: LoadedData) -> list[SplitRow]:
    """The split actually used, one row per usable image (what ``split.csv`` holds)."""
    return [SplitRow(f.path.absolute(), data.class_names[f.label], f.split, d) for f, d in zip(data.files, data.digests)]
