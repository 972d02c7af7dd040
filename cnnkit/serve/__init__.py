"""Serving stage: a trained model -> a TensorFlow-Serving-compatible REST service (FastAPI + uvicorn).

``create_app(source)`` returns the FastAPI app; ``cnnkit serve`` runs it with uvicorn. Importing
this package imports FastAPI (the ``serve`` extra: ``pip install "cnnkit[serve]"``).
"""

from cnnkit.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
