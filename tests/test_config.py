import json
from pathlib import Path

import pytest

from cohortcast.config import ConfigError, IngestConfig, dump_yaml, flatten, load_config, to_dict


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


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("ingest.crop_sise=64", "ingest.crop_sise: unknown field (did you mean 'crop_size'?)"),
        ("ingest.crop_size=big", "ingest.crop_size: expected an integer, got 'big'"),
        ("ingest.normalise=zscore", "ingest.normalise: 'zscore' is not one of"),
        ("ingest.hu_window=[400, -1000]", "ingest.hu_window: low must be below high"),
        ("ingest.split.train=0.9", "ingest.split.train: train + val + test must be 1"),
        ("synth.min_exams=1", "synth.min_exams"),
        ("ingest.volume_shape=[16, 32]", "ingest.volume_shape: expected 3 items"),
        ("nonsense", "expected KEY=VALUE"),
    ],
)
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


JOB_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_shipped_configs_resolve_to_their_pinned_values():
    """Every jobs/configs/*.yaml resolves (defaults, flavour, file) to exactly the values
    pinned in tests/data/resolved_job_configs.json, taken before model flavours existed:
    naming `flavor: sd15` instead of the numbers changed no model. A config change that
    is meant to change a shipped config's values updates that file with it."""
    pinned = json.loads((Path(__file__).parent / "data" / "resolved_job_configs.json").read_text())
    resolved = {p.name: load_config(p) for p in JOB_CONFIGS.glob("*.yaml")}  # every shipped config loads
    assert set(pinned) <= set(resolved)
    for name, expected in pinned.items():
        now = json.loads(json.dumps(flatten(resolved[name])))  # tuples as lists, as pinned
        changed = {
            k: (expected.get(k), now.get(k))
            for k in set(expected) | set(now)
            if expected.get(k, "<missing>") != now.get(k, "<missing>")
        }
        assert not changed, f"{name}: (pinned, now) {changed}"


def test_a_flavour_is_the_base_that_explicit_keys_override(tmp_path):
    from cohortcast.config.presets import sd15_forecaster

    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  flavor: sd15\n  vae: {pretrained_path: /w/vae, layers_per_block: 3}\n"
        "  denoiser: {cross_attention_dim: 512}\n"
    )
    cfg = load_config(path, ["model.denoiser.cross_attention_dim=1024"]).model
    assert cfg.vae.block_out_channels == (128, 256, 512, 512)  # flavour over the defaults
    assert cfg.vae.layers_per_block == 3 and cfg.vae.pretrained_path == "/w/vae"  # the file over the flavour
    assert cfg.denoiser.cross_attention_dim == 1024  # --set over the file
    assert cfg.temporal == sd15_forecaster().temporal  # sections the file leaves out: the flavour's
    # --set can name the flavour too, under the file's own keys
    assert load_config(path, ["model.flavor=debug"]).model.vae.layers_per_block == 3
    assert load_config(path, ["model.flavor=debug"]).model.vae.block_out_channels == (16, 32, 32)


def test_a_flavour_resolves_to_values_not_a_name(tmp_path):
    """The loaded config holds the flavour's values: naming it or spelling its numbers out
    is the same config (the same stage keys), and a dumped config reloads unchanged."""
    from cohortcast.config.presets import sd15_forecaster

    named = load_config(None, ["model.flavor=sd15"])
    assert named.model == sd15_forecaster() and "flavor" not in to_dict(named.model)
    assert load_config(None, ["model.flavor=debug"]) == load_config()
    dump_yaml(named, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == named


def test_unknown_flavour_names_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.flavor=sd16"])
    assert "model.flavor: unknown flavour 'sd16' (did you mean 'sd15'?); known flavours: ['debug', 'sd15']" in str(
        err.value
    )
    with pytest.raises(ConfigError, match="model.vae.flavor: unknown field"):
        load_config(None, ["model.vae.flavor=sd15"])  # only the model section has flavours


def test_training_section_rejects_bad_stages_and_weights():
    with pytest.raises(ConfigError, match="training.stages: unknown stage"):
        load_config(overrides=["training.stages=[vae,ldm_conditional]"])
    with pytest.raises(ConfigError, match="training.task_weight"):
        load_config(overrides=["training.task_weight=-1"])
    with pytest.raises(ConfigError, match="training.task_loss"):
        load_config(overrides=["training.task_loss=mse"])


def test_relative_paths_resolve_against_workdir(tmp_path):
    from cohortcast.config.paths import resolve_paths

    cfg = resolve_paths(
        load_config(
            overrides=[
                f"workdir={tmp_path}",
                "model.conditioner.llm_path=models/llm",
                "training.scaling.storage_path=/abs/ray",
                "ingest.output=s3://b/x",
            ]
        )
    )
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
