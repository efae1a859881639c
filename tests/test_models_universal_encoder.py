"""The universal 2D/3D encoder (models/universal_encoder.py): shapes, one transformer for
both dimensionalities, reproducible masking, a MIM loss that trains, clear input errors,
the `unimiss` flavour's size, local weights that load only when they fit exactly, and a
few pinned numbers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cohortcast.config import ConfigError, load_config
from cohortcast.config.cldm import EncoderConfig, encoder_flavor, unimiss_encoder
from cohortcast.errors import CohortcastError, MissingInputError
from cohortcast.models.errors import EncoderInputError, PretrainedWeightsError
from cohortcast.models.universal_encoder import UniversalEncoder, load_pretrained, random_patch_mask
from cohortcast.models.vit import sincos_position_embedding

# Counted by hand (a block of width d: 12 d^2 + 13 d) and by the test below. `unimiss`:
# ViT-B/16 blocks 12 x 7,087,872 = 85,054,464, + [CLS] 768 + final norm 1,536 + patch
# embeddings 16x16 (197,376) and 8x16x16 (1,573,632) = 86,827,776; that is timm's
# vit_base_patch16_224 without its head (85,798,656) plus the 3D embedding, less its
# 3-channel 2D embedding's extra 393,216 and its learnt 197 x 768 position table (ours are
# fixed sin-cos). MAE's decoder (512 wide, 8 blocks; embed, mask token, norm, a 2D and a
# 3D head): 26,796,288.
UNIMISS_PARAMS = 113_624_064
UNIMISS_ENCODER_PARAMS = 86_827_776  # without the MIM decoder: what the latent cache runs
DEBUG_PARAMS, DEBUG_ENCODER_PARAMS = 146_208, 120_768


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


def bowls(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Paraboloids (x - c)^2 + ... with a random centre per sample: a masked patch's
    normalised pixels (a slope pointing away from the centre) follow from the visible
    patches only together with WHERE the patch is, so learning them needs the positions."""
    b, _, *spatial = shape
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij")
    centre = torch.rand(b, len(spatial), generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8
    bowl = sum((axis - centre[:, i].view(b, *[1] * len(spatial))) ** 2 for i, axis in enumerate(axes))
    return bowl[:, None]


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
    """50 Adam steps, each on the same 2D and 3D batches with fresh (seeded) masks: each
    dimensionality's loss, on masks it never trained on, ends far below both its start and
    what predicting every masked patch's mean scores ((P - 1) / P with MAE's unbiased
    per-patch variance: 0.98 for 64-pixel 2D patches, 0.996 for 256-pixel 3D ones). With
    the positions switched off it stays near that trivial score (measured: 0.91, 0.96)."""
    enc = model()
    images, volumes = bowls((4, 1, 64, 64), 1), bowls((2, 1, 16, 32, 32), 2)
    opt = torch.optim.Adam(enc.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def held_out() -> list[float]:  # the same unseen masks before and after
        with torch.no_grad():
            return [float(enc.mim_loss(x, torch.Generator().manual_seed(123))) for x in (images, volumes)]

    start = held_out()
    for _ in range(50):
        loss = enc.mim_loss(images, gen) + enc.mim_loss(volumes, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = held_out()
    for before, after in zip(start, end):  # measured: 1.68 -> 0.08 (2D), 1.25 -> 0.07 (3D)
        assert after < 0.3 and after < 0.2 * before, (start, end)


def test_each_dimensionality_trains_the_shared_blocks_and_only_its_own_embedding():
    enc = model()
    for x, own, other in (
        (bowls((2, 1, 64, 64), 3), "_2d", "_3d"),
        (bowls((2, 1, 16, 32, 32), 4), "_3d", "_2d"),
    ):
        enc.zero_grad(set_to_none=True)
        enc.mim_loss(x, torch.Generator().manual_seed(0)).backward()
        grads = {n: p.grad for n, p in enc.named_parameters()}
        assert all(grads[n] is None for n in grads if other in n)
        assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if own in n)
        # every shared encoder block weight gets a gradient from either kind of input
        shared = [n for n in grads if n.startswith("blocks.") and n.endswith("weight")]
        assert shared and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in shared)


# -- the reference: MAE (facebookresearch/mae, models_mae.py and util/pos_embed.py) ------


def mae_2d_sincos(width: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed (no [CLS] row), transcribed: its first half of the
    channels encodes the column (np.meshgrid(grid_w, grid_h)), its second the row."""
    half = width // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2.0))

    def one_d(pos):
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


def mae_forward_loss(enc: UniversalEncoder, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MAE's forward (randmask, forward_encoder, forward_decoder, forward_loss with
    norm_pix_loss), transcribed for one channel onto this encoder's modules, with MAE's own
    sin-cos positions and einsum patchify."""
    p, n, b = 8, (imgs.shape[-1] // 8) ** 2, imgs.shape[0]
    half = lambda w: torch.cat([mae_2d_sincos(w, 8)[:, w // 2 :], mae_2d_sincos(w, 8)[:, : w // 2]], 1)  # noqa: E731
    x = enc.patch_embed_2d(imgs) + half(enc.cfg.dim)
    len_keep = int(n * (1 - enc.cfg.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, x.shape[2]))
    mask = torch.ones(b, n)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([enc.cls_token.expand(b, -1, -1), x], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    x = enc.decoder_embed(enc.norm(x))
    x_ = torch.cat([x[:, 1:], enc.mask_token.repeat(b, n + 1 - x.shape[1], 1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1)
    x = x + torch.cat([torch.zeros(1, x.shape[2]), half(x.shape[2])])  # the [CLS] row is 0
    for blk in enc.decoder_blocks:
        x = blk(x)
    pred = enc.decoder_pred_2d(enc.decoder_norm(x))[:, 1:]
    h = imgs.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(b, 1, h, p, h, p)).reshape(b, h * h, p * p)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def test_2d_positions_and_mim_loss_match_mae():
    # Positions: MAE's 2D sin-cos with its two halves swapped (ours: rows first).
    ours = sincos_position_embedding((8, 8), 64)
    mae = mae_2d_sincos(64, 8)
    torch.testing.assert_close(ours, torch.cat([mae[:, 32:], mae[:, :32]], dim=1))
    # The whole loss: same masks (the noise our generator draws), same weights.
    enc, imgs = model(), smooth((3, 1, 64, 64), 13)
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = mae_forward_loss(enc, imgs, noise)
        got = enc.mim_loss(imgs, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Attention: ours (scaled_dot_product_attention) is torch's MultiheadAttention, whose
    # in_proj rows are laid out q, k, v as timm's qkv is.
    attn = enc.blocks[0].attn
    ref = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight), ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight), ref.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(2, 10, 64)
        torch.testing.assert_close(attn(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


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
    with torch.device("meta"):  # no memory: 114 M parameters
        enc = UniversalEncoder(cfg)
    assert sum(p.numel() for p in enc.blocks.parameters()) == 12 * (12 * 768**2 + 13 * 768) == 85_054_464
    for net, total, encoder in (
        (enc, UNIMISS_PARAMS, UNIMISS_ENCODER_PARAMS),
        (model(), DEBUG_PARAMS, DEBUG_ENCODER_PARAMS),
    ):
        count = sum(p.numel() for p in net.parameters())
        decoder = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("decoder", "mask_token")))
        assert (count, count - decoder) == (total, encoder)


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
    # The path the jobs take: the loaded config's cldm.encoder, then the constructor.
    cfg = load_config(None, [f"cldm.encoder.pretrained_path={tmp_path / 'enc'}", "cldm.encoder.mask_ratio=0.5"])
    from_config = UniversalEncoder(cfg.cldm.encoder)
    torch.testing.assert_close(from_config.tokens(smooth((1, 1, 64, 64), 8)), _outputs(enc)[0], rtol=0, atol=0)
    # Input sizes and the mask ratio do not shape the weights: they may differ.
    load_pretrained(model(image_2d=(32, 32), mask_ratio=0.5), tmp_path / "enc")


def test_load_refuses_a_config_that_does_not_fit_its_weights(tmp_path):
    model().save(tmp_path / "enc")
    config = tmp_path / "enc" / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps(saved | {"depth": 3}))  # weights of 2 blocks
    with pytest.raises(PretrainedWeightsError) as err:
        UniversalEncoder.load(tmp_path / "enc")
    assert "missing: blocks.2.norm1.weight" in str(err.value) and "(dim 64, depth 3," in str(err.value)
    config.write_text(json.dumps(saved | {"dim": 96}))
    with pytest.raises(PretrainedWeightsError) as err:
        UniversalEncoder.load(tmp_path / "enc")
    assert "32 wrongly shaped: blocks.0.attn.proj.bias (weights (64,), model (96,))" in str(err.value)
    assert str(err.value).endswith("... (20 more)")  # a long list is cut, with its count
    config.write_text(json.dumps(saved | {"depht": 3}))
    with pytest.raises(PretrainedWeightsError, match="not a readable encoder config"):
        UniversalEncoder.load(tmp_path / "enc")
    config.unlink()
    with pytest.raises(MissingInputError, match="no config.json"):
        UniversalEncoder.load(tmp_path / "enc")


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
    assert isinstance(err.value, CohortcastError) and str(tmp_path / "bad.pt") in message
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


# Golden values (see tests/test_golden_values.py): the debug encoder, seed 0, fixed inputs;
# printed by `python tests/test_models_universal_encoder.py` (CPU, float32, torch 2.13; the
# same on 1 and 2 threads). After a deliberate change of what the encoder computes, paste
# the new ones and say why in the commit.
GOLDEN_CLS_2D = [0.3413165, -0.0128475, 0.7246181]  # embed(image)[0, :3]
GOLDEN_CLS_3D = [0.4390215, -1.5129439, 0.2368326]  # embed(volume)[0, :3]
GOLDEN_MIM = [1.548535, 1.2481602]  # 2D, 3D mim_loss with generator seed 0


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
