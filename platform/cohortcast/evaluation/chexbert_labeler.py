"""A CheXbert labeler (Smit et al. 2020) from local weights: the learned labeler that real
MIMIC-CXR report metrics use, as a drop-in `ReportLabeler` next to the RuleLabeler.

The model is CheXbert's `bert_labeler`: a transformers BertModel, dropout, and one linear
head per CheXpert observation on the [CLS] hidden state, 4 classes for the first 13
(0 blank, 1 positive, 2 negative, 3 uncertain) and 2 for "No Finding" (blank, positive;
a 4-class No Finding head is accepted too). The published `chexbert.pth` is a dict with
`model_state_dict`, keys prefixed `module.` (saved from nn.DataParallel); a bare state
dict, with or without the prefix, loads the same. The BERT configuration and tokenizer
come from a local Hugging Face folder (bert-base-uncased for the published weights).
Nothing is downloaded: a missing file or a checkpoint whose tensors do not fit that
configuration is refused with a CohortcastError naming the mismatch.

Labels: blank -> not mentioned. CheXbert states no change against a prior exam, so the
change slots come from the RuleLabeler's change cues (`rule_changes`, on by default; off
leaves them empty and change-label F1 then has nothing to score). The
report is labelled whole (findings and impression), truncated to 512 tokens as CheXbert.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from cohortcast.errors import MissingInputError
from cohortcast.evaluation.report_labeler import (
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
    ReportLabelError,
    ReportLabels,
    RuleLabeler,
    binary_labels,
)

# CheXbert's head order (its constants.CONDITIONS).
CHEXPERT_14 = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
CLASSES = (NOT_MENTIONED, POSITIVE, NEGATIVE, UNCERTAIN)  # head output index -> status
MAX_TOKENS = 512


class CheXbertCheckpointError(ReportLabelError):
    """A CheXbert checkpoint that does not fit the BERT configuration it is loaded into."""


class CheXbertModel(nn.Module):
    """BertModel + one linear head per observation on [CLS] (CheXbert's bert_labeler)."""

    def __init__(self, config, head_classes: Sequence[int]):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(0.1)
        self.linear_heads = nn.ModuleList(nn.Linear(config.hidden_size, n) for n in head_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        cls = self.dropout(cls)
        return [head(cls) for head in self.linear_heads]


def _state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a checkpoint is data, never code to run.
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unsupported-type errors all mean "not a CheXbert checkpoint"
        raise CheXbertCheckpointError(f"{checkpoint.name}: not a readable torch checkpoint ({exc})") from exc
    state = loaded.get("model_state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheXbertCheckpointError(f"{checkpoint.name}: expected a state dict (or {{'model_state_dict': ...}})")
    # DataParallel's prefix; position_ids was a saved buffer in older transformers only.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}


def _head_classes(state: dict[str, torch.Tensor], checkpoint: Path) -> list[int]:
    sizes = []
    for i, name in enumerate(CHEXPERT_14):
        weight = state.get(f"linear_heads.{i}.weight")
        if weight is None:
            raise CheXbertCheckpointError(f"{checkpoint.name}: no head {i} ({name}); CheXbert has 14 linear_heads")
        allowed = (2, 4) if name == "No Finding" else (4,)
        if weight.shape[0] not in allowed:
            raise CheXbertCheckpointError(
                f"{checkpoint.name}: head {i} ({name}) has {weight.shape[0]} classes; expected {allowed}"
            )
        sizes.append(int(weight.shape[0]))
    if "linear_heads.14.weight" in state:
        raise CheXbertCheckpointError(f"{checkpoint.name}: more than 14 linear_heads")
    return sizes


class CheXbertLabeler:
    """CheXbert labels from `checkpoint` (chexbert.pth) and `bert_dir` (the BERT config and
    tokenizer); `uncertain` maps uncertain labels in `binary` as RuleLabeler's does. A
    structural `ReportLabeler` (labels, label), plus label_many to label in batches."""

    labels = CHEXPERT_14

    def __init__(
        self,
        checkpoint: str | Path,
        bert_dir: str | Path,
        uncertain: str = "ones",
        rule_changes: bool = True,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ):
        from transformers import AutoTokenizer, BertConfig

        checkpoint, bert_dir = Path(checkpoint), Path(bert_dir)
        if not checkpoint.is_file():
            raise MissingInputError(f"CheXbert checkpoint not found: {checkpoint}")
        if not (bert_dir / "config.json").is_file():
            raise MissingInputError(f"CheXbert BERT folder has no config.json: {bert_dir}")
        binary_labels(ReportLabels({}), (), uncertain)  # validates the policy
        self.uncertain, self.batch_size, self.device = uncertain, batch_size, torch.device(device)
        self.rules = RuleLabeler() if rule_changes else None
        config = BertConfig.from_pretrained(bert_dir, local_files_only=True)
        state = _state_dict(checkpoint)
        self.model = CheXbertModel(config, _head_classes(state, checkpoint))
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing/unexpected keys or shapes that differ from config.json
            raise CheXbertCheckpointError(
                f"{checkpoint.name} does not fit the BERT configuration in {bert_dir.name}: {str(exc)[:600]}"
            ) from exc
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(bert_dir, local_files_only=True)
        self.max_tokens = min(MAX_TOKENS, config.max_position_embeddings)

    def label(self, report: str) -> ReportLabels:
        return self.label_many([report])[0]

    @torch.inference_mode()
    def label_many(self, reports: Iterable[str]) -> list[ReportLabels]:
        reports = list(reports)
        out: list[ReportLabels] = []
        for start in range(0, len(reports), self.batch_size):
            batch = reports[start : start + self.batch_size]
            enc = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            ).to(self.device)
            heads = self.model(enc["input_ids"], enc["attention_mask"])
            classes = torch.stack([h.argmax(dim=1) for h in heads], dim=1).cpu()  # (batch, 14)
            for text, row in zip(batch, classes.tolist()):
                status = {name: CLASSES[c] for name, c in zip(CHEXPERT_14, row)}
                change = self.rules.label(text).change if self.rules else {}
                out.append(ReportLabels(status, {name: change.get(name) for name in CHEXPERT_14}))
        return out

    def binary(self, labels: ReportLabels, names: Sequence[str] | None = None) -> dict[str, int | None]:
        return binary_labels(labels, names or self.labels, self.uncertain)
