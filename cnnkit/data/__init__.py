"""Data stages: scan -> decode -> cache -> batches, and the doctor's report.

Nothing in this package imports a deep-learning backend except ``batches`` (Keras's PyDataset),
so decode workers start fast.
"""

from cnnkit.data.cache import ImageCache, build_cache
from cnnkit.data.dataset import LoadedData, load_image_folder
from cnnkit.data.decode import DecodeError, load_image
from cnnkit.data.scan import IMAGE_EXTENSIONS, ImageFile, ImageFolder, SkippedFile, expand_inputs, scan_folder

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "ImageCache",
    "ImageFile",
    "ImageFolder",
    "LoadedData",
    "SkippedFile",
    "build_cache",
    "expand_inputs",
    "load_image",
    "load_image_folder",
    "scan_folder",
]
