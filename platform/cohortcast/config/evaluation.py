"""Evaluation configs: the ViT malignancy evaluator and the NAMD Table-1 job."""

from __future__ import annotations

from dataclasses import dataclass, field

from cohortcast.config.loader import require as _require
from cohortcast.config.training import StageConfig


@dataclass
class EvaluatorConfig:
    """Downstream malignancy classifier (NAMD Sec. 4.1.2): a transformers
    `ViTForImageClassification` trained with Ray Train on real follow-up crops of the
    train split. `pretrained_path` starts from a local ViT folder (e.g. a ViT-B/16
    checkpoint) instead of random weights; the sizes below then come from its config."""

    pretrained_path: str | None = None
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    patch_size: int = 4
    dropout: float = 0.0
    validate_every_epochs: int = 4  # validation AUROC on the val split's follow-ups
    train: StageConfig = field(
        default_factory=lambda: StageConfig(
            max_steps=150, micro_batch_size=16, lr=1e-3, warmup_steps=10, checkpoint_every=75, log_every=25
        )
    )

    def validate(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be a multiple of num_heads")
        _require(self.patch_size >= 1 and self.num_layers >= 1, "patch_size", "patch_size and num_layers must be >= 1")


@dataclass
class AblationConfig:
    """NAMD without the alignment and probe losses (Table 1's ablation): the same job
    with `model.vae.loss.alignment = probe = 0` and no task loss (lambda = 0, since the
    probe it would use is untrained), written to `training_output`; forecast into
    `forecasts`. `train_if_missing` runs that training from the evaluation job."""

    enabled: bool = True
    train_if_missing: bool = True
    training_output: str = "runs/demo/train_ablation"
    forecasts: str = "runs/demo/forecasts_ablation"


@dataclass
class RegressorEvalConfig:
    """The no-diffusion baseline (Table 1 row): the NAMD job's `regressor` stage (the
    same networks and context trained to predict the follow-up latent in one pass, from
    the same stage-c weights), trained by the evaluation job when missing, forecast into
    `forecasts`."""

    enabled: bool = True
    forecasts: str = "runs/demo/forecasts_regressor"


@dataclass
class EvaluationConfig:
    """jobs/evaluate_namd.py: Table 1 of NAMD on `forecast.split` (forecasts from the
    `forecast` section), prediction variance (Sec. 4.3, App. D) and a Markdown report.

    FID needs `inception_torchscript`: the standard FID Inception-v3 as TorchScript
    (`inception-2015-12-05.pt`, as StyleGAN2-ADA / clean-fid use it), from a local path.
    Without it the Frechet distance is computed in the evaluator ViT's [CLS] features and
    labelled so. LPIPS needs `lpips_vgg_path` (torchvision vgg16 state dict) and
    `lpips_path` (lpips `vgg.pth` heads); without them LPIPS is reported as n/a."""

    evaluator_output: str = "runs/demo/train/evaluator"
    report: str = "runs/demo/evaluation"
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    regressor: RegressorEvalConfig = field(default_factory=RegressorEvalConfig)
    # Patient-level bootstrap resamples for the AUROC confidence intervals and the paired
    # differences (NAMD - real baseline, NAMD - ablation, NAMD - regressor).
    bootstrap: int = 1000
    # The nodule region for the region MAE: a disc around the crop centre whose radius is
    # half the follow-up's long diameter plus this margin.
    region_margin_mm: float = 2.0
    inception_torchscript: str | None = None
    lpips_vgg_path: str | None = None
    lpips_path: str | None = None
    variance_cases: int = 50  # cases drawn for the running-variance figure (App. D uses 50)
    figure_cases: int = 6  # cases shown with their pixel-variance maps
    batch_size: int = 64  # evaluator forward batch

    def validate(self) -> None:
        _require(
            (self.lpips_vgg_path is None) == (self.lpips_path is None),
            "lpips_path",
            "set both lpips_vgg_path and lpips_path, or neither",
        )
        _require(self.variance_cases >= 1 and self.figure_cases >= 1, "variance_cases", "must be >= 1")
        _require(self.bootstrap >= 100, "bootstrap", "must be >= 100 resamples")
        _require(self.region_margin_mm >= 0, "region_margin_mm", "must be >= 0")
