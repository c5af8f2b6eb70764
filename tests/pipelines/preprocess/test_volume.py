"""Volume assembly: exact reconstruction from shuffled files, compressed syntaxes, missing / duplicate
slices, uneven spacing, gantry tilt, mixed sizes, per-slice rescale, padding, corrupt files, NIfTI."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import uid

from pipelines.preprocess.discover import discover
from pipelines.preprocess.series import SeriesRef, VolumeError
from pipelines.preprocess.volume import load_volume
from pipelines.synth.writers import write_nifti
from tests.pipelines.preprocess.dicom_fixtures import (
    AXIAL,
    PHI_STRINGS,
    normal_of,
    random_volume,
    stored_hu,
    write_ct_series,
)


def _ref(paths) -> SeriesRef:
    return SeriesRef(kind="dicom", files=tuple(paths), folder_key="x")


def _no_phi(*texts: str) -> None:
    for text in texts:
        for s in PHI_STRINGS:
            assert s not in text, f"identifier {s!r} leaked into {text!r}"


def _smooth_volume(shape=(6, 48, 48)) -> np.ndarray:
    """A smooth body-like HU volume (compresses like CT): (Z, Y, X) int16 in [-1024, 1000]."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    v = 300 * np.sin(x / 5) * np.cos(y / 7) + 20 * z + 200 * ((x - 24) ** 2 + (y - 24) ** 2 < 300)
    return np.clip(np.rint(v), -1024, 1000).astype(np.int16)


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, (0.866025, 0.5, 0.0, -0.5, 0.866025, 0.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)],
    ids=["axial", "rotated-in-plane", "flipped-column"],
)
def test_shuffled_random_names_nested_reconstruct_exactly(tmp_path, orientation) -> None:
    hu = random_volume((20, 48, 40), seed=1)  # (Z, Y, X)
    rng = random.Random(3)
    names = [f"{'ab'[k % 2]}/{rng.randrange(16**8):08x}" + ("" if k % 3 else ".dcm") for k in range(20)]
    write_ct_series(tmp_path / "case", hu, orientation=orientation, names=names, slice_spacing=2.5)
    found = discover(tmp_path)
    assert len(found.selected) == 1 and not found.skipped
    ref = found.selected[0]
    ref = SeriesRef(**{**ref.__dict__, "files": tuple(rng.sample(ref.files, len(ref.files)))})  # any order
    vol = load_volume(ref)
    img = vol.image
    assert img.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu)
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = normal_of(orientation)
    np.testing.assert_allclose(img.GetOrigin(), (-100.5, -120.25, 30.0), atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.7, 2.5), atol=1e-4)  # (dx, dy, dz)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), np.stack([r, c, n], 1), atol=1e-5)
    # voxel (i, j, k) lies at origin + i dx r + j dy c + k dz n
    p = np.array(img.TransformIndexToPhysicalPoint((3, 5, 7)))
    expected = np.array((-100.5, -120.25, 30.0)) + 3 * 0.8 * r + 5 * 0.7 * c + 7 * 2.5 * n
    np.testing.assert_allclose(p, expected, atol=1e-4)
    assert vol.notes == []


def test_matches_simpleitk_gdcm_reader(tmp_path) -> None:
    """Cross-check against an independent reader (SimpleITK's GDCM series reader)."""
    hu = random_volume((8, 32, 36), seed=2)
    paths = write_ct_series(tmp_path / "s", hu)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref_img = reader.Execute()
    img = load_volume(_ref(reversed(paths))).image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref_img))
    np.testing.assert_allclose(img.GetOrigin(), ref_img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), ref_img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), ref_img.GetDirection(), atol=1e-6)


