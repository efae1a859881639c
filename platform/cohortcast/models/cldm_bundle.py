"""The CLDM forecaster bundle: the CLDM job's saved models (`cldm.training.output`, see
pipeline.cldm.CLDMOutputs) as one object that turns prior studies into a forecast study.

    encoder/       UniversalEncoder (required)       priors -> tokens
    diffusion/     CLDMForecaster (required)         tokens + dates -> N sampled target tokens
    segmentation/  SegmentationDecoder (optional)    sampled tokens -> ILD mask probabilities
    report/        ReportDecoder (optional)          mean tokens (+ last prior's) -> report text
    regressor/     StudyRegressor (optional)         the no-diffusion baseline (method="regressor")

`forecast(priors, case_ids, ...)`: per case a list of (image, days before the target) of
one kind (CT volumes (D, H, W) or radiographs (H, W), already in the ingestion scale, as
the ingested `volume` / `radiograph` columns) -> one `CaseForecast` each. With the most
recent prior's known mask (`prior_masks`, as copy-last needs) the forecast is also
anchored to it (models.mask_anchoring). Priors are
encoded, samples decoded, in fixed micro-batches (the forecaster's
`scheduler.micro_batch`) and reports generated one case at a time, so a case's answer is
bit-identical alone or in any batch, as the forecaster's samples are. Pure PyTorch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cohortcast.models.errors import ForecasterLoadError
from cohortcast.models.sampler import run_fixed_chunks

PARTS = ("encoder", "diffusion", "segmentation", "report", "regressor")
KIND_DIMS = {"ct": 3, "radiograph": 2}
THRESHOLD = 0.5


@dataclass
class CaseForecast:
    kind: str  # "ct" | "radiograph"
    token_mean: np.ndarray  # (1 + N, dim) float32
    token_variance: np.ndarray  # (1 + N, dim), over the samples
    probability: np.ndarray | None = None  # study grid: mean over samples of sigmoid(decoder logits)
    probability_variance: np.ndarray | None = None  # study grid: per-voxel variance of those probabilities
    mask: np.ndarray | None = None  # uint8, probability >= 0.5
    fibrotic_voxels: int | None = None
    fibrotic_fraction: float | None = None  # of the study grid's voxels
    fibrotic_volume_ml: float | None = None  # when the voxel volume is given
    sample_voxels: np.ndarray | None = None  # (S,) each sample's own mask (>= 0.5) voxel count
    sample_volume_ml: np.ndarray | None = None
    # with the most recent prior's known mask (`prior_masks`): that mask edited by the
    # decoded change (models.mask_anchoring), the validation's best-scoring forecast
    anchored_mask: np.ndarray | None = None
    anchored_voxels: int | None = None
    anchored_volume_ml: float | None = None
    report: str | None = None


def per_case(value, cases: int) -> list:
    """One value for all cases, or already one per case."""
    if value is None or isinstance(value, (int, float)):
        return [value] * cases
    if len(value) != cases:
        raise ValueError(f"{len(value)} values for {cases} cases")
    return list(value)


def _folder_error(folder: Path, message: str) -> ForecasterLoadError:
    return ForecasterLoadError(f"{folder}: {message}")


def check_sizes(folder: Path, encoder, models: dict) -> None:
    """Every model must read the encoder's tokens: width, patches and grids (= the
    encoder's input sizes / its patches). ForecasterLoadError naming the part and fields."""
    enc = encoder.cfg
    want = {
        "latent.dim": enc.dim,
        "latent.patch_2d": tuple(enc.patch_2d),
        "latent.patch_3d": tuple(enc.patch_3d),
        "latent.grid_2d": tuple(s // p for s, p in zip(enc.image_2d, enc.patch_2d)),
        "latent.grid_3d": tuple(s // p for s, p in zip(enc.volume_3d, enc.patch_3d)),
    }
    for part, model in models.items():
        if model is None:
            continue
        lat = model.cfg.latent
        have = {
            "latent.dim": lat.dim,
            "latent.patch_2d": tuple(lat.patch_2d),
            "latent.patch_3d": tuple(lat.patch_3d),
            "latent.grid_2d": tuple(lat.grid_2d),
            "latent.grid_3d": tuple(lat.grid_3d),
        }
        if part == "segmentation":  # one study kind: only its own grid matters
            d = model.dims
            have = {k: v for k, v in have.items() if k == "latent.dim" or k.endswith(f"_{d}d")}
        wrong = [
            f"{k} {list(v) if isinstance(v, tuple) else v} (encoder: {want[k]})"
            for k, v in have.items()
            if v != want[k]
        ]
        if wrong:
            raise _folder_error(folder / part, "does not read the encoder's tokens: " + "; ".join(wrong))


class CLDMBundle:
    def __init__(self, encoder, forecaster, segmentation=None, report=None, regressor=None, name: str = "cldm"):
        self.encoder, self.forecaster = encoder, forecaster
        self.segmentation, self.report, self.regressor = segmentation, report, regressor
        self.name = name  # the training output's folder name (never a full path: it may be shown to clients)

    # ----- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, training_output: str | Path, map_location: str = "cpu") -> CLDMBundle:
        from cohortcast.models.cldm_forecaster import CLDMForecaster
        from cohortcast.models.report_decoder import ReportDecoder
        from cohortcast.models.segmentation_decoder import SegmentationDecoder
        from cohortcast.models.study_regressor import StudyRegressor
        from cohortcast.models.universal_encoder import UniversalEncoder

        folder = Path(training_output)
        for required in ("encoder", "diffusion"):
            if not (folder / required).is_dir():
                raise _folder_error(
                    folder, f"no {required}/ folder: not a CLDM training output (needs encoder/ and diffusion/)"
                )
        encoder = UniversalEncoder.load(folder / "encoder").to(map_location)
        forecaster = CLDMForecaster.load(folder / "diffusion", map_location=map_location)
        optional = {
            "segmentation": lambda p: SegmentationDecoder.load(p, map_location=map_location),
            "report": lambda p: ReportDecoder.load(p, map_location=map_location),
            "regressor": lambda p: StudyRegressor.load(p, map_location=map_location),
        }
        loaded = {part: make(folder / part) if (folder / part).is_dir() else None for part, make in optional.items()}
        check_sizes(folder, encoder, {"diffusion": forecaster, **loaded})
        return cls(encoder, forecaster, name=folder.name, **loaded)

    def to(self, device) -> CLDMBundle:
        for part in (self.encoder, self.forecaster, self.segmentation, self.report, self.regressor):
            if part is not None:
                part.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.forecaster.parameters()).device

    # ----- what it takes -----------------------------------------------------------------
    @property
    def max_priors(self) -> int:
        return int(self.forecaster.cfg.temporal.max_exams)

    @property
    def micro_batch(self) -> int:
        return int(self.forecaster.cfg.scheduler.micro_batch)

    def kinds(self) -> list[str]:
        return [k for k, d in KIND_DIMS.items() if d in self.forecaster.cfg.latent.dims]

    def image_shape(self, kind: str) -> tuple[int, ...]:
        enc = self.encoder.cfg
        return tuple(enc.volume_3d) if kind == "ct" else tuple(enc.image_2d)

    def info(self) -> dict:
        return {
            "name": self.name,
            "kinds": self.kinds(),
            "image_shapes": {k: list(self.image_shape(k)) for k in self.kinds()},
            "token_dim": int(self.encoder.cfg.dim),
            "max_priors": self.max_priors,
            "segmentation": self.segmentation is not None,
            # kinds whose forecasts decode to a mask (and can be anchored to a known prior mask)
            "anchoring_kinds": [k for k in self.kinds() if self._segments(k)],
            "report": self.report is not None,
            "regressor": self.regressor is not None,
        }

    def _segments(self, kind: str) -> bool:
        """Whether forecasts of `kind` decode to a mask."""
        return self.segmentation is not None and self.segmentation.dims == KIND_DIMS[kind]

    def _check(self, priors, case_ids, kind: str, prior_masks=None) -> None:
        if kind not in self.kinds():
            raise ValueError(f"kind {kind!r}: this bundle forecasts {self.kinds()}")
        if len(priors) != len(case_ids):
            raise ValueError(f"{len(case_ids)} case ids for {len(priors)} cases")
        shape = self.image_shape(kind)
        for i, case in enumerate(priors):
            if not 1 <= len(case) <= self.max_priors:
                raise ValueError(f"case {i}: {len(case)} priors; 1..temporal.max_exams={self.max_priors} allowed")
            for image, _ in case:
                if tuple(np.shape(image)) != shape:
                    raise ValueError(f"case {i}: a {kind} prior must be {shape}, got {tuple(np.shape(image))}")
        if prior_masks is not None:
            if not self._segments(kind):
                raise ValueError(f"prior_masks: anchoring needs a {kind} segmentation decoder; this bundle has none")
            if len(prior_masks) != len(priors):
                raise ValueError(f"{len(prior_masks)} prior masks for {len(priors)} cases")
            for i, m in enumerate(prior_masks):
                if m is not None and tuple(np.shape(m)) != shape:
                    raise ValueError(f"case {i}: the prior mask must be {shape}, got {tuple(np.shape(m))}")

    # ----- forecasting -------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(M, *image) -> (M, 1 + N, dim) in fixed micro-batches (batch-independent bits)."""
        x = images[:, None].to(self.device, torch.float32)
        return run_fixed_chunks(self.encoder.tokens, [x], self.micro_batch)

    @torch.no_grad()
    def forecast(
        self,
        priors: list[list[tuple[np.ndarray, float]]],
        case_ids: list[str],
        num_samples: int | None = None,
        seed: int | list[int] = 0,
        steps: int | None = None,
        kind: str = "ct",
        voxel_ml: float | list[float | None] | None = None,
        method: str = "diffusion",
        prior_masks: list[np.ndarray | None] | None = None,
        sampler: str | None = None,
    ) -> list[CaseForecast]:
        """Forecast each case's target study from its priors ((image, days before target)
        pairs); `seed` one for all or one per case; `voxel_ml` one voxel's volume on the
        study grid (per case or for all) for mL figures; `method` "diffusion" or
        "regressor" (the no-diffusion baseline, when the bundle has one); `prior_masks`
        per case the most recent prior's mask on the study grid (or None) to anchor to;
        `sampler` "ddim" | "dpmsolver++" (default: the forecaster's scheduler config)."""
        self._check(priors, case_ids, kind, prior_masks)
        model = {"diffusion": self.forecaster, "regressor": self.regressor}.get(method)
        if model is None:
            raise ValueError(f"method {method!r}: this bundle has no such model (diffusion, regressor if trained)")
        b, k = len(priors), max(len(c) for c in priors)
        shape = self.image_shape(kind)
        images = torch.zeros((b, k, *shape))
        days = torch.zeros((b, k))
        mask = torch.zeros((b, k), dtype=torch.bool)
        for i, case in enumerate(priors):
            for j, (image, before) in enumerate(case):
                images[i, j] = torch.as_tensor(np.asarray(image, np.float32))
                days[i, j], mask[i, j] = float(before), True
        real = self.encode(images[mask])  # only the real priors are encoded
        tokens = torch.zeros((b, k, *real.shape[1:]), device=real.device)
        tokens[mask.to(real.device)] = real
        out = model.forecast(
            tokens,
            days.to(real.device),
            mask.to(real.device),
            case_ids,
            num_samples=num_samples,
            seed=seed,
            steps=steps,
            sampler=sampler,
        )
        cases = [
            CaseForecast(kind, out.mean[i].float().cpu().numpy(), out.variance[i].float().cpu().numpy())
            for i in range(b)
        ]
        if self._segments(kind):
            self._segment(cases, out.samples, voxel_ml)
            if prior_masks is not None:
                self._anchor(cases, out.baseline, prior_masks, voxel_ml)
        if self.report is not None and kind == "radiograph":
            self._reports(cases, out.mean, out.baseline)
        return cases

    def _segment(self, cases: list[CaseForecast], samples: torch.Tensor, voxel_ml) -> None:
        """Each sample's tokens -> sigmoid probabilities; the case's probability is their
        mean, its mask that mean >= 0.5, its spread the samples' own mask volumes."""
        b, s = samples.shape[:2]
        probs = self._probabilities(samples.flatten(0, 1))
        probs = probs.reshape(b, s, *probs.shape[1:])
        per_voxel = per_case(voxel_ml, b)
        for i, case in enumerate(cases):
            p = probs[i]
            mean = p.mean(dim=0)
            variance = p.var(dim=0) if s > 1 else torch.zeros_like(mean)
            case.probability, case.probability_variance = mean.numpy(), variance.numpy()
            case.mask = (mean >= THRESHOLD).to(torch.uint8).numpy()
            case.fibrotic_voxels = int(case.mask.sum())
            case.fibrotic_fraction = case.fibrotic_voxels / math.prod(case.mask.shape)
            case.sample_voxels = (p >= THRESHOLD).flatten(1).sum(dim=1).numpy().astype(np.int64)
            if per_voxel[i] is not None:
                case.fibrotic_volume_ml = case.fibrotic_voxels * float(per_voxel[i])
                case.sample_volume_ml = case.sample_voxels * float(per_voxel[i])

    def _probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """(M, 1 + N, dim) -> (M, *grid) sigmoid probabilities, in fixed micro-batches."""

        def probabilities(rows):
            return torch.sigmoid(self.segmentation(rows)[:, 0].float())

        return run_fixed_chunks(probabilities, [tokens], self.micro_batch).cpu()

    def _anchor(self, cases: list[CaseForecast], baseline: torch.Tensor, prior_masks, voxel_ml) -> None:
        from cohortcast.models.mask_anchoring import anchored_mask

        prior_prob = self._probabilities(baseline).numpy()
        per_voxel = per_case(voxel_ml, len(cases))
        for i, (case, known) in enumerate(zip(cases, prior_masks)):
            if known is None:
                continue
            case.anchored_mask = anchored_mask(case.probability, prior_prob[i], np.asarray(known) > 0)
            case.anchored_voxels = int(case.anchored_mask.sum())
            if per_voxel[i] is not None:
                case.anchored_volume_ml = case.anchored_voxels * float(per_voxel[i])

    def _reports(self, cases: list[CaseForecast], mean: torch.Tensor, baseline: torch.Tensor) -> None:
        """One report per case, generated alone (greedy/beam: deterministic, and no other
        case's length or padding can reach it)."""
        use_prior = self.report.cfg.report.use_prior
        for i, case in enumerate(cases):
            prior = baseline[i : i + 1] if use_prior else None
            case.report = self.report.generate(mean[i : i + 1], prior=prior)[0]
