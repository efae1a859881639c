"""Multi-node scenarios on a local Ray cluster (`ray.cluster_utils.Cluster`), run as a
script by tests/test_multinode.py: the test session holds its own Ray instance, one
per process, so the cluster lives in this subprocess. It writes what it observed as
JSON (argv[1]); the test asserts on it.

    python tests/multinode_scenarios.py OBSERVATIONS.json WORKDIR INGESTED FORECASTER

One cluster for every scenario (a node costs seconds to start on a small machine): a
head with no CPUs (it runs the driver and Ray's services, as on a real cluster) and
three 1-CPU nodes a, b, c, each its own raylet with a label naming it. They share this
machine's disk, which stands for a real cluster's shared storage. In order:

- tune: two sweep trials at once (`run_trials`, `sweep_trial`, `trial_stage`), each a
  1-worker Ray Train run: one node holds one trial's worker.
- train: the unconditional LDM stage (`ldm_unconditional_worker_loop` through
  `run_stage`, ZeRO-2) with 2 half-CPU workers (one node could hold both) and
  `placement_strategy` SPREAD, checkpoints on the shared storage path; once the
  controller has registered its step-2 checkpoint, the node of a worker is removed
  outright; the run restarts on the nodes left, resumes and finishes.
- forecast: cohort forecasting's actor pool (2 actors); once both are up on their nodes
  and a first case is written, the node of one is removed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
import ray.cloudpickle

# The workers cannot import this file (tests/ is not a package on their path): ship the
# worker loop by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODE_LABEL = "cohortcast-node"
# Node failure detection: the GCS declares a node dead after this many missed health
# checks `period` apart (defaults 5 x 3 s, plus a 5 s initial delay). A removed raylet
# refuses connections at once, so only the period and threshold matter; the timeout of
# one check stays at its default so a slow, loaded node is never taken for a dead one.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

TRAIN_STEPS = 3
CHECKPOINT_EVERY = 1
GATE_STEP = 2  # the first attempt holds here (after its checkpoint) until its node is removed


def log(message: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {message}", flush=True)


def append_json(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({**record, "t": round(time.time(), 2)}) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------- cluster


def start_cluster():
    """The cluster, connected; one more try when a node misses Ray's fixed 30 s to
    register (seen on a loaded 2-core machine)."""
    try:
        return _start_cluster()
    except Exception as exc:
        log(f"cluster start failed ({exc!r}); trying once more")
        ray.shutdown()
        return _start_cluster()


def _start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "labels": {NODE_LABEL: "head"},
            "_system_config": SYSTEM_CONFIG,
            "include_dashboard": False,
        },
    )
    nodes = {"head": cluster.head_node}
    try:
        for name in ("a", "b", "c"):  # one CPU each: a sweep trial's worker, or two half-CPU stage workers
            nodes[name] = cluster.add_node(wait=False, num_cpus=1, labels={NODE_LABEL: name})
        cluster.wait_for_nodes(timeout=120)
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": worker_setup},
        )
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, nodes


def node_names() -> dict[str, str]:
    """Ray node id -> node name, as the cluster reports its nodes' labels (dead ones too)."""
    return {n["NodeID"]: n["Labels"].get(NODE_LABEL, "?") for n in ray.nodes()}


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def remove(cluster, nodes: dict, name: str) -> float:
    """Kill a node's raylet and workers at once (no graceful drain: a node lost, not
    retired); returns when the GCS has marked it dead."""
    node = nodes.pop(name)
    started = time.monotonic()
    cluster.remove_node(node, allow_graceful=False)
    wait_for(f"node {name} marked dead", lambda: node.node_id not in {n["NodeID"] for n in alive_nodes()}, 60)
    log(f"node {name} removed ({time.monotonic() - started:.1f} s until the GCS saw it dead)")
    return time.monotonic() - started


# --------------------------------------------------------------------------- train


