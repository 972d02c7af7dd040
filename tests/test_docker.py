"""The Docker build context: files present, the model loads from it, its entry command serves /healthz."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.deploy.docker import pinned_requirements, write_build_context
from cnnkit.errors import CnnkitError
from tests.conftest import write_class_folder
from tests.test_serve import free_port, wait_ready


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docker-run")
    data = write_class_folder(root / "data", per_class=8)
    cnnkit.train(data, root / "colours", epochs=1, image_size=16, cache_root=root / "cache")
    return root / "colours"


def test_build_context_files(run_dir, tmp_path):
    context = write_build_context(run_dir, tmp_path / "ctx")
    assert context.tag == "cnnkit-colours:1" and context.name == "colours"
    names = {p.relative_to(context.path).as_posix() for p in context.path.rglob("*") if p.is_file()}
    for required in ("Dockerfile", "requirements.txt", ".dockerignore", "model/model.keras", "model/run.json",
                     "cnnkit-src/pyproject.toml", "cnnkit-src/cnnkit/serve/app.py", "cnnkit-src/cnnkit/registry/store.py",
                     "cnnkit-src/cnnkit/registry/migrations/versions/0001_initial.py"):
        assert required in names, required
    dockerfile = (context.path / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in dockerfile and "FROM ${BASE} AS build" in dockerfile
    assert "USER cnnkit" in dockerfile and "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "CNNKIT_MODEL_NAME=colours" in dockerfile
    requirements = (context.path / "requirements.txt").read_text().split()
    assert all("==" in line for line in requirements) and any(r.startswith("tensorflow-cpu==") for r in requirements)
    assert requirements == pinned_requirements()
    names = {r.split("==")[0].split("[")[0] for r in requirements}
    assert {"keras", "fastapi", "uvicorn", "sqlalchemy", "alembic"} <= names  # core + the serve extra
    assert not names & {"jax", "torch", "pytest", "tf2onnx"}  # no other backends or test tools
    model = cnnkit.Predictor(context.path / "model")
    assert model.class_names == ["blue", "green", "red"]


def test_entry_command_serves_outside_docker(run_dir, tmp_path):
    context = write_build_context(run_dir, tmp_path / "ctx")
    dockerfile = (context.path / "Dockerfile").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    port = free_port()
    args = [str(context.path / "model") if a == "/model" else a for a in command[1:]]
    args = [str(port) if a == "8501" else "127.0.0.1" if a == "0.0.0.0" else a for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CNNKIT_MODEL_NAME": context.name, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
        pixels = np.zeros((16, 16, 3), int).tolist()
        got = httpx.post(f"{url}/v1/models/colours:predict", json={"instances": [pixels]}, timeout=30)
        assert got.status_code == 200 and len(got.json()["predictions"][0]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_context_from_registry_and_refusals(run_dir, tmp_path):
    from cnnkit.registry import Registry

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    with Registry(url) as reg:
        reg.add(run_dir, "flowers", stage="production")
    context = write_build_context("flowers@production", tmp_path / "ctx", registry_url=url)
    assert context.tag == "cnnkit-flowers:1" and "CNNKIT_MODEL_NAME=flowers" in (context.path / "Dockerfile").read_text()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CnnkitError, match="is not a cnnkit build context"):
        write_build_context(run_dir, tmp_path / "busy")


def test_cli_docker_without_daemon_prints_the_command(run_dir, tmp_path):
    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["docker", str(run_dir), "--tag", "me/colours:1", "--out", str(tmp_path / "c"),
                                      "--no-build"])
    assert result.exit_code == 0, result.output
    assert f"docker build -t me/colours:1 {tmp_path / 'c'}" in result.output
