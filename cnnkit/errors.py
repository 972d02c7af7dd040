"""Errors cnnkit raises on purpose.

Every message says what is wrong, where (file, folder, field), and how to fix it, and ends with
Keras's tail ``Received: name=value`` where a value was received. The CLI prints the message and
exits with code 2; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import errno


class CnnkitError(Exception):
    """Base of every error cnnkit raises on purpose."""


class ConfigError(CnnkitError, ValueError):
    """A config file, option or field is invalid."""


class DataError(CnnkitError, ValueError):
    """The image folder, or one image in it, is unusable."""


class ModelError(CnnkitError):
    """Unknown architecture, or a saved model that cannot be loaded or used."""


class RunExistsError(CnnkitError, FileExistsError):
    """A run directory exists and ``overwrite`` was not asked for."""


class RunNotFoundError(CnnkitError, LookupError):
    """No run directory or model file at that path."""


class RunDamagedError(CnnkitError):
    """A run directory's file is unreadable or damaged (half-written by an old tool, edited by hand)."""


class RegistryError(CnnkitError):
    """The model registry database is unreachable, or a registry request is invalid."""


class VersionNotFoundError(RegistryError, LookupError):
    """No registered model has that name, version or stage."""


class RegistryNotFoundError(RegistryError, LookupError):
    """No registry database where one was to be read: a SQLite file that does not exist (a mistyped path)."""


def describe_os_error(exc: OSError) -> str:
    """A file-system error in one line: what, where, and what to do."""
    where = f"'{exc.filename}'" if exc.filename else "a file"
    if exc.filename2:
        where += f" -> '{exc.filename2}'"
    advice = {
        errno.ENOSPC: f"No space left on the device while writing {where}. Free some space, or write elsewhere "
                      "(--out, CNNKIT_HOME for the decode cache); an interrupted training run continues with --resume.",
        errno.EDQUOT: f"Disk quota exceeded while writing {where}. Free some space or write elsewhere (--out, CNNKIT_HOME).",
        errno.EACCES: f"Permission denied: {where}. Choose a folder you can write to (--out, CNNKIT_HOME) or fix the "
                      "permissions of that one.",
        errno.EPERM: f"Operation not permitted: {where}. Choose a folder you can write to, or fix its permissions.",
        errno.EROFS: f"{where} is on a read-only file system. Write elsewhere (--out, CNNKIT_HOME).",
        errno.ENOENT: f"No such file or folder: {where}.",
        errno.ENOTDIR: f"{where}: part of this path is a file, not a folder. Choose another path.",
        errno.EISDIR: f"{where} is a folder where a file was expected.",
        errno.ENAMETOOLONG: f"The path {where} is too long for the file system. Choose a shorter one.",
    }
    return advice.get(exc.errno, f"{exc.strerror or exc}: {where}.")
