"""Visibility of every synthetic finding, and separation of the anatomies' token sets, at candidate input geometries
(issue 15, items 1 and 4: the CPU benchmark's geometry chosen by measurement; visibility as data).

    nice -n 19 .venv/bin/python -m benchmarks.visibility COHORT [COHORT ...] --out DIR [--cases N]
                                                         [--geometries A,B] [--write-config B] [--record]

``COHORT`` is a folder written by ``fvlm synth --format nifti`` (images, segmentations, lesion maps and truth
JSON: :mod:`pipelines.synth.cohort`); several are pooled (``--cases N``: the first N of each). Writes
``DIR/visibility.json`` (every number below, per geometry) and ``DIR/benchmarks.md`` (the BENCHMARKS.md block;
``--record`` also writes it there), and prints a table per geometry. ``--write-config G`` writes each task's
verdict at geometry ``G`` into ``configs/synth/findings.yaml`` (``visible`` and ``visibility``, read by
:func:`pipelines.synth.findings.findings_config`).

Geometries (:data:`GEOMETRIES`, data: a third is one more entry). Each case takes the path of the model's input:

1. crop grid: the union box of the fvlm15 anatomies present (>= 10 source voxels) plus ``margin_zyx_vox``, on an
   axis-aligned grid of ``spacing_xyz_mm``, padded centred to ``min_size_zyx`` and cut to ``max_size_zyx``
   around its centre (:func:`pipelines.preprocess.crop.crop_grid`, the preprocessing's own rule);
2. the HU volume resampled onto it (linear; -1024 outside the scan; clipped to [-1024, 3071] as stored); with
   ``antialias`` each source axis is first smoothed by a Gaussian of ``sigma_mm = max(0, (s_out - s_in) / 2)``.
   The anatomy map (TotalSegmentator ids grouped to fvlm15 by the preprocessing's lookup table) takes the
   nearest source voxel;
3. windowed: ``I = clip((HU + 1150) / 1500, 0, 1)`` (:func:`pipelines.cases.view.window`);
4. with ``resize_zyx``, the windowed case resized to that size (trilinear, ``align_corners=False``; anatomy map
   ``nearest-exact``): the operators of :func:`pipelines.cases.view.resize_view`, the loader's resize mode
   (:func:`resize` calls them without MONAI's import time; a test checks that both agree);
5. cut into tokens of ``token_zyx`` voxels.

Each finding's lesion indicator (1 on its lesion id, 0 elsewhere) takes steps 2 and 4 as a float volume (same
smoothing, linear resampling, trilinear resize: the image's linear operators), so its value ``f`` in an output
voxel is the share of that voxel's intensity that comes from the lesion (before the window's clipping).

Measures (output grid, voxel size ``s_out`` per axis; for a resized geometry the case's own, extent / size):

- lesion volume ``V = sum(f)``: the partial-volume-weighted size in output voxels. The lesion touches the voxels
  with ``f >= 0.05``; none touched: out of view, ``V = 0`` and ``CNR = 0``.
- core ``L = {f >= 0.5}`` (voxels at least half lesion); if empty, the one voxel of largest ``f``, whose contrast
  then carries the partial-volume dilution.
- background ``B``: voxels of the task's anatomy not touched by the lesion, within ``NEAR_MM`` = 30 mm of it (a box
  of ``max(1, ceil(30 / s_out))`` voxels per axis around the touched voxels), in the anatomy's interior (its six
  neighbours in the anatomy too: the anatomy's partial volume with its neighbours is not noise of the host); the
  first of (interior and near, near, whole anatomy) with >= ``MIN_BACKGROUND`` = 10 voxels, else undefined.
- ``CNR = |mean(I over L) - mean(I over B)| / max(std(I over B), 5 HU / 1500)``: the floor, below the synthetic
  organs' texture (9-16 HU in liver and spleen), only bounds a background the window saturates (bone above
  350 HU), against which any difference would otherwise be infinite.
- effect AUC, per task over cases: the anatomy's voxel count and its mean ``I`` on the output grid, cases with
  the task against eligible cases without it (same sex for a sex-specific task, an enhanced phase for a
  contrast-only one), both with the anatomy on the output grid; ``roc_auc_score`` of each, folded to
  ``max(AUC, 1 - AUC)``, the larger of the two (Hanley & McNeil 1982 standard error beside it). Needs >= 3 cases
  on each side.

Per task: ``n`` cases with it, median ``V`` and median ``CNR`` over them, the effect AUC. ``kind`` is ``organ`` for
the signatures whose lesion is the whole organ or its tissue (``enlarge``: cardiomegaly, hepatomegaly,
splenomegaly, atrophies, distensions, prostatomegaly, adrenal hyperplasia; ``density``: steatosis, osteopenia):
no host lies outside such a lesion, so a contrast is undefined or measures normal anatomy (``lesion share`` in the
JSON: median share of the anatomy's source voxels the lesion covers). Every other signature is ``lesion``.

Rule, the same for every task::

    visible = (kind == "lesion" and median V >= 1 and median CNR >= 1) or effect AUC >= 0.75

A lesion smaller than one output voxel owns none; a core differing from its surroundings by less than one
background standard deviation is matched by a third of the normal voxels around it (Gaussian background). An
effect AUC of 0.75 (half-way between chance and perfect) means one summary of the anatomy that the model pools,
its extent or its mean, ranks a case with the finding above one without it three times in four; with about 10
positives its standard error is about 0.09, so a finding without effect passes by chance in about 1-2% of tasks.
The rule errs towards invisible: a shape change that neither stands out locally nor moves its anatomy's voxel
count (a vertebral compression fracture's lost height) counts as invisible. The verdict written to the config
names the measure that decided: ``cnr`` (value CNR, with ``volume_vox``) for a lesion that passes the local test or
fails both, else ``effect_auc``; ``cases`` is the number of cases with the task behind it. Verdicts near a threshold
need many cases: on the 300 cases of ``data/bench15/cohort/val`` (about 13 per task) 8 of the 54 verdicts at
``bench-6x6x10`` differ from those on val + train (2,300 cases, about 90 per task), from which the config is written.

Anatomy separation: per case, the set of tokens touched by each anatomy (a token holding >= 1 of its output
voxels); per anatomy, the share of cases (with the anatomy on the output grid) in which its set is a subset of
another anatomy's set (tokens pooled for it are then all shared with that anatomy), the anatomy most often
containing it, the median number of tokens touched, the median ``purity`` (its voxels / all anatomy voxels in
the tokens it touches: its own share of a pooling over those tokens), and the median share of its source volume
on the output grid (``in view``: a fixed field of view may cut it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import yaml  # noqa: E402
from scipy import ndimage  # noqa: E402

from anatomy.catalog import AnatomySet, load_anatomy_set  # noqa: E402
from benchmarks.record import machine, markdown_table, record  # noqa: E402
from pipelines.preprocess.crop import CropConfig, anatomy_lut, anatomy_stats, crop_grid  # noqa: E402
from pipelines.synth.findings import VISIBILITY_MEASURES, findings_config  # noqa: E402

WINDOW_HU = (-1150.0, 350.0)
PAD_HU, CLIP_HU = -1024.0, (-1024.0, 3071.0)
MIN_SOURCE_VOXELS = 10
TOUCH, CORE = 0.05, 0.5
NEAR_MM = 30.0
MIN_BACKGROUND = 10
SIGMA_FLOOR = 5.0 / (WINDOW_HU[1] - WINDOW_HU[0])
MIN_VOLUME_VOX, MIN_CNR, MIN_EFFECT_AUC = 1.0, 1.0, 0.75
MIN_AUC_CASES = 3
ORGAN_SIGNATURES = frozenset({"enlarge", "density"})
"""Signatures whose lesion is the whole organ or its tissue: judged by the effect AUC only."""


@dataclass(frozen=True)
class Geometry:
    """One candidate input geometry of the model (module docstring, steps 1-5)."""

    name: str
    """Name written to the config's ``visibility.geometry``."""
    spacing_xyz_mm: tuple[float, float, float]
    """Crop grid voxel size (x, y, z) mm."""
    margin_zyx_vox: tuple[int, int, int]
    """Margin around the anatomies' union box, crop grid voxels (z, y, x)."""
    min_size_zyx: tuple[int, int, int]
    """The crop grid is padded (centred) to at least this size."""
    max_size_zyx: tuple[int, int, int]
    """... and cut to at most this size around the anatomies' centre (= ``min_size_zyx``: a fixed size)."""
    token_zyx: tuple[int, int, int]
    """Token (patch) size in model-input voxels."""
    antialias: bool
    """Gaussian smoothing before each downsampling, ``sigma_mm = max(0, (s_out - s_in) / 2)`` per axis."""
    resize_zyx: tuple[int, int, int] | None = None
    """Resize the windowed crop to this size (per case: the voxel size then varies); None keeps the crop grid."""
    description: str = ""

    def __post_init__(self) -> None:
        CropConfig(name=self.name, spacing_xyz_mm=self.spacing_xyz_mm, margin_zyx_vox=self.margin_zyx_vox,
                   min_size_zyx=self.min_size_zyx, max_size_zyx=self.max_size_zyx)  # its checks
        if self.resize_zyx is None and self.min_size_zyx != self.max_size_zyx:
            raise ValueError(f"geometry {self.name!r}: without resize_zyx the crop size must be fixed "
                             f"(min_size_zyx == max_size_zyx), got {self.min_size_zyx} and {self.max_size_zyx}")
        out = self.resize_zyx or self.min_size_zyx
        if any(o % t for o, t in zip(out, self.token_zyx)):
            raise ValueError(f"geometry {self.name!r}: input size {out} is not a multiple of token size "
                             f"{self.token_zyx}")

    def crop_config(self) -> CropConfig:
        return CropConfig(name=self.name, spacing_xyz_mm=self.spacing_xyz_mm, margin_zyx_vox=self.margin_zyx_vox,
                          min_size_zyx=self.min_size_zyx, max_size_zyx=self.max_size_zyx, pad_hu=int(PAD_HU))

    @property
    def grid_zyx(self) -> tuple[int, int, int]:
        out = self.resize_zyx or self.min_size_zyx
        return tuple(o // t for o, t in zip(out, self.token_zyx))  # type: ignore[return-value]


GEOMETRIES: dict[str, Geometry] = {
    "A": Geometry("demo-resize-32x64x64", (3.0, 3.0, 5.0), (2, 4, 4), (32, 64, 64), (200, 200, 200), (8, 16, 16),
                  antialias=False, resize_zyx=(32, 64, 64),
                  description="configs/preprocess/demo.yaml crop, each case resized to 32 x 64 x 64, 64 tokens"),
    "B": Geometry("bench-6x6x10", (6.0, 6.0, 10.0), (0, 0, 0), (72, 48, 64), (72, 48, 64), (8, 8, 8),
                  antialias=True,
                  description="6 x 6 x 10 mm, fixed 72 x 48 x 64 crop, 432 tokens of 80 x 48 x 48 mm"),
}


# ------------------------------------------------------------------------------------------------- measures
def lesion_measures(image: np.ndarray, fraction: np.ndarray, host: np.ndarray,
                    spacing_zyx_mm: tuple[float, float, float]) -> tuple[float, float]:
    """``(V, CNR)`` of one lesion (module docstring). ``image`` windowed (Z, Y, X); ``fraction`` the lesion's
    resampled indicator (Z, Y, X); ``host`` (Z, Y, X) bool, its anatomy. CNR is NaN without a background."""
    volume = float(fraction.sum())
    touched = fraction >= TOUCH
    if not touched.any():
        return 0.0, 0.0
    core = fraction >= CORE
    if not core.any():
        core = np.zeros_like(core)
        core.flat[int(np.argmax(fraction))] = True
    reach = [2 * max(1, math.ceil(NEAR_MM / s)) + 1 for s in spacing_zyx_mm]
    near = ndimage.maximum_filter(touched.view(np.uint8), size=reach).astype(bool)
    outside = host & ~touched
    interior = ndimage.binary_erosion(host)
    for background in (outside & near & interior, outside & near, outside):
        if int(background.sum()) >= MIN_BACKGROUND:
            break
    else:
        return volume, float("nan")
    values = image[background].astype(np.float64)
    contrast = abs(float(image[core].astype(np.float64).mean()) - values.mean())
    return volume, contrast / max(float(values.std()), SIGMA_FLOOR)


def token_counts(labels: np.ndarray, token_zyx: tuple[int, int, int], n: int) -> np.ndarray:
    """``(n + 1, T)`` int: voxels of label 0..n per token (``T`` tokens, row-major z, y, x); ``labels`` (Z, Y, X)."""
    gz, gy, gx = (s // t for s, t in zip(labels.shape, token_zyx))
    tz, ty, tx = token_zyx
    blocks = labels.reshape(gz, tz, gy, ty, gx, tx).transpose(0, 2, 4, 1, 3, 5).reshape(gz * gy * gx, -1)  # (T, t)
    keys = np.arange(blocks.shape[0])[:, None] * (n + 1) + blocks.astype(np.int64)
    counts = np.bincount(keys.ravel(), minlength=blocks.shape[0] * (n + 1)).reshape(-1, n + 1)  # (T, n + 1)
    return counts.T


def token_sets(labels: np.ndarray, token_zyx: tuple[int, int, int], n: int) -> np.ndarray:
    """``(n + 1, T)`` bool: which tokens hold label 0..n (:func:`token_counts` > 0)."""
    return token_counts(labels, token_zyx, n) > 0


def purity(counts: np.ndarray) -> list[float | None]:
    """Per label 1..n: its voxels / all anatomy voxels (labels >= 1) in the tokens it touches (None when absent),
    the share of an anatomy's own content in a pooling over its tokens. ``counts`` (n + 1, T)."""
    out: list[float | None] = []
    for a in range(1, counts.shape[0]):
        touched = counts[a] > 0
        out.append(float(counts[a].sum() / counts[1:, touched].sum()) if touched.any() else None)
    return out


def contained_in(sets: np.ndarray) -> dict[int, list[int]]:
    """Per label ``a`` >= 1 that touches a token: the other labels ``b`` >= 1 whose token set holds all of ``a``'s."""
    present = [a for a in range(1, sets.shape[0]) if sets[a].any()]
    return {a: [b for b in present if b != a and not (sets[a] & ~sets[b]).any()] for a in present}


def effect_auc(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """``(max(AUC, 1 - AUC), Hanley-McNeil standard error)``; NaN with fewer than 3 cases on a side."""
    from sklearn.metrics import roc_auc_score

    p, q = len(positive), len(negative)
    if p < MIN_AUC_CASES or q < MIN_AUC_CASES:
        return float("nan"), float("nan")
    auc = float(roc_auc_score(np.r_[np.ones(p), np.zeros(q)], np.r_[positive, negative]))
    auc = max(auc, 1.0 - auc)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt(max(0.0, auc * (1 - auc) + (p - 1) * (q1 - auc * auc) + (q - 1) * (q2 - auc * auc)) / (p * q))
    return auc, se


def verdict(kind: str, volume: float, cnr: float, auc: float) -> tuple[bool, dict]:
    """The rule (module docstring): ``(visible, visibility fields without geometry)``."""
    local = kind == "lesion" and volume >= MIN_VOLUME_VOX and cnr >= MIN_CNR  # NaN compares False
    pooled = auc >= MIN_EFFECT_AUC
    if kind == "lesion" and (local or not pooled):
        return bool(local), {"measure": "cnr", "value": round(cnr, 2), "volume_vox": round(volume, 1)}
    return bool(local or pooled), {"measure": "effect_auc", "value": round(auc, 3)}


# ------------------------------------------------------------------------------------------------ one case
def resize(image: np.ndarray, labels: np.ndarray, fractions: dict[int, np.ndarray],
           size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """:func:`pipelines.cases.view.resize_view`'s resize of the windowed ``image`` (trilinear, ``align_corners=False``)
    and of ``labels`` (``nearest-exact``), and the image's operator on each lesion fraction. Arrays (Z, Y, X)."""
    import torch
    import torch.nn.functional as F

    def lin(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]  # (1, 1, Z, Y, X)
        return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()

    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    lab = F.interpolate(lab, size=size, mode="nearest-exact")[0, 0].round().to(torch.uint8).numpy()
    return lin(image), lab, {i: lin(f) for i, f in fractions.items()}


def _resample(arr: np.ndarray, src: sitk.Image, origin, size, spacing, linear: bool, default: float,
              sigma_zyx_vox: list[float] | None) -> np.ndarray:
    if linear and sigma_zyx_vox is not None and any(s > 0 for s in sigma_zyx_vox):
        arr = ndimage.gaussian_filter(arr.astype(np.float32), sigma_zyx_vox, mode="nearest")
    img = sitk.GetImageFromArray(arr.astype(np.float32) if linear else arr)
    img.CopyInformation(src)
    ident = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, origin,
                        spacing, ident, default, sitk.sitkFloat32 if linear else sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)  # (Z, Y, X)


@dataclass
class View:
    """One case at one geometry: windowed image, anatomy map, lesion fractions, output voxel size."""

    image: np.ndarray
    anatomy: np.ndarray
    fractions: dict[int, np.ndarray]
    spacing_zyx_mm: tuple[float, float, float]


def case_view(geom: Geometry, image: sitk.Image, anat: np.ndarray, lesions: np.ndarray, lesion_ids: list[int],
              anatomy_set: AnatomySet) -> View:
    """Module docstring, steps 1-4. ``anat`` (Z, Y, X) fvlm15 labels and ``lesions`` (Z, Y, X) ids on ``image``."""
    from pipelines.cases.view import window

    stats = anatomy_stats(anat, image, anatomy_set, MIN_SOURCE_VOXELS)
    boxes = [s.bbox_lps_mm for s in stats if s.present]
    if not boxes:
        raise ValueError("no fvlm15 anatomy with at least 10 voxels in the label map")
    origin, size, _ = crop_grid(boxes, geom.crop_config())
    origin_t, size_t = tuple(float(v) for v in origin), tuple(int(v) for v in size)
    spacing = tuple(float(v) for v in geom.spacing_xyz_mm)
    sigma = None
    if geom.antialias:
        s_in = image.GetSpacing()
        sigma = [max(0.0, (so - si) / 2) / si for so, si in zip(spacing, s_in)][::-1]  # (z, y, x) source voxels
    hu = np.clip(_resample(sitk.GetArrayViewFromImage(image), image, origin_t, size_t, spacing, True, PAD_HU, sigma),
                 *CLIP_HU)
    lab = _resample(anat, image, origin_t, size_t, spacing, False, 0, None)
    fr = {i: _resample((lesions == i).astype(np.float32), image, origin_t, size_t, spacing, True, 0.0, sigma)
          for i in lesion_ids}
    s_out = tuple(spacing[::-1])
    img = window(hu, WINDOW_HU).numpy()
    if geom.resize_zyx is None:
        return View(img, lab, fr, s_out)  # type: ignore[arg-type]
    if geom.antialias:
        raise NotImplementedError(f"geometry {geom.name!r}: antialiasing before a resize is not implemented")
    img, lab, fr = resize(img, lab, fr, geom.resize_zyx)
    s_out = tuple(s * n / m for s, n, m in zip(s_out, hu.shape, geom.resize_zyx))
    return View(img, lab, fr, s_out)  # type: ignore[arg-type]


def measure_case(folder: Path, case_id: str, geoms: dict[str, Geometry], anatomy_set: AnatomySet,
                 lut: np.ndarray) -> dict:
    """Every per-case number of every geometry (JSON-able)."""
    truth = json.loads((folder / "truth" / f"{case_id}.json").read_text(encoding="utf-8"))
    image = sitk.ReadImage(str(folder / "images" / f"{case_id}.nii.gz"))
    anat = lut[sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "segmentations" / f"{case_id}.nii.gz")))]
    lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lesions" / f"{case_id}.nii.gz")))
    n = len(anatomy_set)
    src_counts = np.bincount(anat.ravel(), minlength=n + 1)
    src_ml = src_counts * float(np.prod(image.GetSpacing())) / 1000.0
    findings = [f for f in truth["findings"] if f.get("lesion_id")]
    out = {"case_id": case_id, "sex": truth.get("sex"), "contrast": truth.get("contrast"),
           "tasks": [f["task"] for f in truth["findings"]], "lesion_share": {}, "geometries": {}}
    for f in findings:
        a = anatomy_set[f["anatomy"]].label
        covered = ((lesions == f["lesion_id"]) & (anat == a)).sum()
        out["lesion_share"][f["task"]] = float(covered / max(src_counts[a], 1))
    for key, geom in geoms.items():
        v = case_view(geom, image, anat, lesions, [f["lesion_id"] for f in findings], anatomy_set)
        counts = np.bincount(v.anatomy.ravel(), minlength=n + 1)
        sums = np.bincount(v.anatomy.ravel(), weights=v.image.ravel().astype(np.float64), minlength=n + 1)
        voxel_ml = float(np.prod(v.spacing_zyx_mm)) / 1000.0
        tok = token_counts(v.anatomy, geom.token_zyx, n)  # (n + 1, T)
        sets = tok > 0
        g = {"counts": counts[1:].tolist(),
             "means": [float(s / c) if c else None for s, c in zip(sums[1:], counts[1:])],
             "in_view": [float(c * voxel_ml / m) if m else None for c, m in zip(counts[1:], src_ml[1:])],
             "tokens": sets[1:].sum(axis=1).tolist(),
             "purity": purity(tok),
             "inside": {anatomy_set.anatomies[a - 1].name: [anatomy_set.anatomies[b - 1].name for b in bs]
                        for a, bs in contained_in(sets).items()},
             "findings": {}}
        for f in findings:
            host = v.anatomy == anatomy_set[f["anatomy"]].label
            vol, cnr = lesion_measures(v.image, v.fractions[f["lesion_id"]], host, v.spacing_zyx_mm)
            g["findings"][f["task"]] = {"volume_vox": vol, "cnr": cnr}
        out["geometries"][key] = g
    return out


