"""Synthetic DICOM files for the discovery and assembly tests: any geometry, per-slice rescale, any
transfer syntax, non-image objects (dose reports), with fake patient identifiers to check messages for.

Encoders: pydicom's own for RLE and JPEG 2000 (pylibjpeg-openjpeg); imagecodecs (libjpeg-turbo, CharLS)
for JPEG baseline, JPEG lossless and JPEG-LS, which pydicom cannot encode without further plugins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

#: Fake identifiers written into every file; no message, note or skip reason may contain them.
PHI = {"PatientName": "Doe^Jane", "PatientID": "PID9876543", "AccessionNumber": "ACC5550123"}
PHI_STRINGS = ("Doe", "Jane", "PID9876543", "ACC5550123")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


def new_uid() -> str:
    return uid.generate_uid(prefix="1.2.826.0.1.3680043.8.498.")


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def _base(sop_class: str, ts: str, study_uid: str, series_uid: str, modality: str) -> Dataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = new_uid()
    fm.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _encode(ds: Dataset, stored: np.ndarray, ts: str) -> None:
    """Put (Y, X) ``stored`` into ``ds`` under transfer syntax ``ts``."""
    ds.PixelData = stored.tobytes()
    if ts in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        return
    if ts in (uid.RLELossless, uid.JPEG2000Lossless, uid.JPEG2000):
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        kwargs = {"j2k_cr": [1]} if ts == uid.JPEG2000 else {}
        ds.compress(ts, stored, **kwargs)
        return
    import imagecodecs

    if ts == uid.JPEGBaseline8Bit:
        frame = imagecodecs.jpeg8_encode(stored, level=95)
    elif ts in (uid.JPEGLosslessSV1, uid.JPEGLossless):
        frame = imagecodecs.jpeg8_encode(stored, lossless=True)
    elif ts == uid.JPEGLSLossless:
        frame = imagecodecs.jpegls_encode(stored)
    else:
        raise ValueError(f"no test encoder for {ts}")
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ts


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    slice_spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    origin: Sequence[float] = (-100.5, -120.25, 30.0),
    orientation: Sequence[float] = AXIAL,
    positions: np.ndarray | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    names: Sequence[str] | None = None,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    bits: int = 16,
    signed: bool = False,
    padding_value: int | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    description: str = "AXIAL",
    modality: str = "CT",
    sop_class: str = uid.CTImageStorage,
    preamble: bool = True,
    empty_uids: bool = False,
    frame_of_reference: str | None = None,
) -> list[Path]:
    """Write the (Z, Y, X) HU volume ``hu`` as one file per slice; return the paths in slice order.

    Slice k sits at ``positions[k]`` (default ``origin + k * slice_spacing * n``, n = r x c);
    ``pixel_spacing`` is DICOM's (row spacing dy, column spacing dx). Stored value
    ``round((HU - intercept) / slope)`` per slice (defaults: slope 1, intercept -1024); ``bits`` 8 writes
    unsigned 8-bit data (for JPEG baseline). ``empty_uids`` writes StudyInstanceUID and SeriesInstanceUID
    present but empty, as some anonymisers leave them.
    """
    nz, ny, nx = hu.shape
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    if positions is None:
        positions = np.asarray(origin, float) + np.outer(np.arange(nz) * slice_spacing, normal_of(orientation))
    slopes = list(slopes) if slopes is not None else [1.0] * nz
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * nz
    names = list(names) if names is not None else [f"IM{k + 1:04d}.dcm" for k in range(nz)]
    dtype = np.uint8 if bits == 8 else (np.int16 if signed else np.uint16)
    paths = []
    for k in range(nz):
        ds = _base(sop_class, transfer_syntax, "" if empty_uids else study_uid, "" if empty_uids else series_uid,
                   modality)
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference
        ds.ImageType = list(image_type)
        ds.SeriesDescription = description
        ds.SeriesNumber = 2
        ds.InstanceNumber = nz - k  # reversed on purpose: assembly must not sort by it
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing:g}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 8 if bits == 8 else 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = f"{slopes[k]:g}"
        ds.RescaleIntercept = f"{intercepts[k]:g}"
        if padding_value is not None:
            ds.PixelPaddingValue = padding_value
            ds["PixelPaddingValue"].VR = "SS" if signed else "US"
        stored = np.rint((hu[k].astype(np.float64) - intercepts[k]) / slopes[k]).astype(dtype)  # (Y, X)
        _encode(ds, stored, transfer_syntax)
        path = folder / names[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        if preamble:
            ds.save_as(path, enforce_file_format=True)
        else:
            pydicom.dcmwrite(path, ds, enforce_file_format=False, little_endian=True, implicit_vr=False)
        paths.append(path)
    return paths


def write_multiframe(
    path: Path,
    sources: Sequence[Path],
    *,
    sop_class: str = ENHANCED_CT,
    order: Sequence[int] | None = None,
    modality: str | None = None,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
) -> Path:
    """Convert the single-frame files ``sources`` (from :func:`write_ct_series`) into one multi-frame object,
    as a legacy conversion does: frame ``j`` holds source ``order[j]``, with its ImagePositionPatient in a
    per-frame PlanePositionSequence and its rescale in a per-frame PixelValueTransformationSequence;
    orientation (PlaneOrientationSequence) and pixel spacing (PixelMeasuresSequence) are shared. No
    geometry is left at the top level. Transfer syntaxes: uncompressed, RLE or JPEG 2000 (lossless)."""
    srcs = [pydicom.dcmread(p) for p in sources]
    order = list(order) if order is not None else list(range(len(srcs)))
    first = srcs[0]
    ds = _base(sop_class, uid.ExplicitVRLittleEndian, first.StudyInstanceUID, first.SeriesInstanceUID,
               modality or first.Modality)
    for key in ("SeriesDescription", "SeriesNumber", "FrameOfReferenceUID", "Rows", "Columns", "SamplesPerPixel",
                "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "PixelPaddingValue"):
        if key in first:
            ds[key] = first[key]
    ds.ImageType = [*list(first.ImageType)[:3], "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        position, rescale, item = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = srcs[k].ImagePositionPatient
        rescale.RescaleSlope = srcs[k].RescaleSlope
        rescale.RescaleIntercept = srcs[k].RescaleIntercept
        rescale.RescaleType = "HU"
        item.PlanePositionSequence = [position]
        item.PixelValueTransformationSequence = [rescale]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    stored = np.stack([srcs[k].pixel_array for k in order])  # (F, Y, X)
    ds.PixelData = stored.tobytes()
    if transfer_syntax != uid.ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_hu(hu: np.ndarray, slopes: Sequence[float], intercepts: Sequence[float]) -> np.ndarray:
    """The HU a reader must get back from :func:`write_ct_series` (its rounding applied). (Z, Y, X)."""
    out = np.empty(hu.shape, dtype=np.float64)
    for k in range(hu.shape[0]):
        out[k] = np.rint((hu[k] - intercepts[k]) / slopes[k]) * slopes[k] + intercepts[k]
    return out


def write_dose_report(path: Path, study_uid: str) -> Path:
    """A radiation dose structured report (modality SR, no pixels)."""
    ds = _base(DOSE_SR, uid.ExplicitVRLittleEndian, study_uid, new_uid(), "SR")
    ds.SeriesDescription = "Dose Report"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def random_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Integer HU in [-1024, 2000]: (Z, Y, X) int16."""
    return np.random.default_rng(seed).integers(-1024, 2001, size=shape).astype(np.int16)
