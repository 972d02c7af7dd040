"""Registry stage: the ``Registry``, numbered and staged model versions of run directories in a SQL database.

``Registry`` records, for each registered version of a model name: version number, creation
time, the artifact and its SHA-256, architecture, backend, Keras/cnnkit
versions, image size, colour mode, class names, data hash, split sizes, augmentation,
hyper-parameters, metrics (validation, test, and every ``cnnkit evaluate`` report), stage
(``none|staging|production|archived``) and notes.

The artifact is immutable: ``add`` copies the run's ``model.keras`` into a content-addressed store
(``cnnkit.registry.artifacts``: ``<artifact root>/<sha256>/model.keras``, by default ``artifacts/``
beside the SQLite file or ``$CNNKIT_HOME/artifacts``), and the version points only at that copy, so
changing the run afterwards (``calibrate``, ``--resume``, a new training) changes nothing served.
``verify`` re-hashes the copies; deleting the last version that uses a copy removes it. Versions
registered before the store existed (schema 0001) keep their path into the run folder.

The store is any SQLAlchemy URL: by default a SQLite file ``$CNNKIT_HOME/registry.db``
(``CNNKIT_HOME`` defaults to ``~/.cnnkit``), or ``CNNKIT_REGISTRY_URL`` / ``url=`` (e.g.
``postgresql://user@host/db``; the psycopg 3 driver is used). The schema is created and upgraded
by Alembic migrations (``cnnkit/registry/migrations``) each time a registry is opened.

Concurrency: version numbers are ``max + 1`` under a unique (name, version) constraint; a writer
that loses a race retries, so two processes registering the same name get distinct versions.
SQLite transactions start with ``BEGIN IMMEDIATE`` (one writer at a time, others wait). Only one
version per name can be in production: a partial unique index enforces it, and ``promote``
archives the previous production version in the same transaction.

This module imports no other stage (no Keras): ``cnnkit registry ...`` starts fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.config import cnnkit_home
from cnnkit.errors import CnnkitError, RegistryError, RegistryNotFoundError, RunNotFoundError, VersionNotFoundError
from cnnkit.registry.artifacts import ArtifactStore, artifact_sha256, default_artifact_root, remove_artifact, store_of
from cnnkit.rundir import MODEL_FILE, RUN_JSON, read_json, read_model_metadata, sha256_file

STAGES = ("none", "staging", "production", "archived")
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_RETRIES = 20  # attempts at a version number when concurrent writers collide


@dataclass
class ModelVersion:
    """One registered version (a plain copy of its database row).

    Attributes:
        name, version: ``name@version`` identifies it; versions count from 1 per name.
        created: when it was registered (UTC).
        artifact_path: its immutable copy in the artifact store (path or URL); sha256: the copy's SHA-256.
        run_dir: the run directory it came from (None for a bare ``.keras`` file).
        artifact_stored: True when ``artifact_path`` is the registry's own copy (False for versions
            registered before the store, which point into their run folder).
        source_path: the file that was copied (provenance only: it may have changed since).
        stage: "none", "staging", "production" or "archived".
        metrics: ``val_*`` and ``test_*`` from training, plus ``eval`` (report name -> metrics).
    """

    name: str
    version: int
    created: _dt.datetime
    artifact_path: str
    sha256: str
    run_dir: str | None
    architecture: str
    backend: str
    keras_version: str
    cnnkit_version: str
    image_size: list[int]
    color_mode: str
    class_names: list[str]
    data_hash: str | None = None
    split_sizes: dict[str, int] | None = None
    augmentation: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stage: str = "none"
    notes: str = ""
    artifact_stored: bool = False
    source_path: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created"] = self.created.isoformat(timespec="seconds")
        return data


@dataclass
class VerifyResult:
    """The state of one version's artifact: "ok", "missing" or "changed" (hash differs)."""

    ref: str
    artifact_path: str
    status: str
    expected_sha256: str
    actual_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_url() -> str:
    """``CNNKIT_REGISTRY_URL``, else SQLite at ``$CNNKIT_HOME/registry.db`` (``~/.cnnkit``)."""
    url = os.environ.get("CNNKIT_REGISTRY_URL")
    if url:
        return url
    return f"sqlite:///{cnnkit_home() / 'registry.db'}"