# ------------------------------------------------------------------------------------------------ summaries
def _median(values) -> float:
    vals = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.median(vals)) if vals else float("nan")


def summarise(cases: list[dict], key: str, anatomy_set: AnatomySet) -> dict:
    """Per task and per anatomy numbers of geometry ``key`` over ``cases`` (module docstring)."""
    specs = findings_config().tasks
    names = anatomy_set.names
    tasks = {}
    for t, spec in specs.items():
        pos = [c for c in cases if t in c["tasks"]]
        if not pos:
            continue
        a = names.index(spec.anatomy)
        per = [c["geometries"][key]["findings"].get(t) for c in pos]
        per = [p for p in per if p is not None]
        neg = [c for c in cases if t not in c["tasks"] and (spec.sex is None or c["sex"] == spec.sex)
               and (not spec.requires_contrast or c["contrast"])]
        aucs = {}
        for what in ("counts", "means"):
            def vals(cs):
                x = [c["geometries"][key][what][a] for c in cs if c["geometries"][key]["counts"][a] > 0]
                return np.array(x, dtype=np.float64)
            aucs[what] = effect_auc(vals(pos), vals(neg))
        best = max(aucs.values(), key=lambda x: -1.0 if math.isnan(x[0]) else x[0])
        kind = "organ" if spec.signature in ORGAN_SIGNATURES else "lesion"
        volume = _median(p["volume_vox"] for p in per)
        cnr = _median(p["cnr"] for p in per) if kind == "lesion" else float("nan")
        visible, fields = verdict(kind, volume, cnr, best[0])
        tasks[t] = {"anatomy": spec.anatomy, "signature": spec.signature, "kind": kind, "n": len(pos),
                    "n_negative": len(neg), "volume_vox": volume, "cnr": cnr,
                    "out_of_view_share": float(np.mean([p["volume_vox"] == 0 for p in per])) if per else float("nan"),
                    "lesion_share": _median(c["lesion_share"].get(t) for c in pos),
                    "auc_count": aucs["counts"][0], "auc_mean": aucs["means"][0], "effect_auc": best[0],
                    "effect_auc_se": best[1], "visible": visible, "visibility": {**fields, "cases": len(pos)}}
    anatomies = {}
    for i, name in enumerate(names):
        here = [c["geometries"][key] for c in cases if c["geometries"][key]["counts"][i] > 0]
        inside = [g["inside"].get(name, []) for g in here]
        most = Counter(b for bs in inside for b in bs).most_common(1)
        anatomies[name] = {"cases": len(here),
                           "inside_share": float(np.mean([bool(bs) for bs in inside])) if here else float("nan"),
                           "most_often_inside": most[0][0] if most else None,
                           "tokens_median": _median(g["tokens"][i] for g in here),
                           "purity_median": _median(g["purity"][i] for g in here),
                           "in_view_median": _median(g["in_view"][i] for g in here)}
    return {"tasks": tasks, "anatomies": anatomies}


