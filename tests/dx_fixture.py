"""A real DX DICOM file written with pydicom the way projection radiographs come from
detectors: ImagerPixelSpacing, PatientOrientation, no ImageOrientationPatient or
ImagePositionPatient, uint16 pixels with a rescale. Shared by the radiograph and the
hostile-ingestion tests (independent of the synthetic cohort's own DX writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

_KEEP = object()  # write the default value


def write_dx(
    path: Path,
    stored: np.ndarray,
    imager_spacing=(0.5, 0.6),
    patient_orientation=_KEEP,
    photometric: str = "MONOCHROME2",
    slope: float = 2.0,
    intercept: float = -100.0,
) -> Path:
    """(rows, columns) uint16 stored values -> a single-frame DX file. `None` leaves a
    geometry element out; PatientOrientation defaults to ["L", "F"] (a PA chest film as
    displayed: along a row to the patient's left, down a column to the feet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = pydicom.uid.generate_uid(entropy_srcs=[str(path.name), "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, sop_uid
    ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(path.name), "study"])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(path.name), "series"])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Film^Dx", "DX-MRN-001", "19500101"
    ds.AccessionNumber, ds.InstitutionName = "ACC-DX", "Radiograph Inst"
    ds.StudyDate = "20040506"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [float(v) for v in imager_spacing]
    orientation = ["L", "F"] if patient_orientation is _KEEP else patient_orientation
    if orientation is not None:
        ds.PatientOrientation = orientation
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = np.ascontiguousarray(stored, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def film(rows: int = 120, cols: int = 96, markers=(), seed: int = 0) -> np.ndarray:
    """A noisy mid-grey film with bright 5 x 5 markers centred at (row, col) pixels."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(900, 1100, size=(rows, cols)).astype(np.uint16)
    for r, c in markers:
        stored[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = 8000
    return stored
