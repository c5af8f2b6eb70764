"""The HU plausibility gate: a body CT in HU passes; raw stored values, a second rescale, a windowed image and
other non-CT distributions fail with the right cause (on a numpy phantom, the synthetic cohort and the real
TotalSegmentator CTs); thresholds load from the preprocess config; ``fvlm preprocess --hu-check`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from configs.checks import ConfigError
from pipelines.cli import main
from pipelines.preprocess.crop import load_crop_config
from pipelines.preprocess.hu_check import (
    HUCheckConfig,
    HUCheckError,
    check_image,
    check_sample,
    gate_volume,
    sample_voxels,
)
from pipelines.preprocess.series import Volume
from tests.pipelines.preprocess.preprocess_fixtures import case_json, cohort, fast_config, manifest

CFG = HUCheckConfig()
REAL = Path(__file__).resolve().parents[4] / "shared" / "data" / "totalsegmentator"


def phantom(shape: tuple[int, int, int] = (12, 64, 64), seed: int = 0) -> np.ndarray:
    """A torso slab in HU, (Z, Y, X) float32: air around it, a fat rim, soft tissue, two lungs and a spine,
    with 15 HU of noise."""
    nz, ny, nx = shape
    _, y, x = np.ogrid[:nz, :ny, :nx]
    yy, xx = (y - ny / 2) / (ny * 0.42), (x - nx / 2) / (nx * 0.46)
    r2 = yy**2 + xx**2
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.broadcast_to(r2 < 1.0, shape)] = -100.0  # fat rim
    hu[np.broadcast_to(r2 < 0.75, shape)] = 45.0  # soft tissue
    for cx in (-0.45, 0.45):
        hu[np.broadcast_to(((xx - cx) / 0.3) ** 2 + ((yy + 0.1) / 0.45) ** 2 < 1, shape)] = -850.0  # lungs
    hu[np.broadcast_to((xx**2 + (yy - 0.6) ** 2) < 0.02, shape)] = 700.0  # spine
    return hu + np.random.default_rng(seed).normal(0, 15, shape).astype(np.float32)


def _check(arr: np.ndarray):
    return check_sample(sample_voxels(arr, CFG.max_sample_voxels), CFG)


VARIANTS = {
    "shifted by -1024 (rescaled twice)": (lambda hu: hu - 1024, "rescaled_twice", "looks rescaled twice"),
    "raw stored values, intercept -1024": (lambda hu: np.clip(hu + 1024, 0, 4095).astype(np.uint16),
                                           "raw_stored_values", "looks like raw stored values: add the rescale"),
    "raw stored values, intercept -1000": (lambda hu: np.clip(hu + 1000, 0, 4095), "raw_stored_values",
                                           "add the rescale"),
    # an unusual slope is not named raw for sure (an MR can fit a line as well): the hint gives the fitted map
    "raw stored values, slope 0.5": (lambda hu: np.clip((hu + 1024) * 2, 0, None), "not_ct", "would look like HU"),
    "windowed to [0, 1]": (lambda hu: np.clip((hu + 1150) / 1500, 0, 1), "not_ct", "windowed or normalised"),
    "windowed to [0, 255]": (lambda hu: np.rint(np.clip((hu + 160) / 400, 0, 1) * 255), "not_ct", "windowed"),
    "constant": (lambda hu: np.full_like(hu, 40), "not_ct", "every voxel is 40"),
    "MR-like (dark air and lungs, bright fat)": (lambda hu: _by_tissue(hu, 20, 900, 400, 150), "not_ct", "MR, PET"),
    "PET-like (Bq/ml)": (lambda hu: _by_tissue(hu, 100, 1500, 1500, 800), "not_ct", "not a CT"),
}


def _by_tissue(hu: np.ndarray, air: float, fat: float, soft: float, bone: float) -> np.ndarray:
    """Another modality's intensities for the phantom's tissues (air and lungs, fat, soft tissue, bone)."""
    noise = np.random.default_rng(1).normal(0, 20, hu.shape)
    return np.select([hu < -500, hu < -50, hu < 300], [air, fat, soft], bone) + noise


def test_phantom_in_hu_passes_with_peaks_near_air_and_soft_tissue() -> None:
    r = _check(phantom())
    assert r.passed, r.problems
    assert -1010 <= r.stats.air_peak_hu <= -990 and -110 <= r.stats.tissue_peak_hu <= 60
    assert r.stats.outside_share < 0.001
    record = r.to_dict("fail")
    assert record["status"] == "pass" and json.dumps(record)  # JSON-ready for case.json


@pytest.mark.parametrize("name", list(VARIANTS))
def test_wrong_units_fail_with_the_right_cause(name: str) -> None:
    fn, cause, words = VARIANTS[name]
    r = _check(fn(phantom()))
    assert not r.passed and r.cause == cause, (name, r.cause, r.explanation)
    assert words in r.explanation
    msg = r.message(CFG)
    assert msg.startswith("implausible HU:") and ("air peak" in msg) and len(msg) < 450


def test_scanner_padding_outside_the_field_of_view_is_not_counted() -> None:
    hu = phantom()
    _, y, x = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    outside = np.broadcast_to(((y - 32) ** 2 + (x - 32) ** 2) > 31**2, hu.shape)
    hu[outside] = -3024  # about 20 % of the voxels, as outside a reconstruction circle
    r = _check(hu)
    assert r.passed, r.problems
    assert r.stats.padding_value == -3024 and 0.15 < r.stats.padding_share < 0.3
    twice = _check(hu - 1024)  # the padding value moves too; the rest is still far below air
    assert not twice.passed and twice.cause == "rescaled_twice"


def test_small_volumes_are_judged_like_large_ones() -> None:
    tiny = phantom((2, 16, 16))  # 512 voxels: shares and peaks still hold
    assert _check(tiny).passed
    assert not _check(tiny + 1024).passed
    big = phantom((40, 128, 128))
    s = sample_voxels(big, 50_000)
    assert s.size <= 50_000 and s.dtype == np.float32 and _check(big).passed


def test_non_finite_voxels_count_as_outside() -> None:
    hu = phantom()
    hu[: hu.shape[0] // 2] = np.nan
    r = _check(hu)
    assert not r.passed and r.stats.outside_share > 0.4


def test_gate_modes(tmp_path: Path) -> None:
    good = Volume(sitk.GetImageFromArray(phantom()))
    bad = Volume(sitk.GetImageFromArray(phantom() + 1024))
    record, warning = gate_volume(good, CFG, "fail")
    assert record["status"] == "pass" and warning is None and record["mode"] == "fail"
    with pytest.raises(HUCheckError, match="raw stored values") as e:
        gate_volume(bad, CFG, "fail")
    assert e.value.record["cause"] == "raw_stored_values" and "--hu-check warn" in str(e.value)
    record, warning = gate_volume(bad, CFG, "warn")
    assert record["status"] == "fail" and record["problems"] and "kept (--hu-check warn)" in warning
    assert gate_volume(bad, CFG, "off") == ({"mode": "off", "status": "off"}, None)
    with pytest.raises(ValueError, match="--hu-check must be one of"):
        gate_volume(good, CFG, "strict")


@pytest.mark.slow  # preprocesses a cohort
def test_synthetic_cohort_volumes_pass(tmp_path: Path) -> None:
    synth = cohort(tmp_path / "synth", cases=4, fmt="nifti", seed=21)
    for f in sorted((synth / "images").glob("*.nii.gz")):
        r = check_image(sitk.ReadImage(str(f)), CFG)
        assert r.passed, (f.name, r.problems)


@pytest.mark.skipif(not (REAL / "example_ct.nii.gz").is_file(), reason=f"real TotalSegmentator CTs not found in {REAL}")
@pytest.mark.parametrize("ct", ["example_ct_sm.nii.gz", "example_ct.nii.gz"])
def test_real_ct_passes_and_its_wrong_unit_versions_fail(ct: str) -> None:
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL / ct))).astype(np.float32)
    assert _check(hu).passed
    for name in ("shifted by -1024 (rescaled twice)", "raw stored values, intercept -1024", "windowed to [0, 1]"):
        fn, cause, _ = VARIANTS[name]
        r = _check(fn(hu))
        assert not r.passed and r.cause == cause, (ct, name, r.cause)


# ------------------------------------------------------------------------------------------- config


def test_thresholds_are_config_data(tmp_path: Path) -> None:
    default = load_crop_config("default")
    assert default.hu_check == HUCheckConfig() and default.to_dict()["hu_check"]["air_peak_hu"] == [-1100, -700]
    assert load_crop_config(fast_config(tmp_path)).hu_check == HUCheckConfig()  # no hu_check block: defaults
    own = tmp_path / "own.yaml"
    own.write_text(fast_config(tmp_path).read_text()
                   + "hu_check:\n  min_air_share: 0.2\n  air_peak_hu: [-1050, -950]\n")
    cfg = load_crop_config(own).hu_check
    assert cfg.min_air_share == 0.2 and cfg.air_peak_hu == (-1050, -950)
    bad = tmp_path / "bad.yaml"
    bad.write_text(fast_config(tmp_path).read_text() + "hu_check:\n  air_peak: [-1050, -950]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field\(s\) hu_check.air_peak; known fields of hu_check: "):
        load_crop_config(bad)
    bad.write_text(fast_config(tmp_path).read_text() + "hu_check:\n  tissue_peak_hu: [150, -150]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: hu_check: tissue_peak_hu must be \[lo, hi\]"):
        load_crop_config(bad)


# --------------------------------------------------------------------------------------- end to end


def _copy_series(src: Path, dst: Path, intercept: str | None) -> None:
    """A copy of a DICOM series under new UIDs; ``intercept`` replaces RescaleIntercept (None: drops the tags)."""
    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if intercept is None:
            del ds.RescaleIntercept, ds.RescaleSlope
        else:
            ds.RescaleIntercept = intercept
        ds.save_as(dst / f.name)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good DICOM series, one whose rescale tags were stripped (raw stored values), one whose intercept
    was doubled (rescaled twice); their label maps."""
    root = tmp_path_factory.mktemp("hu")
    synth = cohort(root / "synth", cases=1, fmt="dicom", seed=4)
    src = synth / "images" / "synth_00000"
    (root / "masks").mkdir()
    for name, intercept in (("good", "-1024"), ("stripped", None), ("twice", "-2048")):
        _copy_series(src, root / "images" / name, intercept)
        (root / "masks" / f"{name}.nii.gz").write_bytes((synth / "segmentations" / "synth_00000.nii.gz").read_bytes())
    return root


