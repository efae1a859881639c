"""CLDM stages `segmentation` and `report`: the batches each worker builds from its shard
of the study latent cache, the validation metrics, the exports, the tiny debug LM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_cldm_models import tiny_config

from cohortcast.config.cldm_stages import DecoderStageConfig
from cohortcast.errors import MissingInputError
from cohortcast.models.mask_metrics import volume_avd
from cohortcast.models.report_decoder import ReportDecoder, load_lm
from cohortcast.models.segmentation_decoder import SegmentationDecoder
from cohortcast.models.tiny_llm import write_tiny_gpt2
from cohortcast.training.cldm_decoder_stages import (
    DecoderDataError,
    ReportObjective,
    export_report,
    export_segmentation,
    fibrotic_fraction,
    previous_exam_rows,
    report_batches,
    report_loss,
    segmentation_batches,
    segmentation_loss,
    validate_report,
    validate_segmentation,
)
from cohortcast.training.study_trajectories import StudyTrajectories

CFG = tiny_config()  # 16-wide tokens; CT 2 x 4 x 4 tokens of 4 x 8 x 8 patches (8 x 32 x 32), CXR 4 x 4
GRID_3D = (8, 32, 32)


def trajectories(exams: list[int], dims: int = 3, seed: int = 0, reports=None) -> StudyTrajectories:
    """Patients p0, p1, ... with `exams[i]` studies each ("p{i}-e{k}", by date). Every
    token of row r is r (so a batch's tokens name their study); CT masks random blobs."""
    rng = np.random.default_rng(seed)
    rows = sum(exams)
    n = math.prod(CFG.latent.grid(dims))
    tokens = np.repeat(np.arange(rows, dtype=np.float32)[:, None, None], 1 + n, axis=1).repeat(CFG.latent.dim, 2)
    studies = [f"p{i}-e{k}" for i, e in enumerate(exams) for k in range(e)]
    masks = (rng.random((rows, *GRID_3D)) < 0.05).astype(np.uint8) if dims == 3 else None
    return StudyTrajectories(
        dims=dims,
        patients=[f"p{i}" for i in range(len(exams))],
        offsets=np.concatenate([[0], np.cumsum(exams)]).astype(np.int64),
        studies=studies,
        days=np.asarray([100.0 * k for e in exams for k in range(e)], np.float32),
        tokens=tokens,
        has_mask=np.ones(rows, bool) if dims == 3 else np.zeros(rows, bool),
        lung_voxels=np.full(rows, 4000, np.int64),
        reports=reports(studies) if reports else [f"report of {s}" for s in studies],
        masks=masks,
    )


def study_of(batch: dict, t: StudyTrajectories, key: str = "tokens") -> list[str]:
    return [t.studies[int(r)] for r in batch[key][:, 0, 0].tolist()]


class PlainEngine:
    """What the stage loop's loss function sees of the DeepSpeed engine: a callable
    module (its forward) and `.module`."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        return self.module(*args)


# ----- batches --------------------------------------------------------------------------


def test_each_worker_sees_its_own_studies_once_per_epoch_in_fresh_orders():
    t = trajectories([3, 1, 4, 2, 5, 2, 3])
    shards = [t.shard(rank, 2) for rank in range(2)]
    seen = [set(s.studies) for s in shards]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(t.studies)  # disjoint, all covered
    for shard in shards:
        orders = []
        for epoch in range(2):
            rng = np.random.default_rng([0, epoch, 0])
            batches = list(segmentation_batches(shard, 3, rng))
            assert all(b["tokens"].shape == (3, 33, 16) and b["mask"].shape == (3, *GRID_3D) for b in batches)
            names = [s for b in batches for s in study_of(b, t)]  # tokens name the global row
            assert len(names) == len(set(names)) == len(shard.studies) // 3 * 3  # full batches, no repeat
            for b in batches:  # each study with its own mask
                rows = [shard.studies.index(s) for s in study_of(b, t)]
                assert torch.equal(b["mask"], torch.from_numpy(shard.masks[rows]))
            orders.append(names)
        assert orders[0] != orders[1]  # reshuffled per epoch


def test_report_batches_pair_each_study_with_its_own_previous_exam_and_drop_at_the_rate():
    t = trajectories([1, 4, 3, 6, 2], dims=2)
    # rows: p0 0 | p1 1-4 | p2 5-7 | p3 8-13 | p4 14-15
    assert previous_exam_rows(t).tolist() == [-1, -1, 1, 2, 3, -1, 5, 6, -1, 8, 9, 10, 11, 12, -1, 14]
    dropped, follow_ups = 0, 0
    for epoch in range(200):
        for b in report_batches(t, 4, 0.3, np.random.default_rng(epoch)):
            names = study_of(b, t)
            assert b["texts"] == [f"report of {s}" for s in names]
            for i, name in enumerate(names):
                patient, k = name.split("-e")
                if k == "0":
                    assert b["drop_prior"][i]  # a first exam has no prior
                    continue
                follow_ups += 1
                if b["drop_prior"][i]:
                    dropped += 1
                    assert not b["prior"][i].any() and b["prior_row"][i] == -1
                else:  # the prior is the same patient's exam just before (tokens name it)
                    assert t.studies[int(b["prior"][i, 0, 0])] == f"{patient}-e{int(k) - 1}"
    assert abs(dropped / follow_ups - 0.3) < 0.03
    for rate, expected in ((0.0, 0), (1.0, 1)):
        rows = [b for e in range(3) for b in report_batches(t, 4, rate, np.random.default_rng(e))]
        follow = torch.cat([b["prior_row"] for b in rows]) != -1
        first = torch.tensor([n.endswith("-e0") for b in rows for n in study_of(b, t)])
        assert bool((~follow[~first]).all()) == bool(expected) and bool(follow[~first].any()) != bool(expected)


def test_a_worker_with_fewer_studies_than_a_batch_is_told_so():
    from cohortcast.training.cldm_decoder_stages import check_shard

    with pytest.raises(DecoderDataError, match="worker 1 has 3 studies .*micro_batch_size"):
        check_shard(trajectories([3]), 3, 4, 1, "segmentation")


# ----- segmentation ---------------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """A stand-in decoder: row r (its tokens are r) gets logits[r]; zero loss."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return self.logits[tokens[:, 0, 0].long()][:, None]

    def loss(self, logits, mask):
        return torch.zeros(())


def test_validation_avd_and_dice_against_a_hand_computation():
    t = trajectories([3])
    t.masks[:] = 0
    t.masks[0, 0, :2, :2] = 1  # 4 voxels
    t.masks[2, 1, :3, :3] = 1  # 9 voxels
    t.has_mask = np.asarray([True, False, True])  # row 1: no fibrosis
    t.lung_voxels = np.asarray([100, 50, 0])  # row 2: lung unknown, out of aVD
    pred = torch.full((3, *GRID_3D), -5.0)
    pred[0, 0, :2, :5] = 5.0  # 10 voxels, 4 of them right
    pred[1, 0, 0, :5] = 5.0  # 5 voxels where there is nothing
    pred[2, 1, :3, :3] = 5.0  # exact
    metrics = validate_segmentation(FixedLogits(pred), t, 2, train_fraction=0.1)
    assert metrics["avd"] == pytest.approx(((10 - 4) / 100 + 5 / 50) / 2)
    assert metrics["avd_empty"] == pytest.approx((4 / 100 + 0 / 50) / 2)
    assert metrics["avd_mean_fraction"] == pytest.approx((abs(10 - 4) / 100 + abs(5 - 0) / 50) / 2)
    assert metrics["dice"] == pytest.approx((2 * 4 / (10 + 4) + 1.0) / 2)  # rows 0 and 2 only
    assert metrics["avd_with_mask"] == pytest.approx(6 / 100)
    assert np.isnan(volume_avd(np.array([3.0]), np.array([1.0]), np.array([0]))[0])  # never a huge number
    assert fibrotic_fraction(t) == pytest.approx((4 / 100 + 0 / 50) / 2)


def patch_task(count: int, seed: int) -> StudyTrajectories:
    """Learnable: a patch is fibrotic iff its token's first feature is positive; that
    feature's mean differs per study, so the burden ranges from nearly none to most of
    the grid (no constant guess is close); the lung is the whole grid."""
    rng = np.random.default_rng(seed)
    t = trajectories([1] * count)
    t.tokens = rng.normal(size=t.tokens.shape).astype(np.float32)
    t.tokens[:, :, 0] += rng.uniform(-1.5, 1.5, count)[:, None]
    hot = (t.tokens[:, 1:, 0] > 0).reshape(count, 2, 4, 4)  # (R, token grid)
    t.masks = hot.repeat(4, 1).repeat(8, 2).repeat(8, 3).astype(np.uint8)  # (R, 8, 32, 32)
    t.has_mask = t.masks.reshape(count, -1).any(1)
    t.lung_voxels = np.full(count, math.prod(GRID_3D), np.int64)
    return t


def test_a_segmentation_decoder_trained_in_process_beats_the_trivial_baselines(one_thread):
    train, val = patch_task(32, seed=1), patch_task(16, seed=2)
    torch.manual_seed(0)
    model = SegmentationDecoder(CFG, 3)
    engine = PlainEngine(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = validate_segmentation(model.eval(), val, 8, fibrotic_fraction(train))
    model.train()
    step = 0
    for epoch in range(25):
        for batch in segmentation_batches(train, 8, np.random.default_rng(epoch)):
            loss = segmentation_loss(engine, batch)["total"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    assert step == 100
    after = validate_segmentation(model.eval(), val, 8, fibrotic_fraction(train))
    assert after["loss"] < before["loss"]
    assert after["avd"] < 0.5 * min(after["avd_empty"], after["avd_mean_fraction"])
    assert after["dice"] > 0.5  # an empty mask scores 0


def test_segmentation_export_from_kept_best_weights_loads_back(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = SegmentationDecoder(CFG, 3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "best.safetensors"))
    export_segmentation(CFG, str(tmp_path / "best.safetensors"), tmp_path / "out")
    tokens = torch.randn(2, 33, 16)
    assert torch.equal(SegmentationDecoder.load(tmp_path / "out", expected=CFG)(tokens), model.eval()(tokens))


# ----- report ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    corpus = ["level low , unchanged", "level high , new", "level low , new", "level high , unchanged"]
    return write_tiny_gpt2(tmp_path_factory.mktemp("lm") / "gpt2", corpus, hidden_size=32, layers=2)


def prior_task(exams: list[int], seed: int) -> StudyTrajectories:
    """Each exam has a level (low/high) written in its tokens; the report says the level
    and whether it changed since the previous exam: the change word needs the prior."""
    rng = np.random.default_rng(seed)
    t = trajectories(exams, dims=2)
    levels = rng.integers(0, 2, len(t.studies))
    t.tokens = rng.normal(scale=0.1, size=t.tokens.shape).astype(np.float32)
    t.tokens[:, :, 0] += np.where(levels, 2.0, -2.0)[:, None]
    prev = previous_exam_rows(t)
    t.reports = [
        f"level {'high' if levels[r] else 'low'} , {'new' if p >= 0 and levels[p] != levels[r] else 'unchanged'}"
        for r, p in enumerate(prev)
    ]
    return t


def test_report_decoder_learns_what_only_the_prior_tells(lm_folder, one_thread):
    cfg = tiny_config()
    cfg.report.lm_path = str(lm_folder)
    train, val = prior_task([4] * 12, seed=1), prior_task([4] * 6, seed=2)
    torch.manual_seed(0)
    lm, tok = load_lm(lm_folder)
    objective = ReportObjective(ReportDecoder(cfg, lm, tok))
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    for epoch in range(25):
        for batch in report_batches(train, 8, 0.5, np.random.default_rng(epoch)):
            loss = report_loss(PlainEngine(objective), batch)["total"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    metrics = validate_report(objective.decoder.eval(), val, 8)
    assert metrics["cases"] == 18  # 6 patients x 3 follow-ups
    # "new" vs "unchanged" costs up to log 2 per 4 tokens without the prior
    assert metrics["ce_prior"] < metrics["ce_no_prior"] - 0.05, metrics
    assert metrics["ce_first"] < metrics["ce_no_prior"]  # a first exam is always "unchanged"


def test_report_export_of_kept_best_weights_keeps_the_fine_tuned_lm(lm_folder, tmp_path):
    """Through the stage loop's best-weights writer: GPT-2 ties lm_head to the input
    embeddings, which safetensors refuses to write as one shared tensor."""
    from cohortcast.training.stage_loop import _keep_if_best

    cfg = tiny_config()
    cfg.report.lm_path = str(lm_folder)
    torch.manual_seed(1)
    objective = ReportObjective(ReportDecoder(cfg, *load_lm(lm_folder)))
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the LM too: "fine-tuned"

    class Engine:
        module, global_steps = objective, 7

    best = {"value": None, "step": None}
    _keep_if_best(Engine(), 1.5, best, str(tmp_path / "best.safetensors"))
    assert best == {"value": 1.5, "step": 7}
    export_report(cfg, str(tmp_path / "best.safetensors"), tmp_path / "report")
    back = ReportDecoder.load(tmp_path / "report", expected=cfg)
    tokens, prior = torch.randn(2, 17, 16), torch.randn(2, 17, 16)
    objective.eval()
    texts = ["level low , new", "level high , unchanged"]
    assert torch.allclose(back.loss(tokens, texts, prior), objective.decoder.loss(tokens, texts, prior))
    assert not torch.equal(back.lm.get_input_embeddings().weight, load_lm(lm_folder)[0].get_input_embeddings().weight)


def test_report_export_refuses_another_models_weights(lm_folder, tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_config()
    cfg.report.lm_path = str(lm_folder)
    save_file({"forecaster.x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(DecoderDataError, match="not a report decoder checkpoint"):
        export_report(cfg, str(tmp_path / "w.safetensors"), tmp_path / "out")


# ----- the tiny debug LM ------------------------------------------------------------------


def write_report_cache(folder, reports: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = folder / "studies" / "dims=2" / "split=train"
    out.mkdir(parents=True)
    pq.write_table(pa.table({"report_text": reports}), out / "part-0.parquet")


def lm_cfg(tmp_path, **tiny):
    from cohortcast.config.schema import CohortcastConfig

    cfg = CohortcastConfig()
    cfg.cldm.training.output = str(tmp_path / "train")
    for k, v in tiny.items():
        setattr(cfg.cldm.training.tiny_lm, k, v)
    return cfg


def test_ensure_report_lm_writes_a_tiny_gpt2_from_the_training_reports_once(tmp_path, monkeypatch):
    from cohortcast.pipeline import cldm_tiny_lm

    write_report_cache(tmp_path / "cache", ["FINDINGS: Zebroid opacities.", None])
    cfg = lm_cfg(tmp_path, write_if_missing=True, hidden_size=16, layers=1)
    path = cldm_tiny_lm.ensure_report_lm(cfg, tmp_path / "cache")
    assert path == str(tmp_path / "train" / "tiny_lm")
    lm, tok = load_lm(path)
    assert lm.config.n_embd == 16 and lm.config.n_layer == 1
    unk = tok.unk_token_id
    assert unk not in tok("FINDINGS: Zebroid opacities.", add_special_tokens=False)["input_ids"]  # the cohort's words
    assert unk not in tok("FINDINGS: Normal heart size. No pleural effusion.", add_special_tokens=False)["input_ids"]  # the fallback's
    monkeypatch.setattr("cohortcast.models.tiny_llm.write_tiny_gpt2", lambda *a, **k: pytest.fail("rewritten"))
    assert cldm_tiny_lm.ensure_report_lm(cfg, tmp_path / "cache") == path  # reused


def test_ensure_report_lm_without_a_path_or_the_debug_switch_names_the_settings(tmp_path):
    from cohortcast.pipeline.cldm_tiny_lm import ensure_report_lm

    cfg = lm_cfg(tmp_path)
    with pytest.raises(MissingInputError, match="lm_path is not set.*tiny_lm.write_if_missing"):
        ensure_report_lm(cfg, tmp_path)
    cfg.cldm.models.report.lm_path = str(tmp_path / "nowhere")
    with pytest.raises(MissingInputError, match="nowhere is not a folder"):
        ensure_report_lm(cfg, tmp_path)
    (tmp_path / "lm").mkdir()
    cfg.cldm.models.report.lm_path = str(tmp_path / "lm")
    assert ensure_report_lm(cfg, tmp_path) == str(tmp_path / "lm")


# ----- on Ray Train -----------------------------------------------------------------------


def write_cache(root, t_by_split: dict[str, dict[int, StudyTrajectories]]) -> tuple[str, str]:
    """A study latent cache + ingested studies table holding `t_by_split` (as the job's
    stages read them: load_trajectories)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def tensor(array):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))

    for split, kinds in t_by_split.items():
        for dims, t in kinds.items():
            patients = [t.patients[i] for i in range(len(t)) for _ in t.rows_of(i)]
            folder = root / "cache" / "studies" / f"dims={dims}" / f"split={split}"
            folder.mkdir(parents=True)
            table = {
                "patient": patients,
                "study": t.studies,
                "days_since_baseline": t.days.tolist(),
                "cls": tensor(t.tokens[:, 0]),
                "tokens": tensor(t.tokens[:, 1:]),
                "has_mask": t.has_mask.tolist(),
                "lung_voxels": t.lung_voxels.tolist(),
                "report_text": t.reports,
            }
            pq.write_table(pa.table(table), folder / "part-0.parquet")
            if dims == 3:
                ingested = root / "ingested" / "studies" / f"split={split}"
                ingested.mkdir(parents=True, exist_ok=True)
                affine = np.repeat(np.eye(4)[None], len(t.studies), 0)
                rows = {"study": t.studies, "dims": [3] * len(t.studies), "mask": tensor(t.masks)}
                pq.write_table(pa.table({**rows, "volume_affine": tensor(affine)}), ingested / "part-0.parquet")
    return str(root / "cache"), str(root / "ingested")


def test_loaded_cache_rows_match_what_was_written(tmp_path):
    from cohortcast.training.study_trajectories import load_trajectories

    t = trajectories([2, 3])
    cache, ingested = write_cache(tmp_path, {"train": {3: t}})
    back = load_trajectories(cache, "train", 3, ingested)
    assert back.studies == t.studies and np.array_equal(back.tokens, t.tokens)
    assert np.array_equal(back.masks, t.masks)


@pytest.mark.ray
def test_both_decoder_stages_train_on_two_zero2_workers_and_export_loadable_models(ray_session, lm_folder, tmp_path):
    from cohortcast.config.training import ScalingSettings
    from cohortcast.training.cldm_decoder_stages import report_worker_loop, segmentation_worker_loop
    from cohortcast.training.runner import run_stage

    cfg = tiny_config()
    cfg.report.lm_path = str(lm_folder)
    splits = {
        split: {3: patch_task(n, seed), 2: prior_task([3] * (n // 3), seed)}
        for split, n, seed in (("train", 12, 1), ("val", 6, 2))
    }
    cache, ingested = write_cache(tmp_path, splits)
    stage = DecoderStageConfig(
        max_steps=3, micro_batch_size=2, warmup_steps=1, zero_stage=2, log_every=1, checkpoint_every=3
    )
    scaling = ScalingSettings(num_workers=2, storage_path=str(tmp_path / "ray"))
    for name, loop, export, load in (
        ("segmentation", segmentation_worker_loop, export_segmentation, SegmentationDecoder.load),
        ("report", report_worker_loop, export_report, ReportDecoder.load),
    ):
        best = tmp_path / f"{name}.best.safetensors"
        config = {"stage": stage, "models": cfg, "cache": cache, "ingested": ingested, "best_path": str(best)}
        result = run_stage(name, loop, config, {}, scaling)
        assert result.error is None and result.metrics["step"] == 3
        metric = "val/avd" if name == "segmentation" else "val/ce_prior"
        assert metric in result.metrics and best.is_file()
        export(cfg, result.checkpoint, tmp_path / name)
        load(tmp_path / name, expected=cfg)
