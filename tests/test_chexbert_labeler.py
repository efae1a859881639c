"""CheXbertLabeler (evaluation.chexbert_labeler) on a tiny randomly initialised BERT with an
offline word-level tokenizer written here: it loads a CheXbert-layout checkpoint, runs,
and maps head outputs to ReportLabels; wrong checkpoints are refused clearly. (Whether
real CheXbert weights label well is CheXbert's business, not checked here.)"""

from __future__ import annotations

import re

import pytest
import torch

from cohortcast.errors import CohortcastError, MissingInputError
from cohortcast.evaluation.chexbert_labeler import (
    CHEXPERT_14,
    CLASSES,
    CheXbertCheckpointError,
    CheXbertLabeler,
    CheXbertModel,
)
from cohortcast.evaluation.report_metrics import label_f1

REPORTS = [
    "FINDINGS: New small left pleural effusion. Heart size is normal.\nIMPRESSION: New effusion.",
    "No pleural effusion or pneumothorax.",
]


def _write_bert(folder, hidden: int = 16) -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for text in REPORTS:
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    config.save_pretrained(folder)
    return config


def _checkpoint(path, config, heads=None, prefix="module."):
    """CheXbert's layout: {'model_state_dict': ...} saved from DataParallel. Heads zeroed
    with a one-hot bias, so head i's class is known: i % 4 (No Finding: positive)."""
    torch.manual_seed(0)
    model = CheXbertModel(config, heads or [4] * 13 + [2])
    with torch.no_grad():
        for i, head in enumerate(model.linear_heads):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[1 if i == 13 else i % 4] = 1.0
    torch.save({"model_state_dict": {prefix + k: v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    return path


def test_loads_runs_and_maps_heads_to_report_labels(tmp_path):
    config = _write_bert(tmp_path / "bert")
    labeler = CheXbertLabeler(_checkpoint(tmp_path / "chexbert.pth", config), tmp_path / "bert", batch_size=1)
    out = labeler.label_many(REPORTS)
    assert len(out) == 2
    for labels in out:
        assert tuple(labels.status) == CHEXPERT_14 == labeler.labels
        assert [labels.status[n] for n in CHEXPERT_14[:13]] == [CLASSES[i % 4] for i in range(13)]
        assert labels.status["No Finding"] == "positive"
    assert out[0].change["Pleural Effusion"] == "worse"  # change cues from the rule labeler
    assert out[1].change["Pleural Effusion"] is None
    assert labeler.binary(out[0])["Atelectasis"] == 1  # head 7 -> class 3 uncertain -> U-Ones
    assert label_f1(out, out).micro == 1.0  # usable by the metrics as any ReportLabeler
    # a bare state dict without DataParallel's prefix loads the same
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(tmp_path / "chexbert.pth", weights_only=True)["model_state_dict"], bare)
    assert CheXbertLabeler(bare, tmp_path / "bert").label(REPORTS[0]) == out[0]


def test_refuses_missing_and_mismatched_checkpoints(tmp_path):
    config = _write_bert(tmp_path / "bert")
    with pytest.raises(MissingInputError, match="CheXbert checkpoint not found"):
        CheXbertLabeler(tmp_path / "nope.pth", tmp_path / "bert")
    good = _checkpoint(tmp_path / "ok.pth", config)
    with pytest.raises(MissingInputError, match="no config.json"):
        CheXbertLabeler(good, tmp_path)
    wider = _write_bert(tmp_path / "wide", hidden=32)
    with pytest.raises(CheXbertCheckpointError, match="does not fit the BERT configuration"):
        CheXbertLabeler(_checkpoint(tmp_path / "wide.pth", wider), tmp_path / "bert")
    with pytest.raises(CheXbertCheckpointError, match=r"head 2 \(Lung Opacity\) has 3 classes"):
        CheXbertLabeler(_checkpoint(tmp_path / "h.pth", config, heads=[4, 4, 3] + [4] * 10 + [2]), tmp_path / "bert")
    with pytest.raises(CheXbertCheckpointError, match=r"no head 13 \(No Finding\)"):
        CheXbertLabeler(_checkpoint(tmp_path / "13.pth", config, heads=[4] * 13), tmp_path / "bert")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheXbertCheckpointError, match="not a readable torch checkpoint") as err:
        CheXbertLabeler(tmp_path / "junk.pth", tmp_path / "bert")
    assert isinstance(err.value, CohortcastError)
