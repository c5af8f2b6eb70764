"""Segmenters: the registry, precomputed masks aligned in physical space, TotalSegmentator failing fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.preprocess.segment import (
    MaskSegmenter,
    SegmentationError,
    create_segmenter,
    list_segmenters,
    missing_weights,
    resample_labels_onto,
)
from tests.pipelines.preprocess.preprocess_fixtures import flipped_copy

ROOT = Path(__file__).resolve().parents[3]


def _image(shape_zyx=(12, 20, 24), spacing=(2.0, 1.5, 3.0), origin=(-20.0, 10.0, -40.0), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.integers(-1000, 1000, shape_zyx).astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _labels(image: sitk.Image, seed: int = 1) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 118, sitk.GetArrayViewFromImage(image).shape).astype(np.uint8)
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(image)
    return lab


def test_registry() -> None:
    assert {"masks", "totalsegmentator"} <= set(list_segmenters())
    with pytest.raises(ValueError, match="unknown segmenter 'nope'; registered segmenters: masks, totalsegmentator"):
        create_segmenter("nope")


def test_mask_on_flipped_grid_with_shifted_origin_lands_on_the_same_voxels() -> None:
    img = _image()
    lab = _labels(img)
    moved = flipped_copy(lab)
    assert moved.GetOrigin() != lab.GetOrigin() and moved.GetDirection() != lab.GetDirection()
    assert not np.array_equal(sitk.GetArrayViewFromImage(moved)[3:, :, 3:], sitk.GetArrayViewFromImage(lab))
    back = resample_labels_onto(moved, img)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(lab))
    assert back.GetOrigin() == img.GetOrigin()


def test_mask_outside_the_image_is_an_error() -> None:
    img = _image()
    lab = _labels(img)
    lab.SetOrigin((500.0, 500.0, 500.0))
    with pytest.raises(SegmentationError, match="does not overlap the image in physical space"):
        resample_labels_onto(lab, img)


def test_masks_folder_matches_by_key_and_single_file_serves_all(tmp_path: Path) -> None:
    img = _image()
    lab = _labels(img)
    sitk.WriteImage(lab, str(tmp_path / "case_a.nii.gz"))
    seg = create_segmenter("masks", path=tmp_path)
    assert np.array_equal(sitk.GetArrayFromImage(seg.segment(img, "case_a")), sitk.GetArrayFromImage(lab))
    with pytest.raises(SegmentationError, match="no label map for this case"):
        seg.segment(img, "case_b")
    single = MaskSegmenter(tmp_path / "case_a.nii.gz")
    assert single.segment(img, None).GetSize() == img.GetSize()
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(SegmentationError, match="cannot be read"):
        seg.segment(img, "bad")
    with pytest.raises(FileNotFoundError):
        create_segmenter("masks", path=tmp_path / "missing")


@pytest.mark.timeout(120)  # no download attempt: TotalSegmentator's request has no timeout and would hang here
def test_totalsegmentator_without_weights_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        create_segmenter("totalsegmentator", classes=["liver"], fast=True, device="cpu")
    msg = str(e.value)
    assert "totalseg_download_weights -t total_fast" in msg and "Dataset297" in msg and "--masks" in msg
    assert str(tmp_path) in msg
    assert not any(tmp_path.rglob("*.zip"))  # nothing was fetched


def test_totalsegmentator_weights_check_finds_installed_weights(tmp_path: Path) -> None:
    assert missing_weights(True, True, tmp_path) == [
        "Dataset297_TotalSegmentator_total_3mm_1559subj", "Dataset298_TotalSegmentator_total_6mm_1559subj"]
    for name in missing_weights(True, True, tmp_path):
        fold = tmp_path / name / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres" / "fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pth").write_bytes(b"")
    assert missing_weights(True, True, tmp_path) == []
    assert len(missing_weights(False, False, tmp_path)) == 5
    seg = create_segmenter("totalsegmentator", classes=["liver"], weights_dir=tmp_path, device="cpu")
    assert seg.describe()["roi_subset"] == ["liver"]


@pytest.mark.slow
def test_cli_totalsegmentator_without_weights_exits_2_fast(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    env = {"TOTALSEG_HOME_DIR": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipelines", "preprocess", str(tmp_path / "in"), str(tmp_path / "out"),
                        "--segmenter", "totalsegmentator", "--device", "cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "weights are not installed" in r.stderr and "totalseg_download_weights" in r.stderr


def test_totalsegmentator_run_sends_no_usage_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TotalSegmentator's API posts usage statistics on every run; fvlm's segmenter turns that call off.
    The model itself is replaced by a stand-in that calls the statistics hook as the real API does."""
    pytest.importorskip("totalsegmentator", reason="TotalSegmentator extra not installed")
    import nibabel as nib
    import totalsegmentator.python_api as ts_api

    for name in missing_weights(True, True, tmp_path):
        fold = tmp_path / name / "fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pth").write_bytes(b"")
    posted: list[dict] = []
    monkeypatch.setattr("requests.post", lambda *a, **k: posted.append(k) or pytest.fail("network call"))

    def fake_totalsegmentator(src, out, **kwargs):
        ts_api.send_usage_stats({"send_usage_stats": True, "totalseg_id": "x", "prediction_counter": 0},
                                {"task": "total", "fast": True, "preview": False, "multilabel": True,
                                 "roi_subset": kwargs.get("roi_subset"), "statistics": False, "radiomics": False})
        ct = nib.load(str(src))
        return nib.Nifti1Image((np.asarray(ct.dataobj) > 0).astype(np.uint8) * 5, ct.affine)  # 5 = liver

    monkeypatch.setattr(ts_api, "totalsegmentator", fake_totalsegmentator)
    seg = create_segmenter("totalsegmentator", classes=["liver"], weights_dir=tmp_path, device="cpu")
    image = _image()
    labels = seg.segment(image, None)
    assert not posted
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels) == 5, sitk.GetArrayFromImage(image) > 0)