def _preprocess(root: Path, out: Path, *extra: str) -> int:
    return main(["preprocess", str(root / "images"), str(out), "--masks", str(root / "masks"), "--case-id", "key",
                 "--config", str(fast_config(out.parent)), "--no-progress", *extra])


@pytest.mark.slow  # preprocesses a cohort
def test_preprocess_fails_implausible_volumes_and_goes_on(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _preprocess(mixed, out) == 1
    rows = {r["case_id"]: r for r in manifest(out)}
    assert rows["good"]["status"] == "ok"
    check = case_json(out, "good")["intensity"]["hu_check"]
    assert check["status"] == "pass" and -1050 <= check["air_peak_hu"] <= -950
    assert -150 <= check["tissue_peak_hu"] <= 150
    assert rows["stripped"]["status"] == "failed"
    assert "looks like raw stored values: add the rescale" in rows["stripped"]["reason"]
    assert rows["twice"]["status"] == "failed" and "looks rescaled twice" in rows["twice"]["reason"]
    for name in ("stripped", "twice"):
        assert "air peak" in rows[name]["reason"] or "no air peak" in rows[name]["reason"]
        assert rows[name]["hu_check"]["status"] == "fail" and not (out / "cases" / name).exists()
    assert json.loads((out / "preprocess.json").read_text())["hu_check"] == "fail"


@pytest.mark.slow  # preprocesses a cohort
def test_hu_check_warn_and_off_keep_the_cases(mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "warn"
    assert _preprocess(mixed, out, "--hu-check", "warn") == 0
    rows = {r["case_id"]: r for r in manifest(out)}
    assert all(r["status"] == "ok" for r in rows.values())
    assert "kept (--hu-check warn)" in rows["stripped"]["reason"] and not rows["good"]["reason"]
    check = case_json(out, "stripped")["intensity"]["hu_check"]
    assert check["status"] == "fail" and check["cause"] == "raw_stored_values" and check["air_peak_hu"] is None
    out = tmp_path / "off"
    assert _preprocess(mixed, out, "--hu-check", "off") == 0
    assert case_json(out, "twice")["intensity"]["hu_check"] == {"mode": "off", "status": "off"}
