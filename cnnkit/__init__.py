"""cnnkit: a folder of images in; a trained, evaluated, explained, registered and served classifier out.

The stages, in the order the data moves (each a subpackage or module importing only those before it)::

    data -> models -> training -> predict -> evaluation / gradcam -> registry -> serve / deploy

The public API is exactly ``__all__``. Heavy modules (Keras and its backend, SQLAlchemy, FastAPI)
are imported on first use, so ``import cnnkit`` and ``cnnkit --help`` stay fast.

Example:
    >>> import cnnkit
    >>> "fast" in cnnkit.available_models()
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnnkit._backends.devices import prefer_onednn

prefer_onednn()  # before anything imports TensorFlow: it reads the switch once (see prefer_onednn)

from cnnkit._version import __version__
from cnnkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from cnnkit.errors import (
    CnnkitError,
    ConfigError,
    DataError,
    ModelError,
    RegistryError,
    RegistryNotFoundError,
    RunExistsError,
    RunNotFoundError,
    VersionNotFoundError,
)

# Public name -> the module that defines it (imported on first use).
_LAZY = {
    "load_image": "cnnkit.data.decode",
    "scan_folder": "cnnkit.data.scan",
    "load_image_folder": "cnnkit.data.dataset",
    "doctor": "cnnkit.data.checks",
    "DoctorReport": "cnnkit.data.checks",
    "build_model": "cnnkit.models",
    "available_models": "cnnkit.models",
    "load_model": "cnnkit.models.saving",
    "train": "cnnkit.training",
    "TrainResult": "cnnkit.training",
    "lr_find": "cnnkit.training",
    "LRFindResult": "cnnkit.training",
    "Predictor": "cnnkit.predict",
    "Prediction": "cnnkit.predict",
    "explain": "cnnkit.gradcam",
    "Heatmap": "cnnkit.gradcam",
    "evaluate": "cnnkit.evaluation",
    "EvalReport": "cnnkit.evaluation",
    "calibrate": "cnnkit.evaluation",
    "CalibrationResult": "cnnkit.evaluation",
    "review": "cnnkit.evaluation",
    "ReviewQueue": "cnnkit.evaluation",
    "compare": "cnnkit.evaluation",
    "Comparison": "cnnkit.evaluation",
    "Registry": "cnnkit.registry",
    "ModelVersion": "cnnkit.registry",
    "export": "cnnkit.deploy",
    "ExportResult": "cnnkit.deploy",
}

__all__ = [
    "CalibrationResult", "CnnkitError", "Comparison", "ConfigError", "DataConfig", "DataError", "DoctorReport",
    "EvalReport", "ExportResult", "Heatmap", "LRFindResult", "ModelConfig", "ModelError", "ModelVersion",
    "Prediction", "Predictor", "Registry", "RegistryError", "RegistryNotFoundError", "ReviewQueue", "RunConfig", "RunExistsError",
    "RunNotFoundError", "TrainConfig", "TrainResult", "VersionNotFoundError", "__version__", "available_models",
    "build_model", "calibrate", "compare", "doctor", "evaluate", "explain", "export", "load_config", "load_image",
    "load_image_folder", "load_model", "lr_find", "review", "scan_folder", "train",
]

if TYPE_CHECKING:  # pragma: no cover
    from cnnkit.data.checks import DoctorReport, doctor
    from cnnkit.data.dataset import load_image_folder
    from cnnkit.data.decode import load_image
    from cnnkit.data.scan import scan_folder
    from cnnkit.deploy import ExportResult, export
    from cnnkit.evaluation import (
        CalibrationResult,
        Comparison,
        EvalReport,
        ReviewQueue,
        calibrate,
        compare,
        evaluate,
        review,
    )
    from cnnkit.gradcam import Heatmap, explain
    from cnnkit.models import available_models, build_model
    from cnnkit.models.saving import load_model
    from cnnkit.predict import Prediction, Predictor
    from cnnkit.registry import ModelVersion, Registry
    from cnnkit.training import LRFindResult, TrainResult, lr_find, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