def observed_ldm_loop(config: dict) -> None:
    """The real stage-c worker loop, observed: every worker records its node and
    attempt; world rank 0 records each step it trains (from the loss call) and each
    report to Ray Train; on the first attempt each worker holds after the step-GATE_STEP
    checkpoint until it is killed with its node (or by the controller tearing the group
    down), so the node goes away mid-stage at a known step instead of racing a fast tiny
    model."""
    import ray.train

    from cohortcast.training import ldm_stage

    probe = Path(config.pop("probe"))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    first = ray.train.get_checkpoint() is None
    append_json(
        probe / "workers.jsonl",
        {
            "rank": rank,
            "node": ray.get_runtime_context().get_node_id(),
            "attempt": "first" if first else "resumed",
            "pid": os.getpid(),
        },
    )
    attempt = "first" if first else "resumed"
    loss = ldm_stage.unconditional_loss

    def observed_loss(engine, scheduler, latents):
        if rank == 0:  # the step this loss is for (grad_accumulation 1)
            append_json(probe / "steps.jsonl", {"step": engine.global_steps + 1, "attempt": attempt})
        return loss(engine, scheduler, latents)

    report = ray.train.report

    def observed_report(metrics, checkpoint=None, **kw):
        report(metrics, checkpoint=checkpoint, **kw)
        if rank == 0:
            append_json(
                probe / "reports.jsonl",
                {
                    "step": metrics["step"],
                    "resumed_from": metrics["resumed_from"],
                    "checkpoint": checkpoint is not None,
                    "attempt": attempt,
                },
            )
        if first and checkpoint is not None and metrics["step"] == GATE_STEP:
            append_json(probe / "held.jsonl", {"rank": rank})
            while True:  # until this process is killed
                time.sleep(0.5)

    ray.train.report = observed_report
    ldm_stage.unconditional_loss = observed_loss
    ldm_stage.ldm_unconditional_worker_loop(config)


def stand_in_latents(rows: int = 8):
    """Rows as stage b's latent cache holds them (`latent_d8`: the 8 orientations of a
    crop's latent), random, of the default model's shape, from the driver (a latent
    cache on disk would add read tasks, and worker processes, to every attempt)."""
    import numpy as np

    from cohortcast.config.models import ForecasterConfig

    vae = ForecasterConfig().vae
    rng = np.random.default_rng(0)
    shape = (8, vae.latent_channels, vae.latent_side, vae.latent_side)
    return ray.data.from_items([{"latent_d8": rng.standard_normal(shape, np.float32)} for _ in range(rows)])


