"""cluster/: the files a user submits with are well-formed and point at real things."""

import os
import shlex
import shutil
import subprocess
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
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    workers = group["template"]["spec"]["containers"][0]
    gpus = int(workers["resources"]["limits"]["nvidia.com/gpu"])
    assert group["replicas"] * gpus == cfg.training.scaling.num_workers  # one Train worker per GPU
    assert group["replicas"] >= 2  # multi-node: everything shared lives on the RWX volume
    mounts = {m["mountPath"] for m in workers["volumeMounts"]}
    for path in (cfg.training.scaling.storage_path, cfg.training.output, cfg.workdir):
        assert any(str(path).startswith(m + "/") for m in mounts), f"{path} is not on a mounted volume"


def test_ray_up_yaml_has_a_head_and_a_gpu_worker_group():
    cluster = yaml.safe_load((ROOT / "cluster/ray-up-gpu.yaml").read_text())
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert any(t["max_workers"] > 0 for name, t in types.items() if name != cluster["head_node_type"])
    assert any("pip install" in c for c in cluster["setup_commands"])


def _run_local_job(tmp_path, args, fail_submit_of=""):
    """cluster/local_job.sh, copied into an empty project, run against a stand-in `ray`
    that records each call (one line of arguments) and has no head running."""
    project = tmp_path / "project"
    (project / "cluster").mkdir(parents=True)
    shutil.copy(ROOT / "cluster/local_job.sh", project / "cluster")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "ray"
    fake.write_text(
        '#!/bin/sh\necho "$*" >> "$RAY_CALLS"\n'
        '[ "$1" = status ] && exit 1\n'  # no head up: the script starts one
        'case "$*" in *"python $FAIL_SUBMIT_OF "*) exit 3;; esac\n'
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_CALLS": str(calls),
        "FAIL_SUBMIT_OF": fail_submit_of or "-",
    }
    done = subprocess.run(["bash", str(project / "cluster/local_job.sh"), *args], env=env, timeout=60)
    return done.returncode, calls.read_text().splitlines(), project


def test_local_job_script_submits_each_job_with_the_runtime_env(tmp_path):
    code, calls, project = _run_local_job(tmp_path, ["jobs/a.py", "--config", "c.yaml", "--then", "jobs/b.py"])
    submit = "job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python"
    assert code == 0
    assert calls[0].startswith("status") and calls[1].startswith("start --head")
    assert calls[2:] == [
        f"{submit} jobs/a.py --config c.yaml --set workdir={project}",
        f"{submit} jobs/b.py --set workdir={project}",
        "stop --force",
    ]


def test_local_job_script_stops_at_a_failing_job_and_its_head(tmp_path):
    code, calls, _ = _run_local_job(tmp_path, ["jobs/a.py", "--then", "jobs/b.py"], fail_submit_of="jobs/a.py")
    assert code == 3
    assert not any("jobs/b.py" in call for call in calls) and calls[-1] == "stop --force"


def test_make_demo_runs_the_training_then_the_evaluation_job():
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), "demo"], capture_output=True, text=True, check=True).stdout
    argv = shlex.split(next(line for line in plan.splitlines() if "local_job.sh" in line))
    assert argv[0] == "cluster/local_job.sh" and (ROOT / argv[0]).is_file()
    jobs = [argv[1]] + [argv[i + 1] for i, a in enumerate(argv) if a == "--then"]
    assert jobs == ["jobs/train_namd.py", "jobs/evaluate_namd.py"] and all((ROOT / j).is_file() for j in jobs)


def test_rayservice_serves_the_application_of_the_serve_config(monkeypatch):
    from ray.serve import Application

    from cohortcast.serving.entry import app_builder

    service = yaml.safe_load((ROOT / "cluster/rayservice-forecast.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    spec = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    local = yaml.safe_load((ROOT / "cluster/serve_config.yaml").read_text())["applications"][0]
    assert spec["import_path"] == local["import_path"]
    cfg = load_config(ROOT / spec["args"]["config"], spec["args"]["set"])
    assert cfg.serve.forecaster.startswith("models:/") and cfg.serve.autoscaling.enabled and cfg.serve.num_gpus == 1
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert workers["maxReplicas"] * gpus >= cfg.serve.autoscaling.max_replicas * cfg.serve.num_gpus
    head_env = {
        e["name"]
        for e in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert cfg.serve.auth_token_env in head_env

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(cfg.serve.auth_token_env, "t")
    app = app_builder(spec["args"])  # builds without touching the model (loaded in the replica)
    assert isinstance(app, Application)
    model = app._bound_deployment.init_args[0]._bound_deployment  # ingress -> model deployment
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4) and scaling.target_ongoing_requests == 16
    assert model.ray_actor_options["num_gpus"] == 1


def test_training_job_sets_the_alias_the_service_serves():
    """The RayService serves models:/<name>@champion: the RayJob must register under that
    name and point that alias at what it registers (issue 13: nothing set it)."""
    job = yaml.safe_load((ROOT / "cluster/rayjob-train-namd.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    trained = load_config(
        ROOT / argv[argv.index("--config") + 1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    )
    service = yaml.safe_load((ROOT / "cluster/rayservice-forecast.yaml").read_text())
    spec = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    served = load_config(ROOT / spec["args"]["config"], spec["args"]["set"])
    assert served.serve.forecaster == f"models:/{trained.mlflow.registry_name}@{trained.mlflow.registry_alias}"
