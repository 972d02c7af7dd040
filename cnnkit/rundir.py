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

import contextlib
import csv
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.errors import ModelError, RunExistsError, RunNotFoundError

MODEL_FILE = "model.keras"
RUN_JSON = "run.json"
SPLIT_CSV = "split.csv"
SKIPPED_CSV = "skipped.csv"
HISTORY_CSV = "history.csv"
SPLIT_COLUMNS = ("path", "class", "split", "sha256")
# The model's own metadata, an extra member of the .keras zip archive (class names, image size, ...).
META_MEMBER = "cnnkit.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | Path, directory: bool = False) -> None:
    """Give a mkstemp/mkdtemp result the permissions a plain open()/mkdir() would (0666/0777 less umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


class RunDirectory:
    """A run directory being written.

    Everything goes to ``path`` (a hidden ``.<name>.partial-*`` sibling of the final folder);
    ``commit()`` renames it into place, replacing an older run only when ``overwrite``; ``discard()``
    removes it (as leaving a ``with`` block by an exception does). An existing folder that is not a
    cnnkit run (no run.json) is never replaced.
    """

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final)
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
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        make_public(self.path, directory=True)

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:  # the run failed or was cut short before commit(): leave nothing behind
            self.discard()

    def commit(self) -> Path:
        replace_directory(self.path, self.final)
        self.path = self.final
        return self.final

    def discard(self) -> None:
        if self.path != self.final:
            shutil.rmtree(self.path, ignore_errors=True)


def replace_directory(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst`` (two renames, no copy)."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, trash / "old")
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` if the block succeeds, else removed.

    ``suffix`` keeps the extension writers infer the format from (".keras", ".png").
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    make_public(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A hidden temporary sibling folder to fill; it replaces ``path`` if the block succeeds, else is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    make_public(tmp, directory=True)
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_rows(path: str | Path, header: list[str] | tuple[str, ...], rows: list[list[object]]) -> Path:
    """Write a CSV via a temporary file and rename, so no reader ever sees half of it."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
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
    with open(path, newline="", encoding="utf-8") as fh:
        return [SplitRow(Path(r["path"]), r["class"], r["split"], r["sha256"]) for r in csv.DictReader(fh)]


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
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
    return {k: [float(r[k]) for r in rows if r.get(k) not in ("", None)] for k in keys}


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


def output_folder(source: str | Path, *parts: str) -> Path:
    """Where a stage writes about a model: ``RUN/<parts>``, or beside a loose ``.keras`` file."""
    source = Path(source)
    base = source if source.is_dir() else model_path(source).parent
    return base.joinpath(*parts)
