"""The model registry, every test on SQLite and on the PostgreSQL at 127.0.0.1:5432 (database ``test``)."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit.errors import RegistryError, RunNotFoundError, VersionNotFoundError
from cnnkit.registry import Registry
from tests.conftest import write_class_folder

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_reason() -> str | None:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return None
    except Exception as exc:  # no server, no driver, no database
        return f"no PostgreSQL at 127.0.0.1:5432/test ({type(exc).__name__}: {str(exc).strip()[:120]})"


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """A fresh, empty registry URL: a SQLite file, or a private schema in PostgreSQL's ``test`` database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    reason = _postgres_reason()
    if reason:
        pytest.skip(reason)
    import psycopg

    schema = f"cnnkit_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny trained run (16x16, 1 epoch), evaluated once, shared by the module's tests."""
    import cnnkit

    root = tmp_path_factory.mktemp("registry-run")
    data = write_class_folder(root / "data", per_class=8)
    run = root / "run"
    cnnkit.train(data, run, model="simple", epochs=1, image_size=16, cache_root=root / "cache")
    cnnkit.evaluate(run, data, name="holdout")
    return run


@pytest.fixture
def registry(registry_url):
    with Registry(registry_url) as reg:
        yield reg


def test_add_records_the_run(registry, run_dir):
    v = registry.add(run_dir, "colours", notes="first try")
    assert (v.name, v.version, v.stage, v.notes) == ("colours", 1, "none", "first try")
    info = json.loads((run_dir / "run.json").read_text())
    assert v.source_path == str((run_dir / "model.keras").resolve())
    assert v.artifact_stored and Path(v.artifact_path) == _store(registry) / v.sha256 / "model.keras"
    assert Path(v.artifact_path).read_bytes() == (run_dir / "model.keras").read_bytes()
    assert hashlib.sha256(Path(v.artifact_path).read_bytes()).hexdigest() == v.sha256
    assert v.class_names == ["blue", "green", "red"] == info["class_names"]
    assert v.image_size == [16, 16] and v.color_mode == "rgb" and v.architecture == "simple"
    assert v.backend == info["versions"]["backend"] and v.keras_version == info["versions"]["keras"]
    assert v.data_hash == info["data_hash"] and v.split_sizes == info["split_sizes"]
    assert v.hyperparameters["train"]["epochs"] == 1
    assert v.augmentation["preset"] == info["augmentation"]["preset"]
    assert v.metrics["val_accuracy"] == info["metrics"]["val_accuracy"]
    assert "accuracy" in v.metrics["eval"]["holdout"]
    again = registry.get("colours@1")
    assert again.to_dict() == v.to_dict()


def test_versions_count_per_name_and_refs_resolve(registry, run_dir):
    assert [registry.add(run_dir, "a").version for _ in range(3)] == [1, 2, 3]
    assert registry.add(run_dir, "b").version == 1
    assert registry.get("a").version == 3 and registry.get("a@latest").version == 3
    assert registry.get("a@2").version == 2
    assert [v.ref for v in registry.list()] == ["a@1", "a@2", "a@3", "b@1"]
    assert [v.ref for v in registry.list("b")] == ["b@1"]


def test_promote_keeps_one_production_per_name(registry, run_dir):
    for _ in range(3):
        registry.add(run_dir, "m")
    registry.add(run_dir, "other", stage="production")
    registry.promote("m", 1, "production")
    registry.promote("m", 2, "staging")
    assert registry.get("m@production").version == 1
    registry.promote("m", 3, "production")
    stages = {v.version: v.stage for v in registry.list("m")}
    assert stages == {1: "archived", 2: "staging", 3: "production"}
    assert registry.get("m@production").version == 3
    assert registry.get("other@production").version == 1  # other names untouched


def test_database_itself_refuses_two_production_versions(registry, run_dir):
    from sqlalchemy.exc import IntegrityError

    registry.add(run_dir, "m", stage="production")
    registry.add(run_dir, "m")
    with pytest.raises(IntegrityError), registry._engine.begin() as conn:
        conn.execute(registry._table.update().where(registry._table.c.version == 2).values(stage="production"))


