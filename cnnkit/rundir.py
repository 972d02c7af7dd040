"""The run directory: its files, written atomically, and the one reader of each.

A run directory is the unit every later stage consumes (see ``docs/design.md``)::

    model.keras   run.json   history.csv   curves.png   split.csv   skipped.csv
    best.weights.h5   last.keras   eval/<name>/   review/<name>/   export/<format>/

Everything here is plain Python (no Keras), so any stage, the registry included, can read a run.
Writes go to a temporary sibling that is renamed into place (``atomic_path``, ``atomic_directory``,
``RunDirectory``), so no reader ever sees half a file. Reads go through ``read_run_json``,
``read_split_csv`` and ``read_history``: the only code that parses those files.
"""

from __future__ import annotations

import hashlib

import contextlib
import csv
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit._version import __version__
from cnnkit.errors import ConfigError, ModelError, RunDamagedError, RunExistsError, RunNotFoundError

MODEL_FILE = "model.keras"
RUN_JSON = "run.json"
SPLIT_CSV = "split.csv"
SKIPPED_CSV = "skipped.csv"
HISTORY_CSV = "history.csv"
SPLIT_COLUMNS = ("path", "class", "split", "sha256")
# The model's own metadata, an extra member of the .keras zip archive (class names, image size, ...).
META_MEMBER = "cnnkit.json"
# An ONNX export folder (``cnnkit export -f onnx``, the onnxruntime engine's cache, the slim image's
# /model): the network, its metadata (``META_MEMBER``) and the SHA-256 of the .keras it came from.
ONNX_MODEL = "model.onnx"
SOURCE_SHA256 = "source.sha256"


# -- temporary names and atomic replacement -------------------------------------------------------------

_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux 3.15+; ext4, xfs, btrfs, tmpfs...)


def _random_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{secrets.token_hex(4)}{suffix}"


def new_file(folder: str | Path, prefix: str, suffix: str = "") -> Path:
    """Create an empty file with a fresh name in ``folder``; the kernel applies the umask (nothing process-wide is touched)."""
    for _ in range(100):
        path = Path(folder) / _random_name(prefix, suffix)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for '{prefix}*{suffix}' in '{folder}'")


def new_directory(folder: str | Path, prefix: str) -> Path:
    """Create a folder with a fresh name in ``folder`` (mode 0777 less the umask, applied by the kernel)."""
    for _ in range(100):
        path = Path(folder) / _random_name(prefix)
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary folder name for '{prefix}*' in '{folder}'")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # a filesystem without it
        return False
    raise OSError(error, os.strerror(error), str(b))


