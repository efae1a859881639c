import pytest

from cohortcast.config import PrivacyConfig, SplitConfig
from cohortcast.data.privacy import DEVELOPMENT_SECRET, MissingSecretError, Pseudonymizer, resolve_secret
from cohortcast.data.split import assign_split


def test_pseudonyms_are_keyed_stable_and_namespaced():
    a, b = Pseudonymizer("secret-a"), Pseudonymizer("secret-b")
    assert a("MRN123") == a("MRN123")
    assert a("MRN123") != b("MRN123")  # depends on the secret, not only the id
    assert a("MRN123") != a("MRN124")
    assert a("X", kind="patient") != a("X", kind="study")
    assert "MRN123" not in a("MRN123") and "secret" not in repr(a)
    assert len(a("MRN123")) == len("sub-") + 16


def test_secret_resolution(monkeypatch):
    monkeypatch.setenv("MY_SECRET", "from-env")
    assert resolve_secret(PrivacyConfig(secret_env="MY_SECRET", secret="from-file")) == "from-env"
    monkeypatch.delenv("MY_SECRET")
    assert resolve_secret(PrivacyConfig(secret_env="MY_SECRET", secret="from-file")) == "from-file"
    assert resolve_secret(PrivacyConfig(secret_env="MY_SECRET")) == DEVELOPMENT_SECRET
    with pytest.raises(MissingSecretError):
        resolve_secret(PrivacyConfig(secret_env="MY_SECRET", require_secret=True))


def test_split_is_deterministic_and_proportional():
    cfg = SplitConfig(train=0.6, val=0.2, test=0.2, seed=3)
    ids = [f"sub-{i:05d}" for i in range(5000)]
    first = [assign_split(i, cfg) for i in ids]
    assert first == [assign_split(i, cfg) for i in ids]
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(first.count(split) / len(ids) - frac) < 0.03
    reseeded = [assign_split(i, SplitConfig(train=0.6, val=0.2, test=0.2, seed=4)) for i in ids]
    assert reseeded != first
