"""Integrity checks on read: a volume is used only when its file is whole and its voxels are finite.

SimpleITK (through its NIfTI reader) fills a truncated gzip stream with zeros and ignores gzip end-of-stream
and CRC errors, so a damaged ``.nii.gz`` reads as a plausible-looking scan. Before a NIfTI file is read:

* a gzip file (magic ``1f 8b``) is decompressed once to its end, which checks every member's CRC-32 and
  length (ISIZE) and that the stream ends with an end-of-stream marker (:mod:`gzip` raises otherwise);
* the NIfTI-1/-2 header's data size (``prod(dim) * bitpix / 8`` after ``vox_offset``) is compared with the
  bytes present (decompressed, or the file size of a plain ``.nii``): fewer bytes is a truncated file.

While the file is read to its end, float voxel data are scanned for NaN and +-inf (SimpleITK itself reads
them as 0, which would make an all-NaN scan uniform water). They fail the volume with their
count and location (voxel index ranges), unless the user opts in to ``fill`` (``--fill-nonfinite HU``): then
they are replaced with that value and a note says how many, where and with what. A non-finite voxel never
becomes 0 HU silently (which is what a cast to int16 would make of it).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipelines.preprocess.series import VolumeError

_CHUNK = 1 << 20
_FLOAT_TYPES = {sitk.sitkFloat32, sitk.sitkFloat64}


class IntegrityError(VolumeError):
    """A file is damaged (truncated, bad CRC) or a volume holds non-finite voxels; the message says which and
    what to do."""


@dataclass
class _Header:
    offset: int  # vox_offset, bytes
    nbytes: int  # voxel data, bytes
    shape_xyz: tuple[int, int, int]  # first three dims (1 where absent)
    dtype: np.dtype | None  # float voxel type (byte order included), None for integer/other data


@dataclass
class NonFinite:
    """NaN and +-inf voxels of a volume: counts and the index ranges they span (array order z, y, x)."""

    nan: int = 0
    inf: int = 0
    lo: np.ndarray = field(default_factory=lambda: np.full(3, np.iinfo(np.int64).max))  # (3,) z, y, x
    hi: np.ndarray = field(default_factory=lambda: np.full(3, -1))  # (3,) z, y, x
    total: int = 0
    slices: int = 0

    def add(self, zyx: np.ndarray, n_nan: int) -> None:
        """Record the non-finite voxels at ``zyx`` (N, 3), ``n_nan`` of them NaN."""
        if len(zyx):
            self.nan += n_nan
            self.inf += len(zyx) - n_nan
            self.lo = np.minimum(self.lo, zyx.min(axis=0))
            self.hi = np.maximum(self.hi, zyx.max(axis=0))

    def describe(self) -> str:
        (za, ya, xa), (zb, yb, xb) = self.lo, self.hi
        share = 100.0 * (self.nan + self.inf) / max(self.total, 1)
        return (f"{self.nan} NaN and {self.inf} infinite voxel(s) ({share:.3g}% of the volume) in slices "
                f"z={za}-{zb} of {self.slices}, rows y={ya}-{yb}, columns x={xa}-{xb} (voxel indices)")

    def error(self, name: str) -> IntegrityError:
        return IntegrityError(f"{name}: {self.describe()}; the file is damaged or uses NaN as a fill value: "
                              "re-export it, or pass --fill-nonfinite HU to replace them with a stated value "
                              "(noted in the output)")


def _parse_header(header: bytes) -> _Header | None:
    """The data layout from a NIfTI-1 or NIfTI-2 header, or None when ``header`` is neither."""
    if len(header) < 4:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        ndim = int(dims[0])
        if not 1 <= ndim <= 7 or bitpix <= 0:
            return None
        sizes = [max(int(d), 1) for d in dims[1:ndim + 1]]
        voxels = int(np.prod(sizes, dtype=np.int64))
        dtype = {16: np.dtype(endian + "f4"), 64: np.dtype(endian + "f8")}.get(int(datatype))
        shape = tuple((sizes + [1, 1, 1])[:3])
        return _Header(max(offset, size), voxels * bitpix // 8, shape, dtype)  # type: ignore[arg-type]
    return None


def _chunks(path: Path, label: str) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks; a damaged gzip stream raises :class:`IntegrityError`."""
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raw.seek(0)
            while chunk := raw.read(_CHUNK):
                yield chunk
            return
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk
        except EOFError:
            raise IntegrityError(f"{label}: truncated gzip stream (the file ends before its end-of-stream "
                                 "marker; a partial download or copy?): fetch or copy the file again") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise IntegrityError(f"{label}: corrupt gzip stream ({e}): the file is damaged; fetch or copy "
                                 "it again") from None


def _voxel_stream(path: Path, label: str, on_voxels=None) -> tuple[_Header | None, int]:
    """Read ``path`` to its end; returns (header, total bytes). ``on_voxels(values, first_index, header)`` gets the
    float voxel data in pieces (flat file order: x fastest) when the header says the data are floats."""
    head = b""
    header: _Header | None = None
    parsed = False
    pos = 0  # bytes of the stream seen before the current chunk
    carry = b""  # a voxel split between two chunks
    for chunk in _chunks(path, label):
        if not parsed:
            head += chunk[: max(540 - len(head), 0)]
            if len(head) >= 540:
                header, parsed = _parse_header(head), True
        if parsed and header is not None and header.dtype is not None and on_voxels is not None:
            start, stop = header.offset, header.offset + header.nbytes
            a, b = max(start, pos), min(stop, pos + len(chunk))
            if a < b:
                data = carry + chunk[a - pos:b - pos]
                size = header.dtype.itemsize
                whole = len(data) // size * size
                first = (a - start - len(carry)) // size
                on_voxels(np.frombuffer(data[:whole], dtype=header.dtype), first, header)
                carry = data[whole:]
        pos += len(chunk)
    if not parsed:
        header = _parse_header(head)
    return header, pos


