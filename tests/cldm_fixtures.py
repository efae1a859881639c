"""A tiny random CLDM training output (encoder/, diffusion/, segmentation/, report/,
regressor/) for bundle, serving and benchmark tests: 16-wide tokens, CT volumes of
8 x 32 x 32 (2 x 4 x 4 tokens), radiographs of 32 x 32 (4 x 4 tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_cldm_models import randomise, tiny_config

from cohortcast.config.cldm import EncoderConfig
from cohortcast.config.cldm_models import ReportDecoderConfig
from cohortcast.models.report_decoder import ReportDecoder, load_lm
from cohortcast.models.segmentation_decoder import SegmentationDecoder
from cohortcast.models.tiny_llm import write_tiny_gpt2

VOLUME = (8, 32, 32)
IMAGE = (32, 32)
REPORTS = [
    "FINDINGS: Reticular opacities at both bases, increased. IMPRESSION: Progressive fibrosis.",
    "FINDINGS: No focal consolidation. IMPRESSION: No acute cardiopulmonary process.",
]


def tiny_encoder_config(**kw) -> EncoderConfig:
    cfg = EncoderConfig(
        dim=16, depth=1, heads=4, image_2d=IMAGE, volume_3d=VOLUME, decoder_dim=16, decoder_heads=4, **kw
    )
    cfg.validate()
    return cfg


def write_tiny_bundle(folder: Path, parts=("segmentation", "report", "regressor"), seed: int = 0, **encoder_kw) -> Path:
    """Random weights (perturbed so conditioning and batching show in the outputs)."""
    from cohortcast.models.cldm_forecaster import CLDMForecaster
    from cohortcast.models.study_regressor import StudyRegressor
    from cohortcast.models.universal_encoder import UniversalEncoder

    torch.manual_seed(seed)
    folder = Path(folder)
    cfg = tiny_config(report=ReportDecoderConfig(max_length=32, max_new_tokens=12))
    UniversalEncoder(tiny_encoder_config(**encoder_kw)).save(folder / "encoder")
    randomise(CLDMForecaster(cfg), seed).save(folder / "diffusion")
    if "segmentation" in parts:
        randomise(SegmentationDecoder(cfg, dims=3), seed + 1, std=0.2).save(folder / "segmentation")
    if "report" in parts:
        lm_folder = write_tiny_gpt2(folder.parent / f"{folder.name}-lm", REPORTS, hidden_size=32, layers=1)
        lm, tok = load_lm(lm_folder)
        randomise(ReportDecoder(cfg, lm=lm, tokenizer=tok).pooler, seed + 2)
        decoder = ReportDecoder(cfg, lm=lm, tokenizer=tok)
        decoder.save(folder / "report")
    if "regressor" in parts:
        randomise(StudyRegressor(cfg), seed + 3).save(folder / "regressor")
    return folder


def random_priors(kind: str, cases: int, k: int, seed: int = 0) -> list[list[tuple[np.ndarray, float]]]:
    rng = np.random.default_rng(seed)
    shape = VOLUME if kind == "ct" else IMAGE
    out = []
    for _ in range(cases):
        days = sorted(rng.uniform(30, 1500, size=k), reverse=True)
        out.append([(rng.uniform(-1, 1, size=shape).astype(np.float32), float(d)) for d in days])
    return out