def scenario_train(cluster, nodes: dict, workdir: Path) -> dict:
    from cohortcast.config.models import ForecasterConfig
    from cohortcast.config.training import ScalingSettings, StageConfig
    from cohortcast.training.runner import run_stage

    probe = workdir / "train-probe"
    probe.mkdir()
    storage = workdir / "shared" / "ray_results"
    name = "ldm_uncond-multinode"
    stage = StageConfig(
        max_steps=TRAIN_STEPS,
        micro_batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        zero_stage=2,  # each rank checkpoints its own optimizer shard: both must survive
        checkpoint_every=CHECKPOINT_EVERY,
        log_every=1,
    )
    scaling = ScalingSettings(
        num_workers=2,
        cpus_per_worker=0.5,  # two fit on one node: only the placement strategy spreads them
        storage_path=str(storage),
        max_failures=1,
        checkpoints_to_keep=10,  # keep the whole history to check it
        placement_strategy="SPREAD",
    )
    data = stand_in_latents()
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_stage(
                name,
                observed_ldm_loop,
                {"stage": stage, "model": ForecasterConfig(), "probe": str(probe)},
                {"train": data},
                scaling,
            )
        except BaseException as exc:  # reported, not raised in the thread
            outcome["error"] = repr(exc)

    started = time.monotonic()
    log(f"train: starting at {time.time():.2f}")
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    snapshot = storage / name / "checkpoint_manager_snapshot.json"

    def gate_checkpoint_registered():
        # the controller's own record: the gate step's checkpoint is what a restart resumes from
        if not snapshot.is_file():
            return None
        try:
            state = json.loads(snapshot.read_text())
        except json.JSONDecodeError:  # caught mid-write
            return None
        latest = state.get("latest_checkpoint_result") or {}
        return latest if (latest.get("metrics") or {}).get("step") == GATE_STEP else None

    wait_for(f"the step-{GATE_STEP} checkpoint", lambda: gate_checkpoint_registered() or outcome, 240)
    if outcome:
        raise RuntimeError(f"the stage ended before its node was removed: {outcome}")
    wait_for("both workers held", lambda: len(read_jsonl(probe / "held.jsonl")) == 2, 60)
    names = node_names()
    first_workers = [w for w in read_jsonl(probe / "workers.jsonl") if w["attempt"] == "first"]
    victim = next(names[w["node"]] for w in first_workers if names[w["node"]] != "head")
    removed_at = time.monotonic() - started
    log(f"train: removing {victim} at {time.time():.2f}")
    detect_s = remove(cluster, nodes, victim)
    thread.join(timeout=300)
    log(f"train: finished at {time.time():.2f}")
    if thread.is_alive():
        raise TimeoutError("the stage did not finish within 300 s of the node removal")
    if "error" in outcome:
        raise RuntimeError(f"the stage failed: {outcome['error']}")
    result = outcome["result"]
    history = [m for _, m in result.best_checkpoints]
    return {
        "wall_s": round(time.monotonic() - started, 1),
        "removed_at_s": round(removed_at, 1),
        "node_death_detected_s": round(detect_s, 1),
        "victim": victim,
        "node_names": names,
        "workers": read_jsonl(probe / "workers.jsonl"),
        "reports": read_jsonl(probe / "reports.jsonl"),
        "steps": read_jsonl(probe / "steps.jsonl"),
        "error": None if result.error is None else repr(result.error),
        "final_step": result.metrics.get("step"),
        "final_resumed_from": result.metrics.get("resumed_from"),
        "checkpoint_steps": [m["step"] for m in history],
        "final_checkpoint_dir": str(result.checkpoint.path) if result.checkpoint else None,
        "storage": str(storage),
        "max_steps": TRAIN_STEPS,
        "gate_step": GATE_STEP,
        "checkpoint_every": CHECKPOINT_EVERY,
    }


# --------------------------------------------------------------------------- forecast


def map_workers() -> dict[str, str]:
    """Alive Ray Data actor-pool workers: actor id -> node id (read from the GCS; the
    state API would need a dashboard)."""
    from ray._private.state import actors

    return {
        actor_id: info["Address"]["NodeID"]
        for actor_id, info in actors().items()
        if info["State"] == "ALIVE" and "MapWorker" in info["ActorClassName"]
    }


