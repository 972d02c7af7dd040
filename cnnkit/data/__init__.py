"""Data stage: a folder of images -> scanned files -> decoded uint8 cache -> batches; the doctor's checks.

In: a folder (``root/<class>/`` or ``root/train|validation|test/<class>/``), files, or image bytes.
Out: ``ImageFolder`` (files, labels, splits, skipped files), ``load_image`` pixels (the one decoder),
``ImageCache`` (memory-mapped uint8 images, keyed by the data hash), ``LoadedData`` (all of it,
ready for batching), ``ArrayBatches`` (``cnnkit.data.batches``) and ``DoctorReport``.

Imports nothing above it. Nothing here imports a deep-learning backend except ``batches``
(Keras's PyDataset) and, only when a built-in set is named, ``builtin`` (``keras.datasets``), so
decode workers start fast.
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
