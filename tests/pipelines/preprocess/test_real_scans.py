"""Real CTs with their TotalSegmentator label maps (../shared/data/totalsegmentator/): after preprocessing,
the mean HU inside liver, spleen, kidneys, aorta and vertebrae in the crop are realistic for those organs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from anatomy.totalseg import total_classes
from pipelines.cli import main

DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "totalsegmentator"
PAIRS = [("example_ct_sm.nii.gz", "example_seg.nii.gz"), ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")]

pytestmark = pytest.mark.skipif(not (DATA / PAIRS[0][0]).is_file(),
                                reason=f"real TotalSegmentator examples not found in {DATA}")

ANATOMIES = """name: organs5
description: five organs with well-known CT densities, vertebrae apart from other bone
anatomies:
  - {name: liver, classes: [liver], synonyms: [liver]}
  - {name: spleen, classes: [spleen], synonyms: [spleen]}
  - {name: kidney, classes: [kidney_left, kidney_right], synonyms: [kidney]}
  - {name: aorta, classes: [aorta], synonyms: [aorta]}
  - {name: vertebrae, classes: [vertebrae_L1, vertebrae_L2, vertebrae_L3, vertebrae_L4, vertebrae_L5,
     vertebrae_T9, vertebrae_T10, vertebrae_T11, vertebrae_T12, vertebrae_S1], synonyms: [vertebra]}
"""
#: Plausible mean HU of each organ in these scans, which are unenhanced (blood in the aorta about 40 HU) at
#: 3 mm, where the kidneys' thin borders mix with perirenal fat: liver 40-70, spleen 35-55 (below the liver
#: without contrast), kidney 20-40 before partial volume, blood 30-50, vertebrae (cancellous + cortical) 150-400.
RANGES = {"liver": (30, 90), "spleen": (20, 80), "kidney": (-10, 60), "aorta": (20, 80), "vertebrae": (120, 450)}


def test_class_map_matches_the_configs() -> None:
    data = json.loads((DATA / "totalsegmentator_total_v2_class_map.json").read_text())
    assert {int(k): v for k, v in data["total"].items()} == total_classes()


@pytest.mark.slow
@pytest.mark.parametrize("ct,seg", PAIRS)
def test_mean_hu_inside_organs_in_the_crop_is_realistic(ct: str, seg: str, tmp_path: Path) -> None:
    aset = tmp_path / "organs5.yaml"
    aset.write_text(ANATOMIES)
    out = tmp_path / "out"
    assert main(["preprocess", str(DATA / ct), str(out), "--masks", str(DATA / seg), "--anatomy", str(aset),
                 "--case-id", "key", "--no-progress"]) == 0
    (row,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "ok"
    case = out / "cases" / row["case_id"]
    meta = json.loads((case / "case.json").read_text())
    assert meta["geometry"]["spacing_xyz_mm"] == [1.0, 1.0, 3.0]
    shape = meta["geometry"]["shape_zyx"]
    assert shape[0] >= 112 and shape[1] >= 256 and shape[2] >= 352
    hu, lab = np.load(case / "image.npy"), np.load(case / "anatomy.npy")
    assert hu.dtype == np.int16
    means = {}
    for a in meta["anatomies"]:
        if a["present"] and a["crop_voxels"] > 500:
            means[a["name"]] = float(hu[lab == a["label"]].mean())
    assert {"liver", "spleen", "kidney", "aorta", "vertebrae"} <= set(means), means
    for name, (lo, hi) in RANGES.items():
        assert lo <= means[name] <= hi, f"{ct}: mean HU of {name} is {means[name]:.0f}, expected {lo}..{hi}"
    assert means["liver"] > means["spleen"]  # the normal unenhanced relation
    assert means["vertebrae"] > means["liver"] > hu[lab == 0].mean()  # bone > soft tissue > air/fat background
    # the crop keeps the source's densities: means agree with the label map on the source grid
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / ct))).astype(float)
    seg_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / seg)))
    ids = {v: k for k, v in total_classes().items()}
    assert means["liver"] == pytest.approx(src[seg_arr == ids["liver"]].mean(), abs=10)
    assert means["spleen"] == pytest.approx(src[seg_arr == ids["spleen"]].mean(), abs=10)
