"""Serve stage: a trained model -> a TensorFlow-Serving-compatible REST service (FastAPI + uvicorn).

In: a run directory, ``.keras`` file or ``NAME@stage`` from the registry. Out: a FastAPI app
(``create_app``) with TF Serving's REST API, ``/predict`` for file uploads, health, readiness and
Prometheus metrics; ``cnnkit serve`` runs it with uvicorn.

Modules: ``app`` (the factory, lifespan, error mapping), ``routes`` (an ``APIRouter``),
``inputs`` (request bodies -> images), ``state`` (the loaded model), ``batching`` (micro-batches),
``settings``, ``prometheus``. Importing this package imports FastAPI (the ``serve`` extra:
``pip install "cnnkit[serve]"``).
"""

from cnnkit.serve.app import create_app
from cnnkit.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