def test_delete_refuses_production(registry, run_dir):
    registry.add(run_dir, "m", stage="production")
    registry.add(run_dir, "m")
    with pytest.raises(RegistryError, match=r"refusing to delete.*promote m@N --stage production"):
        registry.delete("m", 1)
    assert registry.delete("m", 2).version == 2
    assert [v.version for v in registry.list("m")] == [1]
    assert registry.add(run_dir, "m").version == 2  # numbering continues from the highest left


def _store(registry) -> Path:
    return Path(registry.artifact_root)


def _tamper(path: str | Path, data: bytes | None = None) -> None:
    """Change a stored copy behind the registry's back (it is read-only: make it writable first)."""
    path = Path(path)
    path.chmod(0o644)
    if data is None:
        with open(path, "ab") as fh:
            fh.write(b"tampered")
    else:
        path.write_bytes(data)


def _other_model(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run whose model.keras has other bytes (still a loadable zip): a different artifact."""
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    with open(other / "model.keras", "ab") as fh:  # a zip with trailing bytes still loads; new sha256
        fh.write(b"\0" * 16)
    return other


def test_verify_rehashes_the_stored_copies(registry, run_dir, tmp_path):
    other = _other_model(run_dir, tmp_path)
    m1, m2 = registry.add(run_dir, "m"), registry.add(other, "m")
    registry.add(other / "model.keras", "n")
    assert m1.artifact_path != m2.artifact_path
    assert [r.status for r in registry.verify()] == ["ok", "ok", "ok"]
    (other / "model.keras").write_bytes(b"the run changed")  # the run is not what the registry serves
    assert [r.status for r in registry.verify()] == ["ok", "ok", "ok"]
    _tamper(m2.artifact_path)
    results = {r.ref: r for r in registry.verify()}
    assert results["m@1"].status == "ok" and results["m@2"].status == "changed" and results["n@1"].status == "changed"
    assert results["m@2"].actual_sha256 != results["m@2"].expected_sha256
    Path(m2.artifact_path).unlink()
    assert [r.status for r in registry.verify("m")] == ["ok", "missing"]


def test_changing_the_run_after_add_changes_nothing_served(registry, run_dir, tmp_path):
    import cnnkit
    from cnnkit.registry import resolve_source

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    original = (run / "model.keras").read_bytes()
    registry.add(run, "m", stage="production")
    cnnkit.calibrate(run, min_confidence=0.5)  # rewrites the run's model.keras (calibration inside)
    assert (run / "model.keras").read_bytes() != original
    served = resolve_source("m@production", registry_url=registry.url)
    assert served.path.read_bytes() == original and served.sha256 == hashlib.sha256(original).hexdigest()
    assert [r.status for r in registry.verify()] == ["ok"]
    shutil.rmtree(run)  # even a deleted run still serves
    assert resolve_source("m@production", registry_url=registry.url).path.read_bytes() == original


def test_a_copy_is_stored_once_and_removed_with_its_last_version(registry, run_dir, tmp_path):
    other = _other_model(run_dir, tmp_path)
    a1, a2, b1 = registry.add(run_dir, "a"), registry.add(run_dir, "a"), registry.add(other, "b")
    assert a1.artifact_path == a2.artifact_path != b1.artifact_path
    assert sorted(p.name for p in _store(registry).iterdir() if not p.name.startswith(".")) == sorted(
        {a1.sha256, b1.sha256})
    registry.delete("a", 1)
    assert Path(a2.artifact_path).is_file()  # a@2 still uses it
    registry.delete("a", 2)
    assert not Path(a2.artifact_path).parent.exists()
    assert Path(b1.artifact_path).is_file() and (run_dir / "model.keras").is_file()  # the run is never touched
    assert registry.add(run_dir, "a").artifact_path == a1.artifact_path  # stored again when added again


def test_a_copy_shared_by_two_registries_stays_until_neither_uses_it(registry_url, run_dir, tmp_path):
    """Two databases on one store (every non-SQLite registry's default is $CNNKIT_HOME/artifacts): a
    delete in the one never removes the copy the other's production version serves."""
    from cnnkit.registry import resolve_source

    root, other_url = tmp_path / "shared-store", f"sqlite:///{tmp_path / 'other.db'}"
    with Registry(registry_url, artifact_root=root) as mine, Registry(other_url, artifact_root=root) as other:
        served = mine.add(run_dir, "m", stage="production")
        assert other.add(run_dir, "n").artifact_path == served.artifact_path  # one copy, two registries
        result = _cli("registry", "delete", "n@1", "--registry-url", other_url)
        assert result.exit_code == 0 and "kept for another registry" in result.output, result.output
        assert [r.status for r in mine.verify()] == ["ok"]
        assert resolve_source("m@production", registry_url=registry_url).path.read_bytes() == (
            run_dir / "model.keras").read_bytes()
        mine.promote("m", 1, "archived")
        mine.delete("m", 1)  # the last user of the copy, in any registry
        assert not Path(served.artifact_path).parent.exists()
        # a copy from before the users list: who uses it is unknown, so deleting never removes it
        legacy = other.add(run_dir, "n")
        shutil.rmtree(Path(legacy.artifact_path).parent / "users")
        other.delete("n", legacy.version)
        assert Path(legacy.artifact_path).is_file()
        assert (Path(mine.add(run_dir, "m").artifact_path).parent / "users" / "unknown").is_file()  # added again: kept


def test_artifact_root_can_be_any_folder_or_url(registry_url, run_dir, tmp_path):
    with Registry(registry_url, artifact_root=tmp_path / "elsewhere") as reg:
        v = reg.add(run_dir, "m")
    assert Path(v.artifact_path) == tmp_path / "elsewhere" / v.sha256 / "model.keras"
    with Registry(registry_url, artifact_root=f"file://{tmp_path}/as-url") as reg:
        assert reg.add(run_dir, "m").artifact_path == str(tmp_path / "as-url" / v.sha256 / "model.keras")
        assert [r.status for r in reg.verify()] == ["ok", "ok"]  # each version keeps its own copy


def test_a_remote_store_through_fsspec(registry_url, run_dir, tmp_path):
    pytest.importorskip("fsspec")
    import fsspec

    from cnnkit.registry import resolve_source

    root = f"memory://cnnkit-test-{uuid.uuid4().hex[:8]}"
    with Registry(registry_url, artifact_root=root) as reg:
        v = reg.add(run_dir, "m", stage="production")
        assert v.artifact_path == f"{root}/{v.sha256}/model.keras"
        assert fsspec.open(v.artifact_path, "rb").open().read() == (run_dir / "model.keras").read_bytes()
        assert [r.status for r in reg.verify()] == ["ok"]
        served = resolve_source("m@production", registry_url=registry_url)  # fetched, hash-checked, cached
        assert served.path.read_bytes() == (run_dir / "model.keras").read_bytes()
        with fsspec.open(v.artifact_path, "wb") as fh:
            fh.write(b"changed")
        served.path.unlink()
        assert [r.status for r in reg.verify()] == ["changed"]
        with pytest.raises(RegistryError, match="changed since it was registered"):
            resolve_source("m@production", registry_url=registry_url)
        reg.promote("m", 1, "archived")
        reg.delete("m", 1)
        fs = fsspec.filesystem("memory")
        assert not fs.exists(v.artifact_path.split("://", 1)[1])


def test_versions_registered_before_the_store_keep_working(registry_url, run_dir, tmp_path):
    """A schema-0001 row points into its run folder: after the migration it is read, verified, served, deleted."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from cnnkit.registry import resolve_source
    from cnnkit.registry.store import _MIGRATIONS, _create_engine, normalize_url

    run = tmp_path / "old-run"
    shutil.copytree(run_dir, run)
    engine = _create_engine(normalize_url(registry_url))
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.commit()
    with engine.begin() as conn:
        table = sa.Table("model_versions", sa.MetaData(), autoload_with=conn)
        assert "artifact_stored" not in table.c
        conn.execute(table.insert().values(
            name="old", version=1, created=datetime.datetime.now(datetime.timezone.utc),
            artifact_path=str(run / "model.keras"), sha256=hashlib.sha256((run / "model.keras").read_bytes()).hexdigest(),
            run_dir=str(run), architecture="simple", backend="tensorflow", keras_version="3", cnnkit_version="0",
            image_size=[16, 16], color_mode="rgb", class_names=["blue", "green", "red"], stage="production", notes=""))
    engine.dispose()
    with Registry(registry_url) as reg:
        old = reg.get("old@production")
        assert (old.artifact_stored, old.source_path, old.artifact_path) == (False, None, str(run / "model.keras"))
        assert [r.status for r in reg.verify()] == ["ok"]
        assert resolve_source("old@production", registry_url=registry_url).path == run / "model.keras"
        reg.add(run, "old")  # new versions of the same name are stored copies
        assert reg.get("old@2").artifact_stored
        reg.promote("old", 2, "production")
        reg.delete("old", 1)
        assert (run / "model.keras").is_file()  # never removes a file in a run folder


def test_unknown_refs_say_what_exists(registry, run_dir):
    registry.add(run_dir, "flowers")
    with pytest.raises(VersionNotFoundError, match=r"Did you mean 'flowers'"):
        registry.get("flower@1")
    with pytest.raises(VersionNotFoundError, match=r"has no version '7'.*1 \(none\)"):
        registry.get("flowers@7")
    with pytest.raises(VersionNotFoundError, match=r"has no version 'production'"):
        registry.get("flowers@production")
    with pytest.raises(VersionNotFoundError):
        registry.promote("flowers", 9, "production")
    with pytest.raises(RegistryError, match=r"Unknown stage 'prod'.*Did you mean 'production'"):
        registry.promote("flowers", 1, "prod")
    with pytest.raises(RegistryError, match=r"version number, 'latest' or a stage"):
        registry.get("flowers@newest")
    with pytest.raises(RegistryError, match=r"without '@'"):
        registry.add(run_dir, "a@b")
    with pytest.raises(RunNotFoundError, match="No run directory"):
        registry.add(run_dir / "nope", "flowers")


def test_reopening_keeps_data_and_schema_is_migrated(registry_url, run_dir):
    with Registry(registry_url) as first:
        first.add(run_dir, "m")
    with Registry(registry_url) as second:  # upgrade to head again is a no-op
        assert [v.ref for v in second.list()] == ["m@1"]
        from sqlalchemy import text

        with second._engine.begin() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"


_RACER = textwrap.dedent("""
    import sys, time
    from cnnkit.registry import Registry
    url, run, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    registry = Registry(url)
    print(" ".join(str(registry.add(run, "race").version) for _ in range(5)))
""")


def test_two_processes_registering_at_once_get_distinct_versions(registry_url, run_dir):
    start = time.time() + 2.0  # both processes imported and waiting, then open the (new) database at once
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, registry_url, str(run_dir), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    got = [int(v) for out, _ in outputs for v in out.split()]
    assert sorted(got) == list(range(1, 11))
    with Registry(registry_url) as reg:
        assert [v.version for v in reg.list("race")] == list(range(1, 11))


def test_default_url_is_sqlite_under_cnnkit_home(tmp_path, monkeypatch, run_dir):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CNNKIT_REGISTRY_URL", raising=False)
    monkeypatch.delenv("CNNKIT_ARTIFACT_ROOT", raising=False)
    with Registry() as reg:
        v = reg.add(run_dir, "m")
    assert (tmp_path / "home" / "registry.db").is_file()
    assert Path(v.artifact_path) == tmp_path / "home" / "artifacts" / v.sha256 / "model.keras"
    assert Registry(f"sqlite:///{tmp_path}/db/r.db").artifact_root == str(tmp_path / "db" / "artifacts")
    assert Registry(f"sqlite:///{tmp_path}/db/r.db", artifact_root=tmp_path / "x").artifact_root == str(tmp_path / "x")
    monkeypatch.setenv("CNNKIT_ARTIFACT_ROOT", str(tmp_path / "env-root"))
    assert Registry(f"sqlite:///{tmp_path}/db/r.db").artifact_root == str(tmp_path / "env-root")


def test_unreachable_database_is_a_clear_error():
    with pytest.raises(RegistryError, match=r"Cannot open the model registry.*CNNKIT_REGISTRY_URL"):
        Registry("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(RegistryError, match=r"Invalid registry URL"):
        Registry("nosuchdb://x")


# -- CLI ---------------------------------------------------------------------------------------------


def _cli(*args: str):
    from cnnkit.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_registry_commands(registry_url, run_dir, tmp_path):
    url = ["--registry-url", registry_url]
    result = _cli("registry", "add", str(run_dir), "--name", "colours", "--notes", "baseline", *url)
    assert result.exit_code == 0, result.output
    assert "colours@1" in result.output
    assert _cli("registry", "add", str(run_dir), "--name", "colours", *url).exit_code == 0
    result = _cli("registry", "promote", "colours@2", "--stage", "production", *url)
    assert result.exit_code == 0 and "production" in result.output
    result = _cli("registry", "list", *url)
    assert result.exit_code == 0 and "colours" in result.output and "production" in result.output
    result = _cli("registry", "show", "colours@production", "--format", "json", *url)
    shown = json.loads(result.output)
    assert shown["version"] == 2 and shown["class_names"] == ["blue", "green", "red"]
    result = _cli("registry", "delete", "colours@2", *url)
    assert result.exit_code == 2 and "refusing to delete" in result.output
    result = _cli("registry", "delete", "colours@1", *url)
    assert result.exit_code == 0 and "kept for the other versions" in result.output  # colours@2 uses the copy
    assert _cli("registry", "verify", *url).exit_code == 0
    result = _cli("registry", "show", "colours@1", *url)
    assert result.exit_code == 2 and "has no version '1'" in result.output
    result = _cli("registry", "promote", "colours", "--stage", "production", *url)
    assert result.exit_code == 2 and "NAME@VERSION" in result.output


def test_cli_verify_fails_on_changed_artifact(registry_url, run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    root = tmp_path / "store"
    result = _cli("registry", "add", str(copy), "--name", "m", "--registry-url", registry_url, "--artifact-root", str(root))
    assert result.exit_code == 0 and str(root) in result.output, result.output
    (copy / "model.keras").write_bytes(b"not the model")  # the run changes: nothing registered does
    assert _cli("registry", "verify", "--registry-url", registry_url).exit_code == 0
    stored = next(root.glob("*/model.keras"))
    _tamper(stored, b"not the model")
    result = _cli("registry", "verify", "--registry-url", registry_url)
    assert result.exit_code == 1 and "changed" in result.output and str(stored) in result.output
    result = _cli("registry", "delete", "m@1", "--registry-url", registry_url)
    assert result.exit_code == 0 and "removed its copy" in result.output and not stored.exists()


def test_train_register(registry_url, tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=6)
    result = _cli("train", str(data), "--epochs", "1", "--image-size", "16", "--out", str(tmp_path / "run"),
                  "--register", "trained", "--registry-url", registry_url)
    assert result.exit_code == 0, result.output
    with Registry(registry_url) as reg:
        v = reg.get("trained@1")
    assert v.source_path == str((tmp_path / "run" / "model.keras").resolve())
    assert Path(v.artifact_path).read_bytes() == (tmp_path / "run" / "model.keras").read_bytes()


def test_reading_a_registry_at_a_mistyped_path_writes_nothing(run_dir, tmp_path, monkeypatch):
    """list, show, verify, promote, delete and serve NAME@stage only read: a SQLite path with a typo is
    an error naming it, not a new empty registry (and folders) written there; only add creates one."""
    typo = tmp_path / "typo" / "sub" / "registry.db"
    url = ["--registry-url", f"sqlite:///{typo}"]
    for command in (["list"], ["show", "m@1"], ["verify"], ["promote", "m@1"], ["delete", "m@1"]):
        result = _cli("registry", *command, *url)
        assert result.exit_code == 2 and f"No model registry at {typo}" in result.output, (command, result.output)
    result = _cli("serve", "m@production", "--port", "0", *url)
    assert result.exit_code == 2 and "No model registry at" in result.output, result.output
    assert not (tmp_path / "typo").exists()
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path / "home"))  # the default registry, never used yet: empty
    monkeypatch.delenv("CNNKIT_REGISTRY_URL", raising=False)
    result = _cli("registry", "list")
    assert result.exit_code == 0 and "The registry is empty" in result.output
    assert not (tmp_path / "home" / "registry.db").exists()
    assert _cli("registry", "add", str(run_dir), "--name", "m", *url).exit_code == 0  # add creates it
    assert _cli("registry", "show", "m@1", *url).exit_code == 0


def test_train_register_checks_the_registry_before_training(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    result = _cli("train", str(data), "--epochs", "1", "--image-size", "16", "--out", str(out),
                  "--register", "trained", "--registry-url", "postgresql://127.0.0.1:1/test")
    assert result.exit_code == 2 and "Cannot open the model registry" in result.output, result.output
    assert not out.exists()  # said before training, not after it
    result = _cli("train", str(data), "--epochs", "1", "--out", str(out), "--register", "a/b")
    assert result.exit_code == 2 and "A model name is" in result.output and not out.exists()
