"""Rotation augmentation (NAMD App. B): the 8 orientations, the latent cache's
`latent_d8`, and per-epoch orientation draws in stage-d target sampling."""

import numpy as np
import pytest
import torch

from cohortcast.config.models import VAEConfig
from cohortcast.data.manifest import EHR_FEATURES
from cohortcast.data.transforms import NUM_ORIENTATIONS, dihedral_orientation
from cohortcast.evaluation.evaluator_stage import dihedral
from cohortcast.inference.latent_cache import LatentEncoder
from cohortcast.models.vae import NoduleVAE, load_vae, save_vae
from cohortcast.training.trajectories import make_trajectory, sample_targets


def test_dihedral_orientation_gives_the_eight_orientations_in_the_evaluators_order():
    """Guards data.transforms.dihedral_orientation: k = 0..3 rotate by k x 90 degrees,
    4..7 mirror the columns first; 8 distinct images of an asymmetric array, in the
    order evaluator_stage.dihedral stacks them (it rotated and mirrored inline before)."""
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    views = [dihedral_orientation(image, k) for k in range(NUM_ORIENTATIONS)]
    assert NUM_ORIENTATIONS == 8 and len({v.tobytes() + bytes(v.shape) for v in views}) == 8
    assert np.array_equal(views[0], image) and np.array_equal(views[1], np.rot90(image))
    assert np.array_equal(views[4], image[:, ::-1]) and np.array_equal(views[6], np.rot90(image[:, ::-1], 2))
    square = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)  # (B, C, H, W) as the evaluator stacks
    stacked = dihedral(square)
    for k in range(NUM_ORIENTATIONS):
        assert np.array_equal(stacked[k], dihedral_orientation(square, k)[0])
    batch = np.stack([square[0, 0], 2 * square[0, 0]])  # leading axes are carried along
    assert np.array_equal(dihedral_orientation(batch, 5)[1], dihedral_orientation(batch[1], 5))
    with pytest.raises(ValueError, match="outside 0..7"):
        dihedral_orientation(image, 8)


def test_latent_encoder_writes_every_orientations_latent(tmp_path):
    """Guards the cache's `latent_d8` (B, 8, c, h, w): entry k is the diffusion latent of
    orientation k of the crop, entry 0 equals `latent` (the crop as ingested)."""
    torch.manual_seed(0)
    vae = NoduleVAE(VAEConfig())
    vae.set_scaling_factor(1.0)
    save_vae(vae, tmp_path / "vae")
    rng = np.random.default_rng(0)
    crops = rng.uniform(-1, 1, size=(3, 32, 32)).astype(np.float32)
    out = LatentEncoder(str(tmp_path / "vae"))(
        {"crop": crops, "patch": np.zeros((3, 8, 8, 8), np.float32), "case": np.array(["a", "b", "c"])}
    )
    assert "patch" not in out and list(out["case"]) == ["a", "b", "c"]
    assert out["latent_d8"].shape == (3, 8, 4, 8, 8) and out["latent"].shape == (3, 4, 8, 8)
    np.testing.assert_array_equal(out["latent"], out["latent_d8"][:, 0])
    reference = load_vae(tmp_path / "vae")
    for k in range(NUM_ORIENTATIONS):
        view = torch.from_numpy(np.ascontiguousarray(dihedral_orientation(crops, k)))[:, None]
        np.testing.assert_allclose(
            out["latent_d8"][:, k], reference.encode_for_diffusion(view).numpy(), rtol=1e-5, atol=1e-5
        )
    assert not np.allclose(out["latent_d8"][:, 0], out["latent_d8"][:, 1])  # orientations really differ


def nodule_group(days, patient="sub-a"):
    """Cache rows of one nodule with `latent_d8`: exam j's orientation-k latent is filled
    with 10 j + k; crop j is an asymmetric ramp plus j."""
    n = len(days)
    ramp = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1024
    group = {
        "patient": np.array([patient] * n, object),
        "nodule_id": np.array(["n1"] * n, object),
        "days_since_baseline": np.array(days, np.float64),
        "malignant": np.array([0] * n),
        "latent_d8": np.stack(
            [np.stack([np.full((4, 8, 8), 10 * j + k, np.float32) for k in range(8)]) for j in range(n)]
        ),
        "crop": np.stack([ramp + j for j in range(n)]),
    }
    for name in EHR_FEATURES:
        group[name] = np.array([None] * n, object)
    return group


def test_sampled_targets_draw_orientations_and_rotate_crops_to_match():
    """Guards sample_targets(augment=True): one orientation per trajectory per draw,
    applied to every exam (priors, baseline, target latents from `latent_d8`) and to the
    crops (rotated to the same orientation); augment=False keeps the crops as ingested."""
    rows = [make_trajectory(nodule_group([0, 365, 730, 1100], p), 3) for p in ("sub-a", "sub-b")]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    assert batch["latents"].shape == (2, 4, 8, 4, 8, 8)  # (rows, slots, V, c, h, w)
    stored = batch["crops"]
    seen = set()
    for epoch in range(20):
        ex = sample_targets(batch, np.random.default_rng([5, epoch]))
        for i in range(2):
            value = int(ex["baseline"][i, 0, 0, 0])
            exam, k = divmod(value, 10)
            seen.add(k)
            assert int(ex["target"][i, 0, 0, 0]) == 10 * (exam + 1) + k  # the next exam, same orientation
            priors = ex["prior_latents"][i, :, 0, 0, 0][ex["exam_mask"][i]].numpy().astype(int)
            assert (priors % 10 == k).all()
            baseline_crop, target_crop = (dihedral_orientation(stored[i, j], k) for j in (exam, exam + 1))
            np.testing.assert_array_equal(ex["baseline_crop"][i, 0].numpy(), baseline_crop)
            np.testing.assert_array_equal(ex["target_crop"][i, 0].numpy(), target_crop)
            np.testing.assert_array_equal(ex["prior_crops"][i, exam, 0].numpy(), baseline_crop)
    assert len(seen) >= 6, seen  # 40 draws of 8 orientations
    plain = sample_targets(batch, np.random.default_rng(0), augment=False)
    assert (plain["baseline"][:, 0, 0, 0].numpy().astype(int) % 10 == 0).all()
    exam = plain["baseline"][:, 0, 0, 0].numpy().astype(int) // 10
    np.testing.assert_array_equal(plain["baseline_crop"][:, 0].numpy(), stored[np.arange(2), exam])
