"""Serve stage: the web page at ``/`` and the two API routes it needs beyond TF Serving's.

In: the served model (``app.state``) and the files under ``cnnkit/serve/static/`` (plain HTML, CSS
and JavaScript shipped in the package: no build step, nothing fetched from another host). Out:

    GET  /                                   the page (drop, pick or paste images; results; model card)
    GET  /static/{file}                      its stylesheet and script
    GET  /v1/models/{name}/card              the model card (JSON): name, version, stage, class names,
                                             image size, metrics, data hash, training date, backend,
                                             calibration, request limits, evaluation reports
    GET  /v1/models/{name}/reports/{report}  RUN/eval/<report>/report.html, when the run has one

The page itself calls only the routes every client uses (``/readyz``, ``/predict``, ``:explain``,
``/metadata``, ``/card``), so it obeys the same limits. The card comes from the registry when the
model is served as ``NAME@stage`` (its stage read live), else from the run's ``run.json``.
``cnnkit ui`` runs the app on a free 127.0.0.1 port (``cnnkit.serve.listen``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from cnnkit.errors import RegistryError
from cnnkit.registry import ModelSource, Registry
from cnnkit.rundir import read_json, read_run_json
from cnnkit.serve.inputs import RequestError
from cnnkit.serve.routes import ERRORS, ServedDep, SettingsDep, SourceDep, model_named
from cnnkit.serve.settings import ServeSettings
from cnnkit.serve.state import Served

STATIC = Path(__file__).resolve().parent / "static"
_ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
# Everything the page loads comes from this server; images shown are the user's own (blob:) or
# the :explain PNGs (data:). A browser enforcing this cannot be made to reach another host.
_PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(responses=ERRORS)  # the same error answers as every other API route


@router.api_route("/", methods=["GET", "HEAD"], tags=["page"], include_in_schema=False)
async def index() -> FileResponse:
    """The web page."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers={**_HEADERS, "Content-Security-Policy": _PAGE_POLICY})


@router.get("/static/{filename}", tags=["page"], include_in_schema=False)
async def static_file(filename: str) -> FileResponse:
    """The page's stylesheet and script (only these names: no path is ever built from the URL)."""
    if filename not in _ASSETS:
        raise RequestError(404, f"No file '{filename}' here; the page's files are {sorted(_ASSETS)}.")
    return FileResponse(STATIC / filename, media_type=_ASSETS[filename], headers=_HEADERS)


@router.get("/v1/models/{name}/card", tags=["model card"], dependencies=[Depends(model_named)])
async def model_card(request: Request, name: str, source: SourceDep, served: ServedDep,
                     settings: SettingsDep) -> dict[str, Any]:
    """The model card: name, version, stage, class names, image size, metrics, data hash, training date,
    backend, calibration, request limits and the run's evaluation reports (``report_url`` per report)."""
    registry_url = getattr(request.app.state, "registry_url", None)
    return await run_in_threadpool(build_card, source, served, settings, registry_url, f"/v1/models/{name}")


@router.get("/v1/models/{name}/reports/{report}", tags=["model card"], dependencies=[Depends(model_named)])
async def evaluation_report(name: str, report: str, source: SourceDep) -> FileResponse:
    """The run's evaluation report ``RUN/eval/<report>/report.html`` (written by ``cnnkit evaluate``)."""
    reports = eval_reports(source.run_dir)
    if report not in reports or reports[report] is None:
        have = sorted(k for k, v in reports.items() if v is not None)
        raise RequestError(404, f"No evaluation report '{report}' for '{name}'. "
                                + (f"Reports: {have}." if have else "Run 'cnnkit evaluate RUN DATA' to write one."))
    return FileResponse(reports[report], media_type="text/html; charset=utf-8",
                        headers={**_HEADERS, "Content-Security-Policy": _REPORT_POLICY})


# -- the card ------------------------------------------------------------------------------------------


def build_card(source: ModelSource, served: Served, settings: ServeSettings, registry_url: str | None,
               base_url: str) -> dict[str, Any]:
    """The model card as JSON-ready data, from the registry (``NAME@stage``) or the run's ``run.json``.

    Raises:
        RegistryError: the registry cannot be read, or no longer lists the served version.
    """
    meta = served.predictor.meta
    run = read_run_json(source.run_dir) if source.run_dir is not None else {}
    card: dict[str, Any] = {
        "name": source.name, "version": source.version, "stage": None, "from": "run.json" if run else "model file",
        "registry_name": None, "registered": None,
        "trained": run.get("created"), "backend": run.get("versions", {}).get("backend"),
        "architecture": meta.architecture, "class_names": list(meta.class_names),
        "image_size": list(meta.image_size), "color_mode": meta.color_mode, "resize_mode": meta.resize_mode,
        "data_hash": run.get("data_hash"), "split_sizes": run.get("split_sizes"),
        "metrics": {**run.get("metrics", {}), **_eval_headlines(source.run_dir)},
        "sha256": source.sha256,
    }
    if source.stage is not None:  # served as NAME@stage / NAME@VERSION: the registry's record is the card
        card.update(_registry_fields(source, registry_url))
    card["calibration"] = {"temperature": served.temperature, "min_confidence": served.min_confidence}
    card["limits"] = {"max_body_bytes": settings.max_body_bytes, "max_instances": settings.max_instances,
                      "max_pixels": meta.max_pixels}
    card["reports"] = [{"name": report, "url": f"{base_url}/reports/{report}"}
                       for report, path in eval_reports(source.run_dir).items() if path is not None]
    return card


def _registry_fields(source: ModelSource, registry_url: str | None) -> dict[str, Any]:
    """The served version's registry row (found by artifact hash and version, whatever URL name it got)."""
    with Registry(registry_url, create=False) as registry:
        found = [v for v in registry.list() if v.sha256 == source.sha256 and str(v.version) == source.version]
    if not found:
        raise RegistryError(f"The registry no longer lists the served model (version {source.version}, sha256 "
                            f"{(source.sha256 or '')[:12]}...); restart the server with a current NAME@stage.")
    version = found[0]
    return {"stage": version.stage, "from": "registry", "registry_name": version.name,
            "registered": version.to_dict()["created"], "backend": version.backend,
            "architecture": version.architecture, "class_names": version.class_names,
            "image_size": version.image_size, "color_mode": version.color_mode, "data_hash": version.data_hash,
            "split_sizes": version.split_sizes, "metrics": version.metrics, "notes": version.notes}


def eval_reports(run_dir: Path | None) -> dict[str, Path | None]:
    """``{report name: RUN/eval/<name>/report.html or None}`` for each evaluation the run has."""
    if run_dir is None or not (run_dir / "eval").is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in (run_dir / "eval").iterdir() if p.is_dir() and not p.name.startswith(".")):
        report = folder / "report.html"
        found[folder.name] = report if report.is_file() else None
    return found


def _eval_headlines(run_dir: Path | None) -> dict[str, Any]:
    """``{"eval": {report: its numeric top-level metrics}}``, the shape the registry stores."""
    headlines = {}
    for name in eval_reports(run_dir):
        path = run_dir / "eval" / name / "metrics.json"  # type: ignore[operator]
        if path.is_file():
            data = read_json(path)
            headlines[name] = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"eval": headlines} if headlines else {}
