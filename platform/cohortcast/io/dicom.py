"""Write a Volume as a real single-frame CT DICOM series (one file per slice), the
layout scanners and PACS export and viewers open, and a chest radiograph as one DX
file. The identity is the caller's: the synthetic cohort writes synthetic identifiers on
purpose (they are what the privacy tests look for downstream); forecasts write
pseudonyms only."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from cohortcast.io.volume import Volume


@dataclass
class DicomIdentity:
    patient_name: str
    patient_id: str
    birth_date: dt.date | None
    sex: str  # "M" | "F" | "O" (unknown)
    accession: str
    institution: str
    study_date: dt.date
    uid_seed: str  # makes every UID deterministic for a given cohort seed
    series_description: str = "Synthetic low-dose chest CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    manufacturer: str = "cohortcast-synth"


def _uid(*parts: object) -> str:
    """A UUID-derived UID (2.25.<128-bit integer>, PS3.5 B.2) hashed from `parts`, so a
    cohort written twice with the same seed has the same UIDs. pydicom's
    generate_uid(prefix=None, entropy_srcs=...) ignores the entropy and returns a random
    UUID, which made every synthetic cohort's UIDs differ from run to run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _dataset(sop_class: str, sop_uid: str, ident: DicomIdentity, modality: str) -> pydicom.Dataset:
    """File meta + SOP identity + the patient/study identity every object carries."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID = ident.patient_name, ident.patient_id
    ds.PatientBirthDate = ident.birth_date.strftime("%Y%m%d") if ident.birth_date else ""
    ds.PatientSex = ident.sex
    ds.AccessionNumber, ds.InstitutionName = ident.accession, ident.institution
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ident.study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = "090000"
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = modality, ident.manufacturer, "CHEST"
    ds.SeriesDescription, ds.ImageType = ident.series_description, list(ident.image_type)
    return ds


def write_ct_series(volume: Volume, folder: Path, ident: DicomIdentity) -> None:
    """(Z, Y, X) HU volume -> folder/IM0000.dcm ... stored as uint16 with intercept -1024."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = _uid(ident.uid_seed, "study"), _uid(ident.uid_seed, "series")
    frame_uid = _uid(ident.patient_id, "frame")
    stored = np.clip(np.rint(volume.array + 1024.0), 0, 4095).astype(np.uint16)
    spacing = volume.spacing
    orientation = list(np.concatenate([volume.direction[:, 0], volume.direction[:, 1]]))
    for k in range(volume.shape[0]):
        sop_uid = _uid(ident.uid_seed, "sop", k)
        ds = _dataset(CTImageStorage, sop_uid, ident, "CT")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.KVP = 1, k + 1, 120
        ds.ImagePositionPatient = [float(v) for v in volume.voxel_to_world([0, 0, k])[0]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (row, column) spacing
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def write_dx_image(pixels: np.ndarray, path: Path, ident: DicomIdentity, pixel_mm: tuple[float, float]) -> None:
    """A chest radiograph as one single-frame DX (For Presentation) file. `pixels`: (rows,
    cols) uint16, 12 bits stored, brighter = more attenuation (MONOCHROME2), rows from head
    to feet and columns from the patient's right to left: PatientOrientation ["L", "F"].
    Like a real projection radiograph it has ImagerPixelSpacing (row, column mm at the
    detector) and no ImageOrientationPatient/ImagePositionPatient."""
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ValueError(f"write_dx_image: expected a 2D uint16 image, got {pixels.dtype} {pixels.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = _uid(ident.uid_seed, "sop", 0)
    ds = _dataset(DigitalXRayImageStorageForPresentation, sop_uid, ident, "DX")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(ident.uid_seed, "study"), _uid(ident.uid_seed, "series")
    ds.SeriesNumber, ds.InstanceNumber, ds.KVP = 1, 1, 110
    ds.PresentationIntentType, ds.ViewPosition = "FOR PRESENTATION", "AP"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [float(pixel_mm[0]), float(pixel_mm[1])]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    # Log image, higher values = less X-ray intensity at the detector.
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
