"""The source-root layout must never shadow Python's stdlib `platform` module."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed():
    import platform

    assert not (ROOT / "platform" / "__init__.py").exists()
    assert callable(platform.system) and platform.system()
    assert "site-packages" in platform.__file__ or "lib/python" in platform.__file__


def test_package_imports_from_source_root():
    import cohortcast

    assert Path(cohortcast.__file__).resolve().parent == ROOT / "platform" / "cohortcast"
