"""Segmenters: where a case's TotalSegmentator ``total`` label map comes from, behind one interface.

A segmenter turns a CT (a SimpleITK image in HU, any orientation) into a label map **on that image's
grid** holding TotalSegmentator ``total`` class ids. Two are registered:

- ``masks``: precomputed label maps (a folder holding ``<match key>.nii.gz`` files, or one file for a
  single input). A mask is resampled onto the image in physical space (nearest neighbour, identity
  transform, the image as reference), never matched by array index, so a mask exported on another grid,
  orientation or origin lands where it belongs. A mask whose physical extent does not overlap the image is
  an error for that case.
- ``totalsegmentator``: the TotalSegmentator Python API, restricted (``roi_subset``) to the classes the
  anatomy set needs, with its ``fast`` and ``device`` options. Weights come from the user's weights
  folder; they are checked when the segmenter is created, before any case runs, and their absence is an
  error that says how to install them (TotalSegmentator itself would start a download with no timeout).

``create_segmenter(name, **options)`` builds one by name; ``list_segmenters()`` lists the names (thin wrappers
around :data:`SEGMENTERS`, a :class:`fvlm.registry.Registry`). A new segmenter is a class with a
``segment(image, key)`` method registered with :func:`register_segmenter`.
Segmenters are pickled into worker processes, so they hold options, not models.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from unittest import mock
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from fvlm.registry import Registry


class SegmentationError(ValueError):
    """A case's label map cannot be produced or aligned; the message says why (no identifiers in it)."""


class Segmenter(Protocol):
    name: str

    def segment(self, image: sitk.Image, key: str | None) -> sitk.Image:
        """Label map (TotalSegmentator ``total`` ids, uint8) on ``image``'s grid; ``key`` is the case's match key."""
        ...

    def describe(self) -> dict:
        """Options worth recording with each case (no paths that could identify a patient)."""
        ...


#: name -> segmenter class; built by :func:`create_segmenter`
SEGMENTERS: Registry[Callable[..., Segmenter]] = Registry("segmenter")


def register_segmenter(name: str, help: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a segmenter class under ``name`` (and set its ``name``)."""

    def deco(cls: type) -> type:
        SEGMENTERS.register(name, cls, help=help)
        cls.name = name
        return cls

    return deco


def list_segmenters() -> list[str]:
    """Names of the registered segmenters."""
    return SEGMENTERS.names()


def create_segmenter(name: str, **options: object) -> Segmenter:
    """Build segmenter ``name`` with its options (see each class); unknown names and options list the known ones."""
    return SEGMENTERS.create(name, **options)


# ------------------------------------------------------------------------------------------ physical space


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (LPS) min and max corner, in mm, of the region the image's voxels cover (voxel edges)."""
    size = np.array(image.GetSize())
    corners = []
    for cx in (-0.5, size[0] - 0.5):
        for cy in (-0.5, size[1] - 0.5):
            for cz in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(cz))))
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def overlap_mm(a: sitk.Image, b: sitk.Image) -> np.ndarray:
    """Extent (mm, x/y/z) of the intersection of the two images' axis-aligned physical boxes (0 where none)."""
    alo, ahi = physical_bounds(a)
    blo, bhi = physical_bounds(b)
    return np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0.0, None)


def resample_labels_onto(labels: sitk.Image, image: sitk.Image, copy: bool = True) -> sitk.Image:
    """``labels`` resampled onto ``image``'s grid in physical space: nearest neighbour, identity transform.

    ``copy=False`` lets a label map already on ``image``'s grid be returned itself (its geometry set to the
    image's exactly) instead of a copy: for callers that own ``labels`` (a label map just read from disk),
    it saves one label-map-sized copy.

    Raises :class:`SegmentationError` when the two do not overlap physically, or when the label map has
    labels but none of them lands inside the image.
    """
    if labels.GetDimension() != 3:
        raise SegmentationError(f"label map has {labels.GetDimension()} dimensions, expected 3")
    if labels.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationError("label map has several components per voxel, expected one label id")
    ov = overlap_mm(labels, image)
    if not np.all(ov > 0):
        lo, hi = physical_bounds(labels)
        ilo, ihi = physical_bounds(image)
        raise SegmentationError(
            "label map does not overlap the image in physical space (label map spans "
            f"{_box(lo, hi)} mm, image spans {_box(ilo, ihi)} mm); it belongs to another scan or has a wrong origin"
        )
    if labels.GetPixelID() != sitk.sitkUInt8:
        arr = sitk.GetArrayViewFromImage(labels)
        if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(np.mod(arr, 1) == 0)):
            raise SegmentationError("label map holds values that are not label ids 0..255")
        labels = sitk.Cast(labels, sitk.sitkUInt8)
    same = (
        labels.GetSize() == image.GetSize()
        and np.allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-3)
        and np.allclose(labels.GetSpacing(), image.GetSpacing(), atol=1e-5)
        and np.allclose(labels.GetDirection(), image.GetDirection(), atol=1e-5)
    )
    if same:
        out = sitk.Image(labels) if copy else labels  # a copy shares the buffer until CopyInformation copies it
        out.CopyInformation(image)
        return out
    out = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    had = bool(np.any(sitk.GetArrayViewFromImage(labels)))
    if had and not np.any(sitk.GetArrayViewFromImage(out)):
        raise SegmentationError("no labelled voxel of the label map falls inside the image (physical overlap is empty)")
    return out


