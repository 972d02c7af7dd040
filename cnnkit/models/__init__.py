"""Models stage: the zoo and its factory. Importing this package registers every architecture."""

from cnnkit.models import cnn, fast, transfer  # noqa: F401  (registers simple, vgg, fast; the backbones)
from cnnkit.models.registry import LOSS, ModelSpec, augmentation_layers, available_models, build_model, get_spec

__all__ = ["LOSS", "ModelSpec", "augmentation_layers", "available_models", "build_model", "get_spec"]
