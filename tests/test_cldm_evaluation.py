"""The CLDM evaluation (Tables 1-2) on hand-built in-memory cohorts: stub models whose
outputs are known (a perfect segmentation decoder, a copy-the-last-prior forecaster, an
oracle forecaster), and tiny random models saved to folders run end to end. No Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cohortcast.config.cldm_evaluation import CLDMEvaluationConfig
from cohortcast.config.loader import ConfigError
from cohortcast.evaluation import cldm_tables as tables
from cohortcast.evaluation.cldm_evaluation import evaluate_cldm, format_result, load_models
from cohortcast.evaluation.cldm_report import report_markdown, table_metrics, write_report
from cohortcast.evaluation.cldm_scoring import CLDMModels
from cohortcast.evaluation.cldm_targets import CLDMEvaluationError, ct_targets, report_targets
from cohortcast.evaluation.report_metrics import bleu4
from cohortcast.models.cldm_forecaster import TokenForecast
from cohortcast.training.study_trajectories import StudyTrajectories

GRID = (8, 32, 32)  # tiny_config's CT image: grid (2, 4, 4) x patch (4, 8, 8)
DIM, N3, N2 = 16, 32, 16
LUNG = int(np.prod(GRID)) // 2
REPORTS = [
    "FINDINGS: The heart size is normal. No pleural effusion.\nIMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Small left pleural effusion, new.\nIMPRESSION: New small left pleural effusion.",
    "FINDINGS: The left pleural effusion is unchanged. Mild cardiomegaly.\nIMPRESSION: Stable effusion.",
    "FINDINGS: The left pleural effusion has resolved. Mild cardiomegaly.\nIMPRESSION: Effusion improved.",
    "FINDINGS: Worsening left pleural effusion. Moderate edema.\nIMPRESSION: Worse effusion and edema.",
]


def cohort(dims: int, exams=(2, 3, 5, 6, 4, 7, 5, 2), fibrosis=(True,) * 8, seed: int = 0) -> StudyTrajectories:
    """Patients with `exams` exams each; token [CLS][0] of every row holds the row index (the
    stubs below read it back). CT: a box of fibrosis growing by exam (empty for patients
    without fibrosis, has_mask False); radiographs: reports cycling through REPORTS."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(exams)]).astype(np.int64)
    rows = int(offsets[-1])
    n = N3 if dims == 3 else N2
    tokens = rng.standard_normal((rows, 1 + n, DIM)).astype(np.float32)
    tokens[:, 0, 0] = np.arange(rows)
    days = np.concatenate([np.sort(rng.integers(0, 2000, k)).astype(np.float32) for k in exams])
    masks = np.zeros((rows, *GRID), np.uint8)
    has_mask = np.zeros(rows, bool)
    for p, k in enumerate(exams):
        for j in range(k):
            r = offsets[p] + j
            has_mask[r] = fibrosis[p]
            if fibrosis[p]:
                size = 3 + 2 * j + p % 3
                masks[r, 1 : 1 + min(6, 2 + j), 2 : 2 + size, 4 : 4 + size] = 1
    affine = np.diag([5.0, 5.0, 6.0, 1.0])
    return StudyTrajectories(
        dims=dims,
        patients=[f"sub-{p:02d}" for p in range(len(exams))],
        offsets=offsets,
        studies=[f"stu-{r:03d}" for r in range(rows)],
        days=days,
        tokens=tokens,
        has_mask=has_mask if dims == 3 else np.zeros(rows, bool),
        lung_voxels=np.full(rows, LUNG if dims == 3 else 0, np.int64),
        reports=[REPORTS[(r * 3 + 1) % len(REPORTS)] for r in range(rows)] if dims == 2 else [""] * rows,
        masks=masks if dims == 3 else None,
        mask_affine=np.repeat(affine[None], rows, 0) if dims == 3 else None,
    )


def settings(**kw) -> CLDMEvaluationConfig:
    e = CLDMEvaluationConfig(num_samples=3, inference_steps=2, bootstrap=200, **kw)
    e.validate()
    return e


