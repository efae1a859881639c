"""Shared fixtures: one local Ray instance per test session, one tiny synthetic cohort."""

from __future__ import annotations

import os

import pytest

# Tests never use a real pseudonym secret; a fixed one keeps outputs reproducible.
os.environ.setdefault("COHORTCAST_PSEUDONYM_SECRET", "test-secret")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def tiny_synth_config(**overrides):
    from cohortcast.config import SynthConfig

    base = dict(patients=4, seed=7, min_exams=2, max_exams=3, max_nodules=2, image_size=48, num_slices=16,
                pixel_spacing_mm=6.0, slice_thickness_mm=8.0, nifti_fraction=0.3, fibrosis_fraction=0.5)
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
    run_ingest(IngestConfig(manifest=str(tiny_cohort), output=str(out), crop_size=32, crop_spacing_mm=1.5,
                            patch_size=8, volume_shape=(8, 16, 16), split=SplitConfig(1.0, 0.0, 0.0)))
    return out
