"""The NAMD cohort is pinned bit for bit: the CLDM options (issue 15) draw their randomness
from new seed streams and are off by default, so today's `cohortcast synth` output must
not move. One hash covers the four manifest tables (content) and every image file
(NIfTI bytes after decompression, as the gzip header carries no content; DICOM data set
bytes with the UIDs blanked: until issue 15 write_ct_series' UIDs were random UUIDs at
every run, since pydicom's generate_uid ignores `entropy_srcs` when prefix is None; they
are now hashed from the seed (tests/test_readers.py checks that), but the digest was
taken before that fix).

After a deliberate change of the NAMD cohort, rerun `python tests/test_synthetic_namd_golden.py`
and paste the printed digest, saying in the commit why it moved."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from conftest import tiny_synth_config

from cohortcast.data.synthetic import generate_cohort

# Computed at c60ce47 (before issue 15), see the module docstring.
GOLDEN = "f46c5d21475053b47566576a619cedff62ddd9e7d2862e1f996275de27e1731d"


def _golden_config():
    # Both file kinds, fibrosis and none, 2-4 exams: every branch of the writer.
    return tiny_synth_config(patients=3, seed=3, image_size=32, num_slices=8, nifti_fraction=0.5, max_exams=4)


def _file_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            if elem.VR == "UI":
                elem.value = ""
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        return buffer.getvalue()
    return data


def cohort_digest(root: Path) -> tuple[str, dict[str, int]]:
    digest = hashlib.sha256()
    for name in ("patients", "studies", "findings", "labels"):
        frame = pd.read_parquet(root / f"{name}.parquet")
        digest.update(name.encode())
        digest.update(str(list(zip(frame.columns, map(str, frame.dtypes)))).encode())
        digest.update(frame.to_csv(index=False).encode())
    kinds: dict[str, int] = {}
    # synth.json records the config, which gains (default-valued) fields over time.
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".parquet", ".json")):
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode())
        digest.update(hashlib.sha256(_file_bytes(path)).digest())
        kind = "mask" if "mask" in path.name else ("nifti" if rel.endswith(".nii.gz") else "dicom")
        kinds[kind] = kinds.get(kind, 0) + 1
    return digest.hexdigest(), kinds


def test_default_cohort_is_bit_identical_to_before_cldm_options(tmp_path):
    generate_cohort(_golden_config(), tmp_path / "c", progress=False)
    digest, kinds = cohort_digest(tmp_path / "c")
    assert kinds.get("mask", 0) > 0 and kinds.get("nifti", 0) > 0 and kinds.get("dicom", 0) > 0, kinds
    assert digest == GOLDEN


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(_golden_config(), Path(tmp) / "c", progress=False)
        print(cohort_digest(Path(tmp) / "c"))
