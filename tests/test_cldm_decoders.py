"""CLDM task decoders: study tokens -> ILD mask (segmentation), -> report (causal LM)."""

import pytest
import torch
from test_cldm_models import tiny_config

from cohortcast.config.cldm_models import CLDMModelsConfig, ReportDecoderConfig, cldm_models_flavor, upsample_strides
from cohortcast.errors import MissingInputError
from cohortcast.models.errors import ForecasterLoadError
from cohortcast.models.report_decoder import IGNORE, PrefixPooler, ReportDecoder
from cohortcast.models.segmentation_decoder import SegmentationDecoder
from cohortcast.models.tiny_llm import report_tokenizer, write_tiny_gpt2

REPORTS = [
    "FINDINGS: Comparison is made with the prior radiograph. The heart is mildly enlarged. "
    "Small left pleural effusion, new.\nIMPRESSION: Mild cardiomegaly. New small left pleural effusion.",
    "FINDINGS: The heart size is normal. No pleural effusion. No focal consolidation.\n"
    "IMPRESSION: No acute cardiopulmonary process.",
]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_upsampling_stages_multiply_to_the_patch():
    assert upsample_strides((4, 8, 8)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert upsample_strides((8, 16, 16)) == [(2, 2, 2)] * 3 + [(1, 2, 2)]
    assert upsample_strides((3, 4)) == [(3, 2), (1, 2)]


def test_segmentation_decoder_maps_debug_ct_tokens_to_the_volume_grid():
    cfg = CLDMModelsConfig()  # 512 tokens of (4, 8, 8) patches: a (32, 64, 64) volume
    dec = SegmentationDecoder(cfg)
    assert dec(torch.randn(1, 513, 64)).shape == (1, 1, 32, 64, 64)
    with pytest.raises(ValueError, match=r"must be \(B, 1 \+ 512, dim\)"):
        dec(torch.randn(1, 65, 64))


def test_segmentation_decoder_overfits_one_mask(tmp_path):
    cfg = tiny_config()  # tokens on a 2 x 4 x 4 grid of 4 x 8 x 8 patches: an 8 x 32 x 32 volume
    torch.manual_seed(0)
    dec = SegmentationDecoder(cfg)
    tokens = torch.randn(1, 33, 16)
    zz, yy, xx = torch.meshgrid(torch.arange(8), torch.arange(32), torch.arange(32), indexing="ij")
    mask = (((yy - 12) ** 2 + (xx - 19) ** 2 < 40) & (zz > 1) & (zz < 7)).float()[None, None]  # a blob crossing patches
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(60):
        loss = dec.loss(dec(tokens), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    predicted = dec.predict(tokens)
    assert predicted.shape == (1, 8, 32, 32) and predicted.dtype == torch.uint8
    assert dice(predicted[0], mask[0, 0]) > 0.9
    dec.save(tmp_path / "seg")
    back = SegmentationDecoder.load(tmp_path / "seg", expected=tiny_config())
    assert torch.equal(back.predict(tokens), predicted)
    other = tiny_config()
    other.segmentation.channels = (16, 16, 8)
    with pytest.raises(ForecasterLoadError, match="segmentation.channels"):
        SegmentationDecoder.load(tmp_path / "seg", expected=other)


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    return write_tiny_gpt2(tmp_path_factory.mktemp("lm") / "gpt2", REPORTS, hidden_size=32, layers=2)


def test_the_report_tokenizer_round_trips_reports_exactly():
    tok = report_tokenizer(REPORTS)
    for text in REPORTS:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_report_loss_ignores_the_prefix_and_bos(gpt2_path):
    cfg = tiny_config(report=ReportDecoderConfig(lm_path=str(gpt2_path), num_prefix=3))
    dec = ReportDecoder(cfg)
    ids, mask = dec.encode_reports(REPORTS)
    assert ids[0, 0] == dec.bos_id and ids[1, int(mask[1].sum()) - 1] == dec.eos_id
    # The loss is the LM's mean CE over report tokens only: recompute it by hand.
    tokens = torch.randn(2, 17, 16)
    prefix = dec.prefix(tokens)
    logits = dec.lm(inputs_embeds=torch.cat([prefix, dec._embed(ids)], 1)).logits[:, 3:-1]  # predict ids[:, 1:]
    labels = torch.where(mask.bool(), ids, IGNORE)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(dec.loss(tokens, REPORTS), expected, rtol=1e-4, atol=1e-5)


def test_report_decoder_learns_two_reports_from_their_tokens(gpt2_path, tmp_path):
    """Each study's tokens must bring back its own report: the prefix carries the study."""
    cfg = tiny_config(report=ReportDecoderConfig(lm_path=str(gpt2_path), num_prefix=2, max_new_tokens=60))
    torch.manual_seed(0)
    dec = ReportDecoder(cfg)
    tokens = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(120):
        loss = dec.loss(tokens, REPORTS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    assert dec.generate(tokens) == REPORTS
    assert dec.generate(tokens[1:]) == REPORTS[1:]  # alone as in the batch
    assert dec.generate(tokens, num_beams=2) == REPORTS
    dec.save(tmp_path / "report")
    back = ReportDecoder.load(tmp_path / "report", expected=cfg)
    assert back.generate(tokens) == REPORTS
    wider = tiny_config(report=ReportDecoderConfig(num_prefix=5))
    with pytest.raises(ForecasterLoadError, match="report.num_prefix: saved 2, expected 5"):
        ReportDecoder.load(tmp_path / "report", expected=wider)


def test_report_decoder_needs_a_local_lm(tmp_path):
    with pytest.raises(MissingInputError, match="cldm.report.lm_path is not set"):
        ReportDecoder(tiny_config())
    with pytest.raises(MissingInputError, match="not a model folder"):
        ReportDecoder(tiny_config(report=ReportDecoderConfig(lm_path=str(tmp_path))))


def test_paper_size_decoders_parameter_counts():
    cfg = cldm_models_flavor("paper")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        seg = SegmentationDecoder(cfg)
        pooler = PrefixPooler(768, 1024, cfg.report.num_prefix, cfg.report.pool_heads)  # into BioGPT's 1024 width
    assert 3e6 < count(seg) < 8e6, count(seg)
    assert 2e6 < count(pooler) < 5e6, count(pooler)
