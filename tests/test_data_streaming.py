"""Training data streams from Ray Data (issue 17 item 2): the CPUs it keeps for itself,
lazy datasets, and the trajectory table built once beside the latents."""

import numpy as np
import pytest

from cohortcast.config.training import ScalingSettings
from cohortcast.training.data_streaming import data_task_cpus, torch_threads, worker_cpus


@pytest.mark.parametrize(
    "workers, per_worker, data_cpus, cluster, expected",
    [
        (2, 1.0, 0.5, 2.0, 0.75),  # the workers would fill the machine: each gives up a quarter
        (1, 2.0, 0.5, 2.0, 1.5),
        (2, 1.0, 0.5, 4.0, 1.0),  # two CPUs left over anyway: unchanged
        (2, 1.0, 0.5, 2.5, 1.0),  # exactly the reservation left: unchanged
        (8, 8.0, 0.5, 16.0, 8.0),  # larger than the cluster (an autoscaler may add nodes): unchanged
        (2, 1.0, 0.0, 2.0, 1.0),  # no reservation asked for
        (4, 0.5, 1.9, 2.0, 0.25),  # never below a quarter of a CPU
    ],
)
def test_workers_leave_the_reservation_free_on_a_cluster_they_would_fill(
    workers, per_worker, data_cpus, cluster, expected
):
    scaling = ScalingSettings(num_workers=workers, cpus_per_worker=per_worker, data_cpus=data_cpus)
    assert worker_cpus(scaling, cluster) == pytest.approx(expected)


def test_task_and_thread_sizes():
    assert data_task_cpus(0.5) == 0.25 and data_task_cpus(8.0) == 1.0
    assert [torch_threads(c) for c in (0.25, 0.75, 1.0, 1.5, 1.75, 2.0)] == [1, 1, 1, 2, 2, 2]


def test_concurrent_trials_share_the_reservation():
    from cohortcast.config.schema import CohortcastConfig
    from cohortcast.tuning.grid import trials_base

    cfg = CohortcastConfig()
    cfg.training.scaling = ScalingSettings(num_workers=1, cpus_per_worker=1.0, data_cpus=0.5)
    base = trials_base(cfg, concurrency=2, resources={"CPU": 2.0})
    assert base.training.scaling.cpus_per_worker == pytest.approx(0.75)  # 2 trials x 0.75 + 0.5 = 2
    assert cfg.training.scaling.cpus_per_worker == 1.0  # the sweep's own config untouched


def test_negative_reservation_is_a_config_error():
    from cohortcast.config.loader import ConfigError

    with pytest.raises(ConfigError, match="data_cpus"):
        ScalingSettings(data_cpus=-1).validate()


def _latent_cache(folder, patients: int, exams: int = 3):
    """A latent cache's nodule table: `patients` x one nodule x `exams` exams."""
    rows = []
    for p in range(patients):
        for e in range(exams):
            rows.append(
                {
                    "patient": f"p{p:03d}",
                    "nodule_id": "n0",
                    "days_since_baseline": 365 * e,
                    "latent_d8": np.full((8, 4, 2, 2), p + e / 10, np.float32),
                    "crop": np.zeros((4, 4), np.float32),
                    "malignant": p % 2,
                    **{k: 1 for k in _ehr()},
                }
            )
    import ray.data

    ray.data.from_items(rows).write_parquet(str(folder / "nodules" / "split=train"))  # tensor columns, as the cache
    return folder


def _ehr():
    from cohortcast.data.manifest import EHR_FEATURES

    return EHR_FEATURES


@pytest.mark.ray
def test_latents_stream_instead_of_materialising(ray_session, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from cohortcast.training.ldm_stage import latent_dataset

    ds = latent_dataset(_latent_cache(tmp_path / "cache", 3), "train")
    assert not isinstance(ds, MaterializedDataset)
    assert ds.count() == 9 and ds.columns() == ["latent_d8"]
    assert latent_dataset(tmp_path / "cache", "val") is None


@pytest.mark.ray
def test_trajectory_table_is_built_once_then_streamed(ray_session, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from cohortcast.training.trajectories import DONE, trajectory_dataset

    cache = _latent_cache(tmp_path / "cache", 4)
    ds = trajectory_dataset(cache, "train", max_exams=2)
    table = cache / "trajectories" / "max_exams=2" / "split=train"
    assert (table / DONE).is_file() and not isinstance(ds, MaterializedDataset)
    rows = sorted(ds.take_all(), key=lambda r: r["patient"])
    assert [r["patient"] for r in rows] == ["p000", "p001", "p002", "p003"]
    assert all(r["num_exams"] == 3 for r in rows)
    first = np.asarray(rows[1]["latents"])  # (slots, 8, c, h, w), exams by date
    assert first.shape == (3, 8, 4, 2, 2) and np.allclose(first[:, 0, 0, 0, 0], [1.0, 1.1, 1.2])
    written = {p: p.stat().st_mtime_ns for p in table.iterdir()}
    again = trajectory_dataset(cache, "train", max_exams=2)
    assert {p: p.stat().st_mtime_ns for p in table.iterdir()} == written  # reused, not rebuilt
    assert again.count() == 4
    assert not list(table.parent.glob(".*tmp-*"))  # nothing half-written left beside it