def normalize_url(url: str) -> str:
    """Give a bare ``postgresql://`` URL the installed psycopg 3 driver (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME``, ``NAME@3``, ``NAME@production`` or ``NAME@latest`` -> (name, selector or None)."""
    name, _, selector = ref.partition("@")
    if not name:
        raise RegistryError(f"A model reference is NAME, NAME@VERSION or NAME@STAGE, e.g. 'flowers@production'. "
                            f"Received: ref={ref!r}")
    return name, (selector or None)


class Registry:
    """A model registry in a SQL database (SQLite file by default, PostgreSQL by URL).

    Args:
        url: a SQLAlchemy URL; default ``CNNKIT_REGISTRY_URL`` or ``sqlite:///$CNNKIT_HOME/registry.db``.
        artifact_root: where ``add`` stores the immutable copies: a folder or URL (default
            ``CNNKIT_ARTIFACT_ROOT``, else ``artifacts/`` beside a SQLite file, else ``$CNNKIT_HOME/artifacts``).
        create: make a SQLite file (and its folders) that does not exist yet; False for reading, so a
            mistyped path is an error, not a new empty registry written there.

    Raises:
        RegistryError: the database cannot be opened or migrated (the URL is in the message).
        RegistryNotFoundError: ``create`` is False and the SQLite file does not exist.

    Example:
        >>> registry = cnnkit.Registry()
        >>> v = registry.add("runs/first", "flowers")
        >>> production = registry.promote("flowers", v.version, "production")
        >>> path = registry.get("flowers@production").artifact_path
    """

    def __init__(self, url: str | None = None, artifact_root: str | Path | None = None, create: bool = True) -> None:
        self.url = normalize_url(url or default_url())
        self.artifact_root = str(artifact_root or default_artifact_root(self.url))
        missing = None if create else _missing_sqlite_file(self.url)
        if missing is not None:
            raise RegistryNotFoundError(
                f"No model registry at {missing}: the file does not exist, so nothing was registered there. Check "
                "--registry-url / CNNKIT_REGISTRY_URL, or register a run first ('cnnkit registry add RUN --name NAME').")
        self._engine = _create_engine(self.url)
        self._migrate()
        self._table = _table()

    @property
    def location(self) -> str:
        """The database URL, password hidden (for messages)."""
        return self._where()

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _database(self, action: str) -> Iterator[None]:
        """Database failures (locked file, server gone, lost connection) as a RegistryError naming the registry."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            yield
        except SQLAlchemyError as exc:
            raise self._failed(action, exc) from exc

    def _failed(self, action: str, exc: Exception) -> RegistryError:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split()).rstrip(".")
        return RegistryError(f"Could not {action} in the model registry at {self._where()}: {reason}. Check that the "
                             "database is reachable and not locked by another program, then run the command again.")

    # -- writing ---------------------------------------------------------------------------------

    def add(self, run: str | Path, name: str, notes: str = "", stage: str = "none") -> ModelVersion:
        """Register the model of a run directory (or a ``.keras`` file) as a new version of ``name``.

        The model file is copied into the artifact store first; the version points at the copy.

        Returns:
            The new ModelVersion (its ``version`` is the next free number for ``name``).

        Raises:
            RunNotFoundError: no model at ``run``.
            RegistryError: a bad name or stage.
        """
        check_name(name)
        _check_stage(stage)
        artifact, run_json = _run_files(Path(run))
        store = ArtifactStore(self.artifact_root)
        with store.stage(artifact) as (staged, digest):
            record = _record_from_run(artifact, staged, run_json)
            # Publish and insert under the store's lock: a concurrent delete of the last version using
            # this copy cannot remove it between the two.
            with store.lock():
                location = store.publish(staged, digest)
                store.add_user(location, self.url, self._where())
                record.update(artifact_path=location, sha256=digest, artifact_stored=True)
                version = self._insert(name, record, notes, "none" if stage == "production" else stage)
        if stage == "production":
            return self.promote(name, version.version, "production")
        return version

    def _insert(self, name: str, record: dict[str, Any], notes: str, stage: str) -> ModelVersion:
        from sqlalchemy import func, select
        from sqlalchemy.exc import IntegrityError, OperationalError

        t = self._table
        for attempt in range(_RETRIES):
            try:
                with self._engine.begin() as conn:
                    latest = conn.execute(select(func.max(t.c.version)).where(t.c.name == name)).scalar()
                    row = {**record, "name": name, "version": (latest or 0) + 1, "stage": stage, "notes": notes,
                           "created": _dt.datetime.now(_dt.timezone.utc)}
                    conn.execute(t.insert().values(**row))
                return _to_version(row)
            except (IntegrityError, OperationalError) as exc:  # lost the race for this number: try the next
                if attempt == _RETRIES - 1:
                    raise RegistryError(f"Could not register '{name}' in {self._where()}: {exc.orig}") from exc
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def promote(self, name: str, version: int, stage: str = "production") -> ModelVersion:
        """Move ``name@version`` to ``stage``; promoting to production archives the previous one, atomically."""
        from sqlalchemy import select
        from sqlalchemy.exc import IntegrityError, SQLAlchemyError

        _check_stage(stage)
        t = self._table
        try:
            with self._engine.begin() as conn:
                # Lock the name's rows (PostgreSQL) so concurrent promotions queue rather than interleave.
                rows = conn.execute(select(t.c.version, t.c.stage).where(t.c.name == name).with_for_update()).all()
                found = version in {r.version for r in rows}
                if found and stage == "production":
                    conn.execute(t.update().where((t.c.name == name) & (t.c.stage == "production")
                                                  & (t.c.version != version)).values(stage="archived"))
                if found:
                    conn.execute(t.update().where((t.c.name == name) & (t.c.version == version)).values(stage=stage))
        except IntegrityError as exc:
            raise RegistryError(f"Another process promoted '{name}' at the same time; run the command again. "
                                f"({exc.orig})") from exc
        except SQLAlchemyError as exc:
            raise self._failed(f"promote {name}@{version}", exc) from exc
        if not found:  # outside the transaction: _not_found reads the registry again
            raise self._not_found(name, str(version))
        return self.get(f"{name}@{version}")

    def delete(self, name: str, version: int, force: bool = False) -> ModelVersion:
        """Remove ``name@version`` from the registry, and its stored copy when no other version uses it,
        in this registry or another sharing the store (``cnnkit.registry.artifacts``).

        A version registered before the artifact store (``artifact_stored`` False) never has its file
        removed: that file is in the run folder.

        Raises:
            RegistryError: it is the production version (promote another first, or ``force``).
        """
        target = self.get(f"{name}@{version}")
        if target.stage == "production" and not force:
            raise RegistryError(f"'{target.ref}' is the production version of '{name}'; refusing to delete it. "
                                f"Promote another version first (cnnkit registry promote {name}@N --stage production), "
                                "or archive it (--stage archived).")
        from sqlalchemy import func, select

        t = self._table
        store = store_of(target.artifact_path) if target.artifact_stored else None
        with store.lock() if store else contextlib.nullcontext():
            with self._database(f"delete {target.ref}"), self._engine.begin() as conn:
                conn.execute(t.delete().where((t.c.name == name) & (t.c.version == version)))
                users = conn.execute(select(func.count()).where(
                    (t.c.artifact_path == target.artifact_path) & t.c.artifact_stored)).scalar()
            if store and not users:
                remove_artifact(target.artifact_path, self.url)
        return target

    # -- reading ---------------------------------------------------------------------------------

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of ``name``, or of all names), sorted by name then version."""
        from sqlalchemy import select

        t = self._table
        query = select(t).order_by(t.c.name, t.c.version)
        if name is not None:
            query = query.where(t.c.name == name)
        with self._database("list versions"), self._engine.begin() as conn:
            rows = [_to_version(r._asdict()) for r in conn.execute(query)]
        if name is not None and not rows:
            raise self._not_found(name, None)
        return rows

    def names(self) -> list[str]:
        from sqlalchemy import select

        with self._database("list names"), self._engine.begin() as conn:
            return list(conn.execute(select(self._table.c.name).distinct().order_by(self._table.c.name)).scalars())

    def get(self, ref: str) -> ModelVersion:
        """``NAME`` (latest), ``NAME@VERSION``, ``NAME@latest`` or ``NAME@<stage>`` -> its ModelVersion.

        Raises:
            VersionNotFoundError: no such name, version or stage (known names/versions listed).
        """
        from sqlalchemy import select

        name, selector = parse_ref(ref)
        t = self._table
        query = select(t).where(t.c.name == name)
        if selector is None or selector == "latest":
            query = query.order_by(t.c.version.desc()).limit(1)
        elif selector.isdigit():
            query = query.where(t.c.version == int(selector))
        elif selector in STAGES:
            query = query.where(t.c.stage == selector).order_by(t.c.version.desc()).limit(1)
        else:
            raise RegistryError(f"'{ref}': after '@' give a version number, 'latest' or a stage "
                                f"({', '.join(STAGES)}). Received: ref={ref!r}")
        with self._database(f"look up '{ref}'"), self._engine.begin() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise self._not_found(name, selector)
        return _to_version(row._asdict())

    def verify(self, name: str | None = None) -> list[VerifyResult]:
        """Re-hash every version's artifact (its stored copy) of ``name``; report each as ok, missing or changed."""
        results = []
        for v in self.list(name):
            actual = artifact_sha256(v.artifact_path)
            status = "missing" if actual is None else "ok" if actual == v.sha256 else "changed"
            results.append(VerifyResult(v.ref, v.artifact_path, status, v.sha256, actual))
        return results

    # -- helpers ---------------------------------------------------------------------------------

    def _where(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def _not_found(self, name: str, selector: str | None) -> VersionNotFoundError:
        names = self.names()
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            return VersionNotFoundError(
                f"No model named '{name}' in the registry {self._where()}. Registered: {names or 'none'}.{hint} "
                f"Register one with 'cnnkit registry add RUN --name {name}'.")
        versions = [f"{v.version} ({v.stage})" for v in self.list(name)]
        return VersionNotFoundError(f"'{name}' has no version '{selector}'. Versions: {', '.join(versions)}. "
                                    f"Received: ref='{name}@{selector}'")

    def _migrate(self) -> None:
        from alembic import command
        from alembic.config import Config
        from sqlalchemy.exc import SQLAlchemyError

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        try:
            with self._engine.connect() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
        except SQLAlchemyError as exc:
            reason = " ".join(str(exc.orig or exc).split()).rstrip(".")
            raise RegistryError(f"Cannot open the model registry at {self._where()}: {reason}. Check "
                                "--registry-url / CNNKIT_REGISTRY_URL and that the database server is running.") from exc


def _missing_sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL when it does not exist; None for other databases and existing files."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        path = make_url(url).database or ""
    except ArgumentError:
        return None  # _create_engine reports a malformed URL
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return None if Path(path).exists() else Path(path).absolute()


def _create_engine(url: str):
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        if url.startswith("sqlite"):
            parsed = make_url(url)
            path = parsed.database or ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Wait up to a minute for another writer's lock (sqlite:///db?timeout=5 to wait less).
            timeout = float(parsed.query.get("timeout", 60))
            engine = create_engine(parsed.difference_update_query(["timeout"]), connect_args={"timeout": timeout})

            @event.listens_for(engine, "connect")
            def _no_implicit_transactions(dbapi_connection, _record):  # SQLAlchemy's documented recipe
                dbapi_connection.isolation_level = None

            @event.listens_for(engine, "begin")
            def _begin_immediate(conn):  # take the write lock up front: no upgrade deadlock between writers
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        raise RegistryError(f"Invalid registry URL {url!r}: {exc}. Use an SQLAlchemy URL such as "
                            "sqlite:////path/registry.db or postgresql://user@host:5432/db.") from exc


def _table():
    """The ``model_versions`` table as the migrations create it (for queries only; Alembic owns DDL)."""
    import sqlalchemy as sa

    return sa.Table(
        "model_versions", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String), sa.Column("version", sa.Integer),
        sa.Column("created", sa.DateTime(timezone=True)), sa.Column("artifact_path", sa.Text),
        sa.Column("sha256", sa.String), sa.Column("run_dir", sa.Text), sa.Column("architecture", sa.String),
        sa.Column("backend", sa.String), sa.Column("keras_version", sa.String), sa.Column("cnnkit_version", sa.String),
        sa.Column("image_size", sa.JSON), sa.Column("color_mode", sa.String), sa.Column("class_names", sa.JSON),
        sa.Column("data_hash", sa.String), sa.Column("split_sizes", sa.JSON), sa.Column("augmentation", sa.JSON),
        sa.Column("hyperparameters", sa.JSON), sa.Column("metrics", sa.JSON), sa.Column("stage", sa.String),
        sa.Column("notes", sa.Text), sa.Column("artifact_stored", sa.Boolean), sa.Column("source_path", sa.Text),
    )


