"""Registry stage: what ``serve``, ``ui`` and ``docker`` were asked for -> the model file to use.

A source is a run directory, a ``.keras`` file, an ONNX export folder (``model.onnx`` +
``cnnkit.json``: served on ONNX Runtime, without Keras), or a registry reference (``NAME@production``,
``NAME@3``); a registered artifact (the registry's immutable copy, not the run's file) is checked
against its recorded SHA-256 before use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cnnkit.errors import RegistryError
from cnnkit.registry.artifacts import local_artifact
from cnnkit.registry.store import Registry, sha256_file
from cnnkit.rundir import RUN_JSON, is_onnx_export, model_path, run_folder


@dataclass
class ModelSource:
    """Where a served model comes from: its ``.keras`` file (or ONNX export folder), URL name, version and run directory."""

    path: Path
    name: str
    version: str
    run_dir: Path | None
    sha256: str | None = None
    stage: str | None = None


def resolve_source(source: str | Path, name: str | None = None, registry_url: str | None = None) -> ModelSource:
    """``RUN`` dir, ``model.keras``, an ONNX export folder or ``NAME@production`` (``NAME@3``) -> a ModelSource.

    Raises:
        RunNotFoundError / VersionNotFoundError: nothing there.
        RegistryError: the registered artifact changed since registration (its sha256 differs).
    """
    text = str(source)
    if "@" in text and not Path(text).exists():
        with Registry(registry_url, create=False) as registry:
            version = registry.get(text)
        path = local_artifact(version.artifact_path, version.sha256)  # a URL is fetched into the cache
        if not path.is_file() or sha256_file(path) != version.sha256:
            raise RegistryError(f"The artifact of {version.ref} ({path}) is missing or changed since it was registered; "
                                "refusing to serve it. Run 'cnnkit registry verify' and register the run again.")
        return ModelSource(path, name or version.name, str(version.version),
                           Path(version.run_dir) if version.run_dir else None, version.sha256, version.stage)
    if is_onnx_export(text):
        return _onnx_source(Path(text), name)
    path = model_path(text)
    default = path.parent.name if path.stem == "model" else path.stem
    return ModelSource(path, name or url_name(default), "1", run_folder(path))


def _onnx_source(folder: Path, name: str | None) -> ModelSource:
    """``RUN/export/onnx`` is named after its run; a folder with a ``run.json`` (the slim image's /model) is its own run."""
    full = folder.resolve()
    run = full.parents[1] if full.name == "onnx" and full.parent.name == "export" else full
    run_dir = run if (run / RUN_JSON).is_file() else None
    return ModelSource(folder, name or url_name(run.name), "1", run_dir)


def url_name(text: str) -> str:
    """A name safe in URLs: letters, digits, ``.``, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
