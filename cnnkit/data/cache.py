"""Cache stage: decode every image once, in worker processes, to a uint8 array on disk.

The cache is a memory-mapped ``(N, height, width, channels)`` uint8 ``.npy`` file, so a dataset
larger than RAM still trains (the OS pages it in). Its key, the **data hash**, is a SHA-256 over the
decoder version, the image size, colour mode, resize mode and pixel limit, and every image's class
name and content hash (SHA-256 of its bytes), sorted: it does not depend on paths or on the split,
so a moved folder or a new validation seed reuses it, while an edited, added, removed or
relabelled image makes a new one.

Each file is read once: a worker reads the bytes, hashes them and decodes them in the same pass.
The content hashes are remembered in ``<cache_root>/hashes.sqlite`` by (path, size, mtime), so a
second run on the same data only stats the files, finds the cache by its data hash and skips
decoding entirely.

Layout: ``<cache_root>/<data_hash>/{images.npy, ok.npy, meta.json}`` (``meta.json`` lists each
row's class and file hash); written in a temporary folder and renamed, so a crash never leaves a
half-written cache that a later run would trust. A build in progress holds a lock on its folder;
the folders of builds whose process died (killed mid-write) are removed by the next build.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit._progress import progress_task
from cnnkit.config import cnnkit_home
from cnnkit._backends.devices import usable_cpus
from cnnkit.data._pool import process_pool
from cnnkit.data.decode import DECODER_VERSION, DecodeError, load_image
from cnnkit.errors import CnnkitError
from cnnkit.rundir import hold_lock, lock_is_held, new_directory

# Bumped when the cache's files or meta.json change shape; part of the data hash, so an older
# cache is never opened by a newer cnnkit (it is rebuilt instead).
CACHE_FORMAT = 2
_CHUNK = 256  # images per worker task: big enough to amortise IPC, small enough for a smooth bar
# Below this many files and bytes, starting worker processes costs more than it saves.
_MIN_FOR_PROCESSES = 1000
_MIN_BYTES_FOR_PROCESSES = 32 * 1024**2


@dataclass
class ImageCache:
    """Decoded images on disk.

    Attributes:
        path: the cache folder.
        images: read-only memmap, (N, height, width, channels) uint8.
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
    return cnnkit_home() / "cache"


def _read(path: str | Path) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _digest(data: bytes | None, path: str | Path) -> str:
    """SHA-256 of a file's bytes; an unreadable file hashes its path, so it still gets a stable key."""
    return hashlib.sha256(data if data is not None else b"unreadable:" + os.fsencode(str(path))).hexdigest()


class _HashMemo:
    """Content hashes remembered by (path, size, mtime_ns): a warm run stats files instead of reading them.

    The same test ``make`` and ``rsync`` rely on; a file rewritten in place with the same size
    within one mtime tick would be missed, which no image workflow does.
    """

    def __init__(self, root: Path) -> None:
        self.file = root / "hashes.sqlite"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.file, timeout=30)
        # Paths are stored as their bytes: a file name need not be valid UTF-8 (os.fsencode).
        db.execute("CREATE TABLE IF NOT EXISTS file_hashes (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                   "sha256 TEXT)")
        return db

    @staticmethod
    def _stat(paths: list[str]) -> list[tuple[int, int] | None]:
        out: list[tuple[int, int] | None] = []
        for p in paths:
            try:
                st = os.stat(p)
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return out

    def lookup(self, paths: list[str]) -> list[str | None]:
        if not self.file.exists():
            return [None] * len(paths)
        paths = [os.path.abspath(p) for p in paths]
        stats = self._stat(paths)
        with self._connect() as db:
            known = {bytes(row[0]): row[1:] for row in db.execute("SELECT path, size, mtime_ns, sha256 FROM file_hashes")}
        found: list[str | None] = []
        for p, st in zip(paths, stats):
            entry = known.get(os.fsencode(p))
            found.append(entry[2] if st is not None and entry is not None and tuple(entry[:2]) == st else None)
        return found

    def store(self, paths: list[str], digests: list[str]) -> None:
        paths = [os.path.abspath(p) for p in paths]
        stats = self._stat(paths)
        rows = [(os.fsencode(p), st[0], st[1], d) for p, st, d in zip(paths, stats, digests) if st is not None]
        try:
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error:  # a memo is an optimisation: never fail a run for it
            pass


def compute_data_hash(
    class_keys: list[str], digests: list[str], image_size: tuple[int, int], color_mode: str,
    resize_mode: str, max_pixels: int,
) -> str:
    """The data hash (see the module docstring); independent of the order of the files."""
    h = hashlib.sha256()
    h.update(f"cnnkit-cache f{CACHE_FORMAT} d{DECODER_VERSION} {tuple(image_size)} {color_mode} {resize_mode} "
             f"{max_pixels}\n".encode())
    for key, digest in sorted(zip(class_keys, digests)):
        h.update(f"{key}\t{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _decode_rows(
    images_file: str, rows: list[int], paths: list[str], image_size: tuple[int, int], color_mode: str,
    resize_mode: str, max_pixels: int,
) -> list[tuple[int, str, str | None]]:
    """Worker: read, hash and decode ``paths`` into ``rows`` of the memmap -> (row, sha256, failure reason)."""
    images = np.load(images_file, mmap_mode="r+")
    out = []
    for row, path in zip(rows, paths):
        data = _read(path)
        reason = None
        try:
            images[row] = load_image(data if data is not None else Path(path), image_size, color_mode,
                                     resize_mode, max_pixels, name=path)
        except DecodeError as exc:
            reason = exc.reason
        out.append((row, _digest(data, path), reason))
    images.flush()
    return out


