"""CT-RATE adapter: CT-RATE's files become the same ``fvlm preprocess`` output as a DICOM archive.

CT-RATE (Hamamci et al., 2024) ships

- NIfTI volumes in nested folders, ``train/train_1/train_1_a/train_1_a_1.nii.gz`` (patient / study /
  reconstruction); the file name without ``.nii.gz`` is the ``VolumeName`` key;
- a metadata CSV (``train_metadata.csv``): ``VolumeName, ..., XYSpacing ("[0.75, 0.75]"), ZSpacing,
  RescaleSlope, RescaleIntercept, ...``;
- a reports CSV: ``VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN``;
- the multi-abnormality labels CSV: ``VolumeName`` and the 18 label columns.

Intensities: two releases, one metadata. The first release stored raw scanner values:
HU = value * RescaleSlope + RescaleIntercept from the metadata (the reference CT-CLIP / fVLM code applies
this to every volume). The second release (v2) stores HU already, while its metadata still carries the
slope and intercept (not 1/0): applying them again shifts every volume by the intercept (air near -2000 HU,
soft tissue near lung density), and the crop's HU clip would then hide it. So whether the rescale applies
is decided per volume (``--ct-rate-version``, :func:`decide_rescale`):

- ``auto`` (default): from the intensities themselves. The HU plausibility gate's measurements
  (:mod:`pipelines.preprocess.hu_check`: air peak near -1000, soft-tissue peak near 0-60, little outside
  [-1100, 3071]) are taken on the values as read and after the metadata rescale (on the same strided sample;
  the volume is rescaled only if chosen). Plausible only after -> apply (release 1); plausible only as read
  -> do not apply (release 2); both (a near-identity rescale) -> the one whose peaks lie nearer -1000 / +40 HU;
  neither -> apply, as the metadata says, and the gate then fails the case naming both measurements;
- ``1``: apply the metadata rescale unless the NIfTI header carries its own scaling (``scl_slope`` not 0/1 or
  ``scl_inter`` not 0, which SimpleITK has then applied already) - the first release's convention;
- ``2``: never apply it.

The decision, its reason and both measurements go into ``case.json`` (``intensity.ct_rate``). The voxel size
comes from the metadata (``XYSpacing``, ``ZSpacing``) where it disagrees with the header by more than 1%,
as in the reference code; origin and direction are kept from the header. Label maps for ``--masks`` must
then be on the header geometry with the same spacing correction; TotalSegmentator label maps made from
the same files are (``masks`` resamples in physical space).

``fvlm preprocess INPUT OUT --ct-rate METADATA.csv`` applies :data:`CTRATE_DEFAULTS`: anatomy set
``ct-rate4``, preprocess config ``ct-rate``, ``VolumeName`` as id column, ``Findings_EN`` /
``Impressions_EN`` as report text, and the volume names as case ids (CT-RATE is already pseudonymous).
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipelines.preprocess.integrity import read_nifti
from pipelines.preprocess.hu_check import HUCheckConfig, HUStats, describe, image_sample, judge, measure
from pipelines.preprocess.series import SeriesRef, Volume, VolumeError
from pipelines.preprocess.tables import normalise_key

#: CT-RATE's 18 multi-abnormality label columns, in the CSV's order.
CTRATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
#: ``--ct-rate-version``: the release, or ``auto`` (decide per volume from the intensities).
CTRATE_VERSIONS = ("auto", "1", "2")

#: Run options the CT-RATE layout implies (each can still be overridden on the command line).
CTRATE_DEFAULTS = {
    "anatomy": "ct-rate4",
    "crop": "ct-rate",
    "case_id": "key",
    "id_column": "VolumeName",
    "findings_column": "Findings_EN",
    "impression_column": "Impressions_EN",
}


def _parse_xy(value: str) -> tuple[float, float]:
    try:
        v = ast.literal_eval(value.strip()) if value.strip().startswith(("[", "(")) else float(value)
    except (ValueError, SyntaxError):
        raise ValueError(f"XYSpacing {value!r} is not a number or [x, y] list") from None
    if isinstance(v, (int, float)):
        return float(v), float(v)
    if len(v) != 2:
        raise ValueError(f"XYSpacing {value!r} should hold two numbers")
    return float(v[0]), float(v[1])


def read_metadata(path: Path) -> dict[str, dict[str, float]]:
    """VolumeName (without ``.nii.gz``) -> {sx, sy, sz, slope, intercept} from CT-RATE's metadata CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ct-rate metadata {path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"--ct-rate metadata {path}: missing columns {missing} (CT-RATE's metadata CSV has "
                             f"{', '.join(METADATA_COLUMNS)})")
        out: dict[str, dict[str, float]] = {}
        for line, row in enumerate(reader, start=2):
            key = normalise_key(row["VolumeName"])
            if not key:
                continue
            try:
                sx, sy = _parse_xy(row["XYSpacing"])
                out[key] = {"sx": sx, "sy": sy, "sz": float(row["ZSpacing"]),
                            "slope": float(row["RescaleSlope"] or 1), "intercept": float(row["RescaleIntercept"] or 0)}
            except ValueError as e:
                raise ValueError(f"--ct-rate metadata {path} line {line}: {e}") from None
    return out


