"""Integrity on read (issue 17 item 1): truncated or bit-flipped ``.nii.gz``, truncated ``.nii``, NaN/inf voxels;
in ``load_volume``, in the CT-RATE loader and through ``fvlm preprocess`` (a failed case, the run goes on)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.cli import main
from pipelines.preprocess.series import SeriesRef, VolumeError
from pipelines.preprocess.volume import load_volume
from tests.pipelines.preprocess.preprocess_fixtures import case_json, cohort, fast_config, manifest


def _scan(shape=(24, 40, 40), dtype=np.int16) -> np.ndarray:
    """A noisy body-like volume (compresses poorly, like CT): (Z, Y, X)."""
    rng = np.random.default_rng(0)
    return (rng.normal(0, 300, shape).clip(-1024, 2000)).astype(dtype)


def _write(path: Path, arr: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(path), path.name.endswith(".gz"))
    return path


def _ref(path: Path) -> SeriesRef:
    return SeriesRef(kind="nifti", files=(path,), folder_key=path.name.split(".")[0])


def test_truncated_gzip_is_an_error_not_zeros(tmp_path) -> None:
    path = _write(tmp_path / "scan.nii.gz", _scan())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"scan\.nii\.gz: truncated gzip stream"):
        load_volume(_ref(path))


def test_flipped_bytes_fail_the_crc_or_the_stream(tmp_path) -> None:
    path = _write(tmp_path / "scan.nii.gz", _scan())
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match=r"scan\.nii\.gz: (corrupt gzip stream|truncated)"):
        load_volume(_ref(path))


def test_bad_crc_alone_is_caught(tmp_path) -> None:
    path = _write(tmp_path / "scan.nii.gz", _scan())
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01  # the CRC-32 of the member: the deflate data itself is intact
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="corrupt gzip stream"):
        load_volume(_ref(path))


def test_truncated_plain_nifti_is_an_error(tmp_path) -> None:
    path = _write(tmp_path / "scan.nii", _scan())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(VolumeError, match=r"scan\.nii: truncated: the header announces \d+ bytes"):
        load_volume(_ref(path))


def test_gzip_of_a_truncated_nifti_is_an_error(tmp_path) -> None:
    plain = _write(tmp_path / "plain.nii", _scan())
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()[:-500]))  # a whole gzip stream of too few voxel bytes
    with pytest.raises(VolumeError, match="truncated: the header announces"):
        load_volume(_ref(path))


def test_intact_files_read_unchanged(tmp_path) -> None:
    arr = _scan()
    for name in ("a.nii.gz", "b.nii"):
        vol = load_volume(_ref(_write(tmp_path / name, arr)))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), arr)
        assert vol.notes == []


def test_nan_block_fails_with_count_and_location(tmp_path) -> None:
    arr = _scan(dtype=np.float32)
    arr[5:8, 10:20, 3:4] = np.nan
    arr[6, 0, 0] = np.inf
    path = _write(tmp_path / "scan.nii.gz", arr)
    with pytest.raises(VolumeError) as err:
        load_volume(_ref(path))
    msg = str(err.value)
    assert "30 NaN and 1 infinite voxel(s)" in msg and "slices z=5-7 of 24" in msg
    assert "rows y=0-19" in msg and "columns x=0-3" in msg and "--fill-nonfinite" in msg


def test_all_nan_volume_fails_and_never_becomes_water(tmp_path) -> None:
    path = _write(tmp_path / "scan.nii.gz", np.full((6, 8, 8), np.nan, np.float32))
    with pytest.raises(VolumeError, match=r"384 NaN and 0 infinite voxel\(s\) \(100% of the volume\)"):
        load_volume(_ref(path))


def test_fill_nonfinite_replaces_with_the_stated_value_and_notes_it(tmp_path) -> None:
    arr = _scan(dtype=np.float32)
    arr[2, 3, 4] = np.nan
    arr[3, 3, 4] = -np.inf
    vol = load_volume(_ref(_write(tmp_path / "scan.nii.gz", arr)), fill_nonfinite=-1024)
    out = sitk.GetArrayFromImage(vol.image)
    assert out[2, 3, 4] == -1024 and out[3, 3, 4] == -1024 and np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], arr[0])
    (note,) = vol.notes
    assert "1 NaN and 1 infinite" in note and "-1024 HU (--fill-nonfinite)" in note


def test_ctrate_loader_checks_before_its_statistics(tmp_path) -> None:
    from pipelines.preprocess.ctrate import CtRateLoader

    meta = tmp_path / "meta.csv"
    meta.write_text("VolumeName,XYSpacing,ZSpacing,RescaleSlope,RescaleIntercept\n"
                    "train_1_a_1.nii.gz,\"[0.8, 0.8]\",2.5,1,-1024\n")
    arr = _scan(dtype=np.float32)
    arr[:] = np.nan
    path = _write(tmp_path / "train_1_a_1.nii.gz", arr)
    with pytest.raises(VolumeError, match="NaN"):
        CtRateLoader(meta).load(SeriesRef("nifti", (path,), "train_1_a_1"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated gzip"):
        CtRateLoader(meta).load(SeriesRef("nifti", (path,), "train_1_a_1"))


def test_preprocess_records_failed_cases_and_goes_on(tmp_path) -> None:
    synth = cohort(tmp_path / "synth", cases=3, fmt="nifti")
    images = sorted((synth / "images").glob("*.nii.gz"))
    truncated, nan = images[0], images[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    img = sitk.ReadImage(str(nan), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[:] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(nan), True)
    masks = tmp_path / "masks"
    shutil.copytree(synth / "segmentations", masks)
    broken_mask = masks / images[2].name
    broken_mask.write_bytes(broken_mask.read_bytes()[:-300])  # the third case's label map is cut short
    out = tmp_path / "out"
    args = ["preprocess", str(synth / "images"), str(out), "--masks", str(masks), "--config",
            str(fast_config(tmp_path)), "--case-id", "key", "--no-progress"]
    assert main(args) == 1
    rows = {r["case_id"]: r for r in manifest(out)}
    assert rows[truncated.name.split(".")[0]]["status"] == "failed"
    assert "truncated gzip stream" in rows[truncated.name.split(".")[0]]["reason"]
    assert "NaN" in rows[nan.name.split(".")[0]]["reason"] and "100% of the volume" in rows[nan.name.split(".")[0]]["reason"]
    assert "label map file" in rows[images[2].name.split(".")[0]]["reason"]
    assert "gzip" in rows[images[2].name.split(".")[0]]["reason"]


def test_preprocess_fill_nonfinite_is_noted_in_case_json(tmp_path) -> None:
    synth = cohort(tmp_path / "synth", cases=1, fmt="nifti")
    (path,) = sorted((synth / "images").glob("*.nii.gz"))
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[0, :4, :4] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(path), True)
    out = tmp_path / "out"
    args = ["preprocess", str(synth / "images"), str(out), "--masks", str(synth / "segmentations"), "--config",
            str(fast_config(tmp_path)), "--case-id", "key", "--no-progress", "--fill-nonfinite", "-1000"]
    assert main(args) == 0
    case = case_json(out, path.name.split(".")[0])
    assert any("16 NaN" in n and "-1000 HU (--fill-nonfinite)" in n for n in case["source"]["notes"])
