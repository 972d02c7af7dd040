"""Errors cnnkit raises on purpose.

Every message says what is wrong, where (file, folder, field), and how to fix it, and ends with
Keras's tail ``Received: name=value`` where a value was received. The CLI prints the message and
exits with code 2; tracebacks only with ``--debug``.
"""

from __future__ import annotations


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