def scenario_forecast(cluster, nodes: dict, workdir: Path, ingested: str, forecaster: str) -> dict:
    from cohortcast.config.training import ForecastJobConfig
    from cohortcast.inference.cohort_forecast import CASE_FILE, finished_cases, read_forecasts, run_cohort_forecast

    output = workdir / "shared" / "forecasts"
    job = ForecastJobConfig(
        forecaster=forecaster,
        ingested=ingested,
        split="train",
        output=str(output),
        num_samples=2,
        inference_steps=60,  # ~1.7 s a case: room to remove a node between cases
        seed=3,
        actors=2,
        cases_per_batch=1,
        write_dicom=False,
    )
    names = node_names()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_cohort_forecast(job)
        except BaseException as exc:
            outcome["error"] = repr(exc)

    # The pool dispatches only once both actors are up (the job alone starts on the first
    # ready one): on a busy 2-core machine the second actor once came up after a single
    # one had forecast all 5 cases, and there was no second node to lose.
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.wait_for_min_actors_s = 120
    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def mid_job():
        # actors up on two nodes at least and a first case written (the pool dispatches
        # one case at a time per actor once both are up): the victim is one of those nodes
        if outcome:
            return True
        on = sorted({names.get(n) for n in map_workers().values()} - {"head", None})
        if len(on) < 2 or not finished_cases(output):
            return None
        return on[-1]

    victim = wait_for("actors on two nodes and a first finished case", mid_job, 240, 0.05)
    if outcome:
        raise RuntimeError(f"the forecast ended before a node was removed: {outcome}")
    before = {k: (output / "cases" / k / CASE_FILE).stat().st_mtime_ns for k in finished_cases(output)}
    actor_nodes_at_kill = sorted(names.get(n, n) for n in map_workers().values())
    killed_at = time.monotonic() - started
    detect_s = remove(cluster, nodes, victim)
    thread.join(timeout=300)
    data_context.wait_for_min_actors_s = -1  # Ray Data's default again, for the next scenario
    if thread.is_alive():
        raise TimeoutError("the forecast did not finish within 300 s of the node removal")
    if "error" in outcome:
        raise RuntimeError(f"the forecast failed: {outcome['error']}")
    table = read_forecasts(output)
    after = {k: (output / "cases" / k / CASE_FILE).stat().st_mtime_ns for k in before}
    return {
        "wall_s": round(time.monotonic() - started, 1),
        "killed_at_s": round(killed_at, 1),
        "node_death_detected_s": round(detect_s, 1),
        "victim": victim,
        "actor_nodes_at_kill": actor_nodes_at_kill,
        "finished_at_kill": len(before),
        "finished_before_kill_untouched": after == before,
        "summary": outcome["summary"],
        "case_ids": table.column("case_id").to_pylist(),
        "case_folders": sorted(p.name for p in (output / "cases").iterdir()),
    }


# --------------------------------------------------------------------------- tune


def observed_trial_loop(config: dict) -> None:
    """A sweep trial's Ray Train loop, observed: the real stage-c loop, its worker's node
    recorded."""
    import ray.train

    from cohortcast.training.ldm_stage import ldm_unconditional_worker_loop

    probe = Path(config.pop("probe"))
    append_json(
        probe / "trial_workers.jsonl",
        {
            "trial": config.pop("trial"),
            "rank": ray.train.get_context().get_world_rank(),
            "node": ray.get_runtime_context().get_node_id(),
        },
    )
    ldm_unconditional_worker_loop(config)


def light_train_trial(self, cfg, runs, upstream: dict, context, callbacks: list):
    """NAMDSweep.train_trial for this test: the trial's stage is the unconditional LDM
    on stand-in latents instead of the conditional one on a trained upstream (a minute a
    trial here; tests/test_tune_namd.py runs that one). Everything around it is the
    sweep's: run_trials' Tuner, sweep_trial, trial_stage, the trial's config and output
    folder, the Train run inside the trial with Tune's report callback."""
    from cohortcast.config.models import ForecasterConfig
    from cohortcast.config.training import StageConfig
    from cohortcast.training.runner import run_stage
    from cohortcast.training.stage_runner import StageReport

    started = time.perf_counter()
    name = Path(cfg.training.output).name  # trial_config: <tune.output>/trials/<trial name>
    stage = StageConfig(max_steps=2, micro_batch_size=2, warmup_steps=1, zero_stage=0, checkpoint_every=2)
    result = run_stage(
        f"trial-{name}",
        observed_trial_loop,
        {"stage": stage, "model": ForecasterConfig(), "probe": upstream["probe"], "trial": name},
        {"train": stand_in_latents(4)},
        cfg.training.scaling,
        callbacks=callbacks,
    )
    if result.error is not None:
        raise result.error
    folder = Path(cfg.training.output)
    folder.mkdir(parents=True, exist_ok=True)
    return folder, StageReport(
        "ldm_uncond",
        "trained",
        str(folder),
        time.perf_counter() - started,
        metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    )


def worker_setup() -> None:
    """Every worker process of this test's Ray job: the light trial stage in place of
    NAMD's conditional one (the trial code reads it through tuning.jobs.JOBS)."""
    from cohortcast.tuning.jobs import NAMDSweep

    NAMDSweep.train_trial = light_train_trial