def _json(x):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    return x


def _f(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pct(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return "<1%" if 0 < x < 0.005 else f"{100 * x:.0f}%"


def task_table(result: dict) -> str:
    rows = []
    for t, r in result["tasks"].items():
        auc = f"{_f(r['effect_auc'])} ± {_f(r['effect_auc_se'])}" if not math.isnan(r["effect_auc"]) else "n/a"
        rows.append([t, r["anatomy"], r["n"], r["kind"], _f(r["volume_vox"], 1), _f(r["cnr"]), auc,
                     "yes" if r["visible"] else "no"])
    return markdown_table(["task", "anatomy", "n", "kind", "median V (vox)", "median CNR", "effect AUC ± se",
                           "visible"], rows)


def anatomy_table(results: dict[str, dict], geoms: dict[str, Geometry]) -> str:
    names = list(next(iter(results.values()))["anatomies"])
    header = ["anatomy"]
    for k, g in geoms.items():
        header += [f"{k}: tokens (of {int(np.prod(g.grid_zyx))})", f"{k}: inside another", f"{k}: purity",
                   f"{k}: in view"]
    rows = []
    for name in names:
        row = [name]
        for k in geoms:
            r = results[k]["anatomies"][name]
            inside = _pct(r["inside_share"])
            if r["most_often_inside"] and r["inside_share"] > 0:
                inside += f" ({r['most_often_inside']})"
            row += [_f(r["tokens_median"], 0), inside, _pct(r["purity_median"]), _pct(r["in_view_median"])]
        rows.append(row)
    return markdown_table(header, rows)


def comparison_table(results: dict[str, dict], geoms: dict[str, Geometry]) -> str:
    """One row per task, measures of every geometry side by side (the BENCHMARKS.md block)."""
    first = next(iter(results.values()))["tasks"]
    header = ["task", "anatomy", "n", "kind"]
    for k in geoms:
        header += [f"{k}: V", f"{k}: CNR", f"{k}: AUC", f"{k}: visible"]
    rows = []
    for t, r in first.items():
        row = [t, r["anatomy"], r["n"], r["kind"]]
        for k in geoms:
            x = results[k]["tasks"][t]
            row += [_f(x["volume_vox"], 1), _f(x["cnr"], 1), _f(x["effect_auc"]), "yes" if x["visible"] else "no"]
        rows.append(row)
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------------ the config
_FIELDS = re.compile(r",\s*visible: (?:true|false)(?:,\s*visibility: \{[^{}]*\})?")


def _braces(line: str) -> int:
    line = re.sub(r"\"[^\"]*\"|'[^']*'", "", line.split(" #")[0])
    return line.count("{") - line.count("}")


def write_config(path: Path, verdicts: dict[str, tuple[bool, dict]], width: int = 120) -> list[str]:
    """Write ``visible`` and ``visibility`` of each task in ``verdicts`` into the findings YAML ``path`` (flow
    mappings ``  task: {...}``, kept as they are; the two fields go on the entry's last line(s), replacing
    earlier ones). Returns the tasks written. The result is parsed back and must differ only in those fields."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    out, i, written = [], 0, []
    while i < len(lines):
        m = re.match(r"^  ([A-Za-z0-9_]+): \{", lines[i])
        if not m or m.group(1) not in verdicts:
            out.append(lines[i])
            i += 1
            continue
        j, depth = i, _braces(lines[i])
        while depth > 0:
            j += 1
            depth += _braces(lines[j])
        entry = _FIELDS.sub("", "".join(lines[i:j + 1])).rstrip()
        entry = "\n".join(x for x in entry.split("\n") if x.strip())
        if not entry.endswith("}"):
            raise ValueError(f"{path}: task {m.group(1)!r}: entry does not end with '}}' (comment after it?)")
        visible, fields = verdicts[m.group(1)]
        items = [f"{k}: {v}" for k, v in fields.items()]
        words = [f"visible: {str(visible).lower()},", "visibility: {" + items[0] + ","]
        words += [x + "," for x in items[1:-1]] + [items[-1] + "}}"]
        indent = " " * (lines[i].index("{") + 1)
        tail = [indent + words[0]]
        for w in words[1:]:  # fill lines up to ``width``
            if len(tail[-1]) + 1 + len(w) <= width:
                tail[-1] += " " + w
            else:
                tail.append(indent + w)
        out.append(entry[:-1] + ",\n" + "\n".join(tail) + "\n")
        written.append(m.group(1))
        i = j + 1
    new = "".join(out)
    before, after = yaml.safe_load(text), yaml.safe_load(new)
    for t in after["tasks"]:
        strip = {k: v for k, v in after["tasks"][t].items() if k not in ("visible", "visibility")}
        if strip != {k: v for k, v in before["tasks"][t].items() if k not in ("visible", "visibility")}:
            raise AssertionError(f"{path}: editing task {t!r} changed more than its visibility fields")
    if {k: v for k, v in after.items() if k != "tasks"} != {k: v for k, v in before.items() if k != "tasks"}:
        raise AssertionError(f"{path}: editing changed more than the tasks' visibility fields")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
    return written


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cohort", type=Path, nargs="+", help="folder(s) written by `fvlm synth --format nifti`")
    ap.add_argument("--out", type=Path, required=True, help="writes visibility.json and benchmarks.md here")
    ap.add_argument("--cases", type=int, default=None, help="first N cases of each cohort (default: all)")
    ap.add_argument("--geometries", default="A,B", help=f"comma-separated keys of {sorted(GEOMETRIES)}")
    ap.add_argument("--write-config", default=None, metavar="KEY",
                    help="write each task's verdict at this geometry into configs/synth/findings.yaml")
    ap.add_argument("--record", action="store_true", help="also write the block to BENCHMARKS.md")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.geometries.split(",") if k.strip()]
    unknown = [k for k in keys if k not in GEOMETRIES]
    if unknown or not keys:
        raise SystemExit(f"--geometries: unknown {unknown}; known: {', '.join(GEOMETRIES)}")
    if args.write_config is not None and args.write_config not in keys:
        raise SystemExit(f"--write-config {args.write_config}: not among --geometries {keys}")
    ids: list[tuple[Path, str]] = []
    for folder in args.cohort:
        found = sorted(p.name[: -len(".json")] for p in (folder / "truth").glob("*.json"))
        if not found:
            raise SystemExit(f"{folder}: no truth/*.json; pass a folder written by `fvlm synth --format nifti`")
        ids += [(folder, c) for c in (found[: args.cases] if args.cases else found)]
    geoms = {k: GEOMETRIES[k] for k in keys}
    anatomy_set = load_anatomy_set("fvlm15")
    lut = anatomy_lut(anatomy_set)
    t0 = time.perf_counter()
    cases = []
    for i, (folder, cid) in enumerate(ids):
        cases.append({"cohort": str(folder), **measure_case(folder, cid, geoms, anatomy_set, lut)})
        if (i + 1) % 25 == 0 or i + 1 == len(ids):
            print(f"{i + 1}/{len(ids)} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    results = {k: summarise(cases, k, anatomy_set) for k in keys}
    rule = {"lesion": f"V >= {MIN_VOLUME_VOX} and CNR >= {MIN_CNR}", "any": f"effect AUC >= {MIN_EFFECT_AUC}",
            "near_mm": NEAR_MM, "touch": TOUCH, "core": CORE, "min_background": MIN_BACKGROUND,
            "organ_signatures": sorted(ORGAN_SIGNATURES)}
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"cohorts": [str(c) for c in args.cohort], "cases": len(ids), "seconds": round(seconds, 1), "rule": rule,
               "geometries": {k: {"spec": asdict(g), **results[k]} for k, g in geoms.items()}, "per_case": cases}
    (args.out / "visibility.json").write_text(json.dumps(_json(payload), indent=1), encoding="utf-8")
    for k, g in geoms.items():
        vis = sum(r["visible"] for r in results[k]["tasks"].values())
        print(f"\n## Geometry {k}: {g.name} ({g.description}); {vis} of {len(results[k]['tasks'])} tasks visible\n")
        print(task_table(results[k]))
    print("\n## Anatomy token sets\n")
    print(anatomy_table(results, geoms))

    def uncertain(r: dict) -> bool:  # few cases, or decided by an AUC within two standard errors of the threshold
        by_auc = r["visibility"]["measure"] == "effect_auc"
        return r["n"] < 8 or (by_auc and abs(r["effect_auc"] - MIN_EFFECT_AUC) < 2 * r["effect_auc_se"])

    few = {k: [t for t, r in results[k]["tasks"].items() if uncertain(r)] for k in keys}
    counts = ", ".join(f"{k} ({g.name}) {sum(r['visible'] for r in results[k]['tasks'].values())}"
                       for k, g in geoms.items())
    table = comparison_table(results, geoms) + "\n\n" + anatomy_table(results, geoms)
    notes = (f"{len(ids)} cases of {', '.join(f'`{c}`' for c in args.cohort)}, {seconds:.0f} s on one core. "
             "Geometries: "
             + "; ".join(f"{k} = {g.name}: {g.description}" for k, g in geoms.items())
             + f". Visible tasks: {counts}. V: median lesion volume in output voxels (partial-volume weighted); CNR: "
             "median contrast of the lesion core against its anatomy within 30 mm, in background standard "
             "deviations; AUC: the larger of the anatomy's voxel-count and mean-intensity AUCs between cases with and "
             "without the task, folded to >= 0.5. Rule (every task): visible = (kind lesion, V >= 1 and CNR >= 1) or "
             "AUC >= 0.75; `organ` kind (signatures enlarge, density) by the AUC only. Anatomy table: median tokens "
             "touched; share of cases whose token set lies inside another anatomy's (the most frequent one); median "
             "purity (the anatomy's voxels / all anatomy voxels in its tokens); median share of the source volume on "
             "the grid. Definitions: `benchmarks/visibility.py`."
             + " Uncertain verdicts (fewer than 8 cases, or decided by an AUC within 2 se of 0.75): "
             + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in few.items()) + ".")
    title = f"Finding visibility and anatomy token separation: {' vs '.join(g.name for g in geoms.values())}"
    command = "nice -n 19 .venv/bin/python -m benchmarks.visibility " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.record:
        record(title, table, notes, command=command)
    block = (f"### {title}\n\n- command: `{command}`\n- date: {_dt.date.today().isoformat()}\n"
             f"- machine: {machine()}\n\n{table}\n\n{notes}\n")
    (args.out / "benchmarks.md").write_text(block, encoding="utf-8")
    print(f"\nBENCHMARKS.md block: {args.out / 'benchmarks.md'}; per-case numbers: {args.out / 'visibility.json'}")
    if args.write_config is not None:
        k = args.write_config
        verdicts = {t: (r["visible"], {"geometry": geoms[k].name, **r["visibility"]})
                    for t, r in results[k]["tasks"].items()
                    if not math.isnan(r["visibility"]["value"]) and r["visibility"]["measure"] in VISIBILITY_MEASURES}
        path = Path(findings_config().source)
        written = write_config(path, verdicts)
        skipped = sorted(set(findings_config().tasks) - set(written))
        print(f"wrote visibility of {len(written)} tasks at {geoms[k].name} into {path}"
              + (f"; not measured (no cases or too few): {', '.join(skipped)}" if skipped else ""))


if __name__ == "__main__":
    main()
