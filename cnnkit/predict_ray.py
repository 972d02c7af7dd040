"""Prediction past one machine: the same ``Predictor`` as a Ray Data stage (``cnnkit predict --ray``).

In: a run directory, ``.keras`` file or ONNX export folder, and image files, folders or globs
(listed here, as ``Predictor.predict`` lists them). Out: one CSV, JSON or Parquet file of predictions
in input order, equal to what ``cnnkit predict --out`` writes in one process (or, without a file,
the predictions themselves, for ``cnnkit predict --ray`` to print).

The file list becomes a Ray dataset of ``(index, path, file, error)`` rows (``path`` as the user
typed it, for the output; ``file`` absolute, for the workers); ``map_batches`` runs
``_PredictBatches``, a callable class, on a pool of ``workers`` actors: each loads the model once
(``Predictor``) and calls ``Predictor.predict_files`` on its batches, so decoding, calibration and
the abstain rule are the single-process ones. Results stream to shards in the chosen format in a
hidden folder beside the output (a temporary folder without one); the shards are then merged by
``index`` into the output (temporary file + rename) and removed. A merge that finds fewer rows
than it sent (shards written on other nodes, to a folder the driver does not share) is an error,
never a shorter file.

On a cluster (``address``), the model file and the images must be at the same paths on every node
(shared storage), and the workers need cnnkit and the same Keras backend (set through the job's
runtime environment). Ray is imported only here, and only when called: ``pip install "cnnkit[ray]"``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit._backends.devices import usable_cpus
from cnnkit.engines import check_engine, open_engine
from cnnkit.errors import ConfigError, DataError
from cnnkit.predict import PREDICTION_FORMATS, Prediction, Predictor, list_inputs, write_predictions
from cnnkit.rundir import new_directory

# Local Ray's shared-memory object store: rows of paths and predictions are small, and the
# default (30% of memory) would reserve gigabytes on a laptop.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


@dataclass
class RayPrediction:
    """What ``predict_with_ray`` returns.

    Attributes:
        out: the merged prediction file (None when none was asked for).
        count: predictions written (one per input image).
        failed: inputs that could not be predicted (their ``error`` column says why).
        workers: Ray actors that loaded the model.
        shards: shard files merged.
        predictions: every prediction, in input order.
        engine: the inference engine every worker ran (auto settled by the driver).
    """

    out: Path | None
    count: int
    failed: int
    workers: int
    shards: int
    predictions: list[Prediction]
    engine: str = "keras"


def predict_with_ray(
    source: str | Path,
    inputs: list[str | Path] | str | Path,
    out: str | Path | None,
    fmt: str = "csv",
    *,
    address: str | None = None,
    workers: int = 2,
    batch_size: int | None = None,
    top_k: int = 3,
    engine: str | None = None,
) -> RayPrediction:
    """Predict images on a Ray cluster (or a local Ray) and write one file of predictions in input order.

    Args:
        source: a run directory, ``.keras`` file or ONNX export folder (the same path on every node).
        inputs: image files, folders (recursive) and glob patterns.
        out: the file to write (replaced atomically); None: write none, return the predictions.
        fmt: csv, json or parquet (the columns of ``cnnkit.predict.write_predictions``), also the
            shards' format.
        address: a Ray cluster (``ray://host:10001`` or ``auto``); None starts a local Ray with
            ``workers`` + 1 CPUs (the workers, and one for reading and writing).
        workers: actors running a ``Predictor`` each (the model is loaded once per actor).
        batch_size: images per ``map_batches`` batch and per model call (default: the Predictor's,
            ``cnnkit.predict.default_batch_size`` of the model's image size).
        top_k: classes listed per image.
        engine: the inference engine of every worker's Predictor (keras, onnxruntime, or auto, which
            the driver settles once for all workers; None: the default).

    Returns:
        A RayPrediction.

    Raises:
        ConfigError: ray is not installed (with the install command), bad ``fmt``, ``workers`` or ``engine``.
        DataError: no images in ``inputs``; shards missing rows (written where the driver cannot read).

    Example:
        >>> result = predict_with_ray("runs/first", ["photos/"], "predictions.csv", workers=2)  # doctest: +SKIP
    """
    if fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"--ray writes {', '.join(PREDICTION_FORMATS)} files. Received: format={fmt!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--ray-workers must be a whole number >= 1. Received: workers={workers!r}")
    check_engine(engine)
    ray = _import_ray()
    if address and not ray.is_initialized():
        _check_reachable(address)  # in seconds, before the model loads: ray.init retries for minutes
    source = Path(source).resolve()  # the workers may start in another folder (or on another node)
    # Fail here, in one line, on a bad model or engine rather than in a worker (this also makes the
    # ONNX export the onnxruntime engine needs, once, in the cache the workers on this machine share).
    driver = Predictor(source, batch_size=batch_size, engine=engine)
    batch_size, engine = driver.batch_size, driver.engine.name  # auto settled once, here: every worker runs it
    paths, errors = list_inputs(inputs)
    out = None if out is None else Path(out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    started_here = _start_ray(ray, address, workers)
    shard_dir = (new_directory(out.parent, f".{out.name}.shards-") if out is not None
                 else Path(tempfile.mkdtemp(prefix="cnnkit-ray-shards-")))
    try:
        rows = [{"index": i, "path": os.fsdecode(p), "file": os.fsdecode(Path(p).absolute()), "error": e or ""}
                for i, (p, e) in enumerate(zip(paths, errors))]
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(1, workers * 4)))
        predicted = dataset.map_batches(
            _PredictBatches, fn_constructor_kwargs={"source": str(source), "batch_size": batch_size,
                                                    "top_k": top_k, "engine": engine},
            batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
        getattr(predicted, f"write_{fmt}")(str(shard_dir))
        shards = sorted(p for p in shard_dir.iterdir() if p.is_file())
        results = _merge(shards, fmt)
        if len(results) != len(rows):
            raise DataError(
                f"Ray's workers wrote {len(results)} of {len(rows)} predictions to the shards this machine can read "
                f"in '{shard_dir}': on a cluster, --out must be on storage every node shares (the shards are "
                f"written beside it). Nothing was written. Received: out={os.fsdecode(out) if out else None!r}")
        if out is not None:
            write_predictions(results, out, fmt)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if started_here:
            ray.shutdown()
    return RayPrediction(out, len(results), sum(1 for r in results if r.error), workers, len(shards), results, engine)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError('--ray needs Ray Data, the cnnkit[ray] extra: pip install "cnnkit[ray]". Or drop --ray to '
                          "predict in this process. Received: ray=None") from exc
    return ray


# How long to wait for a Ray head's port to accept a connection before saying it cannot be reached
# (ray.init itself retries for minutes, printing connection warnings, before it gives up).
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raises ConfigError at once when ``address`` (``host:port`` or ``ray://host:port``) takes no connection.

    ``auto`` and addresses without a port are left to Ray, which finds them its own way.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(
            f"Cannot reach a Ray cluster at '{address}' ({exc.strerror or exc}). Check that its head node is running "
            "('ray status' there) and the address: host:6379 for the head's GCS, ray://host:10001 for Ray Client; or "
            f"use --ray alone for a local Ray. Received: ray={address!r}") from None


def _start_ray(ray: Any, address: str | None, workers: int) -> bool:
    """Connect to ``address`` or start a local Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    import keras

    # The workers must decode and predict with this process's backend.
    runtime_env = {"env_vars": {"KERAS_BACKEND": keras.backend.backend()}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=workers + 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def _actor_cpus() -> int:
    """In a Ray actor (only there): the CPUs Ray assigned to it (its ``num_cpus``, at least 1); for an actor
    given no CPU share, ``usable_cpus()``."""
    import ray

    cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    return max(1, round(cpus)) if cpus else usable_cpus()


class _PredictBatches:
    """A Ray Data ``map_batches`` callable class: one Predictor per actor, loaded once."""

    def __init__(self, source: str, batch_size: int, top_k: int, engine: str | None = None) -> None:
        from cnnkit import _progress

        _progress.set_progress(False)
        # Ray gives each actor a share of the node's CPUs (num_cpus) but no affinity, so usable_cpus() would be
        # the whole node's: ONNX Runtime sized by it would start that many threads in every actor. (The keras
        # engine's backends size their own thread pools, in an actor as anywhere.)
        cpus = _actor_cpus()
        self.predictor = Predictor.from_engine(open_engine(source, engine, threads=cpus), batch_size=batch_size,
                                               workers=max(2, cpus))
        self.top_k = top_k

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        errors = [e or None for e in batch["error"]]
        results = self.predictor.predict_files(list(batch["file"]), errors, self.top_k)
        return pd.DataFrame({
            "index": batch["index"].astype("int64"),
            "path": list(batch["path"]),  # as the user gave it (the workers read the absolute file)
            "label": [r.label for r in results],
            "confidence": [r.confidence for r in results],
            "top_k": [json.dumps(r.top_k) for r in results],
            # an error names the file as the user gave it, as in one process
            "error": [(r.error or "").replace(file, path) for r, file, path in zip(results, batch["file"], batch["path"])],
        })


def _merge(shards: list[Path], fmt: str) -> list[Prediction]:
    """Every shard's rows, in input order, as Predictions."""
    import pyarrow as pa

    tables = [_read_shard(shard, fmt) for shard in shards]
    if not tables:
        return []
    table = pa.concat_tables([t.select(["index", "path", "label", "confidence", "top_k", "error"]) for t in tables])
    rows = sorted(table.to_pylist(), key=lambda row: row["index"])
    results = []
    for row in rows:
        # The confidence is the first of top_k, read from its JSON (exact) rather than the shard's
        # confidence column (pandas writes JSON floats to 10 digits).
        top_k = [(name, float(p)) for name, p in json.loads(row["top_k"] or "[]")]
        results.append(Prediction(row["path"], row["label"] or "", top_k[0][1] if top_k else 0.0, top_k,
                                  row["error"] or None))
    return results


def _read_shard(shard: Path, fmt: str) -> Any:
    import pyarrow as pa

    text_columns = {"path": pa.string(), "label": pa.string(), "top_k": pa.string(), "error": pa.string()}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(shard)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(shard, convert_options=pcsv.ConvertOptions(
            column_types={"index": pa.int64(), "confidence": pa.float64(), **text_columns},
            strings_can_be_null=False))
    import pyarrow.json as pjson

    return pjson.read_json(shard, parse_options=pjson.ParseOptions(explicit_schema=pa.schema(
        [("index", pa.int64()), ("confidence", pa.float64()), *text_columns.items()])))