def scan_nifti_file(path: Path, what: str = "") -> NonFinite:
    """Read the NIfTI file ``path`` to its end (see the module docstring) and count its non-finite voxels.

    Raises :class:`IntegrityError` when the file is damaged; ``what`` prefixes the message (e.g. ``label map
    file``); the file is named by its name only.
    """
    path = Path(path)
    label = f"{what} {path.name}".strip()
    found = NonFinite()

    def count(values: np.ndarray, first: int, header: _Header) -> None:
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            nx, ny, _ = header.shape_xyz
            idx = bad + first
            zyx = np.stack([idx // (nx * ny), (idx // nx) % ny, idx % nx], axis=1)  # (N, 3)
            found.add(zyx, int(np.isnan(values[bad]).sum()))

    header, total = _voxel_stream(path, label, count)
    if header is not None:
        if total < header.offset + header.nbytes:
            raise IntegrityError(f"{label}: truncated: the header announces {header.nbytes} bytes of voxel data, "
                                 f"the file holds {max(total - header.offset, 0)}; fetch or copy the file again")
        found.total = int(np.prod(header.shape_xyz))
        found.slices = header.shape_xyz[2]
    return found


def check_nifti_file(path: Path, what: str = "") -> None:
    """Raise :class:`IntegrityError` when the NIfTI file ``path`` is damaged (non-finite voxels not judged)."""
    scan_nifti_file(path, what)


def _nonfinite_mask(path: Path, label: str, size: int) -> np.ndarray:
    """(size,) bool, flat file order: True where the voxel is NaN or infinite (for ``--fill-nonfinite``)."""
    mask = np.zeros(size, dtype=bool)

    def mark(values: np.ndarray, first: int, header: _Header) -> None:
        mask[first:first + len(values)] = ~np.isfinite(values)

    _voxel_stream(path, label, mark)
    return mask


@dataclass
class NiftiRead:
    image: sitk.Image
    note: str | None = None
    """What ``fill`` replaced, when it replaced anything."""
    filled: np.ndarray | None = None
    """(Z, Y, X) bool: the voxels ``fill`` replaced (None when none)."""


def read_nifti(path: Path, pixel_type: int | None = None, what: str = "", fill: float | None = None) -> NiftiRead:
    """:func:`scan_nifti_file`, then ``sitk.ReadImage`` (optionally cast to ``pixel_type``).

    SimpleITK reads NaN and inf as 0; so non-finite voxels are found in the file itself and fail the read
    (:class:`IntegrityError` with their count and location) or, with ``fill``, are set to ``fill`` in the image.
    """
    path = Path(path)
    label = f"{what} {path.name}".strip()
    found = scan_nifti_file(path, what)
    if found.nan + found.inf and fill is None:
        raise found.error(label)
    try:
        image = sitk.ReadImage(str(path)) if pixel_type is None else sitk.ReadImage(str(path), pixel_type)
    except RuntimeError as exc:
        raise VolumeError(f"{label}: cannot be read as NIfTI (corrupt or truncated?)") from exc
    if not found.nan + found.inf:
        return NiftiRead(image)
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X) copy
    mask = _nonfinite_mask(path, label, data.size)[: data.size].reshape(data.shape)  # (Z, Y, X)
    data[mask] = fill
    out = sitk.GetImageFromArray(data, isVector=False)
    out.CopyInformation(image)
    return NiftiRead(out, f"replaced {found.describe()} with {fill:g} HU (--fill-nonfinite)", mask)


def check_finite(image: sitk.Image, name: str, fill: float | None = None) -> tuple[sitk.Image, str | None]:
    """Fail on NaN/inf voxels of an in-memory ``image`` or, with ``fill``, replace them; returns (image, note or
    None). Integer images are returned unchanged; the scan runs over blocks of slices (memory: one block's mask).
    """
    if image.GetPixelID() not in _FLOAT_TYPES:
        return image, None
    arr = sitk.GetArrayViewFromImage(image)  # (Z, Y, X)
    found = NonFinite(total=arr.size, slices=arr.shape[0])
    for z0 in range(0, arr.shape[0], 16):
        block = arr[z0:z0 + 16]  # (z, Y, X)
        bad = ~np.isfinite(block)
        if bad.any():
            zyx = np.argwhere(bad)  # (N, 3)
            zyx[:, 0] += z0
            found.add(zyx, int(np.isnan(block[bad]).sum()))
    if not found.nan + found.inf:
        return image, None
    if fill is None:
        raise found.error(name)
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X) copy
    data[~np.isfinite(data)] = fill
    out = sitk.GetImageFromArray(data)
    out.CopyInformation(image)
    return out, f"replaced {found.describe()} with {fill:g} HU (--fill-nonfinite)"


__all__ = ["IntegrityError", "NiftiRead", "NonFinite", "check_finite", "check_nifti_file", "read_nifti",
           "scan_nifti_file"]