@pytest.mark.parametrize(
    "syntax",
    [
        uid.RLELossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.JPEGLSLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLossless,
        uid.JPEGBaseline8Bit,
    ],
    ids=lambda s: s.keyword,
)
def test_compressed_transfer_syntaxes(tmp_path, syntax) -> None:
    hu = _smooth_volume()
    if syntax == uid.JPEGBaseline8Bit:
        # 8-bit lossy: stored = (HU + 1024) / 8, so one stored step is 8 HU.
        slopes, intercepts = [8.0] * 6, [-1024.0] * 6
        paths = write_ct_series(tmp_path, hu, transfer_syntax=syntax, bits=8, slopes=slopes, intercepts=intercepts)
        out = sitk.GetArrayFromImage(load_volume(_ref(paths)).image)
        expected = stored_hu(hu, slopes, intercepts)
        assert np.abs(out - expected).max() <= 8 * 8  # a few stored steps
        assert np.abs(out - expected).mean() <= 8
        return
    paths = write_ct_series(tmp_path, hu, transfer_syntax=syntax)
    out = sitk.GetArrayFromImage(load_volume(_ref(paths)).image)
    np.testing.assert_array_equal(out, hu)


def _missing(tmp_path, drop, **kwargs):
    hu = random_volume((20, 24, 24), seed=4)
    paths = write_ct_series(tmp_path, hu, slice_spacing=2.0, origin=(0.0, 0.0, 0.0))
    kept = [p for k, p in enumerate(paths) if k not in drop]
    return hu, load_volume(_ref(kept), **kwargs)


def test_one_missing_slice_is_interpolated(tmp_path) -> None:
    hu, vol = _missing(tmp_path, {7})
    out = sitk.GetArrayFromImage(vol.image)
    assert out.shape == hu.shape and vol.image.GetSpacing()[2] == pytest.approx(2.0)
    keep = [k for k in range(20) if k != 7]
    np.testing.assert_array_equal(out[keep], hu[keep])
    np.testing.assert_allclose(out[7], (hu[6].astype(np.float32) + hu[8]) / 2, atol=1e-3)
    assert any("interpolated 1 missing slice" in n and "z=12.00" in n and "z=16.00" in n for n in vol.notes)


def test_three_missing_slices_are_an_error(tmp_path) -> None:
    with pytest.raises(VolumeError, match=r"missing 3 slices between z=12\.00 and z=20\.00"):
        _missing(tmp_path, {7, 8, 9})


def test_max_gap_slices_allows_a_longer_gap(tmp_path) -> None:
    hu, vol = _missing(tmp_path, {7, 8, 9}, max_gap_slices=3)
    assert sitk.GetArrayFromImage(vol.image).shape == hu.shape


def test_duplicate_slice_identical_is_dropped(tmp_path) -> None:
    hu = random_volume((10, 24, 24), seed=5)
    paths = write_ct_series(tmp_path, hu)
    dup = tmp_path / "copy_of_5"
    dup.write_bytes(paths[5].read_bytes())
    vol = load_volume(_ref([*paths, dup]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), hu)
    assert any("duplicate" in n for n in vol.notes)


def test_duplicate_position_with_different_pixels_is_an_error(tmp_path) -> None:
    hu = random_volume((10, 24, 24), seed=6)
    paths = write_ct_series(tmp_path / "a", hu)
    other = write_ct_series(tmp_path / "b", hu[:1] + 1, names=["other.dcm"])
    with pytest.raises(VolumeError, match="same position") as err:
        load_volume(_ref([*paths, *other]))
    _no_phi(str(err.value))


