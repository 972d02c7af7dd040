"""Registry stage: trained runs -> numbered, staged, verifiable model versions in a SQL database.

In: run directories (or ``.keras`` files) and their ``run.json``. Out: ``ModelVersion`` rows
(name, version, stage, artifact and its SHA-256, architecture, class names, data hash, metrics...),
and ``resolve_source`` turning ``RUN``, ``model.keras`` or ``NAME@stage`` into the model file to serve.

SQLite under ``$CNNKIT_HOME`` by default, any SQLAlchemy URL otherwise; the schema is migrated by
Alembic (``cnnkit/registry/migrations``) when a registry is opened. Imports no Keras, so
``cnnkit registry ...`` starts fast.
"""

from cnnkit.registry.sources import ModelSource, resolve_source
from cnnkit.registry.store import STAGES, ModelVersion, Registry, VerifyResult, parse_ref, sha256_file

__all__ = ["STAGES", "ModelSource", "ModelVersion", "Registry", "VerifyResult", "parse_ref", "resolve_source",
           "sha256_file"]
