"""cluster/: the files a user submits with are well-formed and point at real things."""

import shlex
from pathlib import Path

import yaml

from cohortcast.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_env_makes_the_package_importable_and_skips_local_state():
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert (ROOT / env["env_vars"]["PYTHONPATH"] / "cohortcast" / "__init__.py").is_file()
    assert {".venv", "runs", "mlruns"} <= set(env["excludes"])


def test_rayjob_runs_train_namd_with_a_loadable_config():
    job = yaml.safe_load((ROOT / "cluster/rayjob-train-namd.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train_namd.py"]
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, overrides)  # unknown keys or bad values would raise
    assert cfg.training.scaling.use_gpu
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["PYTHONPATH"] == "platform"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(workers["resources"]["limits"]["nvidia.com/gpu"]) == cfg.training.scaling.num_workers


def test_ray_up_yaml_has_a_head_and_a_gpu_worker_group():
    cluster = yaml.safe_load((ROOT / "cluster/ray-up-gpu.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert any(t["max_workers"] > 0 for name, t in types.items() if name != cluster["head_node_type"])
    assert any("pip install" in c for c in cluster["setup_commands"])


def test_local_job_script_submits_with_the_runtime_env():
    script = (ROOT / "cluster/local_job.sh").read_text()
    assert "ray job submit" in script and "cluster/runtime_env.yaml" in script
    assert "jobs/train_namd.py" in (ROOT / "Makefile").read_text()
