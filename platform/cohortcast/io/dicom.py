"""Write a Volume as a real single-frame CT DICOM series (one file per slice), the
layout scanners and PACS export and viewers open. The identity is the caller's: the
synthetic cohort writes synthetic identifiers on purpose (they are what the privacy
tests look for downstream); forecasts write pseudonyms only."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

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
    return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])


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
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID = ident.patient_name, ident.patient_id
        ds.PatientBirthDate = ident.birth_date.strftime("%Y%m%d") if ident.birth_date else ""
        ds.PatientSex = ident.sex
        ds.AccessionNumber, ds.InstitutionName = ident.accession, ident.institution
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ident.study_date.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = "090000"
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", ident.manufacturer, "CHEST"
        ds.SeriesDescription, ds.ImageType = ident.series_description, list(ident.image_type)
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
