"""Cache stage: decode every image once, in worker processes, to a uint8 array on disk.

The cache is a memory-mapped ``(N, height, width, channels)`` uint8 ``.npy`` file, so a dataset
larger than RAM still trains (the OS pages it in). Its key, the **data hash**, is a SHA-256 over the
decoder version, the image size, colour mode, resize mode and pixel limit, and every image's class
name and content hash (SHA-256 of its bytes), sorted; it does not depend on paths or on the split,
so a moved folder or a new validation seed reuses it, while an edited, added, removed or
relabelled image makes a new one. A second run on the same data skips decoding entirely.

Layout: ``<cache_root>/<data_hash>/{images.npy, ok.npy, meta.json}``; written in a temporary
folder and renamed, so a crash never leaves a half-written cache that a later run would trust.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit._progress import progress_task
from cnnkit._rundir import make_public
from cnnkit.data._pool import process_pool
from cnnkit.data.decode import DECODER_VERSION, DecodeError, load_image

_CHUNK = 256  # images per worker task: big enough to amortise IPC, small enough for a smooth bar
_MIN_FOR_PROCESSES = 1000  # below this, starting worker processes costs more than it saves


@dataclass
class ImageCache:
    """Decoded images on disk.

    Attributes:
        path: the cache folder.
        images: read-only memmap, (N, height, width, channels) uint8, rows in cache order.
        ok: (N,) bool; False where the file could not be decoded (its row is zeros).
        reasons: row -> why it could not be decoded.
        data_hash: the cache key (see the module docstring).
        decoded: number of images decoded by this call (0 when the cache was reused).
    """

    path: Path
    images: np.ndarray
    ok: np.ndarray
    reasons: dict[int, str]
    data_hash: str
    decoded: int


def default_cache_root() -> Path:
    """``$CNNKIT_HOME/cache`` (``CNNKIT_HOME`` defaults to ``~/.cnnkit``)."""
    home = os.environ.get("CNNKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cnnkit")
    return Path(home) / "cache"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes; an unreadable file hashes its path, so it still gets a stable key."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return hashlib.sha256(b"unreadable:" + str(path).encode()).hexdigest()


def hash_files(paths: list[Path], description: str = "Hashing") -> list[str]:
    """SHA-256 of many files, read on a few threads (hashlib and file reads release the GIL)."""
    out: list[str] = [""] * len(paths)
    with progress_task(description, len(paths)) as advance, concurrent.futures.ThreadPoolExecutor(8) as pool:
        for i, digest in enumerate(pool.map(file_sha256, paths, chunksize=64)):
            out[i] = digest
            if i % 256 == 255 or i == len(paths) - 1:
                advance(256 if i % 256 == 255 else (i % 256) + 1)
    return out


def compute_data_hash(
    class_keys: list[str], digests: list[str], image_size: tuple[int, int], color_mode: str,
    resize_mode: str, max_pixels: int,
) -> tuple[str, np.ndarray]:
    """The data hash, and the cache order (a permutation of the inputs)."""
    order = np.array(sorted(range(len(digests)), key=lambda i: (class_keys[i], digests[i])), dtype=np.int64)
    h = hashlib.sha256()
    h.update(f"cnnkit-cache v{DECODER_VERSION} {image_size} {color_mode} {resize_mode} {max_pixels}\n".encode())
    for i in order:
        h.update(f"{class_keys[i]}\t{digests[i]}\n".encode())
    return h.hexdigest(), order


def _decode_rows(
    images_file: str, rows: list[int], paths: list[str], image_size: tuple[int, int], color_mode: str,
    resize_mode: str, max_pixels: int,
) -> list[tuple[int, str]]:
    """Worker: decode ``paths`` into ``rows`` of the memmap; returns (row, reason) for failures."""
    images = np.load(images_file, mmap_mode="r+")
    failures = []
    for row, path in zip(rows, paths):
        try:
            images[row] = load_image(path, image_size, color_mode, resize_mode, max_pixels)
        except DecodeError as exc:
            failures.append((row, exc.reason))
    images.flush()
    return failures


def _open_cache(folder: Path, data_hash: str, decoded: int) -> ImageCache:
    meta = json.loads((folder / "meta.json").read_text())
    return ImageCache(
        path=folder,
        images=np.load(folder / "images.npy", mmap_mode="r"),
        ok=np.load(folder / "ok.npy"),
        reasons={int(k): v for k, v in meta["reasons"].items()},
        data_hash=data_hash,
        decoded=decoded,
    )


def build_cache(
    paths: list[Path],
    class_keys: list[str],
    image_size: tuple[int, int],
    color_mode: str = "rgb",
    resize_mode: str = "stretch",
    max_pixels: int = 80_000_000,
    cache_root: Path | None = None,
    workers: int | None = None,
    digests: list[str] | None = None,
) -> tuple[ImageCache, np.ndarray]:
    """Decode ``paths`` into a cache (or reuse the one with the same data hash).

    Args:
        paths: image files.
        class_keys: each file's class name (part of the data hash; "" when unlabelled).
        image_size, color_mode, resize_mode, max_pixels: as ``load_image`` takes them.
        cache_root: where caches live (default ``$CNNKIT_HOME/cache``).
        workers: decode processes (default: every core).
        digests: the files' SHA-256, if already computed.

    Returns:
        The cache, and ``rows``: ``rows[i]`` is the cache row of ``paths[i]``.
    """
    digests = digests if digests is not None else hash_files(paths)
    data_hash, order = compute_data_hash(class_keys, digests, image_size, color_mode, resize_mode, max_pixels)
    rows = np.empty(len(paths), dtype=np.int64)
    rows[order] = np.arange(len(paths))
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / data_hash
    if (folder / "meta.json").exists():
        return _open_cache(folder, data_hash, decoded=0), rows

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_hash[:12]}-", dir=root))
    make_public(tmp, directory=True)
    try:
        channels = 3 if color_mode == "rgb" else 1
        shape = (len(paths), image_size[0], image_size[1], channels)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        del images  # workers open it themselves
        ordered_paths = [str(paths[i]) for i in order]
        failures = _decode_all(str(tmp / "images.npy"), ordered_paths, image_size, color_mode, resize_mode,
                               max_pixels, workers)
        ok = np.ones(len(paths), dtype=bool)
        for row, _ in failures:
            ok[row] = False
        np.save(tmp / "ok.npy", ok)
        meta = {
            "data_hash": data_hash, "shape": shape, "decoder_version": DECODER_VERSION,
            "image_size": image_size, "color_mode": color_mode, "resize_mode": resize_mode,
            "reasons": {str(row): reason for row, reason in failures},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open_cache(folder, data_hash, decoded=len(paths)), rows


def _decode_all(
    images_file: str, paths: list[str], image_size: tuple[int, int], color_mode: str, resize_mode: str,
    max_pixels: int, workers: int | None,
) -> list[tuple[int, str]]:
    workers = workers or os.cpu_count() or 1
    chunks = [list(range(s, min(s + _CHUNK, len(paths)))) for s in range(0, len(paths), _CHUNK)]
    failures: list[tuple[int, str]] = []
    args = (image_size, color_mode, resize_mode, max_pixels)
    with progress_task("Decoding images", len(paths)) as advance:
        if workers == 1 or len(paths) < _MIN_FOR_PROCESSES:
            for rows in chunks:
                failures += _decode_rows(images_file, rows, [paths[r] for r in rows], *args)
                advance(len(rows))
            return failures
        with process_pool(workers) as pool:
            futures = {
                pool.submit(_decode_rows, images_file, rows, [paths[r] for r in rows], *args): len(rows)
                for rows in chunks
            }
            for future in concurrent.futures.as_completed(futures):
                failures += future.result()
                advance(futures[future])
    return sorted(failures)
