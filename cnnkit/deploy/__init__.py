"""Deploy stage: a trained model -> files and images that run it elsewhere.

In: a run directory, ``.keras`` file, or ``NAME@stage`` from the registry. Out: exported models
(``export``: SavedModel for TensorFlow Serving, ONNX, TFLite) and a Docker build context
(``write_build_context``, optionally built by ``build_image``).
"""

from cnnkit.deploy.docker import BuildContext, build_image, write_build_context
from cnnkit.deploy.formats import FORMATS, ExportResult, export

__all__ = ["FORMATS", "BuildContext", "ExportResult", "build_image", "export", "write_build_context"]
