"""The model's view of a case: one definition of how a packed crop becomes the model input, shared by training
(:class:`pipelines.cases.dataset.CaseDataset`), evaluation (the same dataset with ``train=False``) and ``fvlm
predict`` (an in-memory crop), so that image and anatomy map always lie on one grid and the three agree.
:func:`case_view` is that one definition (crop or resize, window, flips, cut); the functions below are its steps.

Intensity: the stored HU become C input channels, one per HU window ``(lo_c, hi_c)``:
``image[c] = clip((hu - lo_c) / (hi_c - lo_c), 0, 1)`` (:func:`windows`). One window (the preprocess run's
``window_hu``) is the reference; a model's ``vision.input_windows_hu`` asks for several.

Arrays are (Z, Y, X) on the preprocess crop grid (LPS, axis-aligned: axis 2 runs from the patient's right to
their left). Two modes:

``crop``: the voxels of ``box`` (a box of the crop grid, :func:`crop_box`), each axis optionally reversed
(a flip), then padded centred to ``size`` with air (image) and 0 (anatomy). Image and map are indexed by the
same slices, so they agree voxel for voxel by construction.

``resize``: the whole case resampled onto a ``size`` grid spanning the same field of view. Output voxel ``i``
of an axis resized by ``s = n_in / n_out`` has its centre at input coordinate ``(i + 0.5) s - 0.5``. The
windowed image is interpolated there (trilinear, ``align_corners=False``) and the anatomy map takes the label
of the input voxel whose centre is nearest, ``floor((i + 0.5) s)`` (``nearest-exact``). The older
``nearest`` rule took ``floor(i s)``, on average ``(s - 1) / 2`` input voxels before the image's sample point:
with ``s`` between 2 and 5 in z the map sat about half an output voxel (about 9 mm) off the image, and
anatomy pooling read the neighbour's tokens.

Anatomies and ``cut`` (:func:`case_view`): anatomies the case's stats (``case.json`` ``anatomies``) mark not
present are erased from the map (label 0), so the model sees them as absent. In crop mode an anatomy that is
present but has less than ``min_visible_fraction`` of its voxels (``crop_voxels``) inside the crop is ``cut``;
truncation by the scan range is metadata only, never ``cut``. Flips (``pipelines.cases.augment``) are drawn
from ``rng`` after the crop origin: none without ``rng`` (evaluation, prediction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.cases.augment import draw_flips

__all__ = ["CaseView", "as_windows", "case_view", "crop_box", "crop_view", "resize_view", "window", "windows"]


def _plain(x) -> torch.Tensor:
    """A MONAI MetaTensor (or anything tensor-like) as a plain torch.Tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def window(hu: np.ndarray | torch.Tensor, window_hu: Sequence[float]) -> torch.Tensor:
    """HU -> [0, 1]: ``clip((hu - lo) / (hi - lo), 0, 1)`` as float32 (a new tensor)."""
    lo, hi = float(window_hu[0]), float(window_hu[1])
    t = torch.as_tensor(np.asarray(hu, dtype=np.float32) if not isinstance(hu, torch.Tensor) else hu.float())
    return ((t - lo) / (hi - lo)).clamp_(0.0, 1.0)


