"""Serving under load: 64 concurrent clients for 60 s on ``:predict`` and ``/predict``, plus one sending malformed bodies.

A real ``cnnkit serve`` (uvicorn, default settings: micro-batching on) on 127.0.0.1 serves a small
model. Half the clients send single-image ``:predict`` requests (``{"b64": JPEG}``), half upload the
same JPEG to ``/predict`` (multipart); every answer is checked against the first one. One more
client loops over malformed bodies: JSON nested 5,000 and 100,000 deep, broken JSON, bad base64, a
truncated and a non-image file, a wrong pixel shape, a wrong content type, an empty body, a broken
form, and a body over the size limit. Prints requests, errors by status code (and dropped
connections), p50/p99 latency, and the server's RSS at the start and end; writes
``bench/results/serve_load.json``. Exits 1 if any answer was a 5xx, a dropped connection, a hang
(no answer in 60 s) or a wrong prediction.

    python bench/serve_load.py                  # 64 clients, 60 s (trains a 'simple' 32x32 model first)
    python bench/serve_load.py --quick          # 16 clients, 10 s: a smoke run
    python bench/serve_load.py --run runs/first --clients 64 --seconds 60

The clients run on the same machine as the server: on a 2-core CPU they take a share of its cores,
so the figures are a floor. The load average at the start and end is recorded with them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime as dt
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine  # noqa: E402

BOUNDARY = "cnnkitbenchboundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(workdir: Path, image_size: int, model: str) -> Path:
    """A small model trained for 1 epoch on generated colour classes (load does not need accuracy)."""
    sys.path.insert(0, str(ROOT))
    import cnnkit
    from cnnkit import _progress

    _progress.set_progress(False)
    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():
        (workdir / "data" / name).mkdir(parents=True)
        for i in range(30):
            pixels = np.clip(np.array(colour)[None, None] + rng.integers(-40, 41, (64, 64, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(workdir / "data" / name / f"{i}.jpg")
    run = workdir / "run"
    cnnkit.train(workdir / "data", run, model=model, epochs=1, image_size=image_size, cache_root=workdir / "cache")
    return run


def jpeg() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def multipart(filename: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def malformed_requests(image: bytes, image_size: int) -> list[tuple[str, str, bytes, str]]:
    """(name, path, body, content type) of every malformed request the bad client cycles through."""
    predict, upload = "/v1/models/bench:predict", "/predict"
    form = f"multipart/form-data; boundary={BOUNDARY}"
    js = "application/json"
    b64 = base64.b64encode(image).decode()
    wrong_shape = json.dumps({"instances": [np.zeros((image_size + 3, image_size, 3), int).tolist()]}).encode()
    return [
        ("nested 5000 deep", predict, b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", js),
        ("unclosed 100000 deep", predict, b"[" * 100_000, js),
        ("broken JSON", predict, b'{"instances": [{"b64": ', js),
        ("bad base64", predict, b'{"instances": [{"b64": "!!!not base64"}]}', js),
        ("truncated JPEG", predict, json.dumps({"instances": [{"b64": b64[: len(b64) // 2]}]}).encode(), js),
        ("not an image", predict, json.dumps({"instances": [{"b64": base64.b64encode(b"hello").decode()}]}).encode(), js),
        ("wrong shape", predict, wrong_shape, js),
        ("wrong content type", predict, b"\xff\xd8\xff", "image/jpeg"),
        ("empty body", predict, b"", js),
        ("not an image file", upload, multipart("a.jpg", b"GIF89a nonsense"), form),
        ("broken form", upload, b"--" + BOUNDARY.encode() + b"\r\nnonsense", form),
        ("over the size limit", predict, b'{"instances": ["' + b"A" * (21 * 1024 * 1024) + b'"]}', js),
    ]


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def start_server(run: Path, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "cnnkit.cli", "--quiet", "serve", str(run), "--port", str(port), "--name", "bench",
            "--log-level", "warning"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready after 180 s")


class Tally:
    """Per kind of client ("predict", "upload", "malformed"): status counts, latencies, transport errors."""

    def __init__(self) -> None:
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.wrong = 0
        self.malformed_codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


async def load(base: str, seconds: float, clients: int, image: bytes, image_size: int, tally: Tally) -> float:
    predict_body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    upload_body = multipart("x.jpg", image)
    bad = malformed_requests(image, image_size)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        reference = (await client.post("/v1/models/bench:predict", content=predict_body,
                                       headers={"content-type": "application/json"})).json()["predictions"][0]
        stop_at = time.perf_counter() + seconds

        async def good(i: int) -> None:
            kind = "predict" if i % 2 == 0 else "upload"
            path, body, ctype = (("/v1/models/bench:predict", predict_body, "application/json") if kind == "predict"
                                 else ("/predict?top_k=3", upload_body, f"multipart/form-data; boundary={BOUNDARY}"))
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    response = await client.post(path, content=body, headers={"content-type": ctype})
                except httpx.TimeoutException:
                    tally.codes[kind]["hang (no answer in 60 s)"] += 1
                    continue
                except httpx.TransportError as exc:
                    tally.codes[kind][f"dropped ({type(exc).__name__})"] += 1
                    continue
                tally.latencies[kind].append(time.perf_counter() - started)
                tally.codes[kind][str(response.status_code)] += 1
                if response.status_code == 200 and not correct(kind, response.json(), reference):
                    tally.wrong += 1

        async def malformed() -> None:
            n = 0
            while time.perf_counter() < stop_at:
                name, path, body, ctype = bad[n % len(bad)]
                n += 1
                started = time.perf_counter()
                try:
                    response = await client.post(path, content=body, headers={"content-type": ctype})
                    code = str(response.status_code)
                    tally.latencies["malformed"].append(time.perf_counter() - started)
                except httpx.TimeoutException:
                    code = "hang (no answer in 60 s)"
                except httpx.TransportError as exc:
                    code = f"dropped ({type(exc).__name__})"
                tally.codes["malformed"][code] += 1
                tally.malformed_codes[name][code] += 1
                await asyncio.sleep(0.05)  # one client, not a flood

        started = time.perf_counter()
        await asyncio.gather(*(good(i) for i in range(clients)), malformed())
        return time.perf_counter() - started


def correct(kind: str, answer: dict, reference: list[float]) -> bool:
    if kind == "predict":
        return np.allclose(answer["predictions"][0], reference, rtol=1e-4, atol=1e-6)
    return abs(answer["predictions"][0]["confidence"] - max(reference)) < 1e-4


def mean_batch_size(base: str) -> float | None:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = re.search(r"^cnnkit_batch_size_sum ([0-9.e+]+)", text, re.M)
    count = re.search(r"^cnnkit_batch_size_count ([0-9.e+]+)", text, re.M)
    return round(float(total.group(1)) / float(count.group(1)), 2) if total and count and float(count.group(1)) else None


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def summarise(tally: Tally, wall: float) -> dict:
    valid = {k: v for k, v in tally.codes.items() if k != "malformed"}
    all_valid = [x for k in valid for x in tally.latencies[k]]
    per_kind = {}
    for kind in ("predict", "upload", "malformed"):
        codes = tally.codes.get(kind, collections.Counter())
        per_kind[kind] = {"requests": sum(codes.values()), "codes": dict(sorted(codes.items())),
                          "p50_ms": percentile_ms(tally.latencies[kind], 50),
                          "p99_ms": percentile_ms(tally.latencies[kind], 99)}
    errors = collections.Counter()
    for kind, codes in tally.codes.items():
        for code, n in codes.items():
            if code != "200":
                errors[f"{kind} {code}"] += n
    server_errors = sum(n for codes in tally.codes.values() for code, n in codes.items() if code.startswith("5"))
    failures = sum(n for codes in tally.codes.values() for code, n in codes.items() if not code.isdigit())
    return {
        "seconds": round(wall, 1),
        "requests": sum(sum(c.values()) for c in tally.codes.values()),
        "valid_requests": sum(sum(c.values()) for c in valid.values()),
        "valid_requests_per_s": round(sum(sum(c.values()) for c in valid.values()) / wall, 1),
        "p50_ms": percentile_ms(all_valid, 50), "p99_ms": percentile_ms(all_valid, 99),
        "errors_by_code": dict(sorted(errors.items())),
        "server_errors_5xx": server_errors, "dropped_or_hung": failures, "wrong_answers": tally.wrong,
        "by_client": per_kind,
        "malformed_by_kind": {k: dict(v) for k, v in tally.malformed_codes.items()},
    }


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run directory to serve (default: train a small one)")
    parser.add_argument("--clients", type=int, help="concurrent well-behaved clients (default 64; --quick 16)")
    parser.add_argument("--seconds", type=float, help="length of the timed load (default 60; --quick 10)")
    parser.add_argument("--image-size", type=int, default=32, help="of the model trained when --run is not given")
    parser.add_argument("--model", default="simple", help="architecture trained when --run is not given")
    parser.add_argument("--quick", action="store_true", help="16 clients for 10 s (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load.json", help="the JSON result file")
    args = parser.parse_args()
    args.clients = args.clients or (16 if args.quick else 64)
    args.seconds = args.seconds or (10.0 if args.quick else 60.0)

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(Path(tmp), args.image_size, args.model)
        image_size = args.image_size
        if args.run:
            image_size = json.loads((args.run / "run.json").read_text())["image_size"][0]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(run, port)
        try:
            rss_ready = rss_mb(proc.pid)
            warm = Tally()
            asyncio.run(load(base, 3.0, min(args.clients, 8), jpeg(), image_size, warm))  # warm-up, not counted
            rss_start, load_start = rss_mb(proc.pid), os.getloadavg()
            tally = Tally()
            wall = asyncio.run(load(base, args.seconds, args.clients, jpeg(), image_size, tally))
            rss_end, load_end = rss_mb(proc.pid), os.getloadavg()
            batch = mean_batch_size(base)
        finally:
            stopping = time.perf_counter()
            proc.send_signal(signal.SIGTERM)  # graceful: uvicorn drains, then re-raises the signal (exit -15)
            try:
                exit_code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "killed after 60 s"
            shutdown_s = round(time.perf_counter() - stopping, 2)

    summary = summarise(tally, wall)
    model = str(args.run) if args.run else f"{args.model} {args.image_size}x{args.image_size}, 1 epoch on generated images"
    result = {
        "benchmark": f"serve under load: {args.clients} clients on :predict and /predict + 1 malformed-body client",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "clients": args.clients, "model": model, "server": "cnnkit serve (defaults: micro-batching on, "
        "max_batch_size 32, max_wait_ms 5, max_queue 512, request_timeout_s 30)",
        **summary, "mean_batch_size": batch,
        "rss_mb": {"ready": rss_ready, "start": rss_start, "end": rss_end},
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "server_exit_code_after_sigterm": exit_code, "server_shutdown_s": shutdown_s,
    }
    path = write_json(args.out, {"machine": machine(), **result})
    print(f"\n{result['benchmark']}, {summary['seconds']} s ({model})")
    print(f"requests: {summary['requests']} ({summary['valid_requests']} valid, "
          f"{summary['valid_requests_per_s']}/s; {summary['by_client']['malformed']['requests']} malformed)")
    for kind, row in summary["by_client"].items():
        print(f"  {kind:<10} {row['requests']:>7} requests  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  {row['codes']}")
    print(f"errors by code: {summary['errors_by_code'] or 'none'}")
    print(f"valid requests: p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms; mean batch {batch}")
    print(f"server RSS: {rss_ready} MB ready, {rss_start} MB at the start, {rss_end} MB at the end")
    print(f"load average (1, 5, 15 min): start {result['load_average']['start']}, end {result['load_average']['end']}")
    print(f"5xx: {summary['server_errors_5xx']}, dropped or hung: {summary['dropped_or_hung']}, "
          f"wrong answers: {summary['wrong_answers']}; SIGTERM -> exit {exit_code} in {shutdown_s} s")
    print(f"written {path}")
    if summary["server_errors_5xx"] or summary["dropped_or_hung"] or summary["wrong_answers"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
