"""Stage b: the latent cache is built by a Ray Data actor pool, reused for the same
VAE and data, rebuilt for a changed VAE."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cohortcast.config.models import VAEConfig
from cohortcast.inference.latent_cache import build_latent_cache
from cohortcast.models.vae import NoduleVAE, load_vae, save_vae

pytestmark = pytest.mark.ray


def test_cache_matches_direct_encoding_reuses_and_rebuilds(tiny_ingested, tmp_path):
    torch.manual_seed(0)
    vae_a = NoduleVAE(VAEConfig())
    vae_a.set_scaling_factor(1.0)  # computed by the VAE stage's export in a real run
    save_vae(vae_a, tmp_path / "vae-a")
    first = build_latent_cache(tiny_ingested, tmp_path / "vae-a", tmp_path / "cache", actors=2, batch_size=4)
    assert not first["reused"]
    table = pq.read_table(first["path"] + "/nodules").to_pandas()
    ingested = pq.read_table(tiny_ingested / "nodules").to_pandas()
    assert len(table) == first["rows"] == len(ingested) and "patch" not in table.columns
    row = table.iloc[0]
    vae = load_vae(tmp_path / "vae-a")
    expected = vae.encode_for_diffusion(torch.from_numpy(np.asarray(row["crop"], np.float32))[None, None])[0]
    np.testing.assert_allclose(np.asarray(row["latent"]), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert np.asarray(row["latent"]).shape == (4, 8, 8)  # factor-4 default VAE, 32 px crops
    views = np.asarray(row["latent_d8"])  # the 8 orientations (rotation augmentation); 0 = as ingested
    assert views.shape == (8, 4, 8, 8)
    np.testing.assert_array_equal(views[0], np.asarray(row["latent"]))

    again = build_latent_cache(tiny_ingested, tmp_path / "vae-a", tmp_path / "cache")
    assert again["reused"] and again["path"] == first["path"]

    with torch.no_grad():
        vae.probe.weight.add_(1.0)  # a "retrained" VAE
    save_vae(vae, tmp_path / "vae-b")
    rebuilt = build_latent_cache(tiny_ingested, tmp_path / "vae-b", tmp_path / "cache", actors=1)
    assert not rebuilt["reused"] and rebuilt["path"] != first["path"]

    vae.set_scaling_factor(2.0)  # same weights, another scale (vae.json): other latents
    save_vae(vae, tmp_path / "vae-c")
    rescaled = build_latent_cache(tiny_ingested, tmp_path / "vae-c", tmp_path / "cache", actors=1)
    assert not rescaled["reused"] and rescaled["path"] not in (first["path"], rebuilt["path"])
