"""Load on the forecasting service over loopback: failures, throughput and latency.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--requests 1000] [--concurrency 32]
    python benchmarks/serve_load.py --in-process [--requests 1000] [--concurrency 32]
    python benchmarks/serve_load.py [--compare-batching] [--requests 64] [--concurrency 16]

`--url`: a running service (`cohortcast serve`, `serve run`); the crop shape comes from
its GET /v1/model, a bearer token from the variable `--token-env` names.
`--in-process`: a tiny random Forecaster behind the service's own FastAPI app in this
process (uvicorn on a free loopback port, no Ray): the HTTP layer, validation and
encoding under load, with the model's batching replaced by direct calls.
`--compare-batching` (the default without a target): a tiny random Forecaster (the debug config's sizes; speed does
not depend on training) served twice on a local Ray Serve, `max_batch_size` 8
(batching on, micro-batches of 8 x samples rows) and 1 (off); RESULTS.md's table.

Every request has its own crop and seed. The report: answers by status code, failures
(non-2xx answers and transport errors), requests/s, samples/s, p50/p99 latency
(client-side). Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Run:
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if not str(status).startswith("2"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bodies_for(count: int, shape: tuple[int, int], samples: int, steps: int, sampler: str | None = None) -> list[dict]:
    from cohortcast.serving.requests import encode_npy

    rng = np.random.default_rng(0)
    return [
        {
            "crop_npy_b64": encode_npy(rng.uniform(-1, 1, shape).astype(np.float32)),
            "horizon_days": 365,
            "num_samples": samples,
            "steps": steps,
            "seed": i,
            **({"sampler": sampler} if sampler else {}),
        }
        for i in range(count)
    ]


def load(url: str, bodies: list[dict], concurrency: int, headers: dict | None = None) -> Run:
    """POST every body with `concurrency` client threads (one HTTP session each)."""
    import requests

    local = threading.local()
    run = Run()
    lock = threading.Lock()

    def one(body):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.perf_counter()
        try:
            status = session.post(url, json=body, headers=headers, timeout=600).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        with lock:
            run.latencies.append(time.perf_counter() - started)
            run.statuses[status] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    run.wall = time.perf_counter() - started
    return run


def report(label: str, run: Run, requests_sent: int, samples: int) -> str:
    rate = requests_sent / run.wall
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(run.statuses.items(), key=str))
    return (
        f"{label:<34} {rate:>7.2f} {rate * samples:>10.1f} {np.percentile(run.latencies, 50):>7.3f} "
        f"{np.percentile(run.latencies, 99):>7.3f} {run.failures:>8}   ({statuses})"
    )


HEADER = f"{'path':<34} {'req/s':>7} {'samples/s':>10} {'p50 s':>7} {'p99 s':>7} {'failures':>8}"


def tiny_forecaster(folder: Path) -> Path:
    import torch

    from cohortcast.config.models import DenoiserConfig, ForecasterConfig, SchedulerConfig, VAEConfig
    from cohortcast.models.forecaster import Forecaster

    torch.manual_seed(0)
    Forecaster(
        ForecasterConfig(
            scheduler=SchedulerConfig(), vae=VAEConfig(scaling_factor=1.0), denoiser=DenoiserConfig(change_scale=1.0)
        )
    ).save(folder / "model")
    return folder / "model"


def machine(args) -> str:
    import torch

    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch "
        f"{torch.__version__}; {args.requests} requests, {args.concurrency} concurrent, "
        f"{args.samples} samples x {args.steps} {args.sampler or 'default-sampler'} steps each"
    )


def against_url(args) -> list[tuple[str, Run]]:
    import requests

    base = args.url.rstrip("/")
    token = os.environ.get(args.token_env) if args.token_env else None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    info = requests.get(f"{base}/v1/model", headers=headers, timeout=60)
    info.raise_for_status()
    shape = tuple(info.json()["crop_shape"])
    bodies = bodies_for(args.requests, shape, args.samples, args.steps, args.sampler)
    return [(base, load(f"{base}/v1/forecast", bodies, args.concurrency, headers))]


def in_process(args) -> list[tuple[str, Run]]:
    """The service's FastAPI app with a tiny Forecaster, on uvicorn in a thread."""
    import uvicorn

    from cohortcast.config import IngestConfig
    from cohortcast.config.serving import ServeConfig
    from cohortcast.models.forecaster import Forecaster
    from cohortcast.serving.forecast_model import run_batch
    from cohortcast.serving.local import local_app
    from cohortcast.serving.model_source import ForecasterSource

    class Direct:  # the model deployment without @serve.batch (that needs a Serve replica)
        def __init__(self, folder):
            self.model, self.source = Forecaster.load(folder), ForecasterSource(str(folder), folder)
            self.lock = threading.Lock()

        def info(self):
            side = self.model.cfg.vae.sample_size
            return {
                **self.source.info(),
                "crop_shape": [side, side],
                "uses_ehr": self.model.conditioner is not None,
                "evaluator": False,
            }

        def forecast(self, item):  # the ingress awaits it; runs in the caller's thread pool via to_thread
            import asyncio

            def compute():
                with self.lock:
                    return run_batch(self.model, [item])[0]

            return asyncio.to_thread(compute)

    with tempfile.TemporaryDirectory() as tmp:
        model = Direct(tiny_forecaster(Path(tmp)))
        cfg = ServeConfig(
            forecaster=tmp,
            max_samples=args.samples,
            default_samples=args.samples,
            max_steps=args.steps,
            default_steps=args.steps,
        )
        side = model.info()["crop_shape"][0]
        app = local_app(model, cfg, ingest=IngestConfig(crop_size=side))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            args.url = f"http://127.0.0.1:{port}"
            return [("in-process (no Ray)", against_url(args)[0][1])]
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def compare_batching(args) -> list[tuple[str, Run]]:
    import ray
    from ray import serve

    from cohortcast.config.serving import ServeConfig
    from cohortcast.serving.app import build_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_forecaster(Path(tmp))
        bodies = bodies_for(args.requests, (32, 32), args.samples, args.steps)
        # Fixed micro-batches keep answers batch-independent; each path gets the size that
        # fits it: a full batch of 8 requests in one call, or one request's samples.
        for label, batch in (("batching on (max_batch_size 8)", 8), ("batching off (max_batch_size 1)", 1)):
            cfg = ServeConfig(
                forecaster=str(folder),
                max_batch_size=batch,
                batch_wait_timeout_s=0.02,
                micro_batch=batch * args.samples,
                max_samples=args.samples,
                default_samples=args.samples,
                max_steps=args.steps,
                default_steps=args.steps,
                max_ongoing_requests=args.concurrency * 2,
                max_queued_requests=args.requests,
                num_cpus=max(1, (os.cpu_count() or 2) - 1),
            )
            name = f"bench{batch}"
            serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}/v1/forecast"
            load(url, bodies[: args.concurrency], args.concurrency)  # warm-up
            rows.append((label, load(url, bodies, args.concurrency)))
            serve.delete(name)
    serve.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    target.add_argument("--in-process", action="store_true", help="serve a tiny model in this process (no Ray)")
    target.add_argument(
        "--compare-batching",
        action="store_true",
        help="local Ray Serve, dynamic batching on vs off (RESULTS.md; the default)",
    )
    parser.add_argument("--requests", type=int, help="requests to send (default 1000; 64 with --compare-batching)")
    parser.add_argument("--concurrency", type=int, help="client threads (default 32; 16 with --compare-batching)")
    parser.add_argument("--samples", type=int, default=4, help="samples per request")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per request")
    parser.add_argument(
        "--sampler", choices=["ddim", "dpmsolver++"], help="request field sampler (default: the service's)"
    )
    parser.add_argument("--token-env", help="environment variable holding the service's bearer token")
    args = parser.parse_args()
    args.compare_batching = not (args.url or args.in_process)
    args.requests = args.requests or (64 if args.compare_batching else 1000)
    args.concurrency = args.concurrency or (16 if args.compare_batching else 32)
    run = compare_batching if args.compare_batching else in_process if args.in_process else against_url
    rows = run(args)
    print(machine(args))
    print(HEADER)
    for label, result in rows:
        print(report(label, result, args.requests, args.samples))
    if args.compare_batching:
        off = args.requests / rows[-1][1].wall
        print(f"batching on vs off: {args.requests / rows[0][1].wall / off:.2f}x the throughput")
    return 1 if any(result.failures for _, result in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
