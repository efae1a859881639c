"""The universal 2D/3D encoder (models/universal_encoder.py): shapes, one transformer for
both dimensionalities, reproducible masking, a MIM loss that trains, clear input errors,
the `unimiss` flavour's size, local weights that load only when they fit exactly, and a
few pinned numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cohortcast.config import ConfigError, load_config
from cohortcast.config.cldm import EncoderConfig, encoder_flavor, unimiss_encoder
from cohortcast.errors import CohortcastError, MissingInputError
from cohortcast.models.errors import EncoderInputError, PretrainedWeightsError
from cohortcast.models.universal_encoder import UniversalEncoder, load_pretrained, random_patch_mask

# ViT-B/16 blocks (85,054,464) + [CLS] + final norm; patch embeddings 16x16 (2D) and
# 8x16x16 (3D); MAE's 512-wide 8-block decoder with its mask token, two prediction heads.
UNIMISS_PARAMS = 111_905_792
UNIMISS_ENCODER_PARAMS = 86_985_984  # without the MIM decoder: what the latent cache runs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster on 2 shared cores and fixes the last bits."""


def smooth(shape: tuple[int, ...], seed: int, cells: int = 4) -> torch.Tensor:
    """Images/volumes with structure a neighbour can predict: coarse noise upsampled."""
    coarse = torch.rand(
        shape[:2] + tuple(max(s // cells, 1) for s in shape[2:]), generator=torch.Generator().manual_seed(seed)
    )
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    return F.interpolate(coarse * 2 - 1, size=shape[2:], mode=mode, align_corners=False)


def model(seed: int = 0, **kw) -> UniversalEncoder:
    torch.manual_seed(seed)
    return UniversalEncoder(EncoderConfig(**kw))


def test_2d_and_3d_inputs_give_cls_first_tokens():
    enc = model()
    image, volume = torch.randn(2, 1, 64, 64), torch.randn(3, 1, 16, 32, 32)
    assert enc.tokens(image).shape == (2, 1 + 8 * 8, 64)  # 64 / 8 per side
    assert enc.tokens(volume).shape == (3, 1 + 4 * 4 * 4, 64)  # (16, 32, 32) / (4, 8, 8)
    assert enc.embed(image).shape == (2, 64) and enc.embed(volume).shape == (3, 64)
    torch.testing.assert_close(enc.embed(volume), enc.tokens(volume)[:, 0])
    # Fixed sin-cos positions: any multiple of the patch, not only the configured size.
    assert enc.tokens(torch.randn(1, 1, 32, 48)).shape == (1, 1 + 4 * 6, 64)
    assert enc.tokens(torch.randn(1, 1, 8, 16, 8)).shape == (1, 1 + 2 * 2 * 1, 64)


def test_one_transformer_serves_both_dimensionalities():
    enc = model()
    image, volume = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 16, 32, 32)
    assert enc.patch_embed_2d is not enc.patch_embed_3d
    assert enc.patch_embed_2d.proj.weight.shape == (64, 1, 8, 8)
    assert enc.patch_embed_3d.proj.weight.shape == (64, 1, 4, 8, 8)
    # Only the patch embeddings and the MIM heads are per dimensionality.
    per_dims = {n.split(".")[0] for n, _ in enc.named_parameters() if "_2d" in n or "_3d" in n}
    assert per_dims == {"patch_embed_2d", "patch_embed_3d", "decoder_pred_2d", "decoder_pred_3d"}
    with torch.no_grad():
        before = enc.embed(image), enc.embed(volume)
        enc.blocks[1].mlp[0].weight.add_(0.05 * torch.randn_like(enc.blocks[1].mlp[0].weight))
        after = enc.embed(image), enc.embed(volume)
    assert (after[0] - before[0]).abs().max() > 1e-3
    assert (after[1] - before[1]).abs().max() > 1e-3
    with torch.no_grad():  # the 3D embedding does not touch 2D outputs
        enc.patch_embed_3d.proj.weight.mul_(2.0)
        torch.testing.assert_close(enc.embed(image), after[0])


def test_masking_is_per_sample_and_reproducible_with_a_generator():
    ids, mask, restore = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(3), "cpu")
    assert ids.shape == (4, 16) and mask.shape == (4, 64) and (mask.sum(1) == 48).all()
    assert all(not mask[i, ids[i]].any() for i in range(4))  # the kept patches are the unmasked ones
    assert not torch.equal(mask[0], mask[1])  # each sample its own mask
    again = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(mask, again[1]) and torch.equal(ids, again[0]) and torch.equal(restore, again[2])
    other = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(4), "cpu")[1]
    assert not torch.equal(mask, other)
    # At least one patch visible and one masked, whatever the ratio.
    assert random_patch_mask(2, 4, 0.99, None, "cpu")[0].shape == (2, 1)

    enc, volume = model(), smooth((2, 1, 16, 32, 32), 0)
    same = [enc.mim_loss(volume, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same[0].ndim == 0 and torch.equal(same[0], same[1])
    assert not torch.equal(same[0], enc.mim_loss(volume, torch.Generator().manual_seed(8)))


def test_mim_loss_falls_on_a_fixed_mixed_batch():
    """40 Adam steps, each on the same 2D and 3D batches with fresh (seeded) masks: the
    model learns to fill in patches it did not see, not one fixed mask."""
    enc = model()
    images, volumes = smooth((4, 1, 64, 64), 1), smooth((2, 1, 16, 32, 32), 2)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    eval_gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731 the same masks before and after
    with torch.no_grad():
        start = enc.mim_loss(images, eval_gen()) + enc.mim_loss(volumes, eval_gen())
    for _ in range(40):
        loss = enc.mim_loss(images, gen) + enc.mim_loss(volumes, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = enc.mim_loss(images, eval_gen()) + enc.mim_loss(volumes, eval_gen())
    assert end < 0.6 * start, (float(start), float(end))


def test_reconstruct_keeps_visible_patches_and_zeroes_masked_ones():
    enc, image = model(), smooth((2, 1, 64, 64), 5)
    hidden, filled = enc.reconstruct(image, torch.Generator().manual_seed(0))
    assert hidden.shape == filled.shape == image.shape
    shown = hidden != 0
    assert 0.2 < shown.float().mean() < 0.3  # 16 of 64 patches visible
    torch.testing.assert_close(filled[shown], image[shown])  # visible pixels copied
    assert not torch.allclose(filled[~shown], image[~shown])  # masked ones predicted
    assert enc.reconstruct(smooth((1, 1, 16, 32, 32), 6))[1].shape == (1, 1, 16, 32, 32)


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((2, 64, 64), "rank 3"),
        ((2, 1, 30, 64), "H = 30 is not a multiple of 8"),
        ((2, 1, 16, 32, 36), "W = 36 is not a multiple of 8"),
        ((2, 1, 10, 32, 32), "D = 10 is not a multiple of 4"),
        ((2, 3, 64, 64), "got 3 channels"),
        ((1, 1, 2, 8, 8, 8), "rank 6"),
    ],
)
def test_bad_shapes_name_the_expected_ones(shape, fragment):
    enc = model()
    with pytest.raises(EncoderInputError) as err:
        enc.tokens(torch.zeros(shape))
    message = str(err.value)
    assert fragment in message and isinstance(err.value, CohortcastError)
    assert "(B, 1, H, W)" in message and "(B, 1, D, H, W)" in message and "(B, 1, 64, 64)" in message
    with pytest.raises(EncoderInputError, match=fragment):
        enc.mim_loss(torch.zeros(shape))


def test_the_unimiss_flavour_is_d768_and_builds_on_the_meta_device():
    cfg = load_config(None, ["cldm.encoder.flavor=unimiss", "cldm.encoder.mask_ratio=0.6"]).cldm.encoder
    assert cfg == replace(unimiss_encoder(), mask_ratio=0.6)  # the key given beats the flavour
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch_2d, cfg.image_2d) == (768, 12, 12, (16, 16), (224, 224))
    assert load_config().cldm.encoder == encoder_flavor("debug") == EncoderConfig()
    with pytest.raises(ConfigError, match="cldm.encoder.flavor: unknown flavour 'unimis' \\(did you mean 'unimiss'"):
        load_config(None, ["cldm.encoder.flavor=unimis"])
    with torch.device("meta"):  # no memory: 112 M parameters
        enc = UniversalEncoder(cfg)
    count = sum(p.numel() for p in enc.parameters())
    decoder = sum(p.numel() for n, p in enc.named_parameters() if n.startswith(("decoder", "mask_token")))
    assert (count, count - decoder) == (UNIMISS_PARAMS, UNIMISS_ENCODER_PARAMS)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("cldm.encoder.heads=5", "cldm.encoder.dim: 64 is not divisible by 5 heads"),
        ("cldm.encoder.image_2d=[60, 64]", "cldm.encoder.image_2d: [60, 64] must be a multiple of the patch [8, 8]"),
        ("cldm.encoder.mask_ratio=1.0", "cldm.encoder.mask_ratio: must be in (0, 1)"),
        ("cldm.encoder.dim=63", "cldm.encoder.dim: must be an even number"),
    ],
)
def test_config_errors_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def _outputs(enc):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    image, volume = smooth((1, 1, 64, 64), 8), smooth((1, 1, 16, 32, 32), 9)
    with torch.no_grad():
        return enc.tokens(image), enc.tokens(volume), enc.mim_loss(image, g()), enc.mim_loss(volume, g())


