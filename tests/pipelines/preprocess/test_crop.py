"""Anatomy grouping, statistics and crops; the crop of a flipped, shifted mask equals the crop of the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from anatomy.catalog import load_anatomy_set
from configs.checks import ConfigError
from pipelines.preprocess.crop import (
    CropConfig,
    CropError,
    anatomy_stats,
    crop_case,
    crop_grid,
    group_anatomies,
    hu_means,
    load_crop_config,
)
from pipelines.preprocess.segment import create_segmenter
from tests.pipelines.preprocess.preprocess_fixtures import cohort, flipped_copy

FAST = CropConfig(name="t", spacing_xyz_mm=(3.0, 3.0, 5.0), margin_zyx_vox=(1, 2, 2), min_size_zyx=(8, 16, 16),
                  max_size_zyx=(200, 200, 200))


@pytest.fixture(scope="module")
def synth_nifti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cohort(tmp_path_factory.mktemp("synth"), cases=1, fmt="nifti", seed=5)


def test_default_configs_are_the_released_fvlm_preprocessing() -> None:
    d = load_crop_config("default")
    assert d.spacing_xyz_mm == (1.0, 1.0, 3.0) and d.margin_zyx_vox == (5, 20, 20)
    assert d.min_size_zyx == (112, 256, 352) and d.window_hu == (-1150, 350)
    c = load_crop_config("ct-rate")
    assert c.spacing_xyz_mm == (1.0, 1.0, 3.0) and c.min_size_zyx == (112, 256, 352) and c.pad_hu == -1150


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspacing_xyz_mm: [1, 1]\n")
    with pytest.raises(ConfigError, match="spacing_xyz_mm"):
        load_crop_config(bad)
    bad.write_text("name: x\nspacing: [1, 1, 1]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field\(s\) spacing; known fields: "):
        load_crop_config(bad)
    bad.write_text("name: x\npad_hu: air\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: pad_hu must be an integer, got 'air'"):
        load_crop_config(bad)


def test_a_preprocess_config_extends_a_preset(tmp_path: Path) -> None:
    """``extends: bench`` takes the preset and the file states only what differs (the typed loader's
    ``extends:``, as recipes and model configs)."""
    own = tmp_path / "own.yaml"
    own.write_text("extends: bench\nname: own\nspacing_xyz_mm: [5, 5, 10]\n")
    bench, cfg = load_crop_config("bench"), load_crop_config(own)
    assert cfg.name == "own" and cfg.spacing_xyz_mm == (5, 5, 10)
    assert cfg.min_size_zyx == bench.min_size_zyx and cfg.antialias == bench.antialias


def test_grouping_and_stats() -> None:
    aset = load_anatomy_set("fvlm15")
    total = np.zeros((10, 12, 14), np.uint8)  # (Z, Y, X)
    total[0:4, 2:5, 3:7] = 5  # liver, touching the first slice
    total[5:8, 6:9, 6:9] = 1  # spleen
    total[5:8, 0:2, 0:2] = 2  # kidney_right
    total[6, 10, 10] = 117  # a class of no anatomy of fvlm15? (costal cartilages belong to bone)
    anat = group_anatomies(total, aset)
    assert anat[1, 3, 4] == aset["liver"].label and anat[6, 7, 7] == aset["spleen"].label
    img = sitk.GetImageFromArray(np.zeros_like(total, dtype=np.int16))
    img.SetSpacing((2.0, 2.0, 5.0))
    stats = {s.name: s for s in anatomy_stats(anat, img, aset, min_voxels=1)}
    assert stats["liver"].voxels == 4 * 3 * 4 and stats["liver"].cut_by_scan_boundary
    assert not stats["spleen"].cut_by_scan_boundary and stats["spleen"].present
    assert stats["kidney"].cut_by_scan_boundary  # touches y = 0 and x = 0
    assert stats["spleen"].bbox_lps_mm == [[11.0, 11.0, 22.5], [17.0, 17.0, 37.5]]
    assert stats["spleen"].volume_ml == pytest.approx(27 * 20 / 1000)
    assert not stats["heart"].present and stats["heart"].bbox_lps_mm is None


def test_crop_grid_margin_min_and_max_size() -> None:
    origin, size, cut = crop_grid([[[0, 0, 0], [30, 30, 50]]], FAST)
    assert list(size) == [16, 16, 12]  # x: 30 mm + 2 * 2 * 3 mm = 42 mm -> 14 -> min 16; z: (50 + 10) / 5
    assert not cut and np.allclose(origin + (size - 1) * np.array([3, 3, 5]) / 2, [15, 15, 25])
    small = CropConfig(name="s", spacing_xyz_mm=(1, 1, 1), margin_zyx_vox=(0, 0, 0), min_size_zyx=(1, 1, 1),
                       max_size_zyx=(10, 10, 10))
    _, size, cut = crop_grid([[[0, 0, 0], [20, 5, 5]]], small)
    assert cut and list(size) == [10, 5, 5]


def test_no_anatomy_is_an_error() -> None:
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    lab = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(CropError, match="label map holds 0 anatomies of set 'fvlm15'"):
        crop_case(img, lab, load_anatomy_set("fvlm15"), FAST)


def test_flipped_shifted_mask_gives_the_truths_crop_and_hu(synth_nifti: Path, tmp_path: Path) -> None:
    aset = load_anatomy_set("fvlm15")
    image = sitk.ReadImage(str(synth_nifti / "images" / "synth_00000.nii.gz"))
    truth = sitk.ReadImage(str(synth_nifti / "segmentations" / "synth_00000.nii.gz"))
    sitk.WriteImage(flipped_copy(truth, shift_voxels=4), str(tmp_path / "synth_00000.nii.gz"))
    moved = create_segmenter("masks", path=tmp_path).segment(image, "synth_00000")
    ref = crop_case(image, truth, aset, FAST)
    got = crop_case(image, moved, aset, FAST)
    assert got.geometry == ref.geometry
    assert [s.to_dict() for s in got.stats] == [s.to_dict() for s in ref.stats]
    assert np.array_equal(sitk.GetArrayFromImage(got.anatomy), sitk.GetArrayFromImage(ref.anatomy))
    means_ref, means_got = hu_means(ref), hu_means(got)
    assert means_got == pytest.approx(means_ref, abs=1e-6)
    # and against the truth on the source grid: mean HU per anatomy agrees within resampling error
    hu = sitk.GetArrayFromImage(image).astype(float)
    src = group_anatomies(sitk.GetArrayFromImage(truth), aset)
    for name in ("liver", "spleen", "kidney"):  # large organs; thin ones blur on this coarse grid
        assert means_got[name] == pytest.approx(hu[src == aset[name].label].mean(), abs=25), name
    # by contrast, index-matching the flipped array would put the labels on the wrong voxels
    wrong = sitk.GetImageFromArray(sitk.GetArrayFromImage(flipped_copy(truth, 0)))
    wrong.CopyInformation(image)
    assert hu_means(crop_case(image, wrong, aset, FAST)).get("liver", 0) != pytest.approx(means_ref["liver"], abs=5)


def test_antialias_sigmas_follow_the_downsampling_factor() -> None:
    from pipelines.preprocess.crop import antialias_sigmas_mm

    img = sitk.Image(8, 8, 8, sitk.sitkInt16)
    img.SetSpacing((1.0, 1.5, 2.0))
    assert antialias_sigmas_mm(img, (6.0, 6.0, 10.0)) == pytest.approx([2.5, 2.25, 4.0])
    assert antialias_sigmas_mm(img, (0.5, 1.5, 2.0)) == [0.0, 0.0, 0.0]  # as fine or finer: no smoothing
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))  # image axis 0 runs along y
    assert antialias_sigmas_mm(img, (6.0, 8.0, 10.0)) == pytest.approx([3.5, 2.25, 4.0])


def test_antialias_keeps_a_small_focus_at_every_sampling_phase() -> None:
    """A 2 mm bright focus on a 1 mm grid, cropped onto a 6 mm grid: linear resampling alone keeps it or loses
    it depending on where it falls between the coarse voxel centres; with antialias every phase keeps about
    its partial-volume share (the excess HU integrated over the crop is the focus's, 8 mm^3 x 1000 HU)."""
    aset = load_anatomy_set("fvlm15")
    liver_id = next(t for t, lab in aset.total_id_to_label().items() if lab == aset["liver"].label)
    n = 48
    labels = sitk.GetImageFromArray(np.full((n, n, n), liver_id, np.uint8))
    base = dict(spacing_xyz_mm=(6.0, 6.0, 6.0), margin_zyx_vox=(0, 0, 0), min_size_zyx=(1, 1, 1),
                max_size_zyx=(200, 200, 200), clip_hu=(-1024, 3071))
    integrals = {False: [], True: []}
    for phase in range(6):
        arr = np.zeros((n, n, n), np.int16)
        c = 20 + phase
        arr[c:c + 2, c:c + 2, c:c + 2] = 1000
        img = sitk.GetImageFromArray(arr)
        labels.CopyInformation(img)
        for aa in (False, True):
            out = crop_case(img, labels, aset, CropConfig(name="t", antialias=aa, **base))
            integrals[aa].append(float(sitk.GetArrayFromImage(out.image).astype(float).sum()) * 216.0)
    want = 8.0 * 1000.0
    assert all(abs(v - want) < 0.35 * want for v in integrals[True]), integrals[True]
    assert max(integrals[False]) / max(min(integrals[False]), 1.0) > 3, integrals[False]  # phase-dependent