def test_uneven_spacing_is_resampled_to_the_most_common_spacing(tmp_path) -> None:
    # positions 0, 2, ..., 8, 11, 13, ..., 25 mm: one 3 mm gap among 2 mm gaps
    d = np.array([0, 2, 4, 6, 8, 11, 13, 15, 17, 19, 21, 23, 25], dtype=np.float64)
    base = np.random.default_rng(7).integers(-500, 500, size=(24, 24))  # (Y, X)
    hu = (base[None] + 10 * d[:, None, None]).astype(np.int16)  # (Z, Y, X), linear along z
    positions = np.stack([np.zeros_like(d), np.zeros_like(d), d], axis=1)
    paths = write_ct_series(tmp_path, hu, positions=positions)
    vol = load_volume(_ref(paths))
    out = sitk.GetArrayFromImage(vol.image)
    t = 2.0 * np.arange(13)  # regular grid 0 .. 24 mm
    assert out.shape == (13, 24, 24) and vol.image.GetSpacing()[2] == pytest.approx(2.0)
    np.testing.assert_allclose(out, base[None] + 10 * t[:, None, None], atol=1e-3)
    assert any("uneven slice spacing" in n for n in vol.notes)


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path) -> None:
    """Tilted slice planes (c tilted by 15 deg) with positions advancing along the table (z): each output
    voxel must hold the value of the linear field at its own physical point."""
    theta = math.radians(15.0)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(theta), math.sin(theta))
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    nz, ny, nx, dz, dxy = 12, 40, 32, 2.5, 1.0
    origin = np.array([-10.0, -20.0, 5.0])
    positions = origin + np.outer(np.arange(nz) * dz, [0.0, 0.0, 1.0])  # (Z, 3) table positions

    def field(p):  # linear HU field, exact under linear interpolation
        return 3.0 * p[..., 0] + 2.0 * p[..., 1] + 5.0 * p[..., 2]

    j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")  # (Y, X)
    pts = positions[:, None, None, :] + (i[..., None] * dxy * r + j[..., None] * dxy * c)[None]  # (Z, Y, X, 3)
    hu = np.rint(field(pts)).astype(np.int16)
    paths = write_ct_series(tmp_path, hu, orientation=orientation, positions=positions, pixel_spacing=(dxy, dxy))
    vol = load_volume(_ref(paths))
    img = vol.image
    note = next(n for n in vol.notes if "gantry tilt" in n)
    assert "15.0 deg" in note
    n = np.cross(r, c)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), np.stack([r, c, n], 1), atol=1e-5)
    assert img.GetSpacing()[2] == pytest.approx(dz * math.cos(theta), abs=1e-3)
    out = sitk.GetArrayFromImage(img)  # (Z, Y, X)
    shift = np.arange(nz) * dz * math.sin(theta) / dxy  # rows each slice moved along c
    checked = 0
    for k in range(nz):
        for jj in range(int(math.ceil(shift[k])), ny):
            p = np.array([img.TransformIndexToPhysicalPoint((ii, jj, k)) for ii in (0, 7, nx - 1)])
            np.testing.assert_allclose(out[k, jj, [0, 7, nx - 1]], field(p), atol=1.0)
            checked += 1
    assert checked > nz * ny // 2


def test_mixed_matrix_sizes_are_an_error(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "a", random_volume((5, 48, 48)))
    odd = write_ct_series(tmp_path / "b", random_volume((1, 40, 40)), origin=(-100.5, -120.25, 100.0))
    with pytest.raises(VolumeError, match=r"mixed matrix sizes.*48x48 \(5 slices\), 40x40 \(1 slices\)"):
        load_volume(_ref([*paths, *odd]))


def test_mixed_pixel_spacing_is_an_error(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "a", random_volume((5, 16, 16)))
    odd = write_ct_series(tmp_path / "b", random_volume((1, 16, 16)), pixel_spacing=(0.9, 0.9), origin=(0, 0, 99))
    with pytest.raises(VolumeError, match="mixed pixel spacings"):
        load_volume(_ref([*paths, *odd]))


def test_rescale_varies_per_slice(tmp_path) -> None:
    hu = random_volume((6, 16, 16), seed=8)
    slopes = [1.0, 2.0, 0.5, 1.0, 1.5, 1.0]
    intercepts = [-1024.0, -1000.0, -1024.0, -2048.0, -1100.0, -1024.0]
    paths = write_ct_series(tmp_path, hu, slopes=slopes, intercepts=intercepts)
    img = load_volume(_ref(paths)).image
    assert img.GetPixelID() == sitk.sitkFloat32  # a non-integer slope
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), stored_hu(hu, slopes, intercepts), atol=1e-3)