def _box(lo: np.ndarray, hi: np.ndarray) -> str:
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "]"


# ------------------------------------------------------------------------------------------------ masks

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@register_segmenter("masks")
class MaskSegmenter:
    """Precomputed label maps in TotalSegmentator ``total`` ids.

    ``path`` is a folder holding ``<key><suffix>`` (suffix one of :data:`MASK_SUFFIXES`; the key is the
    case's match key, e.g. the series folder name), or one label-map file used for every case (meant for a
    single input series).
    """

    name = "masks"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"--masks {self.path} does not exist")

    def find(self, key: str | None) -> Path:
        if self.path.is_file():
            return self.path
        if not key:
            raise SegmentationError("no match key for this series, so no mask file can be matched to it")
        for suffix in MASK_SUFFIXES:
            cand = self.path / f"{key}{suffix}"
            if cand.is_file():
                return cand
        for suffix in (".nii.gz", ".nii"):
            if key.endswith(suffix):  # keys that already carry the suffix (CT-RATE VolumeName)
                cand = self.path / key
                if cand.is_file():
                    return cand
        raise SegmentationError(
            f"no label map for this case in the masks folder (looked for <key> with {', '.join(MASK_SUFFIXES)})"
        )

    def segment(self, image: sitk.Image, key: str | None) -> sitk.Image:
        path = self.find(key)
        if path.name.endswith((".nii", ".nii.gz")):
            from pipelines.preprocess.integrity import IntegrityError, check_nifti_file

            try:
                check_nifti_file(path, "label map file")
            except IntegrityError as e:
                raise SegmentationError(str(e)) from None
        try:
            labels = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise SegmentationError(f"label map file {path.name} cannot be read ({_first_line(e)})") from None
        return resample_labels_onto(labels, image, copy=False)

    def describe(self) -> dict:
        return {"name": self.name, "source": "precomputed label maps"}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ------------------------------------------------------------------------------------- TotalSegmentator

#: TotalSegmentator ``total`` weights (dataset ids of ``totalsegmentator.map_tasks_config``): the
#: full-resolution 1.5 mm model is five part models; ``fast`` is one 3 mm model. With ``roi_subset`` the
#: API first runs the 6 mm model (298) to crop around the requested classes.
TOTAL_TASK_IDS = {False: (291, 292, 293, 294, 295), True: (297,)}
ROI_CROP_TASK_ID = 298


def totalseg_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """Where TotalSegmentator looks for weights: ``weights_dir``, else ``$TOTALSEG_WEIGHTS_PATH``, else
    ``$TOTALSEG_HOME_DIR/nnunet/results``, else ``~/.totalsegmentator/nnunet/results`` (its own rule)."""
    if weights_dir:
        return Path(weights_dir)
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"]) / "nnunet" / "results"
    home = Path("/tmp") if str(Path.home()) == "/" else Path.home()
    return home / ".totalsegmentator" / "nnunet" / "results"


def _dataset_folder(task_id: int) -> str:
    try:
        from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    except ImportError as e:
        raise SegmentationError(
            "TotalSegmentator is not installed; install fvlm with the 'segment' extra "
            "(pip install -c requirements/constraints.txt -e '.[segment]') or use --masks"
        ) from e
    info = TASK_ID_WEIGHTS_CONFIGS[task_id]
    return str(Path(info.get("rel_path") or "") / info["foldername"])


def missing_weights(fast: bool, roi_subset: bool, weights_dir: str | os.PathLike | None = None) -> list[str]:
    """The weight folders TotalSegmentator would need and that are absent (no ``checkpoint_final.pth``)."""
    root = totalseg_weights_dir(weights_dir)
    ids = list(TOTAL_TASK_IDS[bool(fast)]) + ([ROI_CROP_TASK_ID] if roi_subset else [])
    missing = []
    for tid in ids:
        folder = root / _dataset_folder(tid)
        if not folder.is_dir() or not any(folder.rglob("checkpoint_final.pth")):
            missing.append(_dataset_folder(tid))
    return missing


#: Where nnU-Net keeps the folders it reads from the environment once, at import: the variables, and the
#: modules of its inference path that copy them (``from nnunetv2.paths import nnUNet_results``).
_NNUNET_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_NNUNET_PATH_MODULES = ("nnunetv2.paths", "nnunetv2.utilities.file_path_utilities",
                        "nnunetv2.utilities.dataset_name_id_conversion")