def replace_directory(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an older ``dst`` is swapped out in one atomic step.

    Readers see the old folder or the new one, never none (Linux: renameat2 RENAME_EXCHANGE). Where
    the filesystem cannot swap, two renames are used and ``dst`` is missing for that instant.
    """
    if not dst.exists():
        os.rename(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
        return
    trash = new_directory(dst.parent, f".{dst.name}.old-")
    os.rename(dst, trash / "old")
    os.rename(src, dst)
    shutil.rmtree(trash, ignore_errors=True)


# -- runs being written: a partial folder held by a lock -----------------------------------------------

LOCK_FILE = ".lock"


def hold_lock(path: Path, wait: bool = False):
    """An exclusive lock on ``path`` held until the file object is closed or the process dies (even kill -9).

    ``wait``: block until another holder lets go, instead of raising ``OSError`` at once.
    """
    handle = open(path, "a+")  # noqa: SIM115 - held for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise
    return handle


def lock_is_held(path: Path) -> bool:
    """True when a living process holds the lock file ``path``."""
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False
    except OSError:
        return True


@dataclass(frozen=True)
class UnfinishedRun:
    """A hidden ``.<run>.partial-*`` folder: a run being written, or one whose process died.

    Attributes:
        path: the partial folder.
        run: the run directory it was to become.
        running: a living process is writing it now (it holds the folder's lock).
        epochs: epochs it finished (its history.csv), 0 when none.
        planned: epochs it planned (its run.json), or None.
        checkpoint: it holds a ``last.keras`` to resume from.
        modified: last change, seconds since the epoch.
    """

    path: Path
    run: Path
    running: bool
    epochs: int
    planned: int | None
    checkpoint: bool
    modified: float
    finished: bool = False  # a finished run swapped out by a replace that was cut off: nothing to resume

    def describe(self) -> str:
        done = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}" + (f" of {self.planned}" if self.planned else "")
        age = max(0, int(time.time() - self.modified))
        when = f"{age // 3600}h{age % 3600 // 60:02d}m ago" if age >= 3600 else f"{age // 60}m{age % 60:02d}s ago"
        state = "being written now" if self.running else ("stopped" if not self.checkpoint else "cut off")
        return f"'{self.path}' ({state} after {done}, last written {when})"


def unfinished_runs(run: str | Path) -> list[UnfinishedRun]:
    """The partial folders of ``run`` (``.<name>.partial-*`` beside it), newest first."""
    run = Path(run)
    return _unfinished(run.parent, f".{glob_escape(run.name)}.partial-*")


def unfinished_in(folder: str | Path) -> list[UnfinishedRun]:
    """Every partial run folder in ``folder`` (``.<name>.partial-*``, whatever the run), newest first."""
    return _unfinished(Path(folder), ".*.partial-*")


def _unfinished(parent: Path, pattern: str) -> list[UnfinishedRun]:
    if not parent.is_dir():
        return []
    found = []
    for path in parent.glob(pattern):
        name = path.name[1:].rsplit(".partial-", 1)[0]
        if not path.is_dir() or not name:
            continue
        try:
            record = read_json(path / RUN_JSON) if (path / RUN_JSON).is_file() else {}
            epochs = len(read_history(path / HISTORY_CSV).get("loss", [])) if (path / HISTORY_CSV).is_file() else 0
        except (OSError, ValueError, csv.Error, RunDamagedError):
            record, epochs = {}, 0
        planned = record.get("config", {}).get("train", {}).get("epochs") if record else None
        found.append(UnfinishedRun(path, parent / name, lock_is_held(path / LOCK_FILE), epochs, planned,
                                   (path / "last.keras").is_file(), _newest_mtime(path),
                                   record.get("status") in ("completed", "interrupted")))
    return sorted(found, key=lambda u: u.modified, reverse=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _newest_mtime(folder: Path) -> float:
    try:
        return max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
    except OSError:
        return 0.0


def remove_unfinished(runs: list[UnfinishedRun]) -> None:
    """Delete partial folders whose process is gone (never one being written)."""
    for item in runs:
        if not lock_is_held(item.path / LOCK_FILE):
            shutil.rmtree(item.path, ignore_errors=True)


class RunDirectory:
    """A run directory being written.

    Everything goes to ``path``, a hidden ``.<name>.partial-*`` sibling of the final folder that
    this process locks while it writes. ``commit()`` swaps it into place (replacing an older run
    only when ``overwrite``) and removes the partial folders of earlier runs that died; ``discard()``
    removes it. Leaving a ``with`` block by an error keeps it when it holds a checkpoint, as a run
    killed hard does: its partial folder has ``run.json`` (status ``running``), and ``history.csv``
    and ``last.keras`` after every epoch, so ``cnnkit train --resume RUN`` continues it. An existing folder that is not a cnnkit
    run (no run.json) is never replaced.

    Raises:
        RunExistsError: the run exists (without ``overwrite``), an unfinished run of it waits to be
            resumed (without ``overwrite`` or ``resuming``), or another process is writing it now.
    """

    def __init__(self, final: str | Path, overwrite: bool = False, resuming: bool = False) -> None:
        self.final = Path(final)
        leftovers = [u for u in unfinished_runs(self.final) if u.finished and not u.running]
        remove_unfinished(leftovers)  # old runs a cut-off replace left beside the new one
        self.unfinished = [u for u in unfinished_runs(self.final) if not u.finished]
        busy = [u for u in self.unfinished if u.running]
        if busy:
            raise RunExistsError(f"Another cnnkit process is writing '{self.final}' now ({busy[0].describe()}). Wait "
                                 "for it, or choose another --out.")
        if self.unfinished and not (overwrite or resuming):
            raise RunExistsError(
                f"An unfinished run of '{self.final}' exists: {self.unfinished[0].describe()}. Continue it with "
                f"'cnnkit train --resume {self.final}', or start over with --overwrite (which deletes it).")
        if self.final.exists():
            if not overwrite:
                raise RunExistsError(
                    f"Run directory '{self.final}' already exists. Pass --overwrite (overwrite=True) to "
                    "replace it, or choose another --out."
                )
            if not self.final.is_dir() or (any(self.final.iterdir()) and not (self.final / RUN_JSON).exists()):
                raise RunExistsError(
                    f"'{self.final}' exists and is not a cnnkit run directory (no run.json); refusing to "
                    "replace it. Choose another --out."
                )
        self.overwrite = overwrite
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = new_directory(self.final.parent, f".{self.final.name}.partial-")
        self._lock = hold_lock(self.path / LOCK_FILE)

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None or self.path == self.final:
            return
        if (self.path / "last.keras").is_file():  # epochs were trained: keep them for --resume
            self._lock.close()
        else:  # nothing worth keeping: leave nothing behind
            self.discard()

    def commit(self) -> Path:
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        replace_directory(self.path, self.final)
        self._lock.close()
        remove_unfinished(self.unfinished)
        self.path = self.final
        return self.final

    def discard(self) -> None:
        if self.path != self.final:
            shutil.rmtree(self.path, ignore_errors=True)
            self._lock.close()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` if the block succeeds, else removed.

    ``suffix`` keeps the extension writers infer the format from (".keras", ".png").
    """
    path = Path(path)
    tmp = new_file(path.parent, f".{path.stem}.", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_replaceable(path: str | Path, replaces: tuple[str, ...], what: str) -> None:
    """Refuse to replace ``path`` unless it is absent, an empty folder, or an earlier ``what`` (a folder
    holding one of the files named in ``replaces``): an output folder given as ``--out`` is replaced
    whole, and a user's folder or file there must never be.

    Raises:
        ConfigError: ``path`` is a file, or a folder of something else, named with the fix.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ConfigError(f"'{path}' is a file; a {what} is written as a folder and would replace it. Choose another "
                          "--out.")
    if any((path / name).exists() for name in replaces) or not any(path.iterdir()):
        return
    raise ConfigError(f"'{path}' exists and is not a {what} (no {' or '.join(replaces)} in it); refusing to replace "
                      "it and what it holds. Choose another --out (a new or empty folder).")


@contextlib.contextmanager
def atomic_directory(path: str | Path, replaces: tuple[str, ...], what: str) -> Iterator[Path]:
    """A hidden temporary sibling folder to fill; it replaces ``path`` if the block succeeds, else is removed.

    ``path`` may already hold only an earlier output of the same kind, one with a file named in
    ``replaces`` (``what`` names that kind in the refusal): see ``check_replaceable``.
    """
    path = Path(path)
    check_replaceable(path, replaces, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_directory(path.parent, f".{path.name}.partial-")
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def editing_run(run: str | Path) -> Iterator[Path]:
    """A staged copy of the run directory ``run`` to change; it replaces ``run`` in one swap if the block succeeds.

    The copy is made of hard links (no data copied; a file written into it with ``atomic_path``
    replaces only the copy's link), so several files change together or not at all.
    """
    run = Path(run)
    stage = new_directory(run.parent, f".{run.name}.edit-")
    try:
        shutil.copytree(run, stage, copy_function=_link_or_copy, dirs_exist_ok=True)
        yield stage
        replace_directory(stage, run)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file cnnkit wrote.

    Raises:
        RunDamagedError: the file is not valid JSON (or not an object); the message names it.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDamagedError(f"'{path}' is damaged: not valid JSON ({exc}). Restore it from a backup, or train the run "
                              "again.") from exc
    if not isinstance(data, dict):
        raise RunDamagedError(f"'{path}' is damaged: it holds a JSON {type(data).__name__}, not an object. Restore it "
                              "from a backup, or train the run again.")
    return data


def write_rows(path: str | Path, header: list[str] | tuple[str, ...], rows: list[list[object]]) -> Path:
    """Write a CSV via a temporary file and rename, so no reader ever sees half of it."""
    # surrogateescape: a file name that is not valid UTF-8 is written back as the bytes it was
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


# -- the run's own files ---------------------------------------------------------------------------


def run_folder(source: str | Path) -> Path | None:
    """The run directory of a run directory or of a ``.keras`` file inside one; None for a loose file."""
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    return folder if (folder / RUN_JSON).is_file() else None


def read_run_json(run: str | Path) -> dict[str, Any]:
    """The run's ``run.json`` (settings, class names, data hash, metrics, ...); ``{}`` when it has none.

    ``run`` is a run directory or a ``.keras`` file inside one.
    """
    folder = run_folder(run)
    return read_json(folder / RUN_JSON) if folder is not None else {}


@dataclass(frozen=True)
class SplitRow:
    """One row of ``split.csv``: an image the run used, its class name, split and SHA-256."""

    path: Path
    class_name: str
    split: str
    sha256: str


def read_split_csv(run: str | Path) -> list[SplitRow] | None:
    """Every image the run used, as ``split.csv`` lists it; None when the run has no ``split.csv``.

    ``run`` is a run directory or a ``.keras`` file inside one.
    """
    source = Path(run)
    path = (source if source.is_dir() else source.parent) / SPLIT_CSV
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            return [SplitRow(Path(r["path"]), r["class"], r["split"], r["sha256"]) for r in csv.DictReader(fh)]
    except (KeyError, csv.Error) as exc:
        raise RunDamagedError(f"'{path}' is damaged (expected the columns {', '.join(SPLIT_COLUMNS)}): {exc}. Restore "
                              "it, or train the run again.") from exc


def write_split_csv(path: str | Path, rows: list[SplitRow]) -> Path:
    """``path,class,split,sha256`` per image (the split actually used)."""
    return write_rows(path, SPLIT_COLUMNS, [[str(r.path), r.class_name, r.split, r.sha256] for r in rows])


def write_history(history: dict[str, list[float]], path: str | Path) -> Path:
    """``history.csv``: one row per epoch, a column per metric (``phase`` as an integer)."""
    keys = list(history)
    epochs = len(history.get("loss", []))

    def cell(key: str, epoch: int) -> Any:
        if epoch >= len(history[key]):
            return ""
        return int(history[key][epoch]) if key == "phase" else history[key][epoch]

    return write_rows(path, ["epoch", *keys], [[epoch + 1] + [cell(k, epoch) for k in keys] for epoch in range(epochs)])


def read_history(path: str | Path) -> dict[str, list[float]]:
    """``history.csv`` -> ``{metric: [value per epoch]}`` (``path`` is the file or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_CSV
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
        return {k: [float(r[k]) for r in rows if r.get(k) not in ("", None)] for k in keys}
    except (UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise RunDamagedError(f"'{path}' is damaged: {exc}. Restore it from a backup, or train the run again.") from exc


def model_path(source: str | Path) -> Path:
    """A run directory or a ``.keras`` file -> the ``.keras`` file.

    Raises:
        RunNotFoundError: nothing there, or a folder without ``model.keras``.
        ModelError: a file that is not ``.keras``.
    """
    source = Path(source)
    if source.is_dir():
        candidate = source / MODEL_FILE
        if not candidate.exists():
            raise RunNotFoundError(
                f"No model.keras in '{source}'. Pass a run directory written by 'cnnkit train' or a .keras file."
            )
        return candidate
    if not source.exists():
        raise RunNotFoundError(f"No run directory or model file at '{source}'.")
    if source.suffix != ".keras":
        raise ModelError(f"'{source}' is not a .keras model file. Pass a run directory or a .keras file.")
    return source


def read_model_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``cnnkit.json`` member of a ``.keras`` file as a dict; None for a plain Keras model.

    Read with ``zipfile`` alone, so the registry and the server can read it without Keras.

    Raises:
        ModelError: not a valid ``.keras`` (zip) file, or an unreadable member.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if META_MEMBER not in archive.namelist():
                return None
            return json.loads(archive.read(META_MEMBER))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ModelError(f"'{path}' is not a valid .keras model file ({exc}). Train one with 'cnnkit train'.") from exc


@dataclass(frozen=True)
class ModelMeta:
    """What a model needs besides its weights to be used correctly.

    Plain Python (read from the ``cnnkit.json`` member of a ``.keras`` file, or the file of that
    name in an ONNX export folder), so the server can use it without Keras.

    Attributes:
        class_names: output index -> class name.
        image_size: (height, width) the model takes.
        color_mode: "rgb" or "grayscale".
        resize_mode: how images are fitted to ``image_size`` ("stretch", "pad", "crop").
        architecture: the zoo name it was built from.
        input_scale: the pixel range the model takes: "0-255" (raw; cnnkit models always).
        max_pixels: the decompression-bomb limit used when decoding for it.
        extra: anything else (calibration, ...), for later stages.
    """

    class_names: list[str]
    image_size: tuple[int, int]
    color_mode: str = "rgb"
    resize_mode: str = "stretch"
    architecture: str = "unknown"
    input_scale: str = "0-255"
    max_pixels: int = 80_000_000
    cnnkit_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelMeta:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        known["image_size"] = tuple(known["image_size"])
        return cls(**known)


def is_onnx_export(path: str | Path) -> bool:
    """True for a folder holding ``model.onnx`` and its ``cnnkit.json`` (an ONNX export)."""
    path = Path(path)
    return path.is_dir() and (path / ONNX_MODEL).is_file() and (path / META_MEMBER).is_file()


def read_export_meta(folder: str | Path) -> ModelMeta:
    """The ``cnnkit.json`` written beside exported model files.

    Raises:
        ModelError: missing or not valid JSON metadata.
    """
    path = Path(folder) / META_MEMBER
    try:
        return ModelMeta.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"Cannot read the model metadata '{path}' ({exc}). Export the model again with "
                         f"'cnnkit export RUN -f onnx'. Received: path='{path}'") from exc


def output_folder(source: str | Path, *parts: str) -> Path:
    """Where a stage writes about a model: ``RUN/<parts>``, or beside a loose ``.keras`` file."""
    source = Path(source)
    base = source if source.is_dir() else model_path(source).parent
    return base.joinpath(*parts)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (model files, weight files, registry artifacts)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
