"""Deploy stage: Docker. A run (or ``NAME@stage`` from the registry) -> a build context for a serving image.

``write_build_context`` writes a folder holding the model (``model/model.keras`` + ``run.json``),
a ``requirements.txt`` pinned to the versions installed here, cnnkit's own source, and a
multi-stage ``Dockerfile`` (CPU TensorFlow, non-root user, HEALTHCHECK on ``/healthz``) whose
entry command is ``cnnkit serve /model``. A model mounted at run time (``-v runs/x:/model``)
replaces the baked-in one.

With ``engine="onnxruntime"`` the image is slim: the model is its ONNX export (``model/model.onnx``
+ ``cnnkit.json`` + ``run.json``) and the requirements are ONNX Runtime, numpy, Pillow, FastAPI,
uvicorn, python-multipart and prometheus-client (cnnkit itself installed without its dependencies;
no pip, no CLI: ``python -m cnnkit.serve`` runs ``create_app``; a model mounted at run time must be
an ONNX export folder, ``cnnkit export RUN -f onnx``): no TensorFlow, no Keras. It answers like
``cnnkit predict`` (within 1e-4); ``:explain`` answers 501. ``build_image`` runs ``docker build`` when a daemon answers, else
returns the command to run.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cnnkit.engines import engine_for, write_onnx_export
from cnnkit.errors import CnnkitError
from cnnkit.registry import resolve_source
from cnnkit.rundir import RUN_JSON, atomic_directory, check_replaceable, is_onnx_export

# The image installs cnnkit's own requirements plus these extras (no JAX/torch, no test tools), with
# environment markers evaluated for the image: Linux, CPython 3.11.
_IMAGE_EXTRAS = ("serve", "postgres")
_IMAGE_ENV = {"platform_system": "Linux", "sys_platform": "linux", "os_name": "posix", "platform_machine": "x86_64",
              "python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython",
              "platform_python_implementation": "CPython"}
# Used only when cnnkit runs from a source tree that was never pip-installed (no metadata to read).
_FALLBACK = ["keras", "tensorflow-cpu", "numpy", "pillow", "scikit-learn", "matplotlib", "typer", "rich",
             "sqlalchemy", "alembic", "psycopg[binary]", "fastapi", "uvicorn[standard]", "python-multipart",
             "prometheus-client"]
# The slim image (engine onnxruntime): what `cnnkit serve /model --engine onnxruntime` imports, nothing more.
SLIM_REQUIREMENTS = ("onnxruntime", "numpy", "pillow", "fastapi", "uvicorn", "python-multipart", "prometheus-client")
_PORT = 8501

DOCKERFILE = """\
# A cnnkit model server: TensorFlow Serving's REST API on port {port} (cnnkit serve, engine {engine}).
#   docker build -t {tag} .            (BASE defaults to python:3.11-slim)
#   docker run -p 127.0.0.1:{port}:{port} {tag}
#   docker run -p 127.0.0.1:{port}:{port} -v "$PWD/{mount}:/model:ro" {tag}    (another model, mounted{mount_note})
ARG BASE=python:3.11-slim

FROM ${{BASE}} AS build
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
COPY cnnkit-src /tmp/cnnkit-src
# An optional CA bundle for networks that intercept TLS, as a BuildKit secret (never in a layer).
RUN --mount=type=secret,id=extra_ca,required=false \\
    export PIP_CERT=$( [ -s /run/secrets/extra_ca ] && echo /run/secrets/extra_ca ); \\
    pip install --no-cache-dir "setuptools>=68" -r /tmp/requirements.txt \\
    && pip install --no-cache-dir --no-deps --no-build-isolation /tmp/cnnkit-src{trim}

FROM ${{BASE}}
RUN useradd --create-home --uid 10001 cnnkit
COPY --from=build /opt/venv /opt/venv
COPY --chown=cnnkit model /model
ENV PATH=/opt/venv/bin:$PATH \\
    {engine_env} \\
    CNNKIT_HOME=/home/cnnkit/.cnnkit CNNKIT_MODEL_NAME={name}
USER cnnkit
EXPOSE {port}
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \\
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=2)"]
CMD {cmd}
"""
_CMD = '["cnnkit", "--quiet", "serve", "/model", "--host", "0.0.0.0", "--port", "{port}"]'
# The slim image has no CLI (Typer, Rich and Pygments are 25 MB): `python -m cnnkit.serve` calls
# create_app(), which reads CNNKIT_MODEL and CNNKIT_ENGINE, and says in one line why a model cannot be
# served (an ONNX export folder is needed: no Keras inside); pip and setuptools leave the image once
# cnnkit is installed, and so do numpy's test suites and ONNX Runtime's model-conversion tools (26 MB
# that serving never imports).
_SLIM_CMD = '["python3", "-m", "cnnkit.serve", "--host", "0.0.0.0", "--port", "{port}"]'
_SLIM_TRIM = (" \\\n    && pip uninstall -y -q pip setuptools \\\n"
              "    && cd /opt/venv/lib/python3*/site-packages \\\n"
              "    && rm -rf numpy/tests numpy/*/tests onnxruntime/transformers onnxruntime/quantization onnxruntime/tools")


@dataclass
class BuildContext:
    """A written build context: its folder, the image tag, and the model's URL name."""

    path: Path
    tag: str
    name: str
    engine: str = "keras"

    @property
    def build_command(self) -> list[str]:
        return ["docker", "build", "-t", self.tag, str(self.path)]


