"""Batch prediction as a Ray Data stage (``cnnkit predict --ray``) equals single-process prediction.

The Ray test starts a local Ray with 2 workers once and writes CSV, JSON and Parquet; it is skipped
with the reason when Ray is not installed (``pip install "cnnkit[ray]"``, part of the test extra).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import _is_ray_address, app
from cnnkit.predict import Predictor, write_predictions
from tests.conftest import write_class_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray")
    write_class_folder(base / "data", per_class=12, seed=3)
    cnnkit.train(base / "data", base / "run", model="simple", epochs=2, image_size=16, batch_size=16,
                 cache_root=base / "cache")
    (base / "data" / "red" / "broken.png").write_bytes(b"not a png")
    return base


@pytest.mark.slow
def _rows(path, fmt: str) -> list:
    import csv
    import json

    if fmt == "json":
        return json.loads(path.read_text())
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _same_rows(a, b, tolerance: float = 1e-6) -> bool:
    """Equal structures, numbers (and numbers written as text) within ``tolerance``, all else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_rows(a[k], b[k], tolerance) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_rows(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        try:
            return a == b or abs(float(a) - float(b)) <= tolerance
        except ValueError:
            return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= tolerance
    return a == b


def test_ray_output_equals_single_process_output(run, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip('ray is not installed (pip install "cnnkit[ray]")')
    import pyarrow.parquet as pq
    import ray

    from cnnkit.predict_ray import predict_with_ray

    inputs = [str(run / "data"), str(run / "data" / "green" / "green_000.png"), str(run / "missing.png")]
    expected = Predictor(run / "run", batch_size=8).predict(inputs)
    assert sum(1 for p in expected if p.error) == 2  # the broken file and the missing one
    ray.init(num_cpus=3, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        for fmt in ("csv", "json", "parquet"):
            write_predictions(expected, tmp_path / f"one.{fmt}", fmt)
            # Batches of 8 over 2 workers: 39 rows in several blocks and shards, merged back in order.
            done = predict_with_ray(run / "run", inputs, tmp_path / f"ray.{fmt}", fmt, workers=2, batch_size=8)
            assert (done.count, done.failed, done.workers) == (len(expected), 2, 2)
            # The same rows in the same order; probabilities equal within 1e-6: oneDNN's kernels (TensorFlow's
            # on every x86-64 CPU) may round differently for a batch of another size, and Ray's blocks end
            # where the single process's batches do not.
            if fmt == "parquet":
                ray_rows, one_rows = (pq.read_table(tmp_path / f"{kind}.parquet").to_pylist() for kind in ("ray", "one"))
            else:
                ray_rows, one_rows = (_rows(tmp_path / f"{kind}.{fmt}", fmt) for kind in ("ray", "one"))
            assert _same_rows(ray_rows, one_rows), (ray_rows[:3], one_rows[:3])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            f"{kind}.{fmt}" for kind in ("one", "ray") for fmt in ("csv", "json", "parquet"))  # no shards left
    finally:
        ray.shutdown()


def test_a_ray_actor_sizes_onnx_runtime_by_its_share_of_the_cpus(run):
    """Ray sets no CPU affinity: an actor sized by the CPUs it may use would start one ONNX Runtime thread per CPU
    of the node in every actor. Each actor gets its num_cpus share (1 here, on a 3-CPU Ray)."""
    for module in ("ray", "onnxruntime", "tf2onnx"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'{module} is not installed (pip install "cnnkit[ray,export]")')
    import keras
    import ray

    from cnnkit._backends.devices import usable_cpus
    from cnnkit.engines import onnx_export
    from cnnkit.predict_ray import _PredictBatches

    if keras.backend.backend() != "tensorflow" or usable_cpus() < 2:
        pytest.skip("the ONNX export runs on TensorFlow here, and one CPU gives one thread either way")
    onnx_export(run / "run")  # as predict_with_ray does on the driver: the actors find it cached
    ray.init(num_cpus=3, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=1)(_PredictBatches).remote(str(run / "run"), 8, 1, "onnxruntime")
        threads = ray.get(actor.__ray_call__.remote(
            lambda self: self.predictor.engine.session.get_session_options().intra_op_num_threads))
        assert threads == 1
    finally:
        ray.shutdown()


def test_predict_without_ray_imports_no_ray(run, tmp_path):
    script = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from cnnkit.cli import app
        result = CliRunner().invoke(app, ["predict", sys.argv[1], sys.argv[2], "--format", "csv"])
        print(result.exit_code, sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(run / "run"), str(run / "data" / "blue")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


def test_ray_missing_names_the_extra(run, tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        from cnnkit.predict_ray import predict_with_ray
        try:
            predict_with_ray(sys.argv[1], [sys.argv[2]], sys.argv[3])
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(run / "run"), str(run / "data"), str(tmp_path / "p.csv")],
                          capture_output=True, text=True, timeout=300)
    assert 'ConfigError --ray needs Ray Data, the cnnkit[ray] extra: pip install "cnnkit[ray]"' in proc.stdout
    assert not (tmp_path / "p.csv").exists()


def test_ray_option_takes_an_optional_address(run, monkeypatch):
    import cnnkit.predict_ray

    assert all(map(_is_ray_address, ["ray://head:10001", "head:6379", "10.0.0.1:6379", "auto", "local"]))
    assert not any(map(_is_ray_address, [str(run / "run"), "photos/", "*.jpg", "--out"]))

    def parsed(source, inputs, out, fmt, *, address, workers, batch_size, top_k, engine):
        raise cnnkit.ConfigError(f"parsed address={address!r} inputs={inputs!r} top_k={top_k} engine={engine!r}")

    monkeypatch.setattr(cnnkit.predict_ray, "predict_with_ray", parsed)  # what the CLI parsed, before Ray starts
    runner = CliRunner()
    data = str(run / "data")
    # A bare --ray (last, or before another option) is a local Ray; an address-looking word is its value.
    for args, address in ((["--ray"], None), (["--ray", "--top-k", "2"], None), (["--ray", "auto"], "auto")):
        result = runner.invoke(app, ["predict", str(run / "run"), data, *args])
        assert result.exit_code == 2, result.output
        assert f"parsed address={address!r} inputs=[{data!r}]" in result.output
    result = runner.invoke(app, ["predict", "--ray", "ray://head:10001", str(run / "run"), data, "--engine", "keras"])
    assert f"parsed address='ray://head:10001' inputs=[{data!r}] top_k=3 engine='keras'" in result.output


@pytest.mark.slow
def test_cli_ray_starts_its_own_local_ray_and_prints_what_one_process_prints(run, monkeypatch):
    """No outside ray.init: cnnkit starts a local Ray, the workers run the chosen engine on relative paths."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip('ray is not installed (pip install "cnnkit[ray]")')
    import ray

    monkeypatch.chdir(run)  # inputs relative to here, as a user types them
    runner = CliRunner()
    args = ["predict", "run", "data", "--format", "csv", "--engine", "onnxruntime", "--batch-size", "8"]
    one = runner.invoke(app, args)
    assert one.exit_code == 1, one.output  # broken.png
    with_ray = runner.invoke(app, [*args, "--ray", "--ray-workers", "2"])
    assert with_ray.exit_code == 1, with_ray.output
    assert not ray.is_initialized()  # the Ray it started was shut down
    assert with_ray.stdout == one.stdout and one.stdout.count("\n") == 38  # header, 36 images, broken.png
    assert "data/red/broken.png" in with_ray.stdout and str(run) not in with_ray.stdout  # the paths as typed
    # auto (predict's default) is settled once, by the driver: the export the runs above cached matched Keras
    from cnnkit.predict_ray import predict_with_ray

    done = predict_with_ray("run", ["data"], None, "csv", workers=2, batch_size=8, engine="auto")
    assert done.engine == "onnxruntime" and done.count == 37 and done.failed == 1


def test_predict_out_writes_the_file_and_refuses_parquet_on_stdout(run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(run / "run"), str(run / "data" / "red"), "--format", "csv"])
    assert result.exit_code == 1  # broken.png
    written = runner.invoke(app, ["predict", str(run / "run"), str(run / "data" / "red"),
                                  "--out", str(tmp_path / "p.csv")])
    assert written.exit_code == 1
    # The same CSV as on stdout (CliRunner reads stdout with universal newlines; the file keeps CSV's \r\n).
    assert (tmp_path / "p.csv").read_bytes().decode().replace("\r\n", "\n") == result.stdout.replace("\r\n", "\n")
    refused = runner.invoke(app, ["predict", str(run / "run"), str(run / "data"), "--format", "parquet"])
    assert refused.exit_code == 2 and "add --out predictions.parquet" in refused.output


def test_an_unreachable_ray_address_is_an_error_in_seconds(run, tmp_path):
    """A head that takes no connection: one clear line naming the address, not minutes of Ray's retries."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip('ray is not installed (pip install "cnnkit[ray]")')
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.perf_counter()
        result = CliRunner().invoke(app, ["predict", str(run / "run"), str(run / "data"), "--ray", address,
                                          "--out", str(tmp_path / "p.csv")])
        assert result.exit_code == 2, result.output
        assert f"Cannot reach a Ray cluster at '{address}'" in result.output and "Traceback" not in result.output
        assert time.perf_counter() - started < 30 and not (tmp_path / "p.csv").exists()
