"""Series discovery: an input folder (or file) -> the CT series to preprocess, one per study, and the rest
skipped with a reason.

INPUT may be

- a folder tree of DICOM files at any depth, with any file names (``.dcm`` or none), possibly holding a
  ``DICOMDIR`` and non-DICOM files (both ignored);
- a folder of NIfTI files (``.nii`` / ``.nii.gz``): each file is one series, ``folder_key`` its stem;
- a single NIfTI file, or one DICOM series folder.

Only headers are read (``stop_before_pixels`` with a short list of tags), so discovery of thousands of
files costs seconds. Files are grouped into series by (StudyInstanceUID, SeriesInstanceUID).

Files without UIDs (anonymisers often leave StudyInstanceUID / SeriesInstanceUID empty) are grouped by
what identifies a series in practice (:func:`pseudo_series_key`): their folder (relative to INPUT),
FrameOfReferenceUID where present, modality and SOP class, orientation, pixel spacing, rows x columns,
SeriesNumber and SeriesDescription. Each such group gets a pseudo id ``nouid-`` + the first 16 hex digits
of the SHA-256 of those facts (stable across runs and mount points; no value of those facts can be read
from it), and the case's notes say so. Without a StudyInstanceUID, series sharing a FrameOfReferenceUID
form one study, and without that, series in one folder do (one series is kept per study, as below).

Multi-frame CT (Enhanced CT and Legacy Converted Enhanced CT Image Storage) is one file per series (or a
few): its frames are the slices, each with the position, orientation and pixel spacing of its per-frame
functional groups, falling back to the shared ones (:func:`frame_facts`); the same rules below apply
to its frames as to the files of a single-frame series.

A series is kept as a candidate when it is an axial CT image series:

1. Modality ``CT`` (``SR``, ``MR``, ``PT``, ... are skipped as ``modality XX``);
2. SOP class CT Image Storage, Enhanced CT or Legacy Converted Enhanced CT Image Storage. Secondary
   captures, structured (dose) reports and other classes are skipped with a reason naming the class (and
   "multi-frame" for multi-frame objects of another modality or class);
3. not a localizer / scout (ImageType contains ``LOCALIZER``; such files inside an otherwise axial series
   are dropped from it) and not a dose screen (ImageType with ``DOSE`` or ``SCREEN SAVE``, or a
   SeriesDescription such as "Dose Report", "Dose Info", "Patient Protocol"; "LOW DOSE CHEST" is kept);
4. near-axial: with slice normal ``n = r x c`` (``r``, ``c`` the row and column direction cosines of
   ImageOrientationPatient), ``|n . z| >= cos 45 deg``, i.e. the slices are closer to axial than to
   coronal or sagittal; gantry-tilted axial series (tilt < 45 deg) pass and are corrected by assembly;
5. at least two slices at distinct positions (``single slice`` otherwise).

A file without ImagePositionPatient / ImageOrientationPatient (typically truncated) is left out of a series
whose other files have them (named in ``SeriesRef.left_out`` and the description; assembly notes it and
interpolates the gap it leaves up to ``max_gap_slices``); a series where no file has them is skipped. A DICOM
file whose header cannot be parsed, or that has neither UIDs nor SOPClassUID / Modality, is skipped as
"unreadable or incomplete DICOM header", naming the file and what failed or is missing.

Selection, one series per study (:data:`SERIES_RULES`):

- ``most_slices_thinnest`` (default): the thinnest consistent slice spacing (the most common gap between
  consecutive slice positions along ``n``, rounded to 0.01 mm); ties -> most slices;
- ``most_slices``: most slices; ties -> thinnest spacing;
- ``series_uid=...``: exactly that series, by SeriesInstanceUID or ``nouid-`` pseudo id (all others, in
  every study, are skipped); a series that fails
  the filters above stays skipped with its reason even when named.

Remaining ties are broken by folder name and then by UID, so the choice is deterministic. Every series not
kept becomes a :class:`SkippedSeries` whose reason never contains a patient identifier.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from fvlm.registry import Registry
from pipelines.preprocess.series import SeriesRef, SkippedSeries

#: SOP class UIDs discovery knows by name.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
#: The CT image classes assembled into volumes (single-frame and multi-frame).
CT_IMAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE)
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "enhanced (multi-frame) CT image",
    "1.2.840.10008.5.1.4.1.1.2.2": "legacy converted enhanced CT image",
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-ray radiation dose structured report",
    "1.2.840.10008.5.1.4.1.1.88.11": "basic text structured report",
    "1.2.840.10008.5.1.4.1.1.88.22": "enhanced structured report",
    "1.2.840.10008.5.1.4.1.1.88.33": "comprehensive structured report",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation",
}
#: Minimum |n . z| of an axial series (cos 45 deg).
AXIAL_MIN_COS = math.cos(math.radians(45.0))
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: SeriesDescription of a dose screen saved as CT images ("LOW DOSE CHEST" is a real CT and is kept).
_DOSE_DESCRIPTION = re.compile(
    r"\bDOSE[\s_-]*(REPORT|INFO|SUMMARY|SHEET|SR)\b|\bRADIATION DOSE\b|\bPATIENT PROTOCOL\b", re.IGNORECASE
)
_TAGS = [
    "SOPClassUID",
    "Modality",
    "ImageType",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "SeriesDescription",
    "SeriesNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]
#: Functional group macro -> the attributes it holds (PS3.3 C.7.6.16.2).
_MACROS = {
    "position": ("PlanePositionSequence", "ImagePositionPatient", 3),
    "orientation": ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
    "pixel_spacing": ("PixelMeasuresSequence", "PixelSpacing", 2),
    "slope": ("PixelValueTransformationSequence", "RescaleSlope", 1),
    "intercept": ("PixelValueTransformationSequence", "RescaleIntercept", 1),
}


@dataclass
class Discovery:
    """What discovery found: the series to assemble (one per study) and every series it left out."""

    selected: list[SeriesRef] = field(default_factory=list)
    skipped: list[SkippedSeries] = field(default_factory=list)


@dataclass
class _Header:
    """The few header facts of one DICOM file that discovery needs."""

    path: Path
    sop_class: str
    modality: str
    image_type: tuple[str, ...]
    study_uid: str
    series_uid: str
    accession: str
    description: str
    identifiers: tuple[str, ...]  # patient name/id, accession: scrubbed from any text discovery emits
    positions: np.ndarray | None  # (F, 3) ImagePositionPatient of each frame, mm, LPS; None if any is missing
    orientation: np.ndarray | None  # (6,) ImageOrientationPatient row then column cosines (first frame)
    frames: int
    grouping: tuple  # the facts a series without UIDs is grouped by (see pseudo_series_key)
    frame_of_reference: str = ""


@dataclass
class _Candidate:
    ref: SeriesRef
    spacing: float  # inf when unknown


# --------------------------------------------------------------------------------------------- reading


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def looks_like_dicom(path: Path) -> tuple[bool, bool]:
    """(is DICOM, has the 128-byte preamble + ``DICM``). Files without a preamble are accepted when they
    start with a group 0x0002 or 0x0008 tag (raw little-endian data sets, common in old archives)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False, False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True, True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00"), False