@contextmanager
def nnunet_weights_at(root: str | os.PathLike) -> Iterator[None]:
    """Point TotalSegmentator and nnU-Net at the weights folder ``root`` for the duration of one call.

    TotalSegmentator hands its weights folder to nnU-Net through environment variables (``nnUNet_results``
    and two more, set by ``totalsegmentator.config.setup_nnunet``), but nnU-Net reads them only once, when
    ``nnunetv2.paths`` is first imported, and modules of its inference path keep copies. In a process that
    imported nnU-Net before (an earlier segmenter with another weights folder, a notebook, a test session)
    nnU-Net would look in the old folder and fail with "Could not find a dataset with the ID 298" while
    the environment names the right one. So the variables (``TOTALSEG_WEIGHTS_PATH`` too) are set here, the
    copies in already imported nnU-Net modules are patched, and both are restored on exit.
    """
    root = str(root)
    env = {"TOTALSEG_WEIGHTS_PATH": root, **{name: root for name in _NNUNET_PATH_VARS}}
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        for module_name in _NNUNET_PATH_MODULES:
            module = sys.modules.get(module_name)
            for name in _NNUNET_PATH_VARS:
                if module is not None and hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, root))
        yield


@register_segmenter("totalsegmentator")
class TotalSegmentatorSegmenter:
    """TotalSegmentator's ``total`` task through its Python API.

    Options: ``classes`` (the ``total`` class names to keep: the anatomy set's classes; passed as
    ``roi_subset``), ``fast`` (the 3 mm model, default True: minutes less per case on a CPU), ``device``
    (``gpu``, ``cpu``, ``mps`` or ``gpu:N``), ``weights_dir`` (else ``TOTALSEG_WEIGHTS_PATH`` /
    ``TOTALSEG_HOME_DIR``), ``threads`` (resampling threads).
    """

    name = "totalsegmentator"

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        fast: bool = True,
        device: str = "gpu",
        weights_dir: str | os.PathLike | None = None,
        threads: int = 1,
    ) -> None:
        self.classes = sorted(classes) if classes else None
        self.fast = bool(fast)
        self.device = device
        self.weights_dir = str(weights_dir) if weights_dir else None
        self.threads = int(threads)
        missing = missing_weights(self.fast, self.classes is not None, self.weights_dir)
        if missing:
            root = totalseg_weights_dir(self.weights_dir)
            task = "total_fast" if self.fast else "total"
            raise FileNotFoundError(
                f"TotalSegmentator weights are not installed in {root} (missing {', '.join(missing)}); "
                f"fvlm never downloads them. On a machine with internet run "
                f"'TOTALSEG_HOME_DIR=<dir> totalseg_download_weights -t {task}' and copy <dir>/nnunet/results "
                f"here, then set TOTALSEG_WEIGHTS_PATH (or TOTALSEG_HOME_DIR, or --weights-dir) to it; "
                f"or pass precomputed label maps with --masks"
            )

    def segment(self, image: sitk.Image, key: str | None) -> sitk.Image:
        import totalsegmentator.python_api as ts_api
        from totalsegmentator.python_api import totalsegmentator

        # TotalSegmentator's API posts anonymous usage statistics to its server on every run; fvlm makes no
        # network calls at run time, so that one call is disabled for the duration of this call only.
        with tempfile.TemporaryDirectory(prefix="fvlm-totalseg-") as tmp, \
                nnunet_weights_at(totalseg_weights_dir(self.weights_dir)), \
                mock.patch.object(ts_api, "send_usage_stats", lambda *args, **kwargs: None):
            src = Path(tmp) / "ct.nii.gz"
            sitk.WriteImage(image, str(src))
            seg = totalsegmentator(
                src, None, ml=True, fast=self.fast, roi_subset=self.classes, device=self.device,
                quiet=True, nr_thr_resamp=self.threads, nr_thr_saving=1, skip_saving=True,
            )
            out = Path(tmp) / "seg.nii.gz"
            import nibabel as nib

            nib.save(seg, str(out))
            labels = sitk.ReadImage(str(out))
        return resample_labels_onto(labels, image, copy=False)

    def describe(self) -> dict:
        return {"name": self.name, "task": "total", "fast": self.fast, "device": self.device,
                "roi_subset": self.classes}


__all__ = [
    "SEGMENTERS",
    "MaskSegmenter",
    "SegmentationError",
    "Segmenter",
    "TotalSegmentatorSegmenter",
    "create_segmenter",
    "list_segmenters",
    "missing_weights",
    "nnunet_weights_at",
    "physical_bounds",
    "register_segmenter",
    "resample_labels_onto",
    "totalseg_weights_dir",
]