def as_windows(window_hu: Sequence[float] | Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    """One ``[lo, hi]`` window or a list of them, as a tuple of ``(lo, hi)`` float pairs."""
    items = list(window_hu)
    if len(items) == 2 and all(np.isscalar(v) for v in items):
        items = [items]
    return tuple((float(lo), float(hi)) for lo, hi in items)


def windows(hu: np.ndarray | torch.Tensor, window_hu: Sequence[float] | Sequence[Sequence[float]]) -> torch.Tensor:
    """HU (...) -> (C, ...) float32, channel c windowed by :func:`window` with the c-th of ``window_hu`` (one
    window or a list, :func:`as_windows`)."""
    t = torch.as_tensor(np.asarray(hu, dtype=np.float32) if not isinstance(hu, torch.Tensor) else hu.float())
    return torch.stack([window(t, w) for w in as_windows(window_hu)])


def crop_box(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator | None) -> tuple[slice, ...]:
    """Origin uniform over valid positions (``rng``, one draw per axis) or central (None); axes smaller than
    ``size`` are taken whole (and padded by :func:`crop_view`)."""
    box = []
    for s, c in zip(shape, size):
        room = max(0, s - c)
        start = int(rng.integers(0, room + 1)) if rng is not None else room // 2
        box.append(slice(start, start + min(s, c)))
    return tuple(box)


def crop_view(image: np.ndarray, anatomy: np.ndarray, size: Sequence[int], box: Sequence[slice],
              flips: Sequence[bool], window_hu: Sequence[float] | Sequence[Sequence[float]], pad_hu: float,
              lut: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Crop mode: ``(image (C, Z, Y, X) f32 in [0, 1], anatomy (Z, Y, X) uint8, pad_before (3,))``, one image
    channel per window of ``window_hu`` (one ``[lo, hi]`` or a list).

    ``image``/``anatomy`` may be memory maps: the box and the flips are one strided copy, so only the box's
    bytes are read. ``lut`` relabels the anatomy map (e.g. erases anatomies that are not present).
    """
    view = tuple(slice(b.stop - 1, b.start - 1 if b.start > 0 else None, -1) if f else b
                 for b, f in zip(box, flips))
    img = np.asarray(image[view], dtype=np.float32)
    lab = np.array(anatomy[view], dtype=np.uint8)  # a writable copy
    if lut is not None:
        lab = lut[lab]
    before = tuple(max(0, c - s) // 2 for s, c in zip(img.shape, size))
    if any(s < c for s, c in zip(img.shape, size)):
        pad = [(b, max(0, c - s) - b) for b, s, c in zip(before, img.shape, size)]
        img = np.pad(img, pad, constant_values=float(pad_hu))
        lab = np.pad(lab, pad, constant_values=0)
    return windows(torch.from_numpy(np.ascontiguousarray(img)), window_hu), torch.from_numpy(lab), before  # type: ignore[return-value]


def resize_view(image: np.ndarray, anatomy: np.ndarray, size: Sequence[int],
                window_hu: Sequence[float] | Sequence[Sequence[float]],
                lut: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize mode: ``(image (C, Z, Y, X) f32 in [0, 1], anatomy (Z, Y, X) uint8)`` on one ``size`` grid (module
    docstring: trilinear image and ``nearest-exact`` map sample the same voxel centres), one image channel per
    window of ``window_hu``."""
    from monai.transforms import Resize

    size = tuple(int(s) for s in size)
    full = windows(np.asarray(image, dtype=np.float32), window_hu)  # (C, Z, Y, X)
    img = _plain(Resize(size, mode="trilinear", align_corners=False)(full))
    lab = np.asarray(anatomy)
    lab = torch.from_numpy((lut[lab] if lut is not None else lab).astype(np.float32))
    anat = _plain(Resize(size, mode="nearest-exact")(lab[None]))[0].round().to(torch.uint8)
    return img.float().contiguous(), anat.contiguous()


@dataclass
class CaseView:
    """One case as the model sees it (:func:`case_view`)."""

    image: torch.Tensor  #: (C, Z, Y, X) float32 in [0, 1], one channel per HU window
    anatomy: torch.Tensor  #: (Z, Y, X) uint8 labels 0 (background) .. A, anatomies not present erased
    cut: np.ndarray  #: (A,) bool: present anatomies with too little of them inside the crop
    flips: tuple[bool, bool, bool]  #: the axes (z, y, x) that were flipped
    box: tuple[slice, ...] | None = None  #: crop mode: the region of the case array that was taken
    pad_before: tuple[int, int, int] = (0, 0, 0)  #: crop mode: padding before each axis of the view
    resized: tuple[torch.Tensor, torch.Tensor] | None = None  #: resize mode: the unflipped (image, anatomy)


def case_view(image: np.ndarray, anatomy: np.ndarray, anatomies: Sequence[Mapping[str, Any]],
              names: Sequence[str], size: Sequence[int], *, mode: str = "crop",
              window_hu: Sequence[float] | Sequence[Sequence[float]], pad_hu: float,
              rng: np.random.Generator | None = None, flip_axes: Sequence[int] = (), flip_prob: float = 0.5,
              min_visible_fraction: float = 0.5,
              resized: tuple[torch.Tensor, torch.Tensor] | None = None) -> CaseView:
    """The model input of one case: ``image``/``anatomy`` (Z, Y, X) HU and labels on the preprocess crop grid
    (memory maps are read only where the crop needs them) -> :class:`CaseView` of ``size`` (z, y, x).

    ``anatomies``: the case's per-anatomy stats (``case.json`` ``anatomies``, or ``AnatomyStats.to_dict()`` of
    an in-memory crop: ``name``, ``present``, ``crop_voxels``); ``names``: the A anatomies of the run, label k
    = ``names[k - 1]``. ``mode``: ``crop`` (:func:`crop_box` with ``rng``, central without, then
    :func:`crop_view`) or ``resize`` (:func:`resize_view`; ``resized``, a previous view's
    :attr:`CaseView.resized` of the same case, skips the resampling, and ``image``/``anatomy`` may then be
    None). ``rng`` draws the crop origin, then one flip per axis of ``flip_axes`` with ``flip_prob`` (module
    docstring); None: central crop, no flips. ``window_hu``: one ``[lo, hi]`` or a list, one channel each.
    """
    size = tuple(int(s) for s in size)
    stats = {a.get("name"): a for a in anatomies}
    a = len(names)
    present = np.array([bool((stats.get(n) or {}).get("present")) for n in names], dtype=bool)  # (A,)
    cut = np.zeros(a, dtype=bool)  # scan-range truncation is metadata (module docstring)
    # label -> label, with anatomies that the stats mark not present erased
    lut = np.zeros(256, dtype=np.uint8)
    lut[1:a + 1] = np.where(present, np.arange(1, a + 1), 0)
    lut = None if present.all() else lut

    if mode == "crop":
        box = crop_box(image.shape, size, rng)
        flips = draw_flips(rng, flip_axes, flip_prob)
        img, anat, before = crop_view(image, anatomy, size, box, flips, window_hu, pad_hu, lut)
        totals = np.array([float((stats.get(n) or {}).get("crop_voxels", 0) or 0) for n in names])  # (A,)
        inside = np.bincount(anat.numpy().reshape(-1), minlength=256)[1:a + 1]  # (A,) voxels in the crop
        frac = np.divide(inside, totals, out=np.zeros(a), where=totals > 0)
        cut |= present & (frac < min_visible_fraction)
        return CaseView(img, anat, cut, flips, box, before)
    if mode != "resize":
        raise ValueError(f"view mode must be crop or resize, got {mode!r}")
    if resized is None:
        resized = resize_view(image, anatomy, size, window_hu, lut)
    img, anat = resized[0].clone(), resized[1].clone()  # callers own their view
    flips = draw_flips(rng, flip_axes, flip_prob)
    dims = [ax for ax, f in enumerate(flips) if f]  # spatial axes of anat (Z, Y, X); img has C first
    if dims:
        img, anat = torch.flip(img, [d + 1 for d in dims]), torch.flip(anat, dims)
    return CaseView(img, anat, cut, flips, resized=resized)