class CopyForecaster:
    """Every sample = the most recent prior's tokens; records what each call was given."""

    def __init__(self, max_exams: int = 6):
        self.cfg = SimpleNamespace(temporal=SimpleNamespace(max_exams=max_exams), report=None)
        self.calls: list[dict] = []

    def forecast(self, prior_tokens, days_before_target, exam_mask, case_ids, num_samples=1, seed=0, steps=None):
        rows = torch.where(exam_mask, prior_tokens[:, :, 0, 0], -1).long()
        self.calls.append({"rows": rows.tolist(), "k": exam_mask.sum(1).tolist(), "cases": list(case_ids)})
        last = prior_tokens[torch.arange(len(case_ids)), exam_mask.sum(1) - 1]
        samples = self.pick(last, case_ids)[:, None].expand(-1, num_samples, -1, -1)
        return TokenForecast(samples, samples.mean(1), torch.zeros_like(last), last)

    def pick(self, last, case_ids):
        return last


class OracleForecaster(CopyForecaster):
    """The target's own tokens, when given at least `min_priors` priors; else copy-last."""

    def __init__(self, trajectories: StudyTrajectories, min_priors: int = 1):
        super().__init__()
        self.t, self.min_priors = trajectories, min_priors

    def pick(self, last, case_ids):
        k = self.calls[-1]["k"]
        rows = [self.t.studies.index(c.split("/")[1]) for c in case_ids]
        truth = torch.from_numpy(self.t.tokens[rows])
        return torch.stack([truth[i] if k[i] >= self.min_priors else last[i] for i in range(len(rows))])


class PerfectDecoder(torch.nn.Module):
    """The row index in [CLS][0] -> that row's true mask as confident logits."""

    def __init__(self, masks: np.ndarray):
        super().__init__()
        self.masks = torch.from_numpy(masks.astype(np.float32))

    def forward(self, tokens):
        rows = tokens[:, 0, 0].round().long()
        return (self.masks[rows] * 20 - 10)[:, None]


class ReportStub:
    """generate -> the report of the row in [CLS][0]; without a prior a fixed normal report."""

    def __init__(self, reports: list[str], use_prior: bool = True):
        self.reports, self.priors_given = reports, []
        self.cfg = SimpleNamespace(report=SimpleNamespace(use_prior=use_prior))

    def generate(self, tokens, prior=None):
        self.priors_given.append(None if prior is None else prior[:, 0, 0].round().long().tolist())
        if prior is None:
            return [REPORTS[0]] * tokens.shape[0]
        return [self.reports[int(r)] for r in tokens[:, 0, 0].round().long()]


def stub_models(ct, forecaster=None, dx=None, regressor=True) -> CLDMModels:
    forecaster = forecaster or CopyForecaster()
    return CLDMModels(
        forecaster,
        PerfectDecoder(ct.masks) if ct is not None else None,
        ReportStub(dx.reports) if dx is not None else None,
        CopyForecaster() if regressor else None,
    )


def hand_dice(p, t):
    return 1.0 if p.sum() + t.sum() == 0 else 2 * (p & t).sum() / (p.sum() + t.sum())


# ----- targets ---------------------------------------------------------------------------------


def test_ct_targets_are_follow_ups_with_masks_and_all_priors_up_to_max_exams():
    ct = cohort(3, exams=(3, 8, 2), fibrosis=(True, True, False))
    targets = ct_targets(ct, max_priors=6)
    # patient 0: positions 1, 2; patient 1: positions 1..7; patient 2 has no masks
    assert len(targets) == 2 + 7
    assert targets.skipped["no ILD mask on the target or its last prior"] == 1
    assert targets.num_priors.tolist() == [1, 2, 1, 2, 3, 4, 5, 6, 6]
    assert targets.case_ids[0] == "sub-00/stu-001"
    # the priors are the most recent exams, oldest first
    last = targets.examples
    assert last.prior_rows[-1].tolist() == [4, 5, 6, 7, 8, 9]  # target row 10 = patient 1's exam 7
    assert (last.last_prior_row == last.target_row - 1).all()


def test_targets_cap_and_missing_lung_mask():
    ct = cohort(3)
    ct.lung_voxels[3] = 0
    targets = ct_targets(ct, 6)
    assert targets.skipped["no lung mask (aVD undefined)"] == 1
    capped = ct_targets(ct, 6, max_targets=5, seed=1)
    assert len(capped) == 5 and set(capped.case_ids) <= set(targets.case_ids)
    assert capped.skipped["left out by max_targets=5"] == len(targets) - 5
    with pytest.raises(CLDMEvaluationError, match="no CT follow-up"):
        ct_targets(cohort(3, exams=(2, 2), fibrosis=(False, False)), 6)