def _text(ds: pydicom.Dataset, name: str) -> str:
    value = ds.get(name, "")
    return "" if value is None else str(value).strip()


def _floats(ds: pydicom.Dataset, name: str, n: int) -> np.ndarray | None:
    value = ds.get(name)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return arr if arr is not None and arr.shape == (n,) and np.all(np.isfinite(arr)) else None


@dataclass(frozen=True)
class FrameFacts:
    """Geometry and rescale of one frame (the one frame of a single-frame file)."""

    position: np.ndarray | None  # (3,) ImagePositionPatient, mm, LPS
    orientation: np.ndarray | None  # (6,) ImageOrientationPatient
    pixel_spacing: np.ndarray | None  # (2,) PixelSpacing (row spacing dy, column spacing dx), mm
    slope: float
    intercept: float


def _first(seq: Any) -> pydicom.Dataset | None:
    return seq[0] if seq else None


def _as_floats(value: Any, n: int) -> np.ndarray | None:
    if value is None or value == "":
        return None
    try:
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def frame_facts(ds: pydicom.Dataset) -> list[FrameFacts]:
    """Per-frame position, orientation, pixel spacing and rescale of an image object, one entry per frame.

    A multi-frame (enhanced) object holds them in functional groups (PS3.3 C.7.6.16): each attribute is
    taken from the frame's item of PerFrameFunctionalGroupsSequence, else from SharedFunctionalGroupsSequence
    (PlanePosition, PlaneOrientation, PixelMeasures, PixelValueTransformation macros), else from the top
    level of the data set (all but the position, which must be per frame when there are several frames).
    A single-frame file holds them at the top level. Missing or invalid values are None (rescale: 1 and 0).
    """
    frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = []
    for f in range(frames):
        groups = [g for g in (per_frame[f] if f < len(per_frame) else None, shared) if g is not None]
        facts: dict[str, np.ndarray | None] = {}
        for key, (macro, attr, n) in _MACROS.items():
            value = None
            for group in groups:
                item = _first(group.get(macro))
                if item is not None and item.get(attr) not in (None, ""):
                    value = item.get(attr)
                    break
            if value is None and (frames == 1 or key != "position"):
                value = ds.get(attr)
            facts[key] = _as_floats(value, n)
        slope, intercept = facts["slope"], facts["intercept"]
        out.append(FrameFacts(
            position=facts["position"], orientation=facts["orientation"], pixel_spacing=facts["pixel_spacing"],
            slope=float(slope[0]) if slope is not None and slope[0] != 0 else 1.0,
            intercept=float(intercept[0]) if intercept is not None else 0.0,
        ))
    return out