def test_save_load_and_pretrained_path_round_trip(tmp_path):
    enc = model(seed=1)
    enc.save(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "weights.safetensors"]
    loaded = UniversalEncoder.load(tmp_path / "enc")
    assert loaded.cfg == enc.cfg and not loaded.training
    for a, b in zip(_outputs(enc), _outputs(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # pretrained_path: the folder, or a bare state-dict file (a DDP "module." prefix is fine)
    from_folder = UniversalEncoder(EncoderConfig(pretrained_path=str(tmp_path / "enc")))
    torch.save({"module." + k: v for k, v in enc.state_dict().items()}, tmp_path / "ddp.pt")
    from_file = UniversalEncoder(EncoderConfig(pretrained_path=str(tmp_path / "ddp.pt")))
    for other in (from_folder, from_file):
        torch.testing.assert_close(_outputs(other)[0], _outputs(enc)[0], rtol=0, atol=0)
    # Input sizes and the mask ratio do not shape the weights: they may differ.
    load_pretrained(model(image_2d=(32, 32), mask_ratio=0.5), tmp_path / "enc")


def test_mismatched_weights_are_refused_with_every_bad_key_listed(tmp_path):
    enc = model()
    state = enc.state_dict()
    state.pop("blocks.1.attn.proj.bias")
    state["blocks.2.norm1.weight"] = torch.ones(64)
    state["patch_embed_3d.proj.weight"] = torch.zeros(64, 1, 2, 8, 8)
    torch.save(state, tmp_path / "bad.pt")
    fresh = model(seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(fresh, tmp_path / "bad.pt")
    message = str(err.value)
    assert "1 missing: blocks.1.attn.proj.bias" in message
    assert "1 unexpected: blocks.2.norm1.weight" in message
    assert "1 wrongly shaped: patch_embed_3d.proj.weight (weights (64, 1, 2, 8, 8), model (64, 1, 4, 8, 8))" in message
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing half-loaded
    # one kind at a time, each refused on its own
    for broken in (
        {k: v for k, v in enc.state_dict().items() if k != "cls_token"},
        enc.state_dict() | {"extra": torch.zeros(1)},
        enc.state_dict() | {"norm.weight": torch.ones(65)},
    ):
        torch.save(broken, tmp_path / "one.pt")
        with pytest.raises(PretrainedWeightsError, match="do not fit this encoder"):
            load_pretrained(model(), tmp_path / "one.pt")
    # A saved folder of another architecture: the config fields that differ are named.
    model(depth=3).save(tmp_path / "deeper")
    with pytest.raises(PretrainedWeightsError, match="depth: weights 3, model 2"):
        UniversalEncoder(EncoderConfig(pretrained_path=str(tmp_path / "deeper")))
    with pytest.raises(MissingInputError, match="cldm.encoder.pretrained_path"):
        load_pretrained(model(), tmp_path / "nowhere")
    (tmp_path / "junk.pt").write_text("not weights")
    with pytest.raises(PretrainedWeightsError, match="cannot read weights"):
        load_pretrained(model(), tmp_path / "junk.pt")


# Golden values (see tests/test_golden_values.py): the debug encoder, seed 0, fixed inputs.
GOLDEN_CLS_2D = [0.0, 0.0, 0.0]
GOLDEN_CLS_3D = [0.0, 0.0, 0.0]
GOLDEN_MIM = [0.0, 0.0]  # 2D, 3D losses with generator seed 0


def golden() -> tuple[list[float], list[float], list[float]]:
    enc = model(seed=0)
    image = torch.rand((1, 1, 64, 64), generator=torch.Generator().manual_seed(11)) * 2 - 1
    volume = torch.rand((1, 1, 16, 32, 32), generator=torch.Generator().manual_seed(12)) * 2 - 1
    with torch.no_grad():
        losses = [float(enc.mim_loss(x, torch.Generator().manual_seed(0))) for x in (image, volume)]
        return enc.embed(image)[0, :3].tolist(), enc.embed(volume)[0, :3].tolist(), losses


def test_golden_values():
    cls_2d, cls_3d, losses = golden()
    assert cls_2d == pytest.approx(GOLDEN_CLS_2D, abs=1e-4)
    assert cls_3d == pytest.approx(GOLDEN_CLS_3D, abs=1e-4)
    assert losses == pytest.approx(GOLDEN_MIM, abs=1e-4)


if __name__ == "__main__":  # print the current values for the GOLDEN_* constants
    torch.set_num_threads(1)
    print(*(f"{[round(v, 7) for v in values]}" for values in golden()), sep="\n")
