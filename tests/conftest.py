"""Shared fixtures: one local Ray instance per test session, one tiny synthetic cohort."""

from __future__ import annotations

import os

import pytest

# Tests never use a real pseudonym secret; a fixed one keeps outputs reproducible.
os.environ.setdefault("COHORTCAST_PSEUDONYM_SECRET", "test-secret")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (the remote-tracking case), for the session."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_cli),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=open(root / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # The dashboard hosts the job server: the end-to-end test submits
    # jobs/train_namd.py to this same instance with `ray job submit`.
    # address "local": a new instance even when another cluster runs on this machine (a
    # `ray start`, or the multi-node test's Cluster), which ray.init() would otherwise join.
    context = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=free_port(),
        log_to_driver=False,
        configure_logging=False,
    )
    ray.test_job_address = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Run a training-heavy test on one intra-op thread (restored after). On a small
    shared CPU, two OpenMP threads competing with other processes spin-wait: a tiny
    model's step measured 10-20x slower than on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def forecaster_config(**kw):
    """A ForecasterConfig that an untrained Forecaster can forecast with: the latent
    scaling factor and the change scale, computed from training data in a real run
    (VAE stage export, pipeline.namd.change_scale), are set to 1 unless given."""
    from cohortcast.config.models import ForecasterConfig

    cfg = ForecasterConfig(**kw)
    if cfg.vae.scaling_factor is None:
        cfg.vae.scaling_factor = 1.0
    if cfg.denoiser.change_scale is None:
        cfg.denoiser.change_scale = 1.0
    return cfg


def tiny_synth_config(**overrides):
    from cohortcast.config import SynthConfig

    base = dict(
        patients=4,
        seed=7,
        min_exams=2,
        max_exams=3,
        max_nodules=2,
        image_size=48,
        num_slices=16,
        pixel_spacing_mm=6.0,
        slice_thickness_mm=8.0,
        nifti_fraction=0.3,
        fibrosis_fraction=0.5,
    )
    base.update(overrides)
    return SynthConfig(**base)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A 4-patient cohort written once per session; tests must copy it before changing it."""
    from cohortcast.data.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "manifest"
    generate_cohort(tiny_synth_config(), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ingested(ray_session, tiny_cohort, tmp_path_factory):
    """The tiny cohort ingested with 32 px crops, every patient in `train` (training tests)."""
    from cohortcast.config import IngestConfig, SplitConfig
    from cohortcast.data.ingest import run_ingest

    out = tmp_path_factory.mktemp("train-ingest") / "ingested"
    run_ingest(
        IngestConfig(
            manifest=str(tiny_cohort),
            output=str(out),
            crop_size=32,
            crop_spacing_mm=1.5,
            patch_size=8,
            volume_shape=(8, 16, 16),
            split=SplitConfig(1.0, 0.0, 0.0),
        )
    )
    return out
