"""cnnkit: a folder of images in; a trained, evaluated classifier out.

The public API is exactly ``__all__``. Heavy modules (Keras and its backend) are imported on first
use, so ``import cnnkit`` and ``cnnkit --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnnkit._version import __version__
from cnnkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from cnnkit.errors import CnnkitError, ConfigError, DataError, ModelError, RunExistsError, RunNotFoundError

_LAZY = {
    "train": "cnnkit.train",
    "TrainResult": "cnnkit.train",
    "evaluate": "cnnkit.evaluate",
    "EvalReport": "cnnkit.evaluate",
    "Predictor": "cnnkit.predict",
    "Prediction": "cnnkit.predict",
    "build_model": "cnnkit.models",
    "available_models": "cnnkit.models",
    "load_model": "cnnkit.models.saving",
    "load_image": "cnnkit.data.decode",
    "load_image_folder": "cnnkit.data.dataset",
    "scan_folder": "cnnkit.data.scan",
    "doctor": "cnnkit.data.doctor",
    "DoctorReport": "cnnkit.data.doctor",
    "explain": "cnnkit.explain",
    "Heatmap": "cnnkit.explain",
    "calibrate": "cnnkit.calibration",
    "CalibrationResult": "cnnkit.calibration",
    "review": "cnnkit.review",
    "ReviewQueue": "cnnkit.review",
    "compare": "cnnkit.compare",
    "Comparison": "cnnkit.compare",
}

__all__ = [
    "CnnkitError", "ConfigError", "DataConfig", "DataError", "DoctorReport", "EvalReport", "ModelConfig",
    "ModelError", "Prediction", "Predictor", "RunConfig", "RunExistsError", "RunNotFoundError", "TrainConfig",
    "TrainResult", "__version__", "available_models", "build_model", "doctor", "evaluate", "load_config",
    "load_image", "load_image_folder", "load_model", "scan_folder", "train",
    # issue 5
    "CalibrationResult", "Comparison", "Heatmap", "ReviewQueue", "calibrate", "compare", "explain", "review",
]

if TYPE_CHECKING:  # pragma: no cover
    from cnnkit.calibration import CalibrationResult, calibrate
    from cnnkit.compare import Comparison, compare
    from cnnkit.data.dataset import load_image_folder
    from cnnkit.data.decode import load_image
    from cnnkit.data.doctor import DoctorReport, doctor
    from cnnkit.data.scan import scan_folder
    from cnnkit.evaluate import EvalReport, evaluate
    from cnnkit.explain import Heatmap, explain
    from cnnkit.models import available_models, build_model
    from cnnkit.models.saving import load_model
    from cnnkit.predict import Prediction, Predictor
    from cnnkit.review import ReviewQueue, review
    from cnnkit.train import TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