def test_report_targets_need_a_reference_report():
    dx = cohort(2, exams=(3, 2))
    dx.reports[4] = " "
    targets = report_targets(dx, 6)
    assert len(targets) == 2 and targets.skipped["no reference report"] == 1


# ----- Table 1 -----------------------------------------------------------------------------------


def test_copy_last_row_equals_a_hand_computation_and_the_bound_is_perfect():
    ct = cohort(3)
    result = evaluate_cldm(settings(tables=("segmentation",)), stub_models(ct), ct=ct)
    t1 = result.table1
    targets = ct_targets(ct, 6)
    dices, avds = [], []
    for row, last in zip(targets.examples.target_row, targets.examples.last_prior_row):
        p, t = ct.masks[last].astype(bool), ct.masks[row].astype(bool)
        dices.append(hand_dice(p, t))
        avds.append(abs(int(p.sum()) - int(t.sum())) / LUNG)
    copy = t1.row(tables.COPY_LAST)
    assert copy.mean_forecast["dice"] == pytest.approx(np.mean(dices))
    assert copy.mean_forecast["avd"] == pytest.approx(np.mean(avds))
    assert copy.mean_forecast["avd"] > 0  # the masks grow: copying misses the growth
    assert copy.mean_forecast["progression_dice"] == 0.0
    assert copy.per_seed["dice"].std == 0.0 and copy.per_seed["dice"].n == 1
    low, high = copy.ci["avd"].low, copy.ci["avd"].high
    assert low <= copy.mean_forecast["avd"] <= high
    bound = t1.row(tables.BOUND)
    assert bound.mean_forecast["dice"] == 1.0 and bound.mean_forecast["avd"] == 0.0
    assert bound.mean_forecast["hd95"] == 0.0
    # the copy forecaster + perfect decoder is copy-last again, per sample and as mean forecast
    cldm = t1.row(tables.CLDM_ALL)
    assert cldm.mean_forecast["avd"] == pytest.approx(copy.mean_forecast["avd"])
    assert cldm.per_seed["avd"].n == 3
    assert t1.targets == len(targets) and t1.patients == 8
    assert [r.method for r in t1.rows] == [
        tables.COPY_LAST,
        tables.NO_DIFFUSION,
        "CLDM (1 prior)",
        "CLDM (3 priors)",
        tables.CLDM_ALL,
        tables.CLDM_ALL_ANCHORED,
        tables.NO_DIFFUSION_ANCHORED,
        tables.BOUND,
    ]
    # a forecast that decodes like its last prior, anchored, is copy-last exactly
    anchored = t1.row(tables.CLDM_ALL_ANCHORED)
    for metric in ("dice", "avd", "progression_dice"):
        assert np.array_equal(anchored.per_case[metric], copy.per_case[metric], equal_nan=True)
    assert t1.anchored_difference.mean == 0.0


