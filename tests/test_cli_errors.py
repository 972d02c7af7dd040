"""Every user-facing error through the CLI is one line saying what, where and how to fix, with a non-zero
exit and no traceback (unless --debug): file-system errors (permissions, disk full, read-only),
database errors (unreachable, locked) and broken runs."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cnnkit.cli import _handle_errors, app
from tests.conftest import write_class_folder

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["-q", "train", "--model", "simple", "--image-size", "16", "--epochs", "1", "--batch-size", "8"]


def _run(*args: str, prefix: list[str] = (), env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "cnnkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    message = " ".join(result.stderr[result.stderr.index("error:"):].split())
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_class_folder(tmp_path_factory.mktemp("errors") / "data", per_class=10)


def _without_permission_overrides() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a process that honours file permissions")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def test_an_unwritable_out_folder(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = _run(*TRAIN, str(data), "--out", str(locked / "run"), prefix=_without_permission_overrides(),
                  env={"CNNKIT_HOME": str(tmp_path / "home")})
    _one_line_error(result, "Permission denied", str(locked), "--out")


def _small_mount(tmp_path: Path, command: str, size: str = "256k", read_only: bool = False) -> subprocess.CompletedProcess:
    """``command`` in a private mount namespace with a tiny (or read-only) tmpfs at tmp_path/mnt."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed: cannot make a small or read-only file system for this test")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 99\n"
    if read_only:
        script += f"mkdir -p {mount}/runs && mount -o remount,ro {mount} || exit 99\n"
    script += command
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CNNKIT_HOME": str(tmp_path / "home")})
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"this machine cannot mount a private tmpfs: {result.stderr.strip()[-300:]}")
    return result


def test_a_full_disk(data, tmp_path):
    out = tmp_path / "mnt" / "run"
    result = _small_mount(tmp_path, f"exec {sys.executable} -m cnnkit.cli {' '.join(TRAIN)} {data} --out {out}")
    _one_line_error(result, "No space left", str(tmp_path / "mnt"))


def test_a_read_only_folder(data, tmp_path):
    out = tmp_path / "mnt" / "runs" / "run"
    result = _small_mount(tmp_path, f"exec {sys.executable} -m cnnkit.cli {' '.join(TRAIN)} {data} --out {out}",
                          size="8m", read_only=True)
    _one_line_error(result, "read-only file system", str(tmp_path / "mnt"))


def test_an_unreachable_registry_database(tmp_path):
    result = _run("registry", "list", "--registry-url", "postgresql://cnnkit@127.0.0.1:9/none",
                  env={"CNNKIT_HOME": str(tmp_path)})
    _one_line_error(result, "Cannot open the model registry at postgresql", "127.0.0.1:9",
                    "--registry-url / CNNKIT_REGISTRY_URL")


def test_a_locked_registry_database(tmp_path):
    db = tmp_path / "registry.db"
    url = f"sqlite:///{db}?timeout=0.5"
    from cnnkit.registry import Registry

    Registry(url).close()  # creates and migrates it (reading commands never create one)
    assert _run("registry", "list", "--registry-url", url).returncode == 0
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
    try:
        result = _run("registry", "list", "--registry-url", url)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _one_line_error(result, "database is locked", str(db))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors-run") / "run"
    result = _run(*TRAIN, str(data), "--out", str(out), env={"CNNKIT_HOME": str(out.parent / "home")})
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_broken_runs(run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "run.json").write_text('{"status": "completed", "config": ')  # cut off by an old tool
    _one_line_error(_run("compare", str(damaged)), "damaged", str(damaged / "run.json"))
    _one_line_error(_run("-q", "train", "--resume", str(damaged)), "damaged", "run.json")
    truncated = tmp_path / "truncated"
    shutil.copytree(run, truncated)
    data = (truncated / "model.keras").read_bytes()
    (truncated / "model.keras").write_bytes(data[: len(data) // 3])
    _one_line_error(_run("-q", "predict", str(truncated), str(run / "curves.png")), "not a valid .keras model file",
                    str(truncated / "model.keras"))
    old = tmp_path / "old"  # a run from before cnnkit kept the history inside the checkpoint, its history.csv lost
    shutil.copytree(run, old)
    (old / "history.csv").unlink()
    with zipfile.ZipFile(run / "last.keras") as src, zipfile.ZipFile(old / "last.keras", "w") as dst:
        for item in src.infolist():
            if item.filename != "cnnkit-history.json":
                dst.writestr(item, src.read(item))
    record = json.loads((old / "run.json").read_text())
    record["status"] = "interrupted"
    (old / "run.json").write_text(json.dumps(record))
    _one_line_error(_run("-q", "train", "--resume", str(old)), "no history.csv", "Start a new run")
    _one_line_error(_run("-q", "evaluate", str(tmp_path / "nowhere")), "No run directory or model file",
                    str(tmp_path / "nowhere"))


def test_an_unexpected_failure_is_one_line_with_exit_3_and_a_traceback_only_with_debug():
    broken = typer.Typer()

    @broken.command()
    @_handle_errors
    def fail() -> None:
        raise RuntimeError("the disk controller caught fire")

    @broken.callback()
    def options(debug: bool = False) -> None:
        from cnnkit import cli

        cli._state["debug"] = debug

    result = CliRunner().invoke(broken, ["fail"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert "internal error (RuntimeError: the disk controller caught fire)" in " ".join(result.output.split())
    assert "--debug" in result.output
    debug = CliRunner().invoke(broken, ["--debug", "fail"])
    assert isinstance(debug.exception, RuntimeError)  # --debug lets the traceback through
    from cnnkit import cli

    cli._state["debug"] = False


def test_cli_errors_name_the_fix_for_a_config_mistake(data, tmp_path):
    result = CliRunner().invoke(app, ["train", str(data), "--schedule", "linear", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "schedule must be one of" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("value, says", [
    ("pytorch", "KERAS_BACKEND='pytorch' is not a Keras backend: use tensorflow (the default), jax or torch "
                "(lower case). Did you mean KERAS_BACKEND=torch?"),
    ("TensorFlow", "Did you mean KERAS_BACKEND=tensorflow?"),
    ("openvino", "KERAS_BACKEND=openvino but openvino is not installed here"),
])
def test_a_wrong_keras_backend_is_the_users_setting_not_a_bug(monkeypatch, value, says):
    """Keras fails on these at import (ValueError, ModuleNotFoundError): exit 2 with the fix, even for info."""
    import importlib.util

    from typer.testing import CliRunner

    from cnnkit.cli import app

    if value == "openvino" and importlib.util.find_spec("openvino") is not None:
        pytest.skip("openvino is installed here")
    monkeypatch.setenv("KERAS_BACKEND", value)
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert "internal error" not in result.output


def test_predict_out_that_is_a_folder_is_named_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from cnnkit.cli import app

    (tmp_path / "outdir").mkdir()
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "x.jpg"), "--out",
                                      str(tmp_path / "outdir")])
    assert result.exit_code == 2, result.output
    assert f"--out '{tmp_path / 'outdir'}' is a folder; it takes the file to write, e.g. --out " \
           f"{tmp_path / 'outdir' / 'predictions.csv'}" in " ".join(result.output.split()).replace("\n", "")
