"""The structured EHR token (ConditionerConfig.kind "structured"): the record as
numbers and one-hots through a small learned projection."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import forecaster_config

from cohortcast.config.models import ConditionerConfig
from cohortcast.data.manifest import EHR_FEATURES
from cohortcast.models.ehr_structured import EHR_VECTOR_SIZE, StructuredEHREncoder, ehr_vector
from cohortcast.models.forecaster import Forecaster
from cohortcast.training.ldm_conditional_stage import ConditionalObjective
from cohortcast.training.trajectories import make_trajectory, sample_targets

RECORD = {
    "SCT_PRE_ATT": "Part Solid",
    "SCT_EPI_LOC": "Lingula",
    "SCT_LONG_DIA": 12.0,
    "SCT_PERP_DIA": 9.0,
    "SCT_MARGINS": "Spiculated",
    "age": 64.0,
    "diagemph": "Yes",
    "gender": "Female",
    "famfather": "Yes",
    "fammother": "No",
    "fambrother": "No",
    "famsister": None,
    "famchild": "No",
}


def test_ehr_vector_tells_missing_from_zero_and_no():
    """Guards ehr_vector's missing indicators: a missing value (None, NaN, blank, absent)
    is never encoded like a real 0, "No" or a category."""
    assert len(ehr_vector(RECORD)) == len(ehr_vector({})) == EHR_VECTOR_SIZE
    missing = ehr_vector({})
    assert ehr_vector({"age": None}) == ehr_vector({"age": float("nan")}) == ehr_vector({"age": " "}) == missing
    assert ehr_vector({"age": 0.0}) != missing
    assert ehr_vector({"famfather": "No"}) != missing and ehr_vector({"famfather": "Yes"}) != ehr_vector(
        {"famfather": "No"}
    )
    assert ehr_vector({"SCT_MARGINS": "Smooth"}) != missing
    assert ehr_vector({"SCT_MARGINS": "Smooth"}) != ehr_vector({"SCT_MARGINS": "Spiculated"})
    assert ehr_vector({"SCT_LONG_DIA": 0.0}) != ehr_vector({"SCT_LONG_DIA": None})
    assert ehr_vector(dict(reversed(list(RECORD.items())))) == ehr_vector(RECORD)  # order-free
    assert all(math.isfinite(v) for v in ehr_vector(RECORD))
    # Unknown categories count as missing, not as the first choice.
    assert ehr_vector({"gender": "X"}) == missing


def test_encoder_maps_records_to_its_width():
    torch.manual_seed(0)
    encoder = StructuredEHREncoder(ConditionerConfig(kind="structured", structured_hidden=24))
    out = encoder.encode_records([RECORD, {}])
    assert out.shape == (2, 24) and out.dtype == torch.float32 and not torch.allclose(out[0], out[1])


def _examples(records):
    """Two trajectories of 2 exams each (synthetic latents), with their own EHR records."""
    rows = []
    for i, record in enumerate(records):
        group = {
            "patient": np.array([f"sub-{i}"] * 2, object),
            "nodule_id": np.array(["n1"] * 2, object),
            "days_since_baseline": np.array([0.0, 365.0]),
            "malignant": np.array([i % 2] * 2),
            "latent": np.random.default_rng(i).normal(size=(2, 4, 8, 8)).astype(np.float32),
            "crop": np.zeros((2, 32, 32), np.float32),
        }
        for name in EHR_FEATURES:
            group[name] = np.array([record.get(name)] * 2, object)
        rows.append(make_trajectory(group, 2))
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return sample_targets(batch, np.random.default_rng(0))


def test_structured_forecaster_trains_uses_and_saves_its_encoder(tmp_path):
    """Guards the structured EHR path end to end: the stage-d objective's gradient
    reaches conditioner.mlp (it is trained), the forecast depends on the record, and
    save/load keeps the encoder (same forecast, identity recorded in forecaster.json)."""
    torch.manual_seed(0)
    f = Forecaster(forecaster_config(conditioner=ConditionerConfig(kind="structured", structured_hidden=32)))
    assert isinstance(f.conditioner, StructuredEHREncoder)
    f.vae.requires_grad_(False)
    f.cfg.denoiser.condition_dropout = 0.0
    batch = _examples([RECORD, {**RECORD, "SCT_MARGINS": "Smooth", "age": None}])
    assert batch["ehr"][0]["SCT_MARGINS"] == "Spiculated" and batch["ehr"][1]["age"] is None
    terms = ConditionalObjective(f, "none")(batch)
    terms["total"].backward()
    for name in ("conditioner.mlp.0.weight", "conditioner.mlp.2.weight", "denoiser.ehr_proj.weight"):
        grad = dict(f.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    f.eval()
    images, horizon = torch.rand(1, 1, 32, 32) * 2 - 1, torch.tensor([365.0])
    common = dict(num_samples=2, seed=3, steps=2)
    spiculated = f.forecast(images, horizon, ["c"], ehr=[RECORD], **common)
    smooth = f.forecast(images, horizon, ["c"], ehr=[{**RECORD, "SCT_MARGINS": "Smooth"}], **common)
    assert not torch.allclose(spiculated.latents, smooth.latents)
    with pytest.raises(ValueError, match="1 EHR records for 2 cases"):
        f.forecast(images.repeat(2, 1, 1, 1), horizon.repeat(2), ["a", "b"], ehr=[RECORD], **common)

    f.save(tmp_path / "fc")
    meta = json.loads((tmp_path / "fc" / "forecaster.json").read_text())
    assert meta["llm"] == {"model_type": "structured", "hidden_size": 32, "features": EHR_VECTOR_SIZE}
    assert meta["config"]["conditioner"]["kind"] == "structured"
    loaded = Forecaster.load(tmp_path / "fc")
    assert isinstance(loaded.conditioner, StructuredEHREncoder)
    again = loaded.forecast(images, horizon, ["c"], ehr=[RECORD], **common)
    assert torch.equal(again.samples, spiculated.samples)
