"""Volume assembly: a :class:`SeriesRef` -> a :class:`Volume` in HU with physical geometry, or a
:class:`VolumeError` that states why not.

DICOM geometry (all vectors in patient LPS millimetres). ImageOrientationPatient holds the row direction
``r`` (direction of increasing column index, the image x axis) and the column direction ``c`` (increasing
row index, image y); the slice normal is ``n = r x c``. Pixel ``(row j, column i)`` of a slice whose
ImagePositionPatient is ``P`` lies at ``P + i * dx * r + j * dy * c``, where PixelSpacing = ``(dy, dx)``
(DICOM lists the row spacing first). Each slice's offset along the stack is ``d = P . n``.

Assembly steps:

1. read every file (pixel data through pydicom's decoders: pylibjpeg-libjpeg for JPEG baseline/extended/
   lossless and JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-rle for RLE, GDCM when installed);
   a corrupt or truncated file (unreadable, no pixel data, pixel data that cannot be decoded) is left out
   and noted by name, so the slice it held is a gap handled by step 7 (a series with fewer than two
   readable files is a :class:`VolumeError` naming the file). A single-frame file is one slice; a
   multi-frame Enhanced / Legacy Converted Enhanced CT file is one slice per frame, with the position,
   orientation, pixel spacing and rescale of its per-frame functional groups, else the shared ones
   (:func:`pipelines.preprocess.discover.frame_facts`). From here on slices are slices, whichever file
   they came from: steps 2-8 are the same code for both (:func:`_assemble`);
2. HU per slice: ``HU = stored * RescaleSlope + RescaleIntercept`` with each slice's own slope and
   intercept; stored values equal to PixelPaddingValue (or inside [PixelPaddingValue,
   PixelPaddingRangeLimit]) become -1024 HU (air);
3. one orientation, one matrix size and one pixel spacing per series, else :class:`VolumeError`;
4. sort by ``d`` (never by InstanceNumber or file name);
5. duplicates (``|d_a - d_b| < 0.01 mm``): identical pixels -> keep one (noted); different pixels -> error;
6. gantry tilt: when the positions do not move along ``n`` (in-plane offset
   ``p_k = (P_k - P_0) - ((P_k - P_0) . n) n`` above a tenth of a pixel), every slice is translated in its
   own plane by ``-p_k`` with linear interpolation, which puts the stack on the orthogonal grid
   ``(r, c, n)`` through the first slice (the slice planes already are perpendicular to ``n``, so an
   in-plane shift is exact; pixels shifted in from outside get the series' minimum HU). Noted with the
   tilt angle ``atan(|dp/dd|)``;
7. slice spacing: ``s`` = the most common gap of consecutive ``d`` (gaps rounded to 0.01 mm). A gap of
   ``k * s`` means ``k - 1`` missing slices: up to ``max_gap_slices`` they are interpolated linearly (noted),
   more is a :class:`VolumeError` "missing N slices between z=... and z=...". Gaps that are no multiple of
   ``s`` (uneven spacing) -> the whole stack is resampled onto the regular grid ``d_0 + j s`` by linear
   interpolation along ``n`` (noted); gaps over ``(max_gap_slices + 1) s`` are still an error;
8. output: a SimpleITK image of the (Z, Y, X) array, origin = ImagePositionPatient of the first slice
   (smallest ``d``), spacing ``(dx, dy, s)``, direction columns ``(r, c, n)``. The pixel type is int16 when
   every HU value is an integer in int16 range and nothing was interpolated, float32 otherwise.

NIfTI files are read with SimpleITK after an integrity check (:mod:`pipelines.preprocess.integrity`: gzip CRC
and length to the end of the stream, voxel data as long as the header says); the HU are taken as stored.
Every volume (NIfTI or DICOM) with NaN or infinite voxels is a :class:`VolumeError` naming their count and
location, unless ``fill_nonfinite`` gives the value to replace them with (noted).

No message or note holds a header value that identifies the patient: files are named by file name only,
and decoder messages are scrubbed of the patient name, ID and accession number.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage

from pipelines.preprocess.discover import (
    FrameFacts,
    frame_facts,
    looks_like_dicom,
    most_common_gap,
    scrub,
    slice_normal,
)
from pipelines.preprocess.integrity import check_finite, read_nifti
from pipelines.preprocess.series import SeriesRef, Volume, VolumeError

#: HU given to padding pixels (PixelPaddingValue).
PAD_HU = -1024
#: Slices closer than this along the normal (mm) share a position.
DUPLICATE_TOL_MM = 0.01
#: Tolerance of a regular gap: max(this, 2% of the spacing), mm.
GAP_TOL_MM = 0.02
_INT16 = np.iinfo(np.int16)


class _Unreadable(VolumeError):
    """One file of a series cannot be read (corrupt, truncated, no pixel data, undecodable)."""


@dataclass
class _Slice:
    name: str
    position: np.ndarray  # (3,) ImagePositionPatient, mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (dy, dx), mm
    shape: tuple[int, int]  # (Y, X) matrix size
    padded: int  # padding pixels set to PAD_HU


def load_volume(ref: SeriesRef, max_gap_slices: int = 1, fill_nonfinite: float | None = None) -> Volume:
    """Assemble ``ref`` into a :class:`Volume` in HU (see the module docstring for every step).

    ``max_gap_slices``: the most consecutive missing slices that are interpolated; a longer gap is a
    :class:`VolumeError`. ``fill_nonfinite``: the HU that NaN/inf voxels become (noted); None (default) fails
    such a volume.
    """
    if ref.kind == "nifti":
        return _load_nifti(ref.files[0], fill_nonfinite)
    if ref.kind == "dicom":
        vol = _load_dicom(ref.files, max_gap_slices, ref.left_out)
        vol.notes[:0] = ref.notes  # what discovery assumed (e.g. how files without UIDs were grouped)
        vol.image, note = check_finite(vol.image, "series", fill_nonfinite)  # float pixel data can hold NaN
        if note:
            vol.notes.append(note)
        return vol
    raise VolumeError(f"unknown series kind {ref.kind!r}")


# ------------------------------------------------------------------------------------------------ NIfTI


def _load_nifti(path: Path, fill_nonfinite: float | None = None) -> Volume:
    read = read_nifti(path, fill=fill_nonfinite)  # gzip CRC/length, voxel bytes, NaN/inf: checked in the file
    image = read.image
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"{path.name}: expected a 3D single-channel volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return Volume(image=image, notes=[read.note] if read.note else [])


# ------------------------------------------------------------------------------------------------ DICOM


def _to_hu(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``raw * slope + intercept`` as int16 when exact in int16, else float32. (Y, X) -> (Y, X)."""
    if float(slope).is_integer() and float(intercept).is_integer():
        hu = raw.astype(np.int32) * int(slope) + int(intercept)  # (Y, X)
        if hu.size == 0 or (hu.min() >= _INT16.min and hu.max() <= _INT16.max):
            return hu.astype(np.int16)
        return hu.astype(np.float32)
    return (raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _frame_geometry(facts: FrameFacts, name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    for attr, value in (("ImagePositionPatient", facts.position), ("ImageOrientationPatient", facts.orientation),
                        ("PixelSpacing", facts.pixel_spacing)):
        if value is None:
            raise VolumeError(f"{name}: missing or invalid {attr}")
    return facts.position, facts.orientation, (float(facts.pixel_spacing[0]), float(facts.pixel_spacing[1]))


def _read_file(path: Path) -> tuple[int, Iterator[tuple[_Slice, np.ndarray]]]:
    """(number of frames, the frames of one file in file order: (header facts, HU pixels (Y, X) int16 or
    float32) each).

    A single-frame CT image is one frame; a multi-frame (Enhanced or Legacy Converted Enhanced CT) image
    gives one frame per entry of its functional groups (:func:`frame_facts`), named ``file [frame k]``.
    Raises :class:`_Unreadable` before the first frame when the file or its pixel data cannot be read.
    """
    name = path.name
    try:
        _, has_preamble = looks_like_dicom(path)
        ds = pydicom.dcmread(path, force=not has_preamble)
    except Exception as exc:  # noqa: BLE001  (pydicom raises many kinds on a corrupt file)
        raise _Unreadable(f"{name}: unreadable DICOM file ({type(exc).__name__})") from exc
    identifiers = [str(ds.get(k, "") or "") for k in ("PatientName", "PatientID", "AccessionNumber")]
    if "PixelData" not in ds:
        raise _Unreadable(f"{name}: no pixel data")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise VolumeError(f"{name}: not a grayscale image (SamplesPerPixel {ds.SamplesPerPixel})")
    facts = frame_facts(ds)
    frames = len(facts)
    names = [name] if frames == 1 else [f"{name} [frame {k + 1}]" for k in range(frames)]
    geometry = [_frame_geometry(f, n) for f, n in zip(facts, names)]
    try:
        raw = ds.pixel_array  # (Y, X) or (F, Y, X) stored values
    except Exception as exc:  # noqa: BLE001  (decoder errors have many types)
        syntax = getattr(getattr(ds.get("file_meta"), "TransferSyntaxUID", None), "name", "unknown syntax")
        detail = scrub(str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__, identifiers)
        raise _Unreadable(f"{name}: pixel data cannot be decoded ({syntax}): {detail}") from exc
    if frames == 1 and raw.ndim == 2:
        raw = raw[None]  # (1, Y, X)
    if raw.ndim != 3 or raw.shape[0] != frames:
        raise VolumeError(f"{name}: pixel data of shape {raw.shape}, expected {frames} 2D frame(s)")
    pad = ds.get("PixelPaddingValue")
    pad_range = sorted((int(pad), int(ds.get("PixelPaddingRangeLimit", pad)))) if pad is not None else None
    return frames, _frames(raw, facts, geometry, names, pad_range)


def _frames(raw: np.ndarray, facts: list[FrameFacts], geometry: list, names: list[str],
            pad_range: list[int] | None) -> Iterator[tuple[_Slice, np.ndarray]]:
    """HU per frame (rescale of that frame, padding -> PAD_HU). raw (F, Y, X) stored values."""
    for k, (f, (position, orientation, spacing), name) in enumerate(zip(facts, geometry, names)):
        hu = _to_hu(raw[k], f.slope, f.intercept)  # (Y, X)
        padded = 0
        if pad_range is not None:
            mask = (raw[k] >= pad_range[0]) & (raw[k] <= pad_range[1])  # (Y, X)
            padded = int(mask.sum())
            if padded:
                hu[mask] = PAD_HU
        yield _Slice(name, position, orientation, spacing, hu.shape, padded), hu


def _read_stack(paths: list[Path]) -> tuple[list[_Slice], np.ndarray, list[str]]:
    """Read the files one at a time into one (Z, Y, X) stack of every frame (one per single-frame file,
    ``NumberOfFrames`` per multi-frame file), in file order; also the names of the unreadable files left out.

    The stack is preallocated for the first file's frames and one row per further file, and grown when a later
    multi-frame file needs more rows. It is
    int16 unless some frame's HU are not integral in int16 range (then float32, converted once). A frame whose
    matrix size differs from the first is not stored: :func:`_check_uniform` rejects the series after every
    file has been read (so that unreadable files are reported first).
    """
    slices: list[_Slice] = []
    stack: np.ndarray | None = None
    bad: list[_Unreadable] = []
    bad_names: list[str] = []
    for i, path in enumerate(paths):
        try:
            n_frames, frames = _read_file(path)
        except _Unreadable as exc:
            bad.append(exc)
            bad_names.append(path.name)
            continue
        rows = len(slices) + n_frames + len(paths) - i - 1  # this file's frames, one row per file left
        if stack is not None and rows > stack.shape[0]:
            grown = np.empty((rows, *stack.shape[1:]), stack.dtype)  # (Z, Y, X)
            grown[: len(slices)] = stack[: len(slices)]
            stack = grown
        for sl, hu in frames:
            k = len(slices)
            slices.append(sl)
            if stack is None:
                stack = np.empty((rows, *hu.shape), dtype=hu.dtype)  # (Z, Y, X)
            if hu.shape != stack.shape[1:]:
                continue
            if hu.dtype != stack.dtype and hu.dtype == np.float32:
                stack = stack.astype(np.float32)  # exact: every int16 value is a float32
            stack[k] = hu
    if len(slices) < 2 and bad:
        more = f" ({len(bad)} of {len(paths)} files unreadable)" if len(bad) > 1 else ""
        raise VolumeError(f"{bad[0]}{more}") from bad[0]
    assert stack is not None
    return slices, stack[: len(slices)], bad_names


def _gather_rows(stack: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``stack[rows]`` computed in place (one slice of scratch memory): (Z, Y, X), rows (M,) distinct -> (M, Y, X)
    view of ``stack``'s buffer."""
    z = stack.shape[0]
    perm = np.empty(z, dtype=np.intp)  # out[i] = in[perm[i]]
    perm[: len(rows)] = rows
    used = np.zeros(z, dtype=bool)
    used[rows] = True
    perm[len(rows):] = np.flatnonzero(~used)
    done = np.zeros(z, dtype=bool)
    for i in range(z):
        if done[i] or perm[i] == i:
            done[i] = True
            continue
        tmp = stack[i].copy()
        j = i
        while True:
            done[j] = True
            k = perm[j]
            if k == i:
                stack[j] = tmp
                break
            stack[j] = stack[k]
            j = k
    return stack[: len(rows)]


def _check_uniform(slices: list[_Slice]) -> None:
    """One orientation, one matrix size and one pixel spacing per series."""
    ref = slices[0].orientation
    if any(np.max(np.abs(s.orientation - ref)) > 1e-3 for s in slices):
        raise VolumeError("mixed slice orientations in one series")
    shapes = Counter(s.shape for s in slices)
    if len(shapes) > 1:
        sizes = ", ".join(f"{y}x{x} ({n} slices)" for (y, x), n in shapes.most_common())
        raise VolumeError(f"mixed matrix sizes in one series (rows x columns): {sizes}")
    spacings = Counter((round(s.pixel_spacing[0], 4), round(s.pixel_spacing[1], 4)) for s in slices)
    if len(spacings) > 1:
        sizes = ", ".join(f"{dy:g} x {dx:g} mm ({n} slices)" for (dy, dx), n in spacings.most_common())
        raise VolumeError(f"mixed pixel spacings in one series (row x column): {sizes}")


def _axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal (r, c, n) from ImageOrientationPatient (Gram-Schmidt on c against r)."""
    r = orientation[:3] / np.linalg.norm(orientation[:3])
    c = orientation[3:] - (orientation[3:] @ r) * r
    c = c / np.linalg.norm(c)
    return r, c, slice_normal(np.concatenate([r, c]))


def _drop_duplicates(slices: list[_Slice], stack: np.ndarray, order: np.ndarray, d: np.ndarray,
                     notes: list[str]) -> np.ndarray:
    """Rows of ``stack`` (file order) to keep, sorted by ``d``: runs with equal ``d`` collapse to one if their
    pixels match, else error. ``order`` (Z,) sorts the files by ``d``; ``d`` (Z,) is already sorted."""
    keep: list[int] = [0]
    dropped = 0
    for k in range(1, len(order)):
        j = keep[-1]
        if d[k] - d[j] >= DUPLICATE_TOL_MM:
            keep.append(k)
            continue
        a, b = order[k], order[j]
        if slices[a].shape == slices[b].shape and np.array_equal(stack[a], stack[b]):
            dropped += 1
            continue
        raise VolumeError(
            f"two slices at the same position z={d[k]:.2f} mm with different pixel data "
            f"({slices[b].name}, {slices[a].name})"
        )
    if dropped:
        notes.append(f"dropped {dropped} duplicate slice(s) (same position, identical pixels)")
    return order[keep]


def _correct_tilt(
    stack: np.ndarray, positions: np.ndarray, d: np.ndarray, axes: tuple, spacing: tuple, notes: list[str]
) -> np.ndarray:
    """Shift each slice in-plane by its offset from the normal line through the first slice.

    stack (Z, Y, X), positions (Z, 3), d (Z,) -> (Z, Y, X) float32 when tilted, else ``stack`` unchanged.
    """
    r, c, n = axes
    dy, dx = spacing
    rel = positions - positions[0]  # (Z, 3)
    p = rel - np.outer(rel @ n, n)  # (Z, 3) in-plane offsets
    offset = np.linalg.norm(p, axis=1)  # (Z,)
    if offset.max() <= 0.1 * min(dx, dy):
        return stack
    dd = d - d[0]  # (Z,)
    shear = (p.T @ dd) / float(dd @ dd)  # (3,) in-plane offset per mm along n
    angle = math.degrees(math.atan(float(np.linalg.norm(shear))))
    fill = float(stack.min())
    out = np.empty(stack.shape, dtype=np.float32)  # (Z, Y, X)
    for k in range(stack.shape[0]):
        shift = (float(p[k] @ c) / dy, float(p[k] @ r) / dx)  # (rows, columns)
        out[k] = ndimage.shift(stack[k].astype(np.float32), shift, order=1, mode="constant", cval=fill)
    notes.append(
        f"corrected gantry tilt of {angle:.1f} deg: slices shifted in-plane (up to {offset.max():.1f} mm) "
        f"onto an orthogonal grid, linear interpolation, uncovered pixels set to {fill:g} HU"
    )
    return out


def _regular_spacing(
    stack: np.ndarray, d: np.ndarray, max_gap_slices: int, notes: list[str]
) -> tuple[np.ndarray, float]:
    """Put the slices on a regular grid along ``n``. stack (Z, Y, X), d (Z,) sorted -> ((Z', Y, X), s)."""
    gaps = np.diff(d)  # (Z-1,)
    mode = most_common_gap(gaps)
    s = float(gaps[np.round(gaps, 2) == mode].mean())
    tol = max(GAP_TOL_MM, 0.02 * s)
    k = np.rint(gaps / s).astype(int)  # (Z-1,) gap in units of s
    on_multiple = np.abs(gaps - k * s) <= tol
    too_long = gaps > (max_gap_slices + 1) * s + tol
    if too_long.any():
        i = int(np.argmax(too_long))
        missing = max(int(k[i]) - 1, 1)
        raise VolumeError(
            f"missing {missing} slices between z={d[i]:.2f} and z={d[i + 1]:.2f} mm (slice spacing {s:.3g} mm; "
            f"at most {max_gap_slices} missing slice(s) are interpolated)"
        )
    if np.all(on_multiple & (k == 1)):
        return stack, s
    holes = np.flatnonzero(on_multiple & (k > 1))
    if 0 < holes.size <= 3:
        notes.extend(
            f"interpolated {k[i] - 1} missing slice(s) between z={d[i]:.2f} and z={d[i + 1]:.2f} mm (linear)"
            for i in holes
        )
    elif holes.size > 3:
        notes.append(
            f"interpolated {int((k[holes] - 1).sum())} missing slice(s) in {holes.size} gaps (linear), the first "
            f"between z={d[holes[0]]:.2f} and z={d[holes[0] + 1]:.2f} mm"
        )
    uneven = ~on_multiple
    if uneven.any():
        notes.append(
            f"resampled uneven slice spacing ({gaps[uneven].min():.3g}-{gaps[uneven].max():.3g} mm gaps) to the "
            f"most common spacing {s:.3g} mm (linear along the slice normal)"
        )
    n_out = int(math.floor((d[-1] - d[0]) / s + tol / s)) + 1
    t = d[0] + s * np.arange(n_out)  # (Z',) target offsets
    lo = np.clip(np.searchsorted(d, t, side="right") - 1, 0, len(d) - 2)  # (Z',)
    w = np.clip((t - d[lo]) / (d[lo + 1] - d[lo]), 0.0, 1.0)  # (Z',)
    w = np.where(np.abs(t - d[lo]) <= tol, 0.0, np.where(np.abs(t - d[lo + 1]) <= tol, 1.0, w))
    blended = (w > 0) & (w < 1)
    out = np.empty((n_out, *stack.shape[1:]), dtype=np.float32 if blended.any() else stack.dtype)  # (Z', Y, X)
    for j in range(n_out):
        a, b = stack[lo[j]], stack[lo[j] + 1]
        out[j] = a if w[j] == 0 else b if w[j] == 1 else (1 - w[j]) * a.astype(np.float32) + w[j] * b
    return out, s


def _load_dicom(files: tuple[Path, ...], max_gap_slices: int, left_out: tuple[str, ...] = ()) -> Volume:
    if not files:
        raise VolumeError("series has no files")
    # Memory: one (Z, Y, X) stack filled a slice at a time, sorted in place, then copied once into the
    # SimpleITK image (peak about twice the volume's size; see BENCHMARKS.md).
    slices, stack, unreadable = _read_stack([Path(f) for f in files])  # stack (Z, Y, X) in file order
    return _assemble(slices, stack, max_gap_slices, [*left_out, *unreadable])


def _assemble(slices: list[_Slice], stack: np.ndarray, max_gap_slices: int, left_out: list[str]) -> Volume:
    """Steps 3-8 for the frames of a series, whatever files they came from (single-frame slices, the frames
    of multi-frame objects): ``slices`` (Z,) and ``stack`` (Z, Y, X) in the same (file) order."""
    _check_uniform(slices)
    notes: list[str] = []
    if left_out:
        names = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        notes.append(f"left out {len(left_out)} unreadable file(s): {names}")
    axes = _axes(slices[0].orientation)
    r, c, n = axes
    d = np.array([s.position @ n for s in slices])  # (Z,)
    order = np.argsort(d, kind="stable")
    rows = _drop_duplicates(slices, stack, order, d[order], notes)  # (Z',) stack rows, sorted by d
    slices, d = [slices[i] for i in rows], d[rows]
    if len(slices) < 2:
        raise VolumeError("single slice: a volume needs at least two slices at distinct positions")
    padded = sum(s.padded for s in slices)
    if padded:
        notes.append(f"set {padded} padding pixels (PixelPaddingValue) to {PAD_HU} HU")
    stack = _gather_rows(stack, rows)  # (Z', Y, X)
    positions = np.stack([s.position for s in slices])  # (Z, 3)
    dy, dx = slices[0].pixel_spacing
    stack = _correct_tilt(stack, positions, d, axes, (dy, dx), notes)
    try:
        stack, s = _regular_spacing(stack, d, max_gap_slices, notes)
    except VolumeError as exc:
        if left_out:
            raise VolumeError(f"{exc}; {notes[0]}") from exc
        raise
    image = sitk.GetImageFromArray(stack)
    del stack
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetSpacing((float(dx), float(dy), float(s)))
    image.SetDirection(tuple(float(v) for v in np.stack([r, c, n], axis=1).ravel()))
    return Volume(image=image, notes=notes)