def test_signed_pixels_and_padding_value(tmp_path) -> None:
    hu = random_volume((4, 16, 16), seed=9)
    hu[:, :3, :3] = -3024  # outside the field of view, stored as the padding value
    paths = write_ct_series(tmp_path, hu, signed=True, padding_value=-2000)
    vol = load_volume(_ref(paths))
    out = sitk.GetArrayFromImage(vol.image)
    expected = hu.copy()
    expected[:, :3, :3] = -1024
    np.testing.assert_array_equal(out, expected)
    assert any("padding" in n for n in vol.notes)


def test_file_without_preamble_is_read(tmp_path) -> None:
    hu = random_volume((3, 16, 16), seed=10)
    paths = write_ct_series(tmp_path, hu, preamble=False, names=["a", "b", "c"])
    assert paths[0].read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(load_volume(_ref(paths)).image), hu)


@pytest.mark.filterwarnings("ignore:End of file reached")
@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless], ids=["raw", "rle"])
def test_truncated_file_is_left_out_named_and_its_gap_interpolated(tmp_path, syntax) -> None:
    hu = random_volume((5, 32, 32))
    paths = write_ct_series(tmp_path, hu, transfer_syntax=syntax)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 700])
    vol = load_volume(_ref(paths))
    arr = sitk.GetArrayFromImage(vol.image)  # (Z, Y, X)
    assert arr.shape == hu.shape and vol.image.GetSpacing()[2] == pytest.approx(2.5)
    np.testing.assert_array_equal(arr[[0, 1, 3, 4]], hu[[0, 1, 3, 4]])
    np.testing.assert_allclose(arr[2], (hu[1].astype(np.float32) + hu[3]) / 2, atol=1e-3)
    assert any("left out 1 unreadable file" in n and paths[2].name in n for n in vol.notes), vol.notes
    assert any("interpolated 1 missing slice" in n for n in vol.notes), vol.notes
    _no_phi(*vol.notes)


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_truncated_files_leaving_a_long_gap_are_an_error_naming_them(tmp_path) -> None:
    paths = write_ct_series(tmp_path, random_volume((6, 16, 16)))
    for p in paths[2:4]:
        p.write_bytes(p.read_bytes()[:-300])
    with pytest.raises(VolumeError, match="missing 2 slices") as err:
        load_volume(_ref(paths))
    assert paths[2].name in str(err.value) and paths[3].name in str(err.value)
    with pytest.raises(VolumeError, match=rf"{paths[2].name}: .*\(2 of 2 files unreadable\)"):  # none readable
        load_volume(_ref([paths[2], paths[3]]))


def test_garbage_file_is_left_out_naming_it(tmp_path) -> None:
    hu = random_volume((3, 16, 16))
    paths = write_ct_series(tmp_path, hu)
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    vol = load_volume(_ref([*paths, bad]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), hu)
    assert any("garbage.dcm" in n for n in vol.notes), vol.notes


def test_nifti_folder(tmp_path) -> None:
    vols = {name: random_volume((5, 12, 10), seed=k) for k, name in enumerate(["case_a", "case_b"])}
    for name, arr in vols.items():
        write_nifti(tmp_path / f"{name}.nii.gz", arr, (3.0, 1.0, 0.9), (1.0, 2.0, 3.0))
    found = discover(tmp_path)
    assert sorted(r.folder_key for r in found.selected) == ["case_a", "case_b"] and not found.skipped
    for ref in found.selected:
        assert ref.kind == "nifti"
        img = load_volume(ref).image
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vols[ref.folder_key])
        np.testing.assert_allclose(img.GetSpacing(), (0.9, 1.0, 3.0))
        np.testing.assert_allclose(img.GetOrigin(), (1.0, 2.0, 3.0))
    single = discover(tmp_path / "case_a.nii.gz")
    assert [r.folder_key for r in single.selected] == ["case_a"]


def test_corrupt_nifti_is_an_error(tmp_path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti at all")
    with pytest.raises(VolumeError, match="broken.nii.gz"):
        load_volume(SeriesRef(kind="nifti", files=(path,), folder_key="broken"))