def read_header(path: Path) -> _Header | None:
    """Header facts of one file; ``None`` for a non-DICOM file or a DICOMDIR. Raises ``ValueError`` naming
    what failed for a DICOM file whose header cannot be parsed."""
    if path.name.upper() == "DICOMDIR":
        return None
    is_dicom, has_preamble = looks_like_dicom(path)
    if not is_dicom:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=not has_preamble)
        sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", ""))
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            return None
        image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
        facts = frame_facts(ds)
        positions = [f.position for f in facts]
        orientation = facts[0].orientation
        spacing = facts[0].pixel_spacing
        identifiers = tuple(
            s for s in (_text(ds, "PatientName"), _text(ds, "PatientID"), _text(ds, "AccessionNumber")) if s
        )
        modality = _text(ds, "Modality").upper()
        description = _text(ds, "SeriesDescription")
        frame_of_reference = _text(ds, "FrameOfReferenceUID")
        grouping = (
            frame_of_reference, modality, sop_class,
            None if orientation is None else tuple(np.round(orientation, 4).tolist()),
            None if spacing is None else tuple(np.round(spacing, 4).tolist()),
            int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), _text(ds, "SeriesNumber"), description,
        )
        return _Header(
            path=path,
            sop_class=sop_class,
            modality=modality,
            image_type=image_type,
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            accession=_text(ds, "AccessionNumber"),
            description=description,
            identifiers=identifiers,
            positions=None if any(p is None for p in positions) else np.stack(positions),  # (F, 3)
            orientation=orientation,
            frames=len(facts),
            grouping=grouping,
            frame_of_reference=frame_of_reference,
        )
    except Exception as exc:  # noqa: BLE001  (pydicom raises many kinds on a corrupt header)
        raise ValueError(f"header cannot be parsed ({type(exc).__name__})") from exc


def scrub(text: str, identifiers: Iterable[str]) -> str:
    """``text`` with every identifier (and each of its ``^``-separated name parts) replaced by ``***``."""
    for ident in identifiers:
        for part in {ident, *ident.split("^")}:
            part = part.strip()
            if len(part) >= 2 and part in text:
                text = text.replace(part, "***")
    return text


def _walk(root: Path) -> list[Path]:
    """All files under ``root`` in a stable order (hidden files and folders skipped)."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def _folder_key(files: Iterable[Path]) -> str:
    """Name of the folder holding the files; the common parent's name when they span folders."""
    parents = sorted({str(f.parent) for f in files})
    return Path(os.path.commonpath(parents)).name if parents else ""


