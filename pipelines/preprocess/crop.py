"""Anatomy grouping, per-anatomy statistics and the anatomy crop of one case.

1. :func:`group_anatomies`: a TotalSegmentator ``total`` label map becomes the anatomy set's label map
   (anatomy ``k`` -> label ``k``) through a lookup table.
2. :func:`anatomy_stats`: per anatomy, present or not, voxel count, volume, physical bounding box (LPS, mm,
   voxel edges) and whether the scan boundary cuts it (its voxels touch the first or last voxel of an axis).
3. :func:`crop_case`: the union box of the anatomies present, plus a margin, on an axis-aligned LPS grid
   of the configured spacing, padded (centred) to at least the configured size; the CT is resampled onto
   it (linear, HU clipped and rounded to int16, ``pad_hu`` outside the scan), the anatomy map too
   (nearest); with ``antialias`` the CT is Gaussian-smoothed first where the crop grid is coarser than
   the source (:func:`antialias_sigmas_mm`). The parameters are data: ``configs/preprocess/<name>.yaml`` (:class:`CropConfig`).

Axis conventions: SimpleITK vectors are (x, y, z); numpy arrays from SimpleITK are (z, y, x).

Memory: :func:`crop_case` never makes a full-size copy of the source volume or label map. The anatomy
statistics come from the ``total`` label map directly (counts per ``total`` id in slabs, boxes per id,
both merged per anatomy), the CT and the ``total`` ids are resampled straight onto the (small) crop grid,
and the lookup table is applied to the cropped label map only. The results are the same, voxel for voxel,
as grouping the full label map first.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from anatomy.catalog import AnatomySet
from configs.checks import ConfigError, read_config
from configs.paths import resolve_config
from configs.typed import build
from pipelines.preprocess.hu_check import HUCheckConfig


class CropError(ValueError):
    """A case cannot be cropped (e.g. no anatomy of the set in its label map); the message says why."""


@dataclass(frozen=True)
class CropConfig:
    """Preprocessing parameters (``configs/preprocess/*.yaml``)."""

    name: str = "default"
    """Preset name."""
    spacing_xyz_mm: tuple[float, float, float] = (1.0, 1.0, 3.0)
    """Output voxel size, (x, y, z) mm."""
    margin_zyx_vox: tuple[int, int, int] = (5, 20, 20)
    """Margin around the anatomies' union box, in output voxels (z, y, x)."""
    min_size_zyx: tuple[int, int, int] = (112, 256, 352)
    """The crop is padded (centred) to at least this size (z, y, x)."""
    max_size_zyx: tuple[int, int, int] = (400, 512, 512)
    """A larger crop is cut to this size around the anatomies' centre (anatomies it cuts are flagged)."""
    pad_hu: int = -1024
    """HU of output voxels outside the scan."""
    clip_hu: tuple[int, int] = (-1024, 3071)
    """Stored HU are clipped to this range and rounded to int16."""
    interpolation: str = "linear"
    """CT resampling: ``linear`` or ``bspline``; the anatomy map is always nearest neighbour."""
    antialias: bool = False
    """Smooth the CT before resampling onto a coarser grid (:func:`antialias_sigmas_mm`), so a voxel holds the
    average of the tissue it covers (a small bright focus becomes a partial-volume rise instead of vanishing or
    not with the sampling phase). Costs one float32 copy of the source volume."""
    window_hu: tuple[float, float] = (-1150.0, 350.0)
    """Intensity window the training loader maps to [0, 1]; stored as metadata, not applied."""
    min_voxels: int = 10
    """An anatomy with fewer voxels in the source label map counts as absent."""
    min_anatomies: int = 1
    """A case with fewer anatomies present fails."""
    hu_check: HUCheckConfig = field(default_factory=HUCheckConfig)
    """Thresholds of the HU plausibility gate every volume passes after conversion (``hu_check.py``)."""
    description: str = ""

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"preprocess config {self.name!r}: {what}")

        check(len(self.spacing_xyz_mm) == 3 and all(s > 0 for s in self.spacing_xyz_mm), "spacing_xyz_mm must be 3 positive numbers")
        check(len(self.margin_zyx_vox) == 3 and all(m >= 0 for m in self.margin_zyx_vox), "margin_zyx_vox must be 3 numbers >= 0")
        check(len(self.min_size_zyx) == 3 and all(m >= 1 for m in self.min_size_zyx), "min_size_zyx must be 3 numbers >= 1")
        check(len(self.max_size_zyx) == 3 and all(a >= b for a, b in zip(self.max_size_zyx, self.min_size_zyx)),
              "max_size_zyx must be 3 numbers >= min_size_zyx")
        check(len(self.clip_hu) == 2 and -32768 <= self.clip_hu[0] < self.clip_hu[1] <= 32767, "clip_hu must be [lo, hi] within int16")
        check(self.interpolation in ("linear", "bspline"), "interpolation must be linear or bspline")
        check(len(self.window_hu) == 2 and self.window_hu[0] < self.window_hu[1], "window_hu must be [lo, hi]")
        check(self.min_voxels >= 1 and self.min_anatomies >= 0, "min_voxels >= 1 and min_anatomies >= 0")

    def to_dict(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out["hu_check"] = self.hu_check.to_dict()
        return out


def load_crop_config(name_or_path: str | os.PathLike = "default") -> CropConfig:
    """Load ``configs/preprocess/<name>.yaml`` or a YAML file (which may ``extends:`` a preset and state only what
    differs), read by the typed loader (:func:`configs.typed.build`): an unknown key, a value of the wrong type
    or a range check names the file and the field."""
    path = resolve_config("preprocess", name_or_path)
    cfg = build(CropConfig, read_config(path, "preprocess"), where=str(path))
    return replace(cfg, description=cfg.description.strip())


# --------------------------------------------------------------------------------------------- grouping


def antialias_sigmas_mm(image: sitk.Image, spacing_xyz_mm) -> list[float]:
    """Gaussian sigma (mm) per image axis before downsampling onto ``spacing_xyz_mm``:

        sigma_k = max(0, (s_out_k - s_in_k) / 2)

    with ``s_in_k`` the source spacing along image axis k and ``s_out_k`` the crop grid's spacing along the
    LPS axis that image axis k runs closest to (axial series: x, y, z). For a downsampling factor
    ``f = s_out / s_in`` this is ``(f - 1) / 2`` source voxels (scikit-image's ``rescale`` anti-aliasing rule):
    no smoothing where the grid is as fine as the source or finer."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: image axes in LPS
    out = []
    for k, s_in in enumerate(image.GetSpacing()):
        s_out = float(spacing_xyz_mm[int(np.argmax(np.abs(direction[:, k])))])
        out.append(max(0.0, (s_out - float(s_in)) / 2.0))
    return out


def anatomy_lut(anatomy_set: AnatomySet) -> np.ndarray:
    """(256,) uint8 lookup table: TotalSegmentator ``total`` id -> anatomy label (0 for other classes)."""
    lut = np.zeros(256, np.uint8)
    for tid, label in anatomy_set.total_id_to_label().items():
        lut[tid] = label
    return lut


def group_anatomies(total_labels: np.ndarray, anatomy_set: AnatomySet) -> np.ndarray:
    """(Z, Y, X) ``total`` ids -> (Z, Y, X) uint8 anatomy labels of the set."""
    if total_labels.dtype != np.uint8:
        total_labels = total_labels.astype(np.uint8)
    return anatomy_lut(anatomy_set)[total_labels]


def _bincount(arr: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(arr.ravel(), minlength=minlength)`` (int64) counted in slabs of the first axis, so that
    numpy's conversion of ``arr`` to intp never holds more than a few million voxels at once."""
    counts = np.zeros(minlength, np.int64)
    if arr.size == 0:
        return counts
    step = max(1, (1 << 20) // max(1, arr[0].size))
    for z in range(0, arr.shape[0], step):
        c = np.bincount(arr[z : z + step].ravel(), minlength=minlength)
        if c.size > counts.size:
            counts = np.concatenate([counts, np.zeros(c.size - counts.size, np.int64)])
        counts[: c.size] += c
    return counts


def _merge_box(a: tuple[slice, ...] | None, b: tuple[slice, ...]) -> tuple[slice, ...]:
    if a is None:
        return b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _total_counts_boxes(total: np.ndarray, lut: np.ndarray, n: int) -> tuple[np.ndarray, list]:
    """Per anatomy label 0..n: voxel counts, and per label 1..n the ``find_objects`` box, of ``lut[total]``
    without building ``lut[total]``. ``total`` (Z, Y, X) uint8."""
    counts_t = _bincount(total, 256)[:256]  # (256,) per total id
    counts = np.zeros(n + 1, np.int64)
    np.add.at(counts, lut.astype(np.intp), counts_t)
    boxes: list = [None] * n
    for t, box in enumerate(ndimage.find_objects(total, max_label=255), start=1):
        k = int(lut[t])
        if box is not None and 1 <= k <= n:
            boxes[k - 1] = _merge_box(boxes[k - 1], box)
    return counts, boxes


@dataclass
class AnatomyStats:
    """What one anatomy looks like in the source label map (and, after cropping, in the crop)."""

    label: int
    name: str
    present: bool
    voxels: int
    volume_ml: float
    bbox_lps_mm: list[list[float]] | None
    """[[x, y, z] min, [x, y, z] max] of the anatomy's voxels (edges), LPS mm; None when absent."""
    cut_by_scan_boundary: bool
    """The anatomy touches the first or last voxel of some axis of the scan: part of it lies outside."""
    cut_by_crop: bool = False
    """The crop's maximum size cut the anatomy."""
    crop_voxels: int = 0
    """Voxels of the anatomy on the output grid."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _index_box_to_lps(image: sitk.Image, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box of the voxel-index box [lo, hi] (inclusive, x/y/z order), voxel edges."""
    pts = [
        image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        for x in (lo[0] - 0.5, hi[0] + 0.5)
        for y in (lo[1] - 0.5, hi[1] + 0.5)
        for z in (lo[2] - 0.5, hi[2] + 0.5)
    ]
    arr = np.array(pts)
    return arr.min(axis=0), arr.max(axis=0)


def anatomy_stats(anat: np.ndarray, image: sitk.Image, anatomy_set: AnatomySet, min_voxels: int = 1) -> list[AnatomyStats]:
    """Per anatomy of the set: presence, voxel count, volume, physical box, scan-boundary cut.

    ``anat`` is the (Z, Y, X) anatomy label map on ``image``'s grid.
    """
    n = len(anatomy_set)
    counts = _bincount(anat, n + 1)
    boxes = ndimage.find_objects(anat, max_label=n)
    return _stats(counts, boxes, anat.shape, image, anatomy_set, min_voxels)


def _stats(counts: np.ndarray, boxes: list, shape: tuple[int, ...], image: sitk.Image, anatomy_set: AnatomySet,
           min_voxels: int) -> list[AnatomyStats]:
    """:func:`anatomy_stats` from per-label voxel counts and ``find_objects`` boxes of the (Z, Y, X) map."""
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    out = []
    for a in anatomy_set.anatomies:
        k = a.label
        box = boxes[k - 1] if k - 1 < len(boxes) else None
        voxels = int(counts[k])
        present = voxels >= min_voxels and box is not None
        bbox = None
        cut = False
        if box is not None and voxels:
            lo_zyx = [s.start for s in box]
            hi_zyx = [s.stop - 1 for s in box]
            cut = any(lo == 0 or hi == size - 1 for lo, hi, size in zip(lo_zyx, hi_zyx, shape))
            plo, phi = _index_box_to_lps(image, tuple(lo_zyx[::-1]), tuple(hi_zyx[::-1]))
            bbox = [[round(float(v), 2) for v in plo], [round(float(v), 2) for v in phi]]
        out.append(AnatomyStats(k, a.name, present, voxels, round(voxels * voxel_ml, 3), bbox, bool(cut and present)))
    return out


# ------------------------------------------------------------------------------------------------- crop


@dataclass
class Crop:
    """The cropped case: CT (int16 HU) and anatomy map (uint8) on one axis-aligned LPS grid."""

    image: sitk.Image
    anatomy: sitk.Image
    stats: list[AnatomyStats]
    geometry: dict[str, Any]


def crop_grid(boxes: list[list[list[float]]], cfg: CropConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """Origin (x, y, z mm, voxel centre) and size (x, y, z) of the output grid covering ``boxes`` (LPS)
    with the margin, padded to ``min_size`` and cut to ``max_size``; and whether it was cut."""
    s = np.array(cfg.spacing_xyz_mm, float)
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    margin = np.array(cfg.margin_zyx_vox[::-1], float) * s
    lo, hi = lo - margin, hi + margin
    size = np.ceil((hi - lo) / s - 1e-6).astype(int)
    centre = (lo + hi) / 2
    min_size = np.array(cfg.min_size_zyx[::-1])
    max_size = np.array(cfg.max_size_zyx[::-1])
    cut = bool(np.any(size > max_size))
    size = np.clip(size, min_size, max_size)
    origin = centre - size * s / 2 + s / 2
    return origin, size, cut


def crop_case(image: sitk.Image, total_labels: sitk.Image, anatomy_set: AnatomySet, cfg: CropConfig) -> Crop:
    """Group, measure and crop one case. ``total_labels`` must lie on ``image``'s grid (see segment.py)."""
    total = sitk.GetArrayViewFromImage(total_labels)  # (Z, Y, X)
    lut = anatomy_lut(anatomy_set)
    assert lut[0] == 0, "total id 0 is background and belongs to no anatomy"
    # The label map to resample: ``total_labels`` itself when it is uint8 on exactly ``image``'s geometry
    # (as every segmenter returns it), else a uint8 copy with ``image``'s geometry (the grouping's rules).
    same_geometry = (total_labels.GetOrigin() == image.GetOrigin() and total_labels.GetSpacing() == image.GetSpacing()
                     and total_labels.GetDirection() == image.GetDirection())
    if total.dtype == np.uint8 and same_geometry:
        total_u8, total_img = total, total_labels
    else:
        total_u8 = total if total.dtype == np.uint8 else total.astype(np.uint8)
        total_img = sitk.GetImageFromArray(total_u8)
        total_img.CopyInformation(image)
    counts, boxes = _total_counts_boxes(total_u8, lut, len(anatomy_set))
    stats = _stats(counts, boxes, total_u8.shape, image, anatomy_set, cfg.min_voxels)
    present = [s for s in stats if s.present]
    if len(present) < max(cfg.min_anatomies, 1):
        found = sorted(set(np.unique(np.asarray(total)).tolist()) - {0})
        raise CropError(
            f"label map holds {len(present)} anatomies of set {anatomy_set.name!r} (need {max(cfg.min_anatomies, 1)}); "
            f"its label ids: {found[:20]}{' ...' if len(found) > 20 else ''}"
        )
    origin, size, cut = crop_grid([s.bbox_lps_mm for s in present], cfg)
    spacing = tuple(float(v) for v in cfg.spacing_xyz_mm)
    ident = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    size_t = tuple(int(v) for v in size)
    origin_t = tuple(float(v) for v in origin)
    interp = sitk.sitkLinear if cfg.interpolation == "linear" else sitk.sitkBSpline
    if cfg.antialias:
        sigmas = antialias_sigmas_mm(image, spacing)
        if any(v > 0 for v in sigmas):
            src = sitk.Cast(image, sitk.sitkFloat32)
            image = sitk.DiscreteGaussian(src, [v * v for v in sigmas], 32, 0.01, True)  # variance in mm^2
            del src
    ct = sitk.Resample(image, size_t, sitk.Transform(), interp, origin_t, spacing, ident, float(cfg.pad_hu), sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(ct)
    hu = np.empty(arr.shape, np.int16)  # (Z, Y, X)
    for z in range(0, arr.shape[0], 16):  # slabs: no full-size float temporary
        np.rint(np.clip(arr[z : z + 16], cfg.clip_hu[0], cfg.clip_hu[1]), out=hu[z : z + 16], casting="unsafe")
    del ct, arr
    out_ct = sitk.GetImageFromArray(hu)
    del hu
    out_ct.SetOrigin(origin_t)
    out_ct.SetSpacing(spacing)
    out_ct.SetDirection(ident)

    # Nearest neighbour picks the same source voxel for the ids as for the grouped map, and outside the
    # scan id 0 maps to 0, so grouping after resampling equals resampling the grouped map.
    out_total = sitk.Resample(total_img, size_t, sitk.Transform(), sitk.sitkNearestNeighbor, origin_t, spacing, ident, 0,
                              sitk.sitkUInt8)
    del total_img
    grouped = lut[sitk.GetArrayViewFromImage(out_total)]  # (Z, Y, X) uint8
    out_anat = sitk.GetImageFromArray(grouped)
    del grouped
    out_anat.CopyInformation(out_total)
    del out_total
    crop_counts = _bincount(sitk.GetArrayViewFromImage(out_anat), len(anatomy_set) + 1)
    for s in stats:
        s.crop_voxels = int(crop_counts[s.label])
        if s.present and cut:
            lo = np.array(s.bbox_lps_mm[0])
            hi = np.array(s.bbox_lps_mm[1])
            glo = origin - np.array(spacing) / 2
            ghi = glo + size * np.array(spacing)
            s.cut_by_crop = bool(np.any(lo < glo - 1e-3) or np.any(hi > ghi + 1e-3))

    geometry = {
        "shape_zyx": [int(v) for v in size[::-1]],
        "spacing_xyz_mm": list(spacing),
        "origin_xyz_mm": [round(float(v), 4) for v in origin],
        "direction": list(ident),
        "orientation": "LPS, axis-aligned; array axes (z, y, x)",
        "source_shape_zyx": list(total.shape),
        "source_spacing_xyz_mm": [round(float(v), 4) for v in image.GetSpacing()],
        "crop_cut_to_max_size": cut,
    }
    return Crop(out_ct, out_anat, stats, geometry)


def hu_means(crop: Crop) -> dict[str, float]:
    """Mean HU of each anatomy inside the crop (anatomies with crop voxels only)."""
    hu = sitk.GetArrayViewFromImage(crop.image)
    lab = sitk.GetArrayViewFromImage(crop.anatomy)
    sums = np.bincount(lab.ravel(), weights=hu.ravel().astype(np.float64), minlength=len(crop.stats) + 1)
    counts = np.bincount(lab.ravel(), minlength=len(crop.stats) + 1)
    return {s.name: float(sums[s.label] / counts[s.label]) for s in crop.stats if counts[s.label]}


__all__ = [
    "AnatomyStats",
    "Crop",
    "CropConfig",
    "CropError",
    "anatomy_lut",
    "anatomy_stats",
    "crop_case",
    "crop_grid",
    "group_anatomies",
    "hu_means",
    "load_crop_config",
]
