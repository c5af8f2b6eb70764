"""File writers of the synthetic cohort: CT DICOM series, NIfTI volumes, atomic text files.

Every writer is atomic: it writes into a temporary sibling and renames it into place, so an interrupted
run never leaves a half-written series or table behind.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipelines.atomic import write_text_atomic

#: Root of the UIDs this generator makes (pydicom's organisational root, reserved for generated UIDs).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
#: Stored value = HU - RESCALE_INTERCEPT, as unsigned 16-bit (the common scanner convention).
RESCALE_INTERCEPT = -1024.0


@dataclass(frozen=True)
class StudyMeta:
    """Identifiers and acquisition facts of one synthetic study. Patient fields are fake but realistic,
    so that de-identification downstream has something to remove."""

    case_id: str
    patient_name: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # M / F
    accession_number: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    institution: str
    referring_physician: str
    study_uid: str
    series_uid: str
    frame_uid: str
    kvp: float
    contrast: bool

    @staticmethod
    def uid(*entropy: object) -> str:
        """A deterministic DICOM UID from the given values."""
        return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(e) for e in entropy])


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _publish_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    meta: StudyMeta,
) -> list[Path]:
    """Write a (Z, Y, X) HU volume as an axial CT series, one file per slice, into ``folder``.

    Geometry: ImageOrientationPatient (1,0,0,0,1,0) (rows along +x, columns along +y, LPS);
    ImagePositionPatient of slice k = origin + k * sz along +z; PixelSpacing = (sy, sx) as DICOM's
    (row spacing, column spacing). Pixels stored as unsigned 16-bit with RescaleSlope 1 and
    RescaleIntercept -1024, so HU = stored - 1024.
    """
    sz, sy, sx = (float(s) for s in spacing)
    ox, oy, oz = (float(o) for o in origin)
    nz, ny, nx = hu.shape
    stored = np.clip(np.rint(hu.astype(np.float32) - RESCALE_INTERCEPT), 0, 65535).astype(np.uint16)  # (Z, Y, X)
    tmp = _atomic_dir(folder)
    try:
        for k in range(nz):
            sop_uid = StudyMeta.uid(meta.series_uid, k)
            fm = FileMetaDataset()
            fm.MediaStorageSOPClassUID = CTImageStorage
            fm.MediaStorageSOPInstanceUID = sop_uid
            fm.TransferSyntaxUID = ExplicitVRLittleEndian
            fm.ImplementationClassUID = UID_PREFIX + "1"
            fm.ImplementationVersionName = "FVLM_SYNTH"
            ds = pydicom.Dataset()
            ds.file_meta = fm
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.Modality = "CT"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.Manufacturer = "fvlm-synth"
            ds.InstitutionName = meta.institution
            ds.ReferringPhysicianName = meta.referring_physician
            ds.PatientName = meta.patient_name
            ds.PatientID = meta.patient_id
            ds.PatientBirthDate = meta.birth_date
            ds.PatientSex = meta.sex
            ds.AccessionNumber = meta.accession_number
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = meta.study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = meta.study_time
            ds.StudyDescription = "CT CHEST ABDOMEN PELVIS" + (" WITH CONTRAST" if meta.contrast else "")
            ds.SeriesDescription = f"AXIAL {sz:g}mm"
            ds.StudyInstanceUID = meta.study_uid
            ds.SeriesInstanceUID = meta.series_uid
            ds.FrameOfReferenceUID = meta.frame_uid
            ds.StudyID = "1"
            ds.SeriesNumber = 2
            ds.InstanceNumber = k + 1
            ds.PatientPosition = "FFS"
            ds.BodyPartExamined = "CHEST"
            ds.KVP = f"{meta.kvp:g}"
            ds.ContrastBolusAgent = "IODINE" if meta.contrast else ""
            ds.SliceThickness = f"{sz:g}"
            ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{oz + k * sz:.4f}"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = f"{oz + k * sz:.4f}"
            ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
            ds.Rows, ds.Columns = ny, nx
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
            ds.PixelData = stored[k].tobytes()
            ds.save_as(tmp / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
        _publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(folder.glob("*.dcm"))


def to_sitk(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> sitk.Image:
    """A (Z, Y, X) array on the LPS grid (spacing (z, y, x), origin (x, y, z)) as a SimpleITK image."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> Path:
    """Write a (Z, Y, X) array as NIfTI with the given physical geometry, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(to_sitk(array, spacing, origin), tmp, useCompression=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV table atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return write_text_atomic(path, buf.getvalue())