# ------------------------------------------------------------------------------------------ geometry


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit slice normal ``n = r x c`` from ImageOrientationPatient ``(r_x, r_y, r_z, c_x, c_y, c_z)``."""
    n = np.cross(orientation[:3], orientation[3:])  # (3,)
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else n


def typical_spacing(positions: np.ndarray, normal: np.ndarray) -> tuple[float | None, int]:
    """(most common gap between consecutive distinct slice positions along ``normal``, count of distinct
    positions). Positions (N, 3) are projected as ``d_k = p_k . n``; gaps are rounded to 0.01 mm."""
    d = np.unique(np.round(positions @ normal, 3))  # (M,) distinct projections, sorted
    if d.size < 2:
        return None, int(d.size)
    return most_common_gap(np.diff(d)), int(d.size)


def most_common_gap(gaps: np.ndarray) -> float:
    """The most frequent of ``gaps`` (M,) rounded to 0.01 mm; a tie goes to the smaller gap."""
    counts = Counter(np.round(gaps, 2).tolist())
    return float(min(counts, key=lambda g: (-counts[g], g)))


# ------------------------------------------------------------------------------------------ selection


#: Selection rules: name -> sort key, the best candidate sorts first (a read-only mapping, registration order).
SERIES_RULES: Registry[Callable[[_Candidate], tuple]] = Registry("series rule")


@SERIES_RULES.register("most_slices_thinnest")
def _key_most_slices_thinnest(c: _Candidate) -> tuple:
    """The thinnest slices first, then the most slices."""
    return (c.spacing, -c.ref.n_slices, c.ref.folder_key, c.ref.series_uid or c.ref.pseudo_id or "")


@SERIES_RULES.register("most_slices")
def _key_most_slices(c: _Candidate) -> tuple:
    """The most slices first, then the thinnest."""
    return (-c.ref.n_slices, c.spacing, c.ref.folder_key, c.ref.series_uid or c.ref.pseudo_id or "")


def _why_not(rule: str, loser: _Candidate, winner: _Candidate) -> str:
    def mm(c: _Candidate) -> str:
        return f"{c.spacing:g} mm" if math.isfinite(c.spacing) else "unknown spacing"

    if rule == "most_slices_thinnest" and loser.spacing != winner.spacing:
        why = f"study has a series at thinner spacing ({mm(winner)} vs {mm(loser)})"
    elif loser.ref.n_slices != winner.ref.n_slices:
        why = f"study has a series with more slices ({winner.ref.n_slices} vs {loser.ref.n_slices})"
    elif loser.spacing != winner.spacing:
        why = f"study has a series at thinner spacing ({mm(winner)} vs {mm(loser)})"
    else:
        why = "study has an equivalent series that sorts first"
    return f"not selected (rule {rule}): {why}"


# ---------------------------------------------------------------------------------------------- main


def _nifti_ref(path: Path) -> SeriesRef:
    return SeriesRef(kind="nifti", files=(path,), folder_key=nifti_stem(path), description="NIfTI")


def _classify(headers: list[_Header]) -> tuple[list[_Header], str | None, list[Path]]:
    """(image files to keep, skip reason or None, files left out as unreadable) for the files of one series.

    Image files without ImagePositionPatient / ImageOrientationPatient (typically truncated files; for a
    multi-frame file, any frame without them) are left out of a series whose other files have both; the
    series is skipped only when none has them."""
    first = headers[0]
    multi = " (multi-frame)" if any(h.frames > 1 for h in headers) else ""
    modalities = sorted({h.modality or "missing" for h in headers})
    if modalities != ["CT"]:
        report = " (structured or dose report)" if "SR" in modalities else ""
        return [], f"modality {'/'.join(modalities)}{report}{multi}", []
    classes = sorted({h.sop_class for h in headers})
    other = [c for c in classes if c not in CT_IMAGE_CLASSES]
    if other:
        name = _SOP_NAMES.get(other[0], f"SOP class {other[0]}" if other[0] else "no SOP class UID")
        return [], f"{name}{multi}: not a CT image series", []
    dose_type = any(t.startswith("DOSE") or t == "SCREEN SAVE" for t in first.image_type)
    if dose_type or _DOSE_DESCRIPTION.search(first.description):
        return [], "dose report / dose screen", []
    images = [h for h in headers if "LOCALIZER" not in h.image_type]
    if not images:
        return [], "localizer (scout)", []
    left_out = [h.path for h in images if h.positions is None or h.orientation is None]
    if left_out:
        if len(left_out) == len(images):
            return [], f"no ImagePositionPatient / ImageOrientationPatient (e.g. {left_out[0].name})", []
        images = [h for h in images if h.positions is not None and h.orientation is not None]
    normal = slice_normal(images[0].orientation)
    if abs(float(normal[2])) < AXIAL_MIN_COS:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        return [], f"not axial: {plane} orientation (|n.z| = {abs(float(normal[2])):.2f})", []
    return images, None, sorted(left_out)


def pseudo_series_key(header: _Header, root: Path) -> tuple:
    """What groups the files of a series without UIDs: the folder (relative to ``root``), then
    FrameOfReferenceUID, modality, SOP class, orientation, pixel spacing, rows, columns, SeriesNumber and
    SeriesDescription (:attr:`_Header.grouping`), and the StudyInstanceUID where only that is present."""
    try:
        folder = header.path.parent.relative_to(root).as_posix()
    except ValueError:
        folder = header.path.parent.name
    return (folder, header.study_uid, *header.grouping)


def pseudo_id(key: tuple) -> str:
    """``nouid-`` + 16 hex digits of the SHA-256 of ``key``: stable, and no value of ``key`` is readable."""
    return "nouid-" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def _pseudo_note(header: _Header, pid: str) -> str:
    missing = " / ".join(k for k, v in (("StudyInstanceUID", header.study_uid),
                                           ("SeriesInstanceUID", header.series_uid)) if not v)
    study = ("its StudyInstanceUID" if header.study_uid else
             "series sharing its FrameOfReferenceUID" if header.frame_of_reference else "series in its folder")
    return (f"no {missing}: files grouped by folder, FrameOfReferenceUID, modality, SOP class, orientation, "
            f"pixel spacing, rows/columns, series number and description into pseudo-series {pid}; "
            f"study: {study}")


def _skipped(headers: list[_Header], reason: str, series_uid: str | None = None) -> SkippedSeries:
    identifiers = {i for h in headers for i in h.identifiers}
    return SkippedSeries(
        reason=scrub(reason, identifiers),
        files=len(headers),
        folder_key=_folder_key(h.path for h in headers),
        series_uid=series_uid,
        description=scrub(headers[0].description, identifiers)[:64] if headers else "",
    )


def discover(input: Path, series_rule: str = "most_slices_thinnest", series_uid: str | None = None) -> Discovery:
    """Find the CT series under ``input`` and keep one per study (see the module docstring for the rules).

    An empty folder gives an empty :class:`Discovery` (the caller reports it). Raises ``FileNotFoundError``
    when ``input`` does not exist and ``ValueError`` for an unknown ``series_rule``.
    """
    if series_rule not in SERIES_RULES:
        raise ValueError(f"unknown series rule {series_rule!r}; choose one of {', '.join(SERIES_RULES)}")
    input = Path(input)
    if not input.exists():
        raise FileNotFoundError(f"{input}: no such file or folder")
    files = [input] if input.is_file() else _walk(input)
    out = Discovery()

    # NIfTI files are series of their own; everything else is probed as DICOM. Series key: the UIDs, or
    # for files without them a pseudo id of their grouping facts (and a pseudo study).
    root = input if input.is_dir() else input.parent
    by_series: dict[tuple[str, str], list[_Header]] = defaultdict(list)
    pseudo_notes: dict[tuple[str, str], str] = {}  # (study, series) key of a series without UIDs -> note
    unreadable: dict[Path, list[tuple[Path, str]]] = defaultdict(list)
    for path in files:
        if is_nifti(path):
            out.selected.append(_nifti_ref(path))
            continue
        try:
            header = read_header(path)
        except ValueError as exc:
            unreadable[path.parent].append((path, str(exc)))
            continue
        if header is None:
            continue  # not DICOM, or a DICOMDIR
        study, series = header.study_uid, header.series_uid
        if (not series or not study) and not (header.sop_class or header.modality):
            missing = [k for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)) if not v]
            unreadable[path.parent].append((path, f"no {', '.join(missing)}, SOPClassUID or Modality"))
            continue
        if not series or not study:
            key = pseudo_series_key(header, root)
            if not study:
                basis = ("for", header.frame_of_reference) if header.frame_of_reference else ("folder", key[0])
                study = "pseudo-study:" + pseudo_id(basis)
            series = series or pseudo_id(key)
            pseudo_notes[(study, series)] = _pseudo_note(header, series)
        by_series[(study, series)].append(header)

    for folder, items in sorted(unreadable.items()):
        out.skipped.append(
            SkippedSeries(
                reason=f"unreadable or incomplete DICOM header in {len(items)} file(s), e.g. {items[0][0].name}: "
                       f"{items[0][1]}",
                files=len(items),
                folder_key=folder.name,
            )
        )

    # Filter each series, then keep one candidate per study.
    by_study: dict[str, list[_Candidate]] = defaultdict(list)
    for (study, series), headers in sorted(by_series.items(), key=lambda kv: str(kv[1][0].path)):
        images, reason, left_out = _classify(headers)
        if reason is None:
            normal = slice_normal(images[0].orientation)
            spacing, n_positions = typical_spacing(np.concatenate([h.positions for h in images]), normal)
            if n_positions < 2:
                reason = "single slice"
        if reason is not None:
            out.skipped.append(_skipped(headers, reason, series))
            continue
        identifiers = {i for h in headers for i in h.identifiers}
        n_localizers = len(headers) - len(images) - len(left_out)
        description = scrub(images[0].description, identifiers)[:64]
        if n_localizers:
            description = f"{description} ({n_localizers} localizer files left out)".strip()
        if left_out:
            names = ", ".join(p.name for p in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
            description = f"{description} ({len(left_out)} unreadable file(s) left out: {names})".strip()
        ref = SeriesRef(
            kind="dicom",
            files=tuple(sorted(h.path for h in images)),
            folder_key=_folder_key(h.path for h in images),
            study_uid=None if study.startswith("pseudo-study:") else study,
            series_uid=images[0].series_uid or None,
            accession_number=images[0].accession or None,
            n_slices=sum(h.frames for h in images),
            slice_spacing_mm=spacing,
            description=description,
            left_out=tuple(p.name for p in left_out),
            pseudo_id=None if images[0].series_uid else series,
            notes=(pseudo_notes[(study, series)],) if (study, series) in pseudo_notes else (),
        )
        by_study[study].append(_Candidate(ref, spacing if spacing is not None else math.inf))

    key = SERIES_RULES[series_rule]
    for study in sorted(by_study, key=lambda s: min(str(c.ref.files[0]) for c in by_study[s])):
        candidates = sorted(by_study[study], key=key)
        if series_uid is not None:
            chosen = [c for c in candidates if series_uid in (c.ref.series_uid, c.ref.pseudo_id)]
            rest = [c for c in candidates if series_uid not in (c.ref.series_uid, c.ref.pseudo_id)]
            out.selected.extend(c.ref for c in chosen)
            for c in rest:
                out.skipped.append(_as_skipped(c, "not selected: another series was chosen by --series-uid"))
            continue
        winner, rest = candidates[0], candidates[1:]
        out.selected.append(winner.ref)
        for c in rest:
            out.skipped.append(_as_skipped(c, _why_not(series_rule, c, winner)))
    return out


def _as_skipped(c: _Candidate, reason: str) -> SkippedSeries:
    return SkippedSeries(
        reason=reason,
        files=len(c.ref.files),
        folder_key=c.ref.folder_key,
        series_uid=c.ref.series_uid or c.ref.pseudo_id,
        description=c.ref.description,
    )
