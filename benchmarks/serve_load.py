"""Load on the forecasting service over loopback, dynamic batching on and off, in one run.

    python benchmarks/serve_load.py [--requests 64] [--concurrency 16] [--samples 4] [--steps 10]

A tiny random Forecaster (the debug config's sizes; speed does not depend on training)
is served twice on a local Ray Serve: `max_batch_size` 8 (batching on, micro-batches of
8 x samples rows) and 1 (off, micro-batches of one request's samples). A
bounded pool of client threads sends the same requests to each; the script prints
throughput (requests/s, samples/s) and p50/p99 latency. Record it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float]]:
    import requests

    def one(body):
        started = time.perf_counter()
        answer = requests.post(url, json=body, timeout=600)
        answer.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, bodies))
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import ray
    import torch
    from ray import serve

    from cohortcast.config.models import DenoiserConfig, ForecasterConfig, SchedulerConfig, VAEConfig
    from cohortcast.config.serving import ServeConfig
    from cohortcast.models.forecaster import Forecaster
    from cohortcast.serving.app import build_app
    from cohortcast.serving.requests import encode_npy

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rng = np.random.default_rng(0)
    bodies = [{"crop_npy_b64": encode_npy(rng.uniform(-1, 1, (32, 32)).astype(np.float32)), "horizon_days": 365,
               "num_samples": args.samples, "steps": args.steps, "seed": i} for i in range(args.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Forecaster(ForecasterConfig(scheduler=SchedulerConfig(), vae=VAEConfig(scaling_factor=1.0),
                                   denoiser=DenoiserConfig(change_scale=1.0))).save(Path(tmp) / "model")
        # Fixed micro-batches keep answers batch-independent; each path gets the size that
        # fits it: a full batch of 8 requests in one call, or one request's samples.
        for label, batch in (("batching on (max_batch_size 8)", 8), ("batching off (max_batch_size 1)", 1)):
            cfg = ServeConfig(forecaster=str(Path(tmp) / "model"), max_batch_size=batch, batch_wait_timeout_s=0.02,
                              micro_batch=batch * args.samples,
                              max_samples=args.samples, default_samples=args.samples, max_steps=args.steps,
                              default_steps=args.steps, max_ongoing_requests=args.concurrency * 2,
                              max_queued_requests=args.requests, num_cpus=max(1, (os.cpu_count() or 2) - 1))
            name = f"bench{batch}"
            serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}/v1/forecast"
            load(url, bodies[: args.concurrency], args.concurrency)  # warm-up
            wall, latencies = load(url, bodies, args.concurrency)
            rows.append((label, wall, latencies))
            serve.delete(name)
    serve.shutdown()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch "
          f"{torch.__version__}, Ray {ray.__version__}; {args.requests} requests, {args.concurrency} concurrent, "
          f"{args.samples} samples x {args.steps} DDIM steps each")
    print(f"{'path':<34} {'req/s':>7} {'samples/s':>10} {'p50 s':>7} {'p99 s':>7} {'vs off':>7}")
    off = args.requests / rows[-1][1]
    for label, wall, lat in rows:
        rate = args.requests / wall
        print(f"{label:<34} {rate:>7.2f} {rate * args.samples:>10.1f} {np.percentile(lat, 50):>7.2f} "
              f"{np.percentile(lat, 99):>7.2f} {rate / off:>6.2f}x")


if __name__ == "__main__":
    main()
