"""The REST service: TF Serving API, served == cnnkit predict, every bad request a 4xx, micro-batching, uvicorn."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import cnnkit
from cnnkit.errors import ConfigError, RegistryError, RunNotFoundError
from cnnkit.serve import ServeSettings, create_app
from cnnkit.metrics import apply_temperature
from tests.conftest import COLORS, colour_image, write_class_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-run")
    data = write_class_folder(root / "data", per_class=8)
    run = root / "colours"
    cnnkit.train(data, run, epochs=1, image_size=16, cache_root=root / "cache")
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """JPEGs and PNGs of other sizes than the model's 16x16, so decode + resize are exercised."""
    root = tmp_path_factory.mktemp("serve-images")
    rng = np.random.default_rng(7)
    paths = []
    for i, colour in enumerate(COLORS.values()):
        img = colour_image(rng, colour, size=40).resize((40, 28))
        paths.append(root / f"img{i}.jpg")
        img.save(paths[-1], quality=90)
        paths.append(root / f"img{i}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(run_dir, max_batch_size=8, max_wait_ms=2, max_pixels=4_000_000)) as c:
        yield c


def b64(path: Path) -> dict[str, str]:
    return {"b64": base64.b64encode(path.read_bytes()).decode()}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_probs(run_dir: Path, paths: list[Path]) -> np.ndarray:
    """What `cnnkit predict` answers for these files, as (N, num_classes) probabilities."""
    predictor = cnnkit.Predictor(run_dir)
    rows = []
    for p in predictor.predict(paths, top_k=len(predictor.class_names)):
        probs = dict(p.top_k)
        rows.append([probs[name] for name in predictor.class_names])
    return np.array(rows)


# -- TF Serving API --------------------------------------------------------------------------------


def test_status_metadata_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    status = client.get("/v1/models/colours").json()
    assert status["model_version_status"][0] == {"version": "1", "state": "AVAILABLE",
                                                 "status": {"error_code": "OK", "error_message": ""}}
    meta = client.get("/v1/models/colours/metadata").json()
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert [d["size"] for d in signature["inputs"]["image"]["tensor_shape"]["dim"]] == ["-1", "16", "16", "3"]
    assert meta["cnnkit"]["class_names"] == ["blue", "green", "red"]
    assert meta["cnnkit"]["input_scale"] == "0-255"
    assert client.get("/docs").status_code == 200
    assert ":predict" in json.dumps(client.get("/openapi.json").json()["paths"])


def test_served_prediction_equals_cnnkit_predict(client, run_dir, images):
    expected = expected_probs(run_dir, images)
    got = client.post("/v1/models/colours:predict", json={"instances": [b64(p) for p in images]})
    assert got.status_code == 200, got.text
    np.testing.assert_allclose(np.array(got.json()["predictions"]), expected, rtol=1e-5, atol=1e-6)
    one = client.post("/v1/models/colours/versions/1:predict", json={"instances": [b64(images[0])]}).json()
    np.testing.assert_allclose(one["predictions"][0], expected[0], rtol=1e-5, atol=1e-6)
    columnar = client.post("/v1/models/colours:predict", json={"inputs": {"image": [b64(images[1])]}}).json()
    np.testing.assert_allclose(columnar["outputs"][0], expected[1], rtol=1e-5, atol=1e-6)
    named = client.post("/v1/models/colours:predict", json={"instances": [{"image": b64(images[2])}]}).json()
    np.testing.assert_allclose(named["predictions"][0], expected[2], rtol=1e-5, atol=1e-6)
    urlsafe = {"b64": base64.urlsafe_b64encode(images[3].read_bytes()).decode()}
    got = client.post("/v1/models/colours:predict", json={"instances": [urlsafe]}).json()
    np.testing.assert_allclose(got["predictions"][0], expected[3], rtol=1e-5, atol=1e-6)
    for signature in ("serving_default", ""):  # the signature the metadata lists, and TF Serving's "" for it
        got = client.post("/v1/models/colours:predict", json={"instances": [b64(images[0])],
                                                              "signature_name": signature}).json()
        np.testing.assert_allclose(got["predictions"][0], expected[0], rtol=1e-5, atol=1e-6)


def test_pixel_arrays_and_the_scale_guard(client, run_dir):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    from_png = client.post("/v1/models/colours:predict",
                           json={"instances": [{"b64": base64.b64encode(png_bytes(pixels)).decode()}]}).json()
    raw = client.post("/v1/models/colours:predict", json={"instances": [pixels.tolist()]}).json()
    np.testing.assert_allclose(raw["predictions"], from_png["predictions"], rtol=1e-5, atol=1e-6)

    scaled = (pixels / 255.0).tolist()
    refused = client.post("/v1/models/colours:predict", json={"instances": [scaled]})
    assert refused.status_code == 400
    assert "raw 0-255 pixels" in refused.json()["error"] and '"input_scale": "0-1"' in refused.json()["error"]
    stated = client.post("/v1/models/colours:predict", json={"instances": [scaled], "input_scale": "0-1"}).json()
    np.testing.assert_allclose(stated["predictions"], raw["predictions"], rtol=1e-5, atol=1e-6)
    dark = np.full((16, 16, 3), 0.5).tolist()  # a genuinely dark raw image, scale stated
    assert client.post("/v1/models/colours:predict", json={"instances": [dark], "input_scale": "0-255"}).status_code == 200


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")  # 9 M pixels, a few KB
    return buffer.getvalue()


def _b64_text(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = [
    ("not json", b"{instances: nope", "application/json", 400, "not valid JSON"),
    ("json list", b"[1, 2]", "application/json", 400, "must be a JSON object"),
    ("no instances key", b'{"images": []}', "application/json", 400, "Unknown field"),
    ("both keys", b'{"instances": [], "inputs": []}', "application/json", 400, "exactly one of"),
    ("empty", b'{"instances": []}', "application/json", 400, "no instances"),
    ("instances not list", b'{"instances": "abc"}', "application/json", 400, "must be a list"),
    ("string instance", b'{"instances": ["abc"]}', "application/json", 400, "an image is"),
    ("bad b64", b'{"instances": [{"b64": "!!!notbase64"}]}', "application/json", 400, "not valid base64"),
    ("truncated b64", b'{"instances": [{"b64": "iVBORw0KGgoAAAANSUhEUgAAAA"}]}', "application/json", 400,
     "not valid base64"),
    ("not an image", json.dumps({"instances": [{"b64": _b64_text(b"hello world")}]}).encode(), "application/json",
     400, "not an image"),
    ("truncated image", None, "application/json", 400, "instances[0]: cannot use the image"),
    ("bomb", json.dumps({"instances": [{"b64": _b64_text(_bomb_png())}]}).encode(), "application/json", 400,
     "decompression bomb"),
    ("wrong shape", json.dumps({"instances": [np.zeros((8, 8, 3)).tolist()]}).encode(), "application/json", 400,
     "(16, 16, 3)"),
    ("ragged", b'{"instances": [[[1, 2], [3]]]}', "application/json", 400, "not a rectangular array"),
    ("out of range", json.dumps({"instances": [np.full((16, 16, 3), 300).tolist()]}).encode(), "application/json",
     400, "0-255"),
    ("bad scale", b'{"instances": [[0]], "input_scale": "0-100"}', "application/json", 400, "input_scale"),
    ("unknown signature", b'{"instances": [[0]], "signature_name": "bogus"}', "application/json", 400,
     "'bogus' not found in signature def"),
    ("too many", json.dumps({"instances": [[0]] * 300}).encode(), "application/json", 400, "Too many instances"),
    ("content type", b'{"instances": [[0]]}', "image/jpeg", 415, "not accepted"),
    ("nested 5000 deep", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400,
     "nests JSON 5001 levels deep"),
    ("nested 40 deep", b'{"instances": [' + b"[" * 40 + b"]" * 40 + b"]}", "application/json", 400, "at most 32"),
    ("unclosed 100000 deep", b"[" * 100_000, "application/json", 400, "nests JSON"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_json_error(client, images, case):
    _, body, content_type, status, fragment = case
    if body is None:
        data = images[0].read_bytes()
        body = json.dumps({"instances": [{"b64": _b64_text(data[: len(data) // 2])}]}).encode()
    response = client.post("/v1/models/colours:predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert client.get("/healthz").status_code == 200  # still serving


def test_limits_and_routing_errors(run_dir, images):
    app = create_app(run_dir, max_body_bytes=2000, max_pixels=1_000_000, max_instances=4)
    with TestClient(app) as c:
        big = c.post("/v1/models/colours:predict", json={"instances": [{"b64": "A" * 4000}]})
        assert big.status_code == 413 and "2,000 bytes" in big.json()["error"]
        ok = c.post("/v1/models/colours:predict", json={"instances": [np.zeros((16, 16, 3), int).tolist()[:1]]})
        assert ok.status_code == 400  # (1, 16, 3) is the wrong shape, within the limit
        missing = c.post("/v1/models/nope:predict", json={"instances": [b64(images[0])]})
        assert missing.status_code == 404 and "serves 'colours'" in missing.json()["error"]
        version = c.post("/v1/models/colours/versions/7:predict", json={"instances": [b64(images[0])]})
        assert version.status_code == 404 and "version 1" in version.json()["error"]
        assert c.get("/v1/models/nope").status_code == 404
        explain = c.post("/v1/models/colours:explain", json={"instances": [b64(images[0])]})
        assert explain.status_code == 200, explain.text
        found = explain.json()["explanations"][0]
        heatmap = Image.open(io.BytesIO(base64.b64decode(found["heatmap_png_b64"])))
        assert heatmap.size == (16, 16) and found["class_name"] in ("blue", "green", "red")
        assert Image.open(io.BytesIO(base64.b64decode(found["overlay_png_b64"]))).mode == "RGB"
        assert c.get("/nowhere").json() == {"error": "Not Found"}
        wrong_method = c.get("/v1/models/colours:predict")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert c.options("/v1/models/colours/versions/1:predict").headers["allow"] == "POST"
    with TestClient(create_app(run_dir, max_pixels=1_000_000)) as c:
        bomb = c.post("/predict", files={"file": ("bomb.png", _bomb_png(), "image/png")})
        assert bomb.status_code == 400 and "decompression bomb" in bomb.json()["error"]


def test_classify_and_friendly_predict(client, run_dir, images):
    expected = expected_probs(run_dir, images[:2])
    names = ["blue", "green", "red"]
    got = client.post("/v1/models/colours:classify", json={"instances": [b64(images[0]), b64(images[1])], "top_k": 2})
    results = got.json()["results"]
    assert len(results) == 2 and all(len(r) == 2 for r in results)
    for row, probs in zip(results, expected):
        assert row[0][0] == names[int(np.argmax(probs))]
        assert row[0][1] == pytest.approx(float(np.max(probs)), rel=1e-5)

    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in images[:2]]
    friendly = client.post("/predict?top_k=3", files=files).json()
    assert friendly["model"] == "colours" and friendly["version"] == "1"
    for item, probs in zip(friendly["predictions"], expected):
        assert item["label"] == names[int(np.argmax(probs))] and not item["abstained"]
        assert item["confidence"] == pytest.approx(float(np.max(probs)), rel=1e-5)
        assert [t["label"] for t in item["top_k"]] == [names[i] for i in np.argsort(-probs, kind="stable")]
    assert client.post("/predict", files={"f": ("x.jpg", b"nope", "image/jpeg")}).json()["error"].startswith("'x.jpg'")
    assert client.post("/predict", files={"a": (None, "b")}).status_code == 400  # a form without files
    assert client.post("/predict", content=b"raw", headers={"content-type": "image/jpeg"}).status_code == 415
    assert client.post("/predict?top_k=0", files=files).status_code == 400


_PREDICT = '{endpoint="/v1/models/{name}:predict"'


def _metric(client, sample: str) -> float:
    """The value of one sample (name with its labels, as exposed) in /metrics; 0 when not there yet."""
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _metrics(client) -> dict[str, float]:
    return {key: _metric(client, sample) for key, sample in {
        "ok": f'cnnkit_requests_total{_PREDICT},method="POST",status="200"}}',
        "bad": f'cnnkit_requests_total{_PREDICT},method="POST",status="400"}}',
        "errors": f'cnnkit_errors_total{_PREDICT},status="400"}}',
        "latency": f'cnnkit_request_latency_seconds_count{_PREDICT}}}',
        "images": "cnnkit_images_total",
        "batches": "cnnkit_batch_size_count",
        "batched_images": "cnnkit_batch_size_sum",
    }.items()}


def test_metrics_count_requests_batches_and_errors(client, images):
    before = _metrics(client)  # the module's client has served the earlier tests' requests too
    assert client.post("/v1/models/colours:predict", json={"instances": [b64(images[0])]}).status_code == 200
    assert client.post("/v1/models/colours:predict", content=b"{",
                       headers={"content-type": "application/json"}).status_code == 400
    after = _metrics(client)
    delta = {key: after[key] - before[key] for key in before}
    assert delta == {"ok": 1, "bad": 1, "errors": 1, "latency": 2, "images": 1, "batches": 1, "batched_images": 1}
    text = client.get("/metrics").text
    assert "cnnkit_request_latency_seconds_bucket" in text


def _batch_count(client) -> float:
    return _metric(client, "cnnkit_batch_size_count")


def test_concurrent_requests_share_model_calls(run_dir, images):
    with TestClient(create_app(run_dir, max_batch_size=8, max_wait_ms=300)) as c:
        before = _metrics(c)
        barrier = threading.Barrier(8)
        codes = []

        def one(i):
            barrier.wait()
            codes.append(c.post("/v1/models/colours:predict", json={"instances": [b64(images[i % 6])]}).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 8
        after = _metrics(c)
        batches = after["batches"] - before["batches"]
        assert 1 <= batches < 8  # 8 requests, fewer model calls
        assert after["batched_images"] - before["batched_images"] == 8  # every image went through a batch
        assert after["images"] - before["images"] == 8


def test_batching_off_gives_the_same_answer(run_dir, images):
    with TestClient(create_app(run_dir, batching=False)) as c:
        got = c.post("/v1/models/colours:predict", json={"instances": [b64(p) for p in images]}).json()
        np.testing.assert_allclose(got["predictions"], expected_probs(run_dir, images), rtol=1e-5, atol=1e-6)
        assert _batch_count(c) == 0


class SlowModel:
    """The served model's own predict, made slow (a fake of a busy accelerator); records the calling threads."""

    def __init__(self, predict_fn, delay_s: float) -> None:
        self.predict_fn, self.delay_s, self.threads = predict_fn, delay_s, set()

    def __call__(self, batch):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return self.predict_fn(batch)


def test_a_slow_model_answers_504_and_a_full_queue_429(run_dir, images):
    body = {"instances": [b64(images[0])]}
    with TestClient(create_app(run_dir, batching=False, max_queue=1, request_timeout_s=0.3)) as c:
        batcher = c.app.state.served.batcher
        batcher.predict_fn = SlowModel(batcher.predict_fn, delay_s=0.6)
        late = c.post("/v1/models/colours:predict", json=body)
        assert late.status_code == 504 and "request_timeout_s" in late.json()["error"]
        time.sleep(0.4)  # the slow call ends

        batcher.timeout_s = 10.0
        answers = {}
        first = threading.Thread(target=lambda: answers.setdefault("first", c.post("/v1/models/colours:predict", json=body)))
        second = threading.Thread(target=lambda: answers.setdefault("second", c.post("/v1/models/colours:predict", json=body)))
        first.start()
        deadline = time.time() + 10
        while not batcher._running and time.time() < deadline:  # the first is on the model
            time.sleep(0.005)
        second.start()
        while batcher.queued < 1 and time.time() < deadline:  # the second waits: the queue (1 image) is full
            time.sleep(0.005)
        full = c.post("/predict", files={"file": ("a.jpg", images[0].read_bytes(), "image/jpeg")})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "overloaded" in full.json()["error"]
        first.join(), second.join()
        assert answers["first"].status_code == answers["second"].status_code == 200
        assert c.get("/healthz").status_code == 200


def test_with_batching_off_predict_and_explain_share_one_model_thread(run_dir, images):
    with TestClient(create_app(run_dir, batching=False)) as c:
        batcher = c.app.state.served.batcher
        slow = batcher.predict_fn = SlowModel(batcher.predict_fn, delay_s=0.01)
        codes = []

        def one(i: int) -> None:
            route = "explain" if i % 4 == 0 else "predict"
            codes.append((route, c.post(f"/v1/models/colours:{route}", json={"instances": [b64(images[i % 6])]}).status_code))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(set(codes)) == [("explain", 200), ("predict", 200)]
        assert len(slow.threads) == 1 and next(iter(slow.threads)).startswith("cnnkit-model")
        assert _batch_count(c) == 0  # batching off: no batches recorded


_JAX_RACE = textwrap.dedent("""
    import base64, collections, json, sys, threading
    from pathlib import Path
    import numpy as np
    import cnnkit
    from fastapi.testclient import TestClient
    from cnnkit import _progress
    from cnnkit.serve import create_app
    _progress.set_progress(False)
    data, run = Path(sys.argv[1]), Path(sys.argv[2])
    cnnkit.train(data, run, model="simple", epochs=1, image_size=16, cache_root=run.parent / "cache")
    bodies = [json.dumps({"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()}]})
              for p in sorted(data.glob("*/*.png"))[:12]]
    outcomes = collections.Counter()
    with TestClient(create_app(run, batching=False), raise_server_exceptions=False) as c:
        post = lambda route, i: c.post(f"/v1/models/colours:{route}", content=bodies[i],
                                       headers={"content-type": "application/json"})
        expected = [post("predict", i).json()["predictions"][0] for i in range(len(bodies))]
        def worker(k):
            for j in range(12):
                i, route = (k + j) % len(bodies), "explain" if (k + j) % 5 == 0 else "predict"
                r = post(route, i)
                ok = r.status_code == 200 and (route == "explain" or np.allclose(r.json()["predictions"][0], expected[i], atol=1e-5))
                outcomes["ok" if ok else f"{route} {r.status_code}"] += 1
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    print(json.dumps(outcomes))
""")


@pytest.mark.slow
def test_jax_model_calls_never_race(tmp_path):
    """On JAX, predict_on_batch mutates the model's state: two threads calling it at once failed with
    "Buffer has been deleted or donated" (a 500). With batching off, :predict and :explain from 16
    threads must all answer, and correctly."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'cnnkit[jax]')")
    data = write_class_folder(tmp_path / "data", per_class=8)
    proc = subprocess.run([sys.executable, "-c", _JAX_RACE, str(data), str(tmp_path / "colours")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": 192}


def _set_meta_extra(path: Path, extra: dict) -> None:
    """Store calibration in the model's own metadata member, as `cnnkit calibrate` does."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    meta = json.loads(members["cnnkit.json"])
    meta["extra"] = {**meta.get("extra", {}), **extra}
    members["cnnkit.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_calibration_stored_with_the_run_is_applied(run_dir, images, tmp_path):
    calibrated = tmp_path / "calibrated"
    shutil.copytree(run_dir, calibrated)
    info = json.loads((calibrated / "run.json").read_text())
    info["calibration"] = {"temperature": 2.5, "min_confidence": 0.99}
    (calibrated / "run.json").write_text(json.dumps(info))
    _set_meta_extra(calibrated / "model.keras", {"temperature": 2.5, "min_confidence": 0.99})
    plain = expected_probs(run_dir, images[:1])
    with TestClient(create_app(calibrated)) as c:
        got = c.post("/v1/models/calibrated:predict", json={"instances": [b64(images[0])]}).json()
        np.testing.assert_allclose(got["predictions"], apply_temperature(plain.astype(np.float32), 2.5), rtol=1e-4)
        assert np.max(got["predictions"]) < np.max(plain)  # T > 1 softens
        friendly = c.post("/predict", files={"file": ("a.jpg", images[0].read_bytes(), "image/jpeg")}).json()
        assert friendly["predictions"][0]["label"] == "unknown" and friendly["predictions"][0]["abstained"]
        assert c.get("/v1/models/calibrated/metadata").json()["cnnkit"]["temperature"] == 2.5


def test_serving_from_the_registry(run_dir, images, tmp_path):
    from cnnkit.registry import Registry

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with Registry(url) as reg:
        reg.add(run_dir, "flowers")
        reg.add(copy, "flowers", stage="production")
    with TestClient(create_app("flowers@production", registry_url=url)) as c:
        assert c.get("/v1/models/flowers").json()["model_version_status"][0]["version"] == "2"
        before = c.post("/v1/models/flowers/versions/2:predict", json={"instances": [b64(images[0])]})
        assert before.status_code == 200
    (copy / "model.keras").write_bytes(b"changed")  # the run changes after registration: nothing served does
    with TestClient(create_app("flowers@production", registry_url=url)) as c:
        after = c.post("/v1/models/flowers/versions/2:predict", json={"instances": [b64(images[0])]})
        assert after.json() == before.json()
    stored = Path(create_app("flowers@production", registry_url=url).state.source.path)
    stored.chmod(0o644)
    stored.write_bytes(b"changed")  # the registry's own copy tampered with: refused
    with pytest.raises(RegistryError, match="missing or changed since it was registered"):
        create_app("flowers@production", registry_url=url)


def test_settings_and_sources_are_checked(run_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        ServeSettings(max_batch_size=0)
    with pytest.raises(ConfigError, match="request_timeout_s must be > 0"):
        ServeSettings(request_timeout_s=0)
    with pytest.raises(ConfigError, match="max_queue must be >= 1"):
        ServeSettings(max_queue=0)
    monkeypatch.setenv("CNNKIT_REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("CNNKIT_MAX_QUEUE", "64")
    assert (ServeSettings.from_env().request_timeout_s, ServeSettings.from_env().max_queue) == (2.5, 64)
    with pytest.raises(RunNotFoundError):
        create_app(tmp_path / "nothing")
    monkeypatch.delenv("CNNKIT_MODEL", raising=False)
    with pytest.raises(ConfigError, match="CNNKIT_MODEL"):
        create_app()
    monkeypatch.setenv("CNNKIT_MAX_WAIT_MS", "soon")
    with pytest.raises(ConfigError, match="CNNKIT_MAX_WAIT_MS must be a number"):
        create_app(run_dir)
    monkeypatch.setenv("CNNKIT_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("CNNKIT_MODEL", str(run_dir))
    monkeypatch.setenv("CNNKIT_MODEL_NAME", "envname")
    app = create_app()
    assert app.state.source.name == "envname"
    assert app.state.settings.max_wait_ms == 7.5


# -- a real uvicorn ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready in time")


def test_cnnkit_serve_on_a_real_uvicorn(run_dir, images):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit.cli", "serve", str(run_dir), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        got = httpx.post(f"{url}/v1/models/colours:predict", json={"instances": [b64(p) for p in images]}, timeout=30)
        np.testing.assert_allclose(got.json()["predictions"], expected_probs(run_dir, images), rtol=1e-5, atol=1e-6)
        bad = httpx.post(f"{url}/v1/models/colours:predict", content=b"{oops", timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_load_benchmark_quick_run(run_dir, tmp_path):
    """bench/serve_load.py --quick, shortened: no 5xx, no dropped or hung request, no wrong answer."""
    out = tmp_path / "serve_load.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"),
                           "--quick", "--seconds", "4", "--clients", "8", "--run", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["valid_requests"] > 0 and result["by_client"]["predict"]["codes"].keys() == {"200"}
    assert result["server_errors_5xx"] == result["dropped_or_hung"] == result["wrong_answers"] == 0
    malformed = result["by_client"]["malformed"]["codes"]
    assert malformed and all(code.startswith("4") for code in malformed), malformed
    assert result["rss_mb"]["end"] > 0 and "p99 " in proc.stdout


def test_cli_serve_reports_a_missing_model(tmp_path):
    from typer.testing import CliRunner

    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing"), "--port", "0"])
    assert result.exit_code == 2 and "No run directory or model file" in result.output


@pytest.mark.parametrize("command", [["serve", "--host", "127.0.0.1"], ["ui", "--no-browser"]])
def test_a_bad_or_busy_address_is_one_line_before_the_model_loads(tmp_path, command, capsys):
    """A port out of range, a host that is no address, or a port in use: exit 2 naming the option, the
    model never read (the source does not even exist), where uvicorn reported them late, with exit 3."""
    import socket

    from typer.testing import CliRunner

    from cnnkit.cli import app
    from cnnkit.serve.__main__ import main

    missing = str(tmp_path / "no-model-here")
    verb, *options = command
    result = CliRunner().invoke(app, [verb, missing, *options, "--port", "99999"])
    assert result.exit_code == 2 and "--port must be between 0 and 65535" in result.output, result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = CliRunner().invoke(app, [verb, missing, *options, "--port", port])
        assert result.exit_code == 2 and f"Cannot listen on 127.0.0.1:{port}" in result.output, result.output
        assert "pick another --port" in result.output and "Traceback" not in result.output
        capsys.readouterr()
        assert main([missing, "--port", port]) == 2  # the slim image's entry point: the port, not the model
        assert f"Cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    if verb == "serve":
        result = CliRunner().invoke(app, [verb, missing, "--host", "256.1.1.1", "--port", "0"])
        assert result.exit_code == 2 and "Cannot listen on host '256.1.1.1'" in result.output, result.output
        result = CliRunner().invoke(app, [verb, missing, "--host", "192.0.2.1", "--port", "0"])  # TEST-NET: not ours
        assert result.exit_code == 2 and "is not an address of this machine" in result.output, result.output
