"""CT-RATE adapter: CT-RATE's files become the same ``fvlm preprocess`` output as a DICOM archive.

CT-RATE (Hamamci et al., 2024) ships

- NIfTI volumes in nested folders, ``train/train_1/train_1_a/train_1_a_1.nii.gz`` (patient / study /
  reconstruction); the file name without ``.nii.gz`` is the ``VolumeName`` key;
- a metadata CSV (``train_metadata.csv``): ``VolumeName, ..., XYSpacing ("[0.75, 0.75]"), ZSpacing,
  RescaleSlope, RescaleIntercept, ...``;
- a reports CSV: ``VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN``;
- the multi-abnormality labels CSV: ``VolumeName`` and the 18 label columns.

The volumes store raw scanner values: HU = value * RescaleSlope + RescaleIntercept from the metadata
(the reference CT-CLIP / fVLM code does exactly this), unless the NIfTI header carries its own scaling
(``scl_slope`` not 0/1 or ``scl_inter`` not 0), which SimpleITK has then applied already. The voxel size
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


class CtRateLoader:
    """Loads one CT-RATE volume in HU with the metadata's rescale and spacing (see the module docstring)."""

    def __init__(self, metadata: str | Path) -> None:
        self.metadata = read_metadata(Path(metadata))

    def load(self, ref: SeriesRef) -> Volume:
        if ref.kind != "nifti":
            raise VolumeError(f"CT-RATE input holds NIfTI volumes, got a {ref.kind} series")
        path = ref.files[0]
        meta = self.metadata.get(normalise_key(ref.folder_key) or "")
        if meta is None:
            raise VolumeError("volume has no row in the CT-RATE metadata CSV (VolumeName)")
        try:
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        except RuntimeError:
            raise VolumeError(f"{path.name}: cannot be read as NIfTI (corrupt or truncated?)") from None
        if image.GetDimension() != 3:
            raise VolumeError(f"{path.name}: expected a 3D volume, got {image.GetDimension()}D")
        notes = []
        if not _header_scaled(path) and (meta["slope"] != 1 or meta["intercept"] != 0):
            image = image * meta["slope"] + meta["intercept"]
            notes.append(f"HU = value * {meta['slope']:g} + {meta['intercept']:g} (CT-RATE metadata)")
        spacing = (meta["sx"], meta["sy"], meta["sz"])
        if not np.allclose(image.GetSpacing(), spacing, rtol=0.01):
            notes.append("voxel size {} mm from the CT-RATE metadata (header said {})".format(
                "x".join(f"{s:g}" for s in spacing), "x".join(f"{s:.4g}" for s in image.GetSpacing())))
            image.SetSpacing(spacing)
        return Volume(image=image, notes=notes)


__all__ = ["CTRATE_DEFAULTS", "CTRATE_LABELS", "CtRateLoader", "read_metadata"]
