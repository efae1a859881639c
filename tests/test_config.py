import pytest

from cohortcast.config import ConfigError, IngestConfig, dump_yaml, flatten, load_config


def test_defaults_validate_and_flatten():
    cfg = load_config()
    flat = flatten(cfg)
    assert flat["ingest.crop_size"] == cfg.ingest.crop_size
    assert flat["ingest.split.train"] == pytest.approx(0.7)
    assert all("." in key or key in {"run_name", "workdir", "synthesize_if_missing"} for key in flat)
    assert flat["training.ldm_cond.zero_stage"] == 2 and flat["training.task_weight"] == 1.0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  crop_size: 48\n  hu_window: [-1200, 600]\nsynth:\n  patients: 3\n")
    cfg = load_config(path, ["ingest.crop_size=96", "synth.seed=5", "ingest.hu_window=[-900, 300]"])
    assert cfg.ingest.crop_size == 96  # override beats file
    assert cfg.synth.patients == 3 and cfg.synth.seed == 5
    assert cfg.ingest.hu_window == (-900.0, 300.0)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["ingest.patch_size=24", "privacy.pseudonym_length=20"])
    dump_yaml(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("override, fragment", [
    ("ingest.crop_sise=64", "ingest.crop_sise: unknown field (did you mean 'crop_size'?)"),
    ("ingest.crop_size=big", "ingest.crop_size: expected an integer, got 'big'"),
    ("ingest.normalise=zscore", "ingest.normalise: 'zscore' is not one of"),
    ("ingest.hu_window=[400, -1000]", "ingest.hu_window: low must be below high"),
    ("ingest.split.train=0.9", "ingest.split.train: train + val + test must be 1"),
    ("synth.min_exams=1", "synth.min_exams"),
    ("ingest.volume_shape=[16, 32]", "ingest.volume_shape: expected 3 items"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_errors_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["ingest.crop_size=true"])
    assert isinstance(IngestConfig().crop_size, int)


def test_shipped_configs_load():
    from pathlib import Path

    from cohortcast.config.presets import sd15_forecaster

    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)
    nlst = load_config(root / "namd_nlst.yaml").model
    preset = sd15_forecaster()
    assert nlst.denoiser.block_out_channels == preset.denoiser.block_out_channels
    assert nlst.vae.block_out_channels == preset.vae.block_out_channels


def test_training_section_rejects_bad_stages_and_weights():
    with pytest.raises(ConfigError, match="training.stages: unknown stage"):
        load_config(overrides=["training.stages=[vae,ldm_conditional]"])
    with pytest.raises(ConfigError, match="training.task_weight"):
        load_config(overrides=["training.task_weight=-1"])
    with pytest.raises(ConfigError, match="training.task_loss"):
        load_config(overrides=["training.task_loss=mse"])


def test_relative_paths_resolve_against_workdir(tmp_path):
    from cohortcast.config.paths import resolve_paths

    cfg = resolve_paths(load_config(overrides=[f"workdir={tmp_path}", "model.conditioner.llm_path=models/llm",
                                               "training.scaling.storage_path=/abs/ray", "ingest.output=s3://b/x"]))
    assert cfg.ingest.manifest == str(tmp_path / "runs/demo/cohort")
    assert cfg.model.conditioner.llm_path == str(tmp_path / "models/llm")
    assert cfg.training.scaling.storage_path == "/abs/ray" and cfg.ingest.output == "s3://b/x"
    assert cfg.model.denoiser.pretrained_path is None  # unset stays unset


def test_partial_section_keeps_the_fields_own_defaults():
    """A section given in part starts from the field's default (a factory with its own
    values), not from the bare dataclass defaults."""
    from cohortcast.config.evaluation import EvaluationConfig

    factory = EvaluationConfig().evaluator.train
    cfg = load_config(None, ["evaluation.evaluator.train.max_steps=90"])
    assert cfg.evaluation.evaluator.train.max_steps == 90
    assert cfg.evaluation.evaluator.train.lr == factory.lr != 1e-4  # 1e-4: StageConfig's class default
    with pytest.raises(ConfigError, match="evaluation.evaluator.train.warmup_steps"):
        load_config(None, ["evaluation.evaluator.train.max_steps=3"])  # factory warmup 10 >= 3


def test_a_mapping_value_replaces_its_default_whole():
    """A Tune grid given in a config is the grid: not merged with the default grid's keys."""
    cfg = load_config(None, ["tune.grid={training.task_weight: [0.1, 1.0]}"])
    assert cfg.tune.grid == {"training.task_weight": [0.1, 1.0]}
    assert load_config(None, ["tune.metric=val/loss_total"]).tune.grid == load_config().tune.grid
    with pytest.raises(ConfigError, match="tune.grid"):
        load_config(None, ["tune.grid={training.task_weight: []}"])