def _header_scaled(path: Path) -> bool:
    """Whether the NIfTI header carries a scaling that SimpleITK applies on reading."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    slope, inter = hdr.get_slope_inter()
    return not (slope in (None, 0, 1) and inter in (None, 0))


def _nominal_distance(stats: HUStats) -> float:
    """How far the air and soft-tissue peaks lie from -1000 and +40 HU (HU; inf when a peak is missing)."""
    if stats.air_peak_hu is None or stats.tissue_peak_hu is None:
        return float("inf")
    return abs(stats.air_peak_hu + 1000.0) + abs(stats.tissue_peak_hu - 40.0)


def decide_rescale(sample: np.ndarray, slope: float, intercept: float, version: str, header_scaled: bool,
                   cfg: HUCheckConfig) -> tuple[bool, dict]:
    """Whether the metadata rescale ``value * slope + intercept`` applies to a volume, and the record of the
    decision for ``case.json``. ``sample`` (N,) float32: the volume's strided sample as read (see the module
    docstring for the rule per ``version``)."""
    if version not in CTRATE_VERSIONS:
        raise ValueError(f"--ct-rate-version must be one of {', '.join(CTRATE_VERSIONS)}, got {version!r}")
    record: dict = {"version": version, "metadata_rescale": {"slope": slope, "intercept": intercept},
                    "header_scaled": header_scaled}
    if slope == 1 and intercept == 0:
        return False, {**record, "applied": False, "release": None,
                       "reason": "the metadata rescale is the identity (slope 1, intercept 0)"}
    if version == "1":
        apply = not header_scaled
        reason = ("--ct-rate-version 1: raw stored values, metadata rescale applied" if apply else
                  "--ct-rate-version 1: the NIfTI header carries its own scaling (applied on reading); "
                  "metadata rescale not applied")
        return apply, {**record, "applied": apply, "release": 1, "reason": reason}
    if version == "2":
        return False, {**record, "applied": False, "release": 2,
                       "reason": "--ct-rate-version 2: values are HU already; metadata rescale not applied"}
    as_read = measure(sample, cfg)
    after = measure(sample * np.float32(slope) + np.float32(intercept), cfg)
    ok_read, ok_after = not judge(as_read, cfg), not judge(after, cfg)
    if ok_after and not ok_read:
        apply, release, reason = True, 1, "plausible HU only after the metadata rescale: raw stored values (release 1)"
    elif ok_read and not ok_after:
        apply, release, reason = False, 2, ("plausible HU as stored, implausible after the metadata rescale: "
                                           "already HU (release 2)")
    elif ok_read and ok_after:
        apply = _nominal_distance(after) < _nominal_distance(as_read)
        release = 1 if apply else 2
        reason = ("plausible HU both as stored and after the metadata rescale; kept the one whose peaks lie "
                  "nearer -1000 / +40 HU")
    else:
        apply, release = True, None
        reason = ("plausible HU neither as stored nor after the metadata rescale; applied the metadata rescale "
                  f"(as stored: {describe(as_read)}; after: {describe(after)})")
    return apply, {**record, "applied": apply, "release": release, "reason": reason,
                   "as_stored": as_read.to_dict(), "after_rescale": after.to_dict(),
                   "_final_stats": after if apply else as_read}


class CtRateLoader:
    """Loads one CT-RATE volume in HU with the metadata's spacing and, where it applies, rescale (see the
    module docstring); ``version`` is ``--ct-rate-version``, ``hu_check`` the gate's thresholds."""

    def __init__(self, metadata: str | Path, version: str = "auto", hu_check: HUCheckConfig | None = None,
                 fill_nonfinite: float | None = None) -> None:
        if str(version) not in CTRATE_VERSIONS:
            raise ValueError(f"--ct-rate-version must be one of {', '.join(CTRATE_VERSIONS)}, got {version!r}")
        self.metadata = read_metadata(Path(metadata))
        self.version = str(version)
        self.hu_check = hu_check or HUCheckConfig()
        self.fill_nonfinite = fill_nonfinite

    def load(self, ref: SeriesRef) -> Volume:
        if ref.kind != "nifti":
            raise VolumeError(f"CT-RATE input holds NIfTI volumes, got a {ref.kind} series")
        path = ref.files[0]
        meta = self.metadata.get(normalise_key(ref.folder_key) or "")
        if meta is None:
            raise VolumeError("volume has no row in the CT-RATE metadata CSV (VolumeName)")
        read = read_nifti(path, sitk.sitkFloat32, fill=self.fill_nonfinite)  # before any intensity statistics
        image = read.image
        if image.GetDimension() != 3:
            raise VolumeError(f"{path.name}: expected a 3D volume, got {image.GetDimension()}D")
        notes = [read.note] if read.note else []
        refill = read.filled  # with --fill-nonfinite: kept at the stated HU after a rescale
        sample = image_sample(image, self.hu_check) if self.version == "auto" else np.zeros(0, np.float32)
        apply, decision = decide_rescale(sample, meta["slope"], meta["intercept"], self.version,
                                         _header_scaled(path), self.hu_check)
        final_stats = decision.pop("_final_stats", None)
        if apply:
            image = image * meta["slope"] + meta["intercept"]
            if refill is not None:
                data = sitk.GetArrayFromImage(image)  # (Z, Y, X)
                data[refill] = self.fill_nonfinite
                filled = sitk.GetImageFromArray(data)
                filled.CopyInformation(image)
                image = filled
            notes.append(f"HU = value * {meta['slope']:g} + {meta['intercept']:g} "
                         f"(CT-RATE metadata; {decision['reason']})")
        elif decision["release"] == 2 or decision["header_scaled"]:
            notes.append(f"CT-RATE metadata rescale not applied: {decision['reason']}")
        spacing = (meta["sx"], meta["sy"], meta["sz"])
        if not np.allclose(image.GetSpacing(), spacing, rtol=0.01):
            notes.append("voxel size {} mm from the CT-RATE metadata (header said {})".format(
                "x".join(f"{s:g}" for s in spacing), "x".join(f"{s:.4g}" for s in image.GetSpacing())))
            image.SetSpacing(spacing)
        vol_meta: dict = {"ct_rate": decision}
        if final_stats is not None:
            vol_meta["hu_stats"] = final_stats  # the gate reuses these measurements of the final image
        return Volume(image=image, notes=notes, meta=vol_meta)


__all__ = ["CTRATE_DEFAULTS", "CTRATE_LABELS", "CTRATE_VERSIONS", "CtRateLoader", "decide_rescale", "read_metadata"]