def _to_version(row: dict[str, Any]) -> ModelVersion:
    row = {k: v for k, v in row.items() if k != "id"}
    row["artifact_stored"] = bool(row.get("artifact_stored"))
    created = row["created"]
    if created.tzinfo is None:  # SQLite stores naive datetimes; they were written as UTC
        row["created"] = created.replace(tzinfo=_dt.timezone.utc)
    row["metrics"] = row.get("metrics") or {}
    return ModelVersion(**row)


def check_name(name: str) -> None:
    """Raise RegistryError unless ``name`` can name a registered model."""
    if not name or "@" in name or "/" in name or len(name) > 200 or name != name.strip():
        raise RegistryError("A model name is 1-200 characters without '@', '/' or surrounding spaces, e.g. "
                            f"'flowers'. Received: name={name!r}")


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        near = [s for s in STAGES if stage and s.startswith(stage.lower())] or difflib.get_close_matches(stage, STAGES, n=1)
        raise RegistryError(f"Unknown stage '{stage}'. Stages: {', '.join(STAGES)}."
                            + (f" Did you mean '{near[0]}'?" if near else "") + f" Received: stage={stage!r}")


def _run_files(run: Path) -> tuple[Path, Path]:
    """(model file, run.json) of a run directory or a bare ``.keras`` file."""
    if run.is_dir():
        artifact, run_json = run / MODEL_FILE, run / RUN_JSON
        if not artifact.is_file():
            raise RunNotFoundError(f"No model.keras in '{run}'. Pass a run directory written by 'cnnkit train'.")
        return artifact, run_json
    if run.is_file() and run.suffix == ".keras":
        return run, run.parent / RUN_JSON
    raise RunNotFoundError(f"No run directory or .keras file at '{run}'. Pass a run written by 'cnnkit train'.")


