"""Run directories written atomically: work in a hidden temporary sibling, rename when done."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnkit.errors import RunExistsError


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
    removes it. An existing folder that is not a cnnkit run (no run.json) is never replaced.
    """

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final)
        if self.final.exists():
            if not overwrite:
                raise RunExistsError(
                    f"Run directory '{self.final}' already exists. Pass --overwrite (overwrite=True) to "
                    "replace it, or choose another --out."
                )
            if not self.final.is_dir() or (any(self.final.iterdir()) and not (self.final / "run.json").exists()):
                raise RunExistsError(
                    f"'{self.final}' exists and is not a cnnkit run directory (no run.json); refusing to "
                    "replace it. Choose another --out."
                )
        self.overwrite = overwrite
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        make_public(self.path, directory=True)

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


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
