"""The study latent cache without Ray: the actor's columns and token shapes for volumes
and radiographs, the key that decides reuse (encoder weights, encoder config, ingestion
fingerprint), and reuse vs rebuild. tests/test_cldm_job.py builds and reuses one on a
Ray Data actor pool."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cohortcast.config.cldm import EncoderConfig
from cohortcast.errors import MissingInputError
from cohortcast.inference.latent_cache import reuse_or_build
from cohortcast.inference.study_latent_cache import KEEP, StudyTokenEncoder, cache_key
from cohortcast.models.universal_encoder import UniversalEncoder

TINY = dict(dim=32, depth=1, heads=2, decoder_dim=16, decoder_heads=2, patch_2d=(4, 4), patch_3d=(2, 4, 4))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster on 2 shared cores."""


@pytest.fixture
def encoder_folder(tmp_path):
    torch.manual_seed(0)
    UniversalEncoder(EncoderConfig(**TINY)).save(tmp_path / "encoder")
    return tmp_path / "encoder"


def _rows(n: int, dims: int) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands the actor: ingested study rows, both image columns."""
    rng = np.random.default_rng(dims)
    batch = {k: np.asarray([f"{k}-{i}" for i in range(n)]) for k in KEEP}
    batch.update(dims=np.full(n, dims, np.int8), num_exams=np.full(n, 2), has_mask=np.ones(n, bool))
    batch["volume"] = rng.uniform(-1, 1, (n, 4, 8, 8)).astype(np.float32)
    batch["radiograph"] = rng.uniform(-1, 1, (n, 8, 12)).astype(np.float32)
    batch["mask"] = np.zeros((n, 4, 8, 8), np.uint8)  # an ingested column the cache does not carry
    return batch


@pytest.mark.parametrize("dims, tokens", [(3, 2 * 2 * 2), (2, 2 * 3)])
def test_actor_writes_cls_and_tokens_of_each_study(encoder_folder, dims, tokens):
    batch = _rows(3, dims)
    out = StudyTokenEncoder(str(encoder_folder), dims)(dict(batch))
    assert set(out) == set(KEEP) | {"cls", "tokens"}  # ids, dates, measures; no image, no mask
    assert out["cls"].shape == (3, 32) and out["tokens"].shape == (3, tokens, 32)
    assert out["cls"].dtype == out["tokens"].dtype == np.float32
    np.testing.assert_array_equal(out["study"], batch["study"])
    column = "volume" if dims == 3 else "radiograph"
    with torch.no_grad():
        expected = UniversalEncoder.load(encoder_folder).tokens(torch.from_numpy(batch[column][:, None]))
    np.testing.assert_allclose(out["cls"], expected[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["tokens"], expected[:, 1:].numpy(), rtol=1e-5, atol=1e-5)


def _ingested(path, fingerprint: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "card.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return path


def test_key_follows_the_encoder_weights_its_config_and_the_ingested_data(encoder_folder, tmp_path):
    data_a, data_b = _ingested(tmp_path / "a", "fp-a"), _ingested(tmp_path / "b", "fp-b")
    key = cache_key(encoder_folder, data_a)
    assert key == cache_key(encoder_folder, data_a) and len(key) == 16
    assert cache_key(encoder_folder, data_b) != key  # re-ingested data
    retrained = UniversalEncoder.load(encoder_folder)
    with torch.no_grad():
        retrained.cls_token.add_(0.01)
    retrained.save(tmp_path / "retrained")
    assert cache_key(tmp_path / "retrained", data_a) != key
    config = json.loads((encoder_folder / "config.json").read_text())
    (encoder_folder / "config.json").write_text(json.dumps({**config, "mask_ratio": 0.5}))
    assert cache_key(encoder_folder, data_a) != key  # same weights, another config
    with pytest.raises(MissingInputError, match="not a saved universal encoder"):
        cache_key(tmp_path / "a", data_a)


def test_a_complete_cache_is_reused_and_anything_else_rebuilt(tmp_path):
    built = []

    def build(tmp):
        built.append(tmp)
        (tmp / "studies").mkdir()
        return {"key": "k", "rows": {"3": 2}}

    first = reuse_or_build(tmp_path / "latents-k", build)
    assert not first["reused"] and first["rows"] == {"3": 2} and (tmp_path / "latents-k" / "studies").is_dir()
    again = reuse_or_build(tmp_path / "latents-k", build)
    assert again["reused"] and again["path"] == first["path"] and len(built) == 1

    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # leaves no half-written cache that would look complete
        reuse_or_build(tmp_path / "latents-j", interrupted)
    assert not (tmp_path / "latents-j").exists()
    assert not reuse_or_build(tmp_path / "latents-j", build)["reused"] and len(built) == 2
