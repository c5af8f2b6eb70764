"""Per-anatomy views (benchmarks.anatomy_views): the window's geometry, its sizes, and the derived folder that
fvlm train / evaluate read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.anatomy_views import VIEWS_FILE, derive, view, window_extents

SPACING = (10.0, 6.0, 6.0)  # z, y, x mm


def _volume(half_zyx=(3, 5, 4), centre=(20, 24, 30), shape=(40, 48, 64)):
    """HU volume of air with a box of 40 HU (anatomy 2) around ``centre``, and anatomy 1 elsewhere in a corner."""
    image = np.full(shape, -1000, dtype=np.int16)
    anatomy = np.zeros(shape, dtype=np.uint8)
    box = tuple(slice(c - h, c + h) for c, h in zip(centre, half_zyx))
    image[box], anatomy[box] = 40, 2
    anatomy[:4, :4, :4] = 1
    return image, anatomy


def test_a_view_centres_the_anatomy_keeps_its_label_alone_and_its_absolute_size() -> None:
    extent = (160.0, 96.0, 96.0)  # mm: 16 voxels of 10 mm, 16 of 6, 16 of 6 in the source
    small_img, small_anat = _volume(half_zyx=(2, 3, 3))
    big_img, big_anat = _volume(half_zyx=(4, 6, 6))
    s_img, s_anat, start, spacing = view(small_img, small_anat, 2, SPACING, extent, (32, 32, 32))
    b_img, b_anat, _, _ = view(big_img, big_anat, 2, SPACING, extent, (32, 32, 32))
    assert s_img.dtype == np.int16 and s_anat.dtype == np.uint8 and s_img.shape == s_anat.shape == (32, 32, 32)
    np.testing.assert_allclose(spacing, [5.0, 3.0, 3.0])  # extent / size: the same for every case
    assert set(np.unique(s_anat)) == {0, 2}  # only the viewed anatomy's label
    where = np.nonzero(s_anat)
    centre = [(w.min() + w.max()) / 2 for w in where]
    np.testing.assert_allclose(centre, [15.5, 15.5, 15.5], atol=1.0)  # centred in the window
    # the same zoom for both cases: twice the box on every axis is ~8x the voxels (absolute size kept)
    assert 6.0 < (b_anat > 0).sum() / (s_anat > 0).sum() < 10.0
    assert (s_img[15:17, 15:17, 15:17] == 40).all() and s_img[0, 0, 0] == -1000


def test_a_view_pads_with_air_outside_the_case_and_antialiases_when_it_shrinks() -> None:
    image, anatomy = _volume(centre=(4, 6, 6), half_zyx=(2, 2, 2))  # near the corner: the window leaves the case
    img, _, start, _ = view(image, anatomy, 2, SPACING, (320.0, 192.0, 192.0), (16, 16, 16), pad_hu=-1024)
    assert (start < 0).all() and img[0, 0, 0] == -1024
    # shrinking 2x along every axis: a one-voxel checkerboard averages out instead of aliasing
    z, y, x = np.indices((40, 48, 64))
    board = np.where((z + y + x) % 2 == 0, 100, -100).astype(np.int16)
    anat = np.zeros_like(anatomy)
    anat[18:21, 22:25, 30:33] = 3  # box centre (19, 23, 31): the window samples whole voxels
    out, _, _, _ = view(board, anat, 3, SPACING, (320.0, 192.0, 192.0), (16, 16, 16))
    inner = out[4:12, 4:12, 4:12].astype(float)
    assert np.abs(inner).max() < 30
    with pytest.raises(ValueError, match="label 5 is absent"):
        view(image, anatomy, 5, SPACING, (100.0, 100.0, 100.0))


def _prep(root: Path, n: int = 3) -> Path:
    """A preprocess-shaped folder of n cases with anatomies 1 (lung) and 2 (heart, absent from the last)."""
    (root / "cases").mkdir(parents=True)
    rows = []
    for i in range(n):
        cid = f"c{i}"
        image, anatomy = _volume(half_zyx=(2 + i, 3, 3))
        heart = i < n - 1
        anatomy[anatomy == 2] = 2 if heart else 0
        if i == 1:  # marked present, but cropped out of the map: no view
            anatomy[anatomy == 1] = 0
        folder = root / "cases" / cid
        folder.mkdir()
        np.save(folder / "image.npy", image)
        np.save(folder / "anatomy.npy", anatomy)
        case = {"case_id": cid, "geometry": {"shape_zyx": list(image.shape), "spacing_xyz_mm": [6.0, 6.0, 10.0],
                                             "origin_xyz_mm": [0.0, 0.0, 0.0]},
                "intensity": {"pad_hu": -1024},
                "anatomies": [
                    {"label": 1, "name": "lung", "present": True, "bbox_lps_mm": [[0, 0, 0], [24, 24, 40]],
                     "cut_by_scan_boundary": True, "cut_by_crop": False, "crop_voxels": 64},
                    {"label": 2, "name": "heart", "present": heart,
                     "bbox_lps_mm": [[0, 0, 0], [36, 36, 10 * (4 + 2 * i)]], "cut_by_scan_boundary": False,
                     "cut_by_crop": False, "crop_voxels": 100}],
                "report": {"text": f"report {i}"}, "labels": {"cardiomegaly": i % 2},
                "manifest": {"case_id": cid, "status": "ok"}}
        (folder / "case.json").write_text(json.dumps(case))
        rows.append({"case_id": cid, "image": f"cases/{cid}/image.npy", "anatomy": f"cases/{cid}/anatomy.npy"})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "manifest.jsonl").write_text("".join(json.dumps({"case_id": r["case_id"]}) + "\n" for r in rows))
    (root / "preprocess.json").write_text(json.dumps({"anatomies": {"1": "lung", "2": "heart"}}))
    return root


def test_window_sizes_are_a_percentile_of_the_bounding_boxes_with_a_margin_and_a_floor(tmp_path: Path) -> None:
    prep = _prep(tmp_path / "prep")
    ext = window_extents(prep, percentile=100.0, margin=1.5, min_mm=40.0)
    assert ext["lung"] == [60.0, 40.0, 40.0]  # (z, y, x): 40 * 1.5, then the 40 mm floor
    assert ext["heart"] == [90.0, 54.0, 54.0]  # the largest heart present (c1: 60 mm in z) * 1.5


def test_derive_writes_one_case_per_present_anatomy_with_the_source_report_and_labels(tmp_path: Path) -> None:
    prep = _prep(tmp_path / "prep")
    ext = {"lung": [60.0, 60.0, 60.0], "heart": [80.0, 60.0, 60.0]}
    out = derive(prep, tmp_path / "views", ext, (8, 8, 8), log=lambda m: None)
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in rows] == ["c0--lung", "c0--heart", "c1--heart", "c2--lung"]
    heart = rows[1]
    assert heart["present"] == ["heart"] and heart["cut"] == [] and heart["shape_zyx"] == [8, 8, 8]
    case = json.loads((out / "cases" / "c0--heart" / "case.json").read_text())
    assert case["report"] == {"text": "report 0"} and case["labels"] == {"cardiomegaly": 0}
    assert case["view"]["source_case"] == "c0" and case["view"]["anatomy"] == "heart"
    assert case["geometry"]["spacing_xyz_mm"] == [7.5, 7.5, 10.0]
    anat = np.load(out / "cases" / "c0--heart" / "anatomy.npy")
    assert set(np.unique(anat)) == {0, 2}
    record = json.loads((out / VIEWS_FILE).read_text())
    assert record["views"] == 4 and record["skipped"] == ["c1: lung is not in the anatomy map"]
    assert not (tmp_path / "views.tmp").exists()
    assert derive(prep, out, ext, (8, 8, 8)) == out  # made once
    with pytest.raises(ValueError, match="other settings"):
        derive(prep, out, {**ext, "lung": [90.0, 60.0, 60.0]}, (8, 8, 8))