def image_requirements() -> list[str]:
    """cnnkit's requirements for a Linux serving image: core + ``serve`` (+ ``postgres``) extras, as names."""
    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("cnnkit") or []
    except importlib.metadata.PackageNotFoundError:
        return list(_FALLBACK)
    names: dict[str, str] = {}
    for text in declared:
        req = Requirement(text)
        if req.name == "cnnkit":  # the test extra's self-reference
            continue
        wanted = req.marker is None or any(req.marker.evaluate({**_IMAGE_ENV, "extra": extra})
                                           for extra in ("", *_IMAGE_EXTRAS))
        if wanted:
            names[req.name] = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
    return list(names.values())


def pinned_requirements() -> list[str]:
    """``package==version`` for each image requirement, pinned to the version installed here."""
    lines = []
    for requirement in image_requirements():
        dist = requirement.split("[")[0]
        try:
            lines.append(f"{requirement}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            if dist == "tensorflow-cpu":  # macOS installs "tensorflow"; the image is Linux
                try:
                    lines.append(f"tensorflow-cpu=={importlib.metadata.version('tensorflow')}")
                    continue
                except importlib.metadata.PackageNotFoundError:
                    pass
            lines.append(requirement)
    return lines


def slim_requirements() -> list[str]:
    """``package==version`` for the slim (onnxruntime) image, pinned to the versions installed here."""
    lines = []
    for name in SLIM_REQUIREMENTS:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(name)
    return lines


def write_build_context(source: str | Path, out: str | Path, tag: str | None = None,
                        registry_url: str | None = None, engine: str | None = None) -> BuildContext:
    """Write a Docker build context serving ``source`` (run dir, ``.keras``, ONNX export folder, or ``NAME@stage``).

    Args:
        source: what to serve; a registry reference is resolved and its sha256 checked.
        out: the folder to write (replaced if it exists and holds a Dockerfile).
        tag: the image tag (default ``cnnkit-<name>:<version>``, ``-slim`` added for onnxruntime).
        engine: "keras" (TensorFlow inside) or "onnxruntime" (the slim image: no TensorFlow); default
            onnxruntime for an ONNX export folder, else keras.

    Raises:
        ConfigError: unknown engine, or keras asked for an ONNX export folder.
        RunNotFoundError / VersionNotFoundError / RegistryError: the model cannot be found or changed.
    """
    engine = engine_for(source, engine)
    resolved = resolve_source(source, registry_url=registry_url)
    out = Path(out)
    check_replaceable(out, ("Dockerfile",), "cnnkit build context")
    slim = engine == "onnxruntime"
    tag = tag or f"cnnkit-{resolved.name.lower()}:{resolved.version}{'-slim' if slim else ''}"
    with atomic_directory(out, ("Dockerfile",), "cnnkit build context") as work:
        if not slim:
            (work / "model").mkdir()
            shutil.copy2(resolved.path, work / "model" / "model.keras")
        elif is_onnx_export(resolved.path):
            shutil.copytree(resolved.path, work / "model")
        else:
            write_onnx_export(resolved.path, work / "model")
        if resolved.run_dir is not None and (resolved.run_dir / RUN_JSON).exists():
            shutil.copy2(resolved.run_dir / RUN_JSON, work / "model" / RUN_JSON)
        requirements = slim_requirements() if slim else pinned_requirements()
        (work / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
        _copy_cnnkit_source(work / "cnnkit-src")
        engine_env = "CNNKIT_ENGINE=onnxruntime CNNKIT_MODEL=/model" if slim else \
            "KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2"
        mount = ("runs/other/export/onnx", ": its ONNX export, 'cnnkit export runs/other -f onnx'") if slim else \
            ("runs/other", "")
        dockerfile = DOCKERFILE.format(port=_PORT, tag=tag, name=resolved.name, engine=engine, engine_env=engine_env,
                                       mount=mount[0], mount_note=mount[1],
                                       trim=_SLIM_TRIM if slim else "",
                                       cmd=(_SLIM_CMD if slim else _CMD).format(port=_PORT))
        (work / "Dockerfile").write_text(dockerfile, encoding="utf-8")
        (work / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n", encoding="utf-8")
    return BuildContext(out, tag, resolved.name, engine)


def _copy_cnnkit_source(target: Path) -> None:
    """cnnkit's package and a minimal pyproject, so the image installs this exact code."""
    package = Path(__file__).resolve().parents[1]  # cnnkit/
    shutil.copytree(package, target / "cnnkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    project = package.parent / "pyproject.toml"
    if project.exists():
        shutil.copy2(project, target / "pyproject.toml")
    else:  # an installed wheel: write a minimal project
        (target / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
            '[project]\nname = "cnnkit"\nversion = "0"\n[project.scripts]\ncnnkit = "cnnkit.cli:main"\n'
            '[tool.setuptools.packages.find]\ninclude = ["cnnkit*"]\n', encoding="utf-8")
    readme = package.parent / "README.md"
    (target / "README.md").write_text(readme.read_text(encoding="utf-8") if readme.exists() else "cnnkit\n",
                                      encoding="utf-8")


def docker_available() -> bool:
    """A docker client on PATH and a daemon answering it."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_image(context: BuildContext) -> bool:
    """Run ``docker build`` when a daemon is available; return whether it ran (raises if it failed)."""
    if not docker_available():
        return False
    result = subprocess.run(context.build_command)
    if result.returncode != 0:
        raise CnnkitError(f"'docker build' failed (exit {result.returncode}) for {context.path}; see its output above.")
    return True
