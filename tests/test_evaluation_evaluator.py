"""The ViT malignancy evaluator: the transformers architecture, save/load, local
pretrained weights, and which crops it trains on."""

import numpy as np
import pytest
import torch

from cohortcast.config.evaluation import EvaluatorConfig
from cohortcast.evaluation.evaluator_stage import dihedral, followup_labels, select_followups
from cohortcast.models.evaluator import MalignancyEvaluator


def test_build_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MalignancyEvaluator.build(EvaluatorConfig(), image_size=32).eval()
    assert type(model.vit).__name__ == "ViTForImageClassification" and model.vit.config.num_labels == 1
    images = torch.randn(3, 1, 32, 32)
    logits, features = model(images), model.features(images)
    assert logits.shape == (3,) and features.shape == (3, EvaluatorConfig().hidden_size)
    # The head reads exactly the [CLS] features the Frechet distance uses.
    assert torch.allclose(model.vit.classifier(features)[:, 0], logits, atol=1e-6)
    model.save(tmp_path / "evaluator")
    loaded = MalignancyEvaluator.load(tmp_path / "evaluator")
    assert torch.allclose(loaded(images), logits, atol=1e-6)


def test_pretrained_three_channel_vit_from_a_local_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=5,
        )
    ).save_pretrained(tmp_path / "vit")
    model = MalignancyEvaluator.build(EvaluatorConfig(pretrained_path=str(tmp_path / "vit")), image_size=32)
    assert model.vit.config.num_labels == 1 and model.vit.config.hidden_size == 24  # sizes from the folder
    assert model(torch.randn(2, 1, 32, 32)).shape == (2,)  # grey 32 px crops into a 3-channel 16 px trunk
    with pytest.raises(FileNotFoundError, match="evaluation.evaluator.pretrained_path"):
        MalignancyEvaluator.build(EvaluatorConfig(pretrained_path=str(tmp_path / "nothing")), image_size=32)


def test_followup_labels_keep_exams_after_the_first_with_known_labels(tmp_path):
    import pandas as pd

    rows = pd.DataFrame(
        {
            "patient": ["a", "a", "a", "b", "b", "c", "c"],
            "nodule_id": ["n1", "n1", "n2", "n1", "n1", "n1", "n1"],
            "days_since_baseline": [0.0, 400.0, 400.0, 30.0, 800.0, 0.0, 365.0],
            "malignant": [1, 1, 0, 0, 0, -1, -1],
        }
    )
    rows.to_parquet(tmp_path / "part.parquet")
    labels = followup_labels(tmp_path)
    # a/n2 is seen once (its first exam is day 400); b/n1 starts at day 30; c is unlabelled.
    assert labels == {"a/n1/400.0": 1.0, "b/n1/800.0": 0.0}
    batch = {
        **{k: rows[k].to_numpy() for k in ("patient", "nodule_id", "days_since_baseline")},
        "crop": np.arange(7 * 4, dtype=np.float32).reshape(7, 2, 2),
    }
    out = select_followups(batch, labels, augment=False)
    assert out["image"].shape == (2, 1, 2, 2) and out["label"].tolist() == [1.0, 0.0]
    assert np.array_equal(out["image"][:, 0], batch["crop"][[1, 4]])
    augmented = select_followups(batch, labels, augment=True)
    assert augmented["image"].shape == (16, 1, 2, 2) and augmented["label"].sum() == 8


def test_dihedral_gives_the_eight_orientations():
    image = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    out = dihedral(image)
    assert out.shape == (8, 1, 3, 3)
    assert len({x.tobytes() for x in out}) == 8  # all distinct for an asymmetric image
    assert np.array_equal(out[0], image[0]) and np.array_equal(out[1, 0], np.rot90(image[0, 0]))


def test_a_one_class_split_is_a_clear_error(tmp_path):
    """score() refuses a split where AUROC is undefined, naming the split and the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cohortcast.config import load_config
    from cohortcast.evaluation.namd_evaluation import EvaluationError, score
    from cohortcast.inference.cohort_forecast import CASE_FILE, tensor_column

    MalignancyEvaluator.build(EvaluatorConfig(), image_size=8).save(tmp_path / "evaluator")
    for i in range(3):
        crop = np.zeros((1, 8, 8), np.float32)
        latent = np.zeros((1, 4, 2, 2), np.float32)  # case format 2: latents, VAE floor, follow-up size
        table = pa.table(
            {
                "case_id": [f"sub-{i}/n1"],
                "patient": [f"sub-{i}"],
                "malignant": [0],
                "target_diameter_mm": [6.0],
                **{k: tensor_column(crop) for k in ("baseline", "target", "mean", "variance", "target_reconstruction")},
                **{k: tensor_column(latent) for k in ("mean_latent", "baseline_latent", "target_latent")},
                "samples": tensor_column(np.zeros((1, 2, 8, 8), np.float32)),
            }
        )
        (tmp_path / "forecasts" / "cases" / f"k{i}").mkdir(parents=True)
        pq.write_table(table, tmp_path / "forecasts" / "cases" / f"k{i}" / CASE_FILE)
    cfg = load_config(
        None,
        [
            "evaluation.ablation.enabled=false",
            "evaluation.regressor.enabled=false",
            f"forecast.output={tmp_path / 'forecasts'}",
        ],
    )
    with pytest.raises(EvaluationError, match=r"'test' split has 3 labelled case\(s\), all of class \[0\]"):
        score(cfg, tmp_path / "evaluator")
