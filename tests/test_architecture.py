"""Imports between cohortcast's sub-packages flow one way: the import-linter `layers`
contract in pyproject.toml ([tool.importlinter]) must hold. Run in a subprocess so the
package it analyses is the one under test (PYTHONPATH), not whatever is installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "cohortcast"


def lint_imports(source_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    command = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        "--config",
        str(ROOT / "pyproject.toml"),
        "--no-cache",
        "--no-logo",
    ]
    return subprocess.run(command, cwd=source_root, env=env, capture_output=True, text=True, timeout=300)


def test_sub_packages_import_downwards_only():
    result = lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_a_back_edge_inside_a_function(tmp_path):
    """The same check on a copy with one function-level import of a higher layer (models ->
    pipeline) must fail and name it: the contract is not vacuous."""
    copy = tmp_path / "cohortcast"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "models" / "sampler.py", "a") as fh:
        fh.write("\n\ndef _back_edge():\n    from cohortcast.pipeline.namd import NAMDJob\n\n    return NAMDJob\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "cohortcast.models.sampler -> cohortcast.pipeline.namd" in result.stdout
