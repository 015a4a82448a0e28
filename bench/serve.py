"""Requests per second of the HTTP API (``--serve``): one uvicorn server, then Ray Serve with 1, 2, ... replicas,
each driven by the same clients at once (A1111 txt2img requests over real HTTP).

    python bench/serve.py [--model_id tiny] [--models_dir models] [--cache_dir cache] [--provider cpu]
                          [--size 64] [--steps 4] [--requests 24] [--clients 4] [--replicas 1,2]

Builds the model first if needed. Per case: a warm-up request per replica, then ``--requests`` requests from
``--clients`` threads; prints a JSON line with requests/s and the median seconds per request. On a GPU machine,
``--provider cuda`` puts one replica on each GPU (as many replicas as GPUs at most).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=5)
            return
        except requests.ConnectionError:
            time.sleep(0.5)
    raise SystemExit(f"no server on port {port}")


def _load(port: int, args, *, warmups: int) -> dict:
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"

    def one(index: int) -> float:
        payload = {"prompt": "a lighthouse at dusk", "seed": index, "steps": args.steps}
        payload.update(width=args.size, height=args.size, sampler_name="Euler a")
        started = time.perf_counter()
        answer = requests.post(url, json=payload, timeout=600)
        answer.raise_for_status()
        return time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(warmups)))  # every replica loads its sessions for this shape
        started = time.perf_counter()
        seconds = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - started
    return {
        "requests_per_s": round(args.requests / wall, 2),
        "median_request_s": round(statistics.median(seconds), 3),
        "requests": args.requests,
        "clients": args.clients,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_id", default="tiny")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--replicas", default="1,2")
    args = parser.parse_args()

    import uvicorn

    from sd_utils import app
    from sd_utils.options import parse_options
    from sd_utils.serve import ray_serve
    from sd_utils.serve.server import create_app
    from sd_utils.serve.service import GenerationService

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--serve", "--model_id", args.model_id, "--provider", args.provider, "--models_dir", args.models_dir]
        argv += ["--cache_dir", args.cache_dir, "--output_dir", scratch]
        options = parse_options(argv)
        job = app.plan(options)
        ready = app.prepare_models(options, job)
        common = {"model": args.model_id, "provider": args.provider, "size": args.size, "steps": args.steps}

        port = _free_port()
        service = GenerationService(options, job, ready)
        server = uvicorn.Server(uvicorn.Config(create_app(lambda: service), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        _wait(port)
        print(json.dumps({"case": "uvicorn", **_load(port, args, warmups=1), **common}), flush=True)
        server.should_exit = True
        thread.join()
        service = None

        for replicas in (int(count) for count in args.replicas.split(",")):
            port = _free_port()
            options = parse_options([*argv, "--ray", "--workers", str(replicas), "--port", str(port)])
            ray_serve.serve_on_ray(options, job, ready, block=False)
            try:
                _wait(port)
                row = {"case": f"Ray Serve, {replicas} replica(s)", **_load(port, args, warmups=2 * replicas)}
                print(json.dumps({**row, **common}), flush=True)
            finally:
                ray_serve.stop()


if __name__ == "__main__":
    main()