def _open_cache(folder: Path, decoded: int) -> tuple[ImageCache, dict[str, int]] | None:
    """Open a finished cache; None when it is damaged or not of this format (then it is rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        ok = np.load(folder / "ok.npy")
        row_of = {key: row for row, key in enumerate(meta["row_keys"])}
        if tuple(images.shape) != tuple(meta["shape"]) or len(ok) != images.shape[0] or len(meta["row_keys"]) != len(ok):
            return None
        cache = ImageCache(folder, images, ok, {int(k): v for k, v in meta["reasons"].items()}, meta["data_hash"],
                           decoded)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cache, row_of


def build_cache(
    paths: list[Path],
    class_keys: list[str],
    image_size: tuple[int, int],
    color_mode: str = "rgb",
    resize_mode: str = "stretch",
    max_pixels: int = 80_000_000,
    cache_root: Path | None = None,
    workers: int | None = None,
) -> tuple[ImageCache, np.ndarray, list[str]]:
    """Decode ``paths`` into a cache, or reuse the one with the same data hash.

    Args:
        paths: image files.
        class_keys: each file's class name (part of the data hash; "" when unlabelled).
        image_size, color_mode, resize_mode, max_pixels: as ``load_image`` takes them.
        cache_root: where caches live (default ``$CNNKIT_HOME/cache``).
        workers: decode processes (default: one per CPU this process may use).

    Returns:
        The cache; ``rows`` (``rows[i]`` is the cache row of ``paths[i]``); and each file's SHA-256.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    names = [str(p) for p in paths]
    memo = _HashMemo(root)
    digests = memo.lookup(names)
    settings = (tuple(image_size), color_mode, resize_mode, max_pixels)
    if all(d is not None for d in digests):
        found = _reuse(root, names, class_keys, digests, settings)  # type: ignore[arg-type]
        if found is not None:
            return found

    _remove_abandoned_builds(root)
    tmp = new_directory(root, ".building-")
    lock = hold_lock(tmp / ".lock")  # released by the OS if this process is killed: the folder is then abandoned
    try:
        channels = 3 if color_mode == "rgb" else 1
        shape = (len(paths), image_size[0], image_size[1], channels)
        np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape).flush()
        results = _decode_all(str(tmp / "images.npy"), names, settings, workers)
        digests = [sha for _, sha, _ in results]
        memo.store(names, digests)
        data_hash = compute_data_hash(class_keys, digests, *settings)
        folder = root / data_hash
        if (folder / "meta.json").exists() and _open_cache(folder, 0) is None:
            shutil.rmtree(folder, ignore_errors=True)  # damaged: replace it with the one just decoded
        if not (folder / "meta.json").exists():
            ok = np.array([reason is None for _, _, reason in results], dtype=bool)
            np.save(tmp / "ok.npy", ok)
            meta = {"data_hash": data_hash, "shape": shape, "decoder_version": DECODER_VERSION,
                    "image_size": image_size, "color_mode": color_mode, "resize_mode": resize_mode,
                    "max_pixels": max_pixels, "row_keys": [f"{k}\t{d}" for k, d in zip(class_keys, digests)],
                    "reasons": {str(row): reason for row, _, reason in results if reason is not None}}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished the same cache first: use theirs
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.close()
    opened = _open_cache(folder, decoded=len(paths))
    if opened is None:
        raise CnnkitError(f"The decode cache '{folder}' could not be written or read back. Check free disk space "
                      f"and permissions under '{root}', or set CNNKIT_HOME to another folder.")
    cache, row_of = opened
    rows = np.array([row_of[f"{k}\t{d}"] for k, d in zip(class_keys, digests)], dtype=np.int64)
    return cache, rows, digests


def _remove_abandoned_builds(root: Path) -> None:
    """Half-written caches of processes that died (their lock is free): never read, removed."""
    for folder in root.glob(".building-*"):
        if not lock_is_held(folder / ".lock"):
            shutil.rmtree(folder, ignore_errors=True)


def _reuse(root: Path, names: list[str], class_keys: list[str], digests: list[str],
           settings: tuple) -> tuple[ImageCache, np.ndarray, list[str]] | None:
    folder = root / compute_data_hash(class_keys, digests, *settings)
    opened = _open_cache(folder, decoded=0) if (folder / "meta.json").exists() else None
    if opened is None:
        return None
    cache, row_of = opened
    rows = np.array([row_of[f"{k}\t{d}"] for k, d in zip(class_keys, digests)], dtype=np.int64)
    return cache, rows, digests


def _total_bytes(paths: list[str]) -> int:
    total = 0
    for path in paths:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass  # reported by the decoder
    return total


def _decode_all(
    images_file: str, paths: list[str], settings: tuple, workers: int | None,
) -> list[tuple[int, str, str | None]]:
    workers = workers or usable_cpus()
    chunks = [list(range(s, min(s + _CHUNK, len(paths)))) for s in range(0, len(paths), _CHUNK)]
    results: list[tuple[int, str, str | None]] = []
    with progress_task("Decoding images", len(paths)) as advance:
        if workers == 1 or (len(paths) < _MIN_FOR_PROCESSES and _total_bytes(paths) < _MIN_BYTES_FOR_PROCESSES):
            for rows in chunks:
                results += _decode_rows(images_file, rows, [paths[r] for r in rows], *settings)
                advance(len(rows))
        else:
            with process_pool(workers) as pool:
                futures = {pool.submit(_decode_rows, images_file, rows, [paths[r] for r in rows], *settings): len(rows)
                           for rows in chunks}
                for future in concurrent.futures.as_completed(futures):
                    results += future.result()
                    advance(futures[future])
    return sorted(results)
