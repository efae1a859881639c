"""Stage skip markers and the job summary's loss figures (no Ray)."""

from cohortcast.config.training import StageConfig
from cohortcast.io import stage_outputs as outputs
from cohortcast.pipeline.namd import NAMDReport, format_report
from cohortcast.training.stage_runner import StageReport, loss_ends


def test_stage_key_changes_with_any_input():
    base = outputs.stage_key("vae", StageConfig(), "fingerprint-a", 2)
    assert base == outputs.stage_key("vae", StageConfig(), "fingerprint-a", 2)
    assert base != outputs.stage_key("vae", StageConfig(max_steps=21), "fingerprint-a", 2)
    assert base != outputs.stage_key("vae", StageConfig(), "fingerprint-b", 2)
    assert base != outputs.stage_key("vae", StageConfig(), "fingerprint-a", 4)


def test_marker_makes_a_stage_valid_only_for_its_key(tmp_path):
    folder = tmp_path / "vae"
    assert not outputs.is_valid(folder, "k1")  # nothing there
    folder.mkdir()
    (folder / "vae.safetensors").write_bytes(b"half-written")  # an export without a marker
    assert not outputs.is_valid(folder, "k1")
    outputs.write_marker(folder, "k1", {"last_loss": 0.5})
    assert outputs.is_valid(folder, "k1") and not outputs.is_valid(folder, "k2")
    assert outputs.read_marker(folder)["last_loss"] == 0.5
    outputs.invalidate(folder)
    assert not outputs.is_valid(folder, "k1")


def test_loss_ends_average_quarters_and_the_report_shows_them():
    assert loss_ends([4.0, 3.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0]) == (3.5, 0.0)
    assert loss_ends([2.0]) == (2.0, 2.0)
    text = format_report(
        NAMDReport(
            [StageReport("vae", "trained", "/x", 12.0, 3.5, 0.25, {"val/reconstruction_l1": 0.125})],
            "/f",
            "MLflow: here",
            "r1",
        )
    )
    assert "3.5000 -> 0.2500" in text and "reconstruction_l1 0.1250" in text and "MLflow: here" in text