def test_truncated_rows_pass_the_k_most_recent_priors_to_the_same_model():
    ct = cohort(3)
    spy = CopyForecaster()
    evaluate_cldm(settings(tables=("segmentation",), batch_size=4), stub_models(ct, spy), ct=ct)
    targets = ct_targets(ct, 6)
    n = len(targets)
    calls_per_row = -(-n // 4)
    assert len(spy.calls) == 3 * calls_per_row  # 1, 3, all priors; batched 4 targets a call
    for row, k in enumerate((1, 3, None)):
        calls = spy.calls[row * calls_per_row : (row + 1) * calls_per_row]
        given = [kk for c in calls for kk in c["k"]]
        rows = [r for c in calls for r in c["rows"]]
        assert [c for call in calls for c in call["cases"]] == targets.case_ids
        for i, (target, got) in enumerate(zip(targets.examples.target_row, given)):
            want = targets.num_priors[i] if k is None else min(k, targets.num_priors[i])
            assert got == want
            assert [r for r in rows[i] if r >= 0] == list(range(target - want, target))


def test_ordering_subset_and_claims_follow_the_numbers():
    ct = cohort(3)
    targets = ct_targets(ct, 6)
    e = settings(tables=("segmentation",))
    copy = evaluate_cldm(e, stub_models(ct), ct=ct)
    want = int((targets.num_priors >= 4).sum())
    assert copy.table1.ordering_targets == want and want > 0
    assert list(copy.table1.ordering) == [tables.CLDM_ALL, "CLDM (3 priors)", "CLDM (1 prior)"]
    holds = {c.text: c.holds for c in copy.claims}
    first = f"{tables.CLDM_ALL} aVD < {tables.COPY_LAST}, paired 95% CI excluding 0"
    assert holds[first] is False  # the same masks as copy-last: difference exactly 0
    assert holds[f"{tables.CLDM_ALL} progression Dice > 0"] is False

    # an oracle when it sees >= 4 priors: better than copy-last, and ordered all <= 3 <= 1
    oracle = evaluate_cldm(e, stub_models(ct, OracleForecaster(ct, min_priors=4)), ct=ct)
    t1 = oracle.table1
    holds = {c.text: c.holds for c in oracle.claims}
    assert holds[first] is True
    assert holds[f"{tables.CLDM_ALL} progression Dice > 0"] is True
    assert holds[f"{tables.CLDM_ALL} aVD < {tables.NO_DIFFUSION}"] is True
    ordering = [c for c in oracle.claims if c.text.startswith("aVD ordered")][0]
    assert ordering.holds and t1.ordering[tables.CLDM_ALL] == 0.0
    assert t1.ordering["CLDM (1 prior)"] > 0
    assert t1.difference.interval.high < 0
    # anchored to the last prior's mask, the oracle's decoded change gives the true volume
    keep = targets.num_priors >= 4
    assert np.allclose(t1.row(tables.CLDM_ALL_ANCHORED).per_case["avd"][keep], 0.0, atol=1.5 / LUNG)
    assert holds[f"(our addition) {tables.CLDM_ALL_ANCHORED} aVD < {tables.COPY_LAST}, paired 95% CI excluding 0"]

    # the same table with the ordering's numbers swapped: the claim flips
    flipped = dataclasses.replace(t1, ordering={k: -v for k, v in t1.ordering.items()})
    claim = [c for c in tables.segmentation_claims(flipped, 0.005) if c.text.startswith("aVD ordered")][0]
    assert not claim.holds
    # Dice margin: copy-last's Dice raised above CLDM's by more than the margin
    rows = [
        dataclasses.replace(r, mean_forecast={**r.mean_forecast, "dice": 1.0}) if r.method == tables.COPY_LAST else r
        for r in t1.rows
    ]
    claims = {c.text: c.holds for c in tables.segmentation_claims(dataclasses.replace(t1, rows=rows), 0.005)}
    dice_claim = f"{tables.CLDM_ALL} Dice not below {tables.COPY_LAST} by more than 0.005"
    assert claims[dice_claim] is (t1.row(tables.CLDM_ALL).mean_forecast["dice"] >= 0.995)


def test_a_decoder_on_another_grid_is_refused():
    ct = cohort(3)
    models = stub_models(ct)
    models.segmentation = PerfectDecoder(ct.masks[:, :4])
    with pytest.raises(CLDMEvaluationError, match="another grid"):
        evaluate_cldm(settings(tables=("segmentation",)), models, ct=ct)


# ----- Table 2 -----------------------------------------------------------------------------------


def test_report_rows_copy_prior_uses_the_previous_report_and_prior_tokens_reach_the_decoder():
    dx = cohort(2)
    models = CLDMModels(CopyForecaster(), None, ReportStub(dx.reports), CopyForecaster())
    result = evaluate_cldm(settings(tables=("report",)), models, dx=dx)
    t2 = result.table2
    targets = report_targets(dx, 6)
    refs = [dx.reports[r] for r in targets.examples.target_row]
    previous = [dx.reports[r] for r in targets.examples.target_row - 1]
    copy = t2.row(tables.COPY_PRIOR)
    assert copy.values["bleu4"] == pytest.approx(bleu4(previous, refs))
    assert copy.values["bleu4"] < 1.0
    # the copy forecaster + the stub decoder writes the last prior's report: copy-prior again
    assert t2.row(tables.CLDM_PRIOR).values["bleu4"] == pytest.approx(copy.values["bleu4"])
    assert t2.row(tables.BOUND_PRIOR).values["bleu4"] == pytest.approx(1.0)
    assert t2.row(tables.BOUND_PRIOR).values["label_f1"] == pytest.approx(1.0)
    # +prior rows got the last prior's tokens (rows target - 1), the without-prior row none
    given = models.report.priors_given
    assert given.count(None) == -(-len(targets) // 16)
    assert [r for g in given if g is not None for r in g][: len(targets)] == list(targets.examples.target_row - 1)
    assert [r.uses_prior for r in t2.rows] == [True, True, False, True, True]
    assert copy.ci["rouge_l"] is not None and copy.ci["rouge_l"].low <= copy.values["rouge_l"]


def test_report_claims_flip_with_the_numbers():
    def table(with_prior, without):
        def row(m, v):
            return tables.ReportRow(m, True, dict.fromkeys(tables.REPORT_METRICS, v), {})

        return tables.Table2(
            [row(tables.CLDM_PRIOR, with_prior), row(tables.CLDM_NO_PRIOR, without)], [], 4, 2, "RuleLabeler", "ones"
        )

    assert all(c.holds for c in tables.report_claims(table(0.4, 0.3)))
    assert not any(c.holds for c in tables.report_claims(table(0.3, 0.4)))
    assert len(tables.report_claims(table(0.3, 0.4))) == 2


# ----- report, metrics, config ---------------------------------------------------------------


def test_markdown_report_holds_both_tables_claims_and_choices(tmp_path):
    ct, dx = cohort(3), cohort(2)
    models = CLDMModels(CopyForecaster(), PerfectDecoder(ct.masks), ReportStub(dx.reports), CopyForecaster())
    result = evaluate_cldm(settings(), models, ct=ct, dx=dx)
    text = report_markdown(result)
    assert "## Table 1" in text and "## Table 2" in text
    assert "| Method | Dice (mean forecast) |" in text and "| Method | +Prior | BLEU-4 |" in text
    assert "does not hold" in text and "truncated context" in text and "identical no-diffusion rows" in text
    path = write_report(tmp_path / "report", result)
    assert path.read_text() == text
    assert (tmp_path / "report" / "tables.json").is_file()
    csv = (tmp_path / "report" / "targets.csv").read_text().splitlines()
    assert len(csv) == 1 + result.table1.targets and csv[1].startswith("sub-00/stu-001,1,")
    metrics = table_metrics(result.table1, result.table2)
    assert metrics["t1/current_exam_upper_bound/dice"] == 1.0
    assert "t2/copy_prior_report/bleu4_ci_low" in metrics
    assert "Table 2" in format_result(result)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="ordering_min_priors"):
        CLDMEvaluationConfig(truncated_priors=(1, 4)).validate()
    with pytest.raises(ConfigError, match="chexbert_checkpoint"):
        CLDMEvaluationConfig(labeler="chexbert").validate()
    with pytest.raises(ConfigError, match="split"):
        CLDMEvaluationConfig(split="dev").validate()


# ----- tiny real models, from folders ------------------------------------------------------------


def save_tiny_models(tmp_path):
    """Random-init tiny models saved to folders as the job's stages write them."""
    from test_cldm_models import tiny_config

    from cohortcast.models.cldm_forecaster import CLDMForecaster
    from cohortcast.models.report_decoder import ReportDecoder
    from cohortcast.models.segmentation_decoder import SegmentationDecoder
    from cohortcast.models.study_regressor import StudyRegressor
    from cohortcast.models.tiny_llm import write_tiny_gpt2

    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.report.lm_path = str(write_tiny_gpt2(tmp_path / "lm", REPORTS, hidden_size=32, layers=1))
    cfg.report.max_new_tokens = 6
    folders = {name: tmp_path / name for name in ("diffusion", "regressor", "segmentation", "report")}
    CLDMForecaster(cfg).save(folders["diffusion"])
    StudyRegressor(cfg).save(folders["regressor"])
    SegmentationDecoder(cfg, dims=3).save(folders["segmentation"])
    ReportDecoder(cfg).save(folders["report"])
    return cfg, folders


def test_tiny_models_saved_to_folders_run_end_to_end_and_a_rerun_reuses_the_cache(tmp_path, monkeypatch):
    from cohortcast.models.cldm_forecaster import CLDMForecaster
    from cohortcast.pipeline.cldm import CLDMOutputs

    cfg, folders = save_tiny_models(tmp_path)
    models = load_models(CLDMOutputs(encoder=tmp_path, latents=tmp_path, **folders), cfg)
    ct, dx = cohort(3, exams=(3, 5, 2, 4)), cohort(2, exams=(3, 5, 2, 4))
    e = settings(batch_size=3, max_targets=6)
    calls = []
    real = CLDMForecaster.forecast
    monkeypatch.setattr(CLDMForecaster, "forecast", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = evaluate_cldm(e, models, ct=ct, dx=dx, cache_folder=tmp_path / "cache")
    assert calls and first.table1.targets == 6 and first.table2.targets == 6
    assert len(first.table1.rows) == 8 and len(first.table2.rows) == 5  # 6 + the two anchored rows
    assert first.table1.row(tables.BOUND).per_seed["dice"].n == 1
    assert first.table1.row(tables.CLDM_ALL).per_seed["dice"].n == 3
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4 + 3
    calls.clear()
    second = evaluate_cldm(e, models, ct=ct, dx=dx, cache_folder=tmp_path / "cache")
    assert not calls  # every forecast came from the cache
    assert table_metrics(second.table1, second.table2) == table_metrics(first.table1, first.table2)
    with pytest.raises(CLDMEvaluationError, match="no report model"):
        load_models(CLDMOutputs(encoder=tmp_path, diffusion=folders["diffusion"]), cfg, ("report",))


def test_the_job_loads_the_stage_outputs_and_logs_tables_and_report_to_mlflow(tmp_path, monkeypatch):
    """run_cldm_evaluation's glue without Ray: the training stages, cohort preparation and
    the latent cache are stubbed; models load from folders, MLflow is a local store."""
    from mlflow.tracking import MlflowClient

    import cohortcast.data.prepare as prepare
    import cohortcast.ray_runtime as ray_runtime
    import cohortcast.training.study_trajectories as st
    from cohortcast.config.schema import CohortcastConfig
    from cohortcast.evaluation.cldm_evaluation import run_cldm_evaluation
    from cohortcast.pipeline.cldm import CLDMJob, CLDMOutputs
    from cohortcast.tracking.job_runs import local_store

    models_cfg, folders = save_tiny_models(tmp_path)
    cfg = CohortcastConfig(workdir=str(tmp_path))
    cfg.cldm.models = models_cfg  # the encoder below wires the same 16-wide token grids
    enc = cfg.cldm.encoder
    enc.dim, enc.volume_3d, enc.image_2d = 16, (8, 32, 32), (32, 32)
    cfg.cldm.evaluation = settings(max_targets=4, batch_size=4, report="evaluation", cache="")
    ct, dx = cohort(3, exams=(3, 5, 2, 4)), cohort(2, exams=(3, 5, 2, 4))
    seen = {}
    monkeypatch.setattr(ray_runtime, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(prepare, "prepare_cohort", lambda cfg: {"config": {"output": str(tmp_path / "ingested")}})
    monkeypatch.setattr(CLDMJob, "run", lambda self, runs, card: CLDMOutputs(tmp_path, tmp_path / "latents", **folders))

    def trajectories(cache, split, dims, ingested=None):
        seen[dims] = (Path(cache).name, split, ingested)
        return ct if dims == 3 else dx

    monkeypatch.setattr(st, "load_trajectories", trajectories)
    result = run_cldm_evaluation(cfg)
    assert seen == {3: ("latents", "test", str(tmp_path / "ingested")), 2: ("latents", "test", None)}
    assert Path(result.report) == tmp_path / "evaluation" / "report.md" and Path(result.report).is_file()
    client = MlflowClient(local_store(tmp_path)[0])
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    child = next(r for r in runs if r.info.run_name == "cldm_evaluation")
    assert child.data.metrics["t1/current_exam_upper_bound/avd"] >= 0
    assert "t2/copy_prior_report/bleu4" in child.data.metrics
    assert child.data.params["cldm.evaluation.max_targets"] == "4"
    assert [a.path for a in client.list_artifacts(child.info.run_id, "report")] == [
        "report/report.md",
        "report/tables.json",
        "report/targets.csv",
    ]
    assert any(r.info.run_name == f"{cfg.run_name}-evaluation" for r in runs)  # the parent run