def scenario_tune(workdir: Path) -> dict:
    from cohortcast.config import load_config
    from cohortcast.config.paths import resolve_paths
    from cohortcast.tuning.grid import trial_config, upstream_key
    from cohortcast.tuning.sweep import run_trials
    from cohortcast.tuning.trial import SweepContext

    probe = workdir / "tune-probe"
    probe.mkdir()
    cfg = resolve_paths(
        load_config(
            None,
            [
                f"workdir={workdir}",
                "tune.output=shared/tune",
                "tune.grid={training.task_weight: [0.1, 1.0]}",
                "tune.metric=loss/total",
                "training.scaling.num_workers=1",
                "training.scaling.storage_path=shared/ray_results",
                "mlflow.enabled=false",
            ],
        )
    )
    trials = [trial_config(cfg, {"training.task_weight": w}) for w in (0.1, 1.0)]
    context = SweepContext(cfg, None, {upstream_key(trials[0]): {"probe": str(probe)}}, {})
    started = time.monotonic()
    log(f"tune: starting at {time.time():.2f}")
    results = run_trials(cfg, context, concurrency=2)
    log(f"tune: finished at {time.time():.2f}")
    rows = [
        {
            "error": None if r.error is None else repr(r.error),
            "stage_status": (r.metrics or {}).get("stage_status"),
            "step": (r.metrics or {}).get("step"),
            "forecaster": (r.metrics or {}).get("forecaster"),
            "path": r.path,
        }
        for r in results
    ]
    return {
        "wall_s": round(time.monotonic() - started, 1),
        "node_names": node_names(),
        "tune_storage": str(Path(cfg.tune.output) / "ray_tune"),
        "trials": rows,
        "workers": read_jsonl(probe / "trial_workers.jsonl"),
    }


# --------------------------------------------------------------------------- main


def main(out: str, workdir: str, ingested: str, forecaster: str) -> None:
    import logging

    from ray.data import DataContext

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # A raylet starts worker processes one at a time per CPU of its node: 1 on these
    # small nodes, where Tune's and Train's zero-CPU actors all queue behind one another.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "2")
    # Ray Train's preemption watcher (an actor, a process, per attempt) acts on graceful
    # node drains; these nodes are killed outright, which the controller sees as worker
    # deaths whether it runs or not.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A 5-case cohort: one shuffle aggregator (an actor, a process) instead of one per
    # CPU of the cluster, and a few partitions instead of 200 tasks.
    context = DataContext.get_current()
    context.max_hash_shuffle_aggregators = 1
    context.default_hash_shuffle_parallelism = 8
    # Cohort forecasting's pool: dispatch once every actor is up, one block at a time
    # each, so a 5-case cohort does not all go to the first actor up.
    context.wait_for_min_actors_s = 180
    context.max_tasks_in_flight_per_actor = 1
    workdir_path = Path(workdir)
    observations: dict = {"timings": {}}
    started = time.monotonic()
    cluster, nodes = start_cluster()
    observations["timings"]["cluster_start_s"] = round(time.monotonic() - started, 1)
    log(f"cluster up: {len(alive_nodes())} nodes in {observations['timings']['cluster_start_s']} s")

    scenarios = (
        ("tune", lambda: scenario_tune(workdir_path)),
        ("train", lambda: scenario_train(cluster, nodes, workdir_path)),
        ("forecast", lambda: scenario_forecast(cluster, nodes, workdir_path, ingested, forecaster)),
    )
    try:
        for name, scenario in scenarios:
            t0 = time.monotonic()
            try:
                observations[name] = scenario()
            except Exception as exc:  # the others still run; the test reports this one
                import traceback

                observations[name] = {"failed": f"{exc!r}", "traceback": traceback.format_exc()}
            observations["timings"][name] = round(time.monotonic() - t0, 1)
            log(f"scenario {name}: {observations['timings'][name]} s")
            Path(out).write_text(json.dumps(observations, indent=2, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()
    observations["timings"]["total_s"] = round(time.monotonic() - started, 1)
    Path(out).write_text(json.dumps(observations, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:5])
