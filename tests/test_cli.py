"""The `cohortcast` command: help everywhere, clear errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

from cohortcast.cli import build_parser, main


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"cohortcast {name} {action.option_strings or action.dest} has no help"


def test_console_script_help_runs():
    # `pip install -e .` must have put the `cohortcast` command next to this Python.
    script = Path(sys.executable).parent / "cohortcast"
    assert script.exists(), "console script missing: reinstall with pip install -e ."
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("synth", "ingest", "validate-manifest", "config"):
        assert command in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "cohortcast", "ingest", "--help"], capture_output=True, text=True, check=True
    )
    assert "--set KEY=VALUE" in out.stdout


def test_bad_override_is_a_clear_error(capsys):
    assert main(["config", "--set", "ingest.crop_size=big"]) == 2
    assert "ingest.crop_size: expected an integer, got 'big'" in capsys.readouterr().err


def test_config_flat_shows_overrides(capsys):
    assert main(["config", "--flat", "--set", "synth.patients=3"]) == 0
    assert '"synth.patients": 3' in capsys.readouterr().out


def test_validate_manifest(tiny_cohort, tmp_path, capsys):
    assert main(["validate-manifest", str(tiny_cohort)]) == 0
    assert "manifest OK: 4 patients" in capsys.readouterr().out
    assert main(["validate-manifest", str(tmp_path / "nope")]) == 2
    assert "manifest folder does not exist" in capsys.readouterr().err


def test_synth_command(tmp_path, capsys):
    args = [
        "synth",
        "--patients",
        "1",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "c"),
        "--set",
        "synth.image_size=32",
        "--set",
        "synth.num_slices=8",
        "--set",
        "synth.min_exams=2",
        "--set",
        "synth.max_exams=2",
    ]
    assert main(args) == 0
    assert "patients 1, studies 2" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite without --overwrite
    assert "already exists" in capsys.readouterr().err


def one_line(err: str) -> str:
    """A user error is exactly one line on stderr (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_serve_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    """Checked before Ray starts: a wrong path or a missing token is one line, exit 2."""
    assert main(["serve", "--forecaster", str(tmp_path / "missing")]) == 2
    assert "serve.forecaster" in one_line(capsys.readouterr().err)
    (tmp_path / "model").mkdir()
    model = ["serve", "--forecaster", str(tmp_path / "model")]
    monkeypatch.delenv("COHORTCAST_NO_SUCH_TOKEN", raising=False)
    assert main(model + ["--set", "serve.auth_token_env=COHORTCAST_NO_SUCH_TOKEN"]) == 2
    assert "COHORTCAST_NO_SUCH_TOKEN" in one_line(capsys.readouterr().err)
    assert main(model + ["--evaluator", str(tmp_path / "no-evaluator")]) == 2
    assert "serve.evaluator" in one_line(capsys.readouterr().err)
    (tmp_path / "cldm" / "encoder").mkdir(parents=True)
    assert main(model + ["--cldm-model", str(tmp_path / "cldm")]) == 2
    assert "serve.cldm_model" in (line := one_line(capsys.readouterr().err)) and "diffusion/" in line
    assert main(model + ["--set", f"serve.cohort_roots=[{tmp_path / 'nowhere'}]"]) == 2
    assert "serve.cohort_roots[0]" in one_line(capsys.readouterr().err)
    assert main(model + ["--set", "serve.max_voxels=0"]) == 2
    assert "max_voxels" in one_line(capsys.readouterr().err)


def test_cldm_forecast_user_errors_exit_2_with_one_line(tmp_path, capsys):
    """Checked before Ray starts: no ingested cohort, then no CLDM model."""
    args = ["forecast", "--job", "cldm", "--ingested", str(tmp_path / "ingested"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "card.json" in one_line(capsys.readouterr().err)
    (tmp_path / "ingested").mkdir()
    (tmp_path / "ingested" / "card.json").write_text("{}")
    assert main(args + ["--forecaster", str(tmp_path / "no-model")]) == 2
    assert "not a CLDM training output" in one_line(capsys.readouterr().err)


def test_missing_pseudonym_secret_exits_2_with_one_line(tiny_cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COHORTCAST_PSEUDONYM_SECRET", raising=False)
    args = [
        "ingest",
        "--manifest",
        str(tiny_cohort),
        "--out",
        str(tmp_path / "out"),
        "--set",
        "privacy.require_secret=true",
    ]
    assert main(args) == 2
    assert "COHORTCAST_PSEUDONYM_SECRET" in one_line(capsys.readouterr().err)
