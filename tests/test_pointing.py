"""The pointing benchmark's geometry and scoring (``benchmarks/pointing.py``) on a tiny made-up case: the lesion
map lands on the preprocess crop grid and the model input view where it should, a token touches a lesion by the
anatomy touch rule, a peak inside the lesion is a hit, and the random baseline is exactly the lesion's share of
the anatomy's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from benchmarks.pointing import lesion_on_crop, lesion_on_input, point, summarize, token_touch


def _source() -> sitk.Image:
    """A 20^3 lesion map, 1 mm voxels, origin 0: lesion 3 at z 4..7, y 10..13, x 2..5."""
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[4:8, 10:14, 2:6] = 3
    arr[15, 15, 15] = 1  # another finding's lesion
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin((0.0, 0.0, 0.0))
    return img


GEOMETRY = {"shape_zyx": [4, 4, 4], "spacing_xyz_mm": [2.0, 2.0, 2.0], "origin_xyz_mm": [2.0, 8.0, 4.0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}


def test_lesion_lands_on_the_crop_grid() -> None:
    # crop voxel (k, j, i) sits at x = 2 + 2i, y = 8 + 2j, z = 4 + 2k mm: the lesion's x 2..5 -> i 0, 1;
    # y 10..13 -> j 1, 2; z 4..7 -> k 0, 1
    on_crop = lesion_on_crop(_source(), GEOMETRY)
    want = np.zeros((4, 4, 4), np.uint8)
    want[0:2, 1:3, 0:2] = 3
    assert np.array_equal(on_crop, want)


def test_lesion_follows_the_evaluation_view() -> None:
    from monai.transforms import Resize, SpatialPad

    on_crop = lesion_on_crop(_source(), GEOMETRY)
    # crop mode: z padded centred (1 before), y cropped centrally (rows 1..2), x unchanged
    view = lesion_on_input(on_crop, "crop", (6, 2, 4))
    want = np.zeros((6, 2, 4), np.uint8)
    want[1:3, 0:2, 0:2] = 3
    assert np.array_equal(view, want)
    # the same as the training loader's central crop + MONAI SpatialPad
    padded = SpatialPad((6, 2, 4), value=0)(torch.from_numpy(on_crop[:, 1:3, :])[None])[0]
    assert np.array_equal(view, np.asarray(padded))
    # resize mode: nearest resize by 2 duplicates every voxel
    up = lesion_on_input(on_crop, "resize", (8, 8, 8))
    assert np.array_equal(up, np.repeat(np.repeat(np.repeat(on_crop, 2, 0), 2, 1), 2, 2))
    assert np.array_equal(up, np.asarray(Resize((8, 8, 8), mode="nearest")(
        torch.from_numpy(on_crop.astype(np.float32))[None])[0]).astype(np.uint8))
    with pytest.raises(ValueError, match="crop or resize"):
        lesion_on_input(on_crop, "warp", (4, 4, 4))


def test_token_touch_uses_the_patch_rule() -> None:
    mask = np.zeros((4, 4, 8), bool)
    mask[3, 0, 5] = True  # patch (2, 2, 2): token (1, 0, 2) of the (2, 2, 4) grid
    touched = token_touch(mask, (2, 2, 2))
    assert touched.shape == (16,) and touched.sum() == 1 and touched[(1 * 2 + 0) * 4 + 2]


def test_peak_inside_the_lesion_is_a_hit_and_the_baseline_is_the_fraction() -> None:
    anatomy = np.zeros(16, bool)
    anatomy[[1, 2, 3, 5, 8]] = True
    lesion = np.zeros(16, bool)
    lesion[[3, 5, 12]] = True  # two of the anatomy's five tokens touch the lesion (12 is outside the anatomy)
    tmap = np.zeros(16)
    tmap[12] = 10.0  # the global maximum lies outside the anatomy: ignored
    tmap[5] = 1.0
    hit, base, peak = point(tmap, anatomy, lesion)
    assert hit and peak == 5 and base == pytest.approx(2 / 5)
    tmap[8] = 2.0  # now the anatomy's peak is token 8, outside the lesion
    hit, base, peak = point(tmap, anatomy, lesion)
    assert not hit and peak == 8 and base == pytest.approx(2 / 5)
    # the baseline is what uniform random pointing inside the anatomy scores on average
    rng = np.random.default_rng(0)
    draws = rng.choice(np.flatnonzero(anatomy), size=20000)
    assert lesion[draws].mean() == pytest.approx(base, abs=0.01)
    with pytest.raises(ValueError, match="no token"):
        point(tmap, np.zeros(16, bool), lesion)


def test_summary_rates_and_paired_difference() -> None:
    rows = [{"pooled": True, "random": 0.25}, {"pooled": False, "random": 0.5}, {"pooled": True, "random": 0.25}]
    s = summarize(rows, ["pooled", "random"], n_boot=200)
    assert s["pooled"]["rate"] == pytest.approx(2 / 3) and s["pooled"]["hits"] == 2
    assert s["random"]["rate"] == pytest.approx(1 / 3)
    assert s["pooled"]["minus_random"] == pytest.approx(2 / 3 - 1 / 3)
    assert s["pooled"]["ci_low"] <= s["pooled"]["rate"] <= s["pooled"]["ci_high"]
