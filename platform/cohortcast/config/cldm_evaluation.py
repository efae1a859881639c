"""The CLDM evaluation's settings (`cldm.evaluation`, jobs/evaluate_cldm.py): Tables 1-2 of
the CLDM paper on one split, with patient-bootstrap CIs and the paper's claims checked."""

from __future__ import annotations

from dataclasses import dataclass

from cohortcast.config.loader import require as _require

SPLITS = ("train", "val", "test")
LABELERS = ("rule", "chexbert")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


@dataclass
class CLDMEvaluationConfig:
    """Table 1 (CT: the forecast ILD mask) and Table 2 (radiographs: the forecast report).

    Targets: on `split`, every follow-up exam (position >= 1) of the kind, forecast from
    all its priors (the most recent `temporal.max_exams` of them); CT targets need a mask
    on the target and on its last prior (fibrosis patients) and a lung mask (aVD), report
    targets a reference report. `max_targets` (0: all) keeps that many per table, drawn
    with `seed` (patients' targets kept in order). `truncated_priors`: Table 1's CLDM rows
    with the *same* model's context cut to the k most recent priors (not retrained
    models); the ordering claim aVD all <= k... uses targets with >= `ordering_min_priors`
    priors. `num_samples` seeded DDIM samples per target with `inference_steps` steps
    (`seed`: sample k of every target = seed run k). `bootstrap`: patient resamples for
    every CI. `labeler`: "rule" (evaluation/report_labeler.RuleLabeler) or "chexbert"
    (local weights: `chexbert_checkpoint` + `chexbert_bert_dir`), uncertain mentions mapped
    by `uncertain` (ones / zeros / ignore). `batch_size`: targets per forecast call.
    `cache`: folder for per-method results keyed by the model folders' contents and these
    settings, so a rerun only re-scores ("" disables). `report`: the report folder."""

    split: str = "test"
    num_samples: int = 10
    inference_steps: int = 50
    seed: int = 0
    bootstrap: int = 1000
    max_targets: int = 0
    truncated_priors: tuple[int, ...] = (1, 3)
    ordering_min_priors: int = 4
    dice_margin: float = 0.005
    labeler: str = "rule"
    uncertain: str = "ones"
    chexbert_checkpoint: str | None = None
    chexbert_bert_dir: str | None = None
    batch_size: int = 16
    tables: tuple[str, ...] = ("segmentation", "report")
    report: str = "runs/cldm/evaluation"
    cache: str = "runs/cldm/evaluation_cache"

    def validate(self) -> None:
        _require(self.split in SPLITS, "split", f"must be one of {list(SPLITS)}, got {self.split!r}")
        _require(self.num_samples >= 1 and self.inference_steps >= 1, "num_samples", "samples and steps must be >= 1")
        _require(self.bootstrap >= 100, "bootstrap", "must be >= 100 resamples")
        _require(self.max_targets >= 0, "max_targets", "must be >= 0 (0: every target)")
        _require(
            len(self.truncated_priors) >= 1 and all(k >= 1 for k in self.truncated_priors),
            "truncated_priors",
            f"needs prior counts >= 1, got {list(self.truncated_priors)}",
        )
        _require(
            list(self.truncated_priors) == sorted(set(self.truncated_priors)),
            "truncated_priors",
            "must be increasing without repeats",
        )
        _require(
            self.ordering_min_priors > max(self.truncated_priors),
            "ordering_min_priors",
            f"must exceed the largest truncated prior count {max(self.truncated_priors)}, or 'all' is one of them",
        )
        _require(self.dice_margin >= 0, "dice_margin", "must be >= 0")
        _require(self.labeler in LABELERS, "labeler", f"must be one of {list(LABELERS)}")
        _require(self.uncertain in UNCERTAIN_POLICIES, "uncertain", f"must be one of {list(UNCERTAIN_POLICIES)}")
        _require(
            self.labeler != "chexbert" or (self.chexbert_checkpoint and self.chexbert_bert_dir),
            "chexbert_checkpoint",
            "labeler 'chexbert' needs chexbert_checkpoint and chexbert_bert_dir (local files)",
        )
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        unknown = [t for t in self.tables if t not in ("segmentation", "report")]
        _require(
            self.tables and not unknown, "tables", f"choose from ['segmentation', 'report'], got {list(self.tables)}"
        )
