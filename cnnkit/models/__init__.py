"""Models stage: the zoo behind one factory, and model files that carry their own metadata.

In: an architecture name, the number of classes, the image size (and for backbones, weights).
Out: an uncompiled ``keras.Model`` from raw 0-255 pixels to class probabilities (``build_model``);
``save_model`` / ``load_model`` for ``.keras`` files holding class names and decode settings.

Importing this package registers every architecture. Imports nothing above it.
"""

from cnnkit.models import cnn, efficientnet_lite, fast, transfer  # noqa: F401  (registers simple, vgg, fast; the backbones)
from cnnkit.models.zoo import LOSS, ModelSpec, augmentation_layers, available_models, build_model, get_spec

__all__ = ["LOSS", "ModelSpec", "augmentation_layers", "available_models", "build_model", "get_spec"]
