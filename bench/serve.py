"""Serving throughput and latency: micro-batching on vs off, measured in one run.

32 concurrent clients (httpx, asyncio) send single-image ``:predict`` requests ({"b64": JPEG}) to a
real ``cnnkit serve`` (uvicorn) on 127.0.0.1, first with ``--no-batching`` (one model call per
request, on the thread pool), then with micro-batching (``--max-batch-size``, ``--max-wait-ms``).
Each mode gets a fresh server, a warm-up, then the timed requests. Prints a table, writes
``bench/results/serve.json`` (atomically), and the headline ratio last.

    python bench/serve.py                 # trains a small 'simple' model at 32x32 unless --run is given
    python bench/serve.py --quick         # fewer requests (CI smoke / a busy machine)
    python bench/serve.py --run runs/first --clients 32 --requests 2000

The clients run on the same machine as the server, so on a 2-core CPU they compete with it for
cores: compare the two modes with each other, not with other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(workdir: Path, image_size: int, model: str = "simple") -> Path:
    """A small model trained for 1 epoch on generated colour classes (serving speed does not need accuracy)."""
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


def request_body() -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return json.dumps({"instances": [{"b64": base64.b64encode(buffer.getvalue()).decode()}]}).encode()


def start_server(run: Path, port: int, batching: bool, max_batch_size: int, max_wait_ms: float) -> subprocess.Popen:
    args = [sys.executable, "-m", "cnnkit.cli", "--quiet", "serve", str(run), "--port", str(port), "--name", "bench",
            "--log-level", "warning", "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
            "--batching" if batching else "--no-batching"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 120
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
    raise SystemExit("server not ready after 120 s")


async def load(url: str, body: bytes, clients: int, requests: int) -> tuple[float, list[float], int]:
    """``requests`` POSTs from ``clients`` concurrent clients -> (wall seconds, latencies in s, errors)."""
    latencies: list[float] = []
    errors = 0
    remaining = requests
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60, headers={"content-type": "application/json"}) as client:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.post(url, content=body)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, latencies, errors


def mean_batch_size(port: int) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = re.search(r"^cnnkit_batch_size_sum ([0-9.e+]+)", text, re.M)
    count = re.search(r"^cnnkit_batch_size_count ([0-9.e+]+)", text, re.M)
    return float(total.group(1)) / float(count.group(1)) if total and count and float(count.group(1)) else None


def measure(run: Path, batching: bool, args: argparse.Namespace, body: bytes) -> dict:
    port = free_port()
    proc = start_server(run, port, batching, args.max_batch_size, args.max_wait_ms)
    try:
        url = f"http://127.0.0.1:{port}/v1/models/bench:predict"
        asyncio.run(load(url, body, args.clients, args.warmup))
        wall, latencies, errors = asyncio.run(load(url, body, args.clients, args.requests))
        batch = mean_batch_size(port) if batching else 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(latencies) * 1000
    return {"mode": "micro-batching on" if batching else "micro-batching off", "batching": batching,
            "requests": len(latencies), "errors": errors, "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_batch_size": round(batch, 2) if batch else None}


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run directory to serve (default: train a small one)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per mode")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per mode first")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--image-size", type=int, default=32, help="of the model trained when --run is not given")
    parser.add_argument("--model", default="simple", help="architecture trained when --run is not given")
    parser.add_argument("--quick", action="store_true", help="600 timed requests per mode, 64 warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup = 600, 64

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(Path(tmp), args.image_size, args.model)
        body = request_body()
        rows = [measure(run, batching, args, body) for batching in (False, True)]

    off, on = rows
    model = str(args.run) if args.run else f"{args.model} {args.image_size}x{args.image_size}"
    print(f"\n:predict ({model}), 1 image per request, {args.clients} concurrent clients, {args.requests} requests per mode "
          f"(max_batch_size={args.max_batch_size}, max_wait_ms={args.max_wait_ms})")
    header = f"{'mode':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'errors':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<20} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['mean_batch_size'] or 0:>11.2f} {r['errors']:>7}")
    ratio = on["requests_per_s"] / off["requests_per_s"]
    result = {
        "benchmark": "serve :predict, single-image requests, micro-batching on vs off",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "clients": args.clients, "requests_per_mode": args.requests, "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms, "quick": args.quick, "run": str(args.run) if args.run else
        f"{args.model} at {args.image_size}x{args.image_size}, trained for 1 epoch on generated images", "results": rows,
        "throughput_ratio_on_vs_off": round(ratio, 2),
    }
    write_json_atomic(args.out, result)
    print(f"\nwritten {args.out}")
    print(f"micro-batching: {ratio:.2f}x the requests/s of one model call per request "
          f"(p99 {on['p99_ms']:.0f} ms vs {off['p99_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
