"""What `fvlm preprocess` knows about one input series before and after reading it.

Discovery (:mod:`pipelines.preprocess.discover`) turns an input folder into :class:`SeriesRef` entries
(kept) and :class:`SkippedSeries` entries (with their reason); assembly (:mod:`pipelines.preprocess.volume`)
turns a :class:`SeriesRef` into a :class:`Volume` in HU or raises :class:`VolumeError` with the reason.

Identifiers. ``study_uid``, ``series_uid`` and ``accession_number`` are held only to match reports and
masks to a series and to derive the de-identified case id. They must never be written to an output file,
a file name or a log line: use :meth:`SeriesRef.source_hash` and :meth:`SeriesRef.describe` instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk


class VolumeError(ValueError):
    """A series cannot be assembled into a volume; the message states why (no identifiers in it)."""


@dataclass(frozen=True)
class SeriesRef:
    """One image series found in the input: a DICOM series (slice files) or one NIfTI file."""

    kind: str
    """``dicom`` or ``nifti``."""
    files: tuple[Path, ...]
    """The series' DICOM files (any order), or the single NIfTI file."""
    folder_key: str
    """Match key ``folder``: the name of the folder holding the series' files (DICOM), or the NIfTI file
    name without ``.nii``/``.nii.gz``."""
    study_uid: str | None = None
    """StudyInstanceUID (DICOM only)."""
    series_uid: str | None = None
    """SeriesInstanceUID (DICOM only)."""
    accession_number: str | None = None
    """AccessionNumber (DICOM only; may be empty in real archives)."""
    n_slices: int = 0
    """Image slices the series holds (DICOM), 0 for NIfTI until read."""
    slice_spacing_mm: float | None = None
    """Slice spacing estimated at discovery (DICOM), used by the selection rule."""
    description: str = ""
    """SeriesDescription and similar technical facts (no identifiers), for logs and the manifest."""
    left_out: tuple[str, ...] = ()
    """Names of the series' files discovery left out as unreadable (e.g. a truncated file without
    ImagePositionPatient); assembly notes them and handles the gap they leave like any missing slice."""
    pseudo_id: str | None = None
    """For a series without SeriesInstanceUID: a hash of the facts discovery grouped its files by (folder,
    FrameOfReferenceUID, geometry, series number and description); never holds an identifier value."""
    notes: tuple[str, ...] = ()
    """What discovery assumed about the series (e.g. how files without UIDs were grouped); assembly puts them
    first in :attr:`Volume.notes`. No identifiers."""

    def match_key(self, key: str) -> str | None:
        """The value of match key ``key`` (``folder``, ``study_uid``, ``accession``) for this series."""
        if key == "folder":
            return self.folder_key
        if key == "study_uid":
            return self.study_uid
        if key == "accession":
            return self.accession_number or None
        raise ValueError(f"unknown match key {key!r}; use folder, study_uid or accession")

    def source_hash(self, salt: str = "") -> str:
        """A stable, non-reversible id of the source series (salted SHA-256 of its UID, its pseudo id, or its
        first file path)."""
        basis = self.series_uid or self.pseudo_id or str(sorted(self.files)[0])
        return hashlib.sha256(f"{salt}|{basis}".encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A log-safe description: kind, slice count, spacing, series description; no identifiers."""
        parts = [self.kind, f"{self.n_slices} slices" if self.n_slices else "", self.description]
        if self.slice_spacing_mm:
            parts.append(f"{self.slice_spacing_mm:g} mm")
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class SkippedSeries:
    """A series discovery did not keep, and why (e.g. ``localizer``, ``modality SR``, ``not selected:
    study has a series with more slices at thinner spacing``)."""

    reason: str
    files: int
    """Number of files of the series."""
    folder_key: str = ""
    """Folder name (the default match key), for the manifest; never a patient identifier."""
    series_uid: str | None = None
    """For hashing only; never written out."""
    description: str = ""


@dataclass
class Volume:
    """One assembled series: a SimpleITK image in HU (float32 or int16) with physical geometry."""

    image: sitk.Image
    """The CT in HU; origin, spacing and direction from the headers (LPS)."""
    notes: list[str] = field(default_factory=list)
    """What assembly repaired or assumed (e.g. ``resampled uneven slice spacing 2.5/5.0 mm to 2.5 mm``)."""
    meta: dict = field(default_factory=dict)
    """What a loader measured or decided about the intensities, for ``case.json`` (e.g. the CT-RATE adapter's
    rescale decision under ``ct_rate``, and ``hu_stats``: the HU gate's measurements of the final image)."""