def _record_from_run(artifact: Path, staged: Path, run_json: Path) -> dict[str, Any]:
    """The columns describing a run, from its run.json and the staged copy of its model (what is stored)."""
    try:
        meta = read_model_metadata(staged) or {}
    except CnnkitError as exc:
        raise RegistryError(f"{str(exc).replace(str(staged), str(artifact))} Not registered.") from exc
    info = read_json(run_json) if run_json.is_file() else {}
    config = info.get("config", {})
    versions = info.get("versions", {})
    return {
        "source_path": str(artifact.resolve()),
        "run_dir": str(artifact.parent.resolve()) if info else None,
        "architecture": meta.get("architecture") or config.get("model", {}).get("name", "unknown"),
        "backend": versions.get("backend", "unknown"),
        "keras_version": versions.get("keras", "unknown"),
        "cnnkit_version": versions.get("cnnkit") or meta.get("cnnkit_version", "unknown"),
        "image_size": list(meta.get("image_size") or info.get("image_size") or []),
        "color_mode": meta.get("color_mode") or info.get("color_mode", "rgb"),
        "class_names": list(meta.get("class_names") or info.get("class_names") or []),
        "data_hash": info.get("data_hash"),
        "split_sizes": info.get("split_sizes"),
        "augmentation": info.get("augmentation"),
        "hyperparameters": {k: v for k, v in config.items() if k in ("model", "train")} or None,
        "metrics": {**info.get("metrics", {}), **_eval_metrics(artifact.parent if info else None)},
    }




def _eval_metrics(run_dir: Path | None) -> dict[str, Any]:
    """``{"eval": {report name: headline metrics}}`` from ``RUN/eval/*/metrics.json``, when evaluated."""
    if run_dir is None or not (run_dir / "eval").is_dir():
        return {}
    reports = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        data = read_json(path)
        reports[path.parent.name] = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"eval": reports} if reports else {}
