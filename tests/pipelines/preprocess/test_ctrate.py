"""CT-RATE adapter on small fixtures in CT-RATE's layout: nested NIfTI volumes of raw values, the metadata
CSV (spacing, rescale), the reports CSV (Findings_EN, Impressions_EN), the multi-abnormality labels CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.cli import main
from pipelines.preprocess.ctrate import CTRATE_LABELS, CtRateLoader, read_metadata
from pipelines.preprocess.series import SeriesRef, VolumeError
from tests.pipelines.preprocess.preprocess_fixtures import case_json, cohort, fast_config, manifest

NAMES = ("train_1_a_1", "train_2_a_2")


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def ctrate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctrate")
    synth = cohort(root / "synth", cases=2, fmt="nifti", seed=11)
    reports = list(csv.DictReader(open(synth / "reports.csv")))
    meta_rows, report_rows, label_rows = [], [], []
    (root / "masks").mkdir()
    for i, name in enumerate(NAMES):
        hu = sitk.ReadImage(str(synth / "images" / f"synth_{i:05d}.nii.gz"))
        spacing = hu.GetSpacing()
        raw = sitk.Cast(hu + 1024, sitk.sitkInt16)  # CT-RATE stores scanner values, HU = raw - 1024
        if i == 1:
            raw.SetSpacing((1.0, 1.0, 1.0))  # a header whose voxel size disagrees with the metadata
        patient, study = name.split("_")[1], name.split("_")[2]
        folder = root / "dataset" / "train" / f"train_{patient}" / f"train_{patient}_{study}"
        folder.mkdir(parents=True)
        sitk.WriteImage(raw, str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.ReadImage(str(synth / "segmentations" / f"synth_{i:05d}.nii.gz")),
                        str(root / "masks" / f"{name}.nii.gz"))
        meta_rows.append([f"{name}.nii.gz", "CT", 120, f"[{spacing[0]}, {spacing[1]}]", spacing[2], 1, -1024, 512, 512])
        report_rows.append([f"{name}.nii.gz", "Dyspnea.", "Non-contrast.", reports[i]["findings"], reports[i]["impression"]])
        label_rows.append([f"{name}.nii.gz", *[(i + k) % 2 for k in range(len(CTRATE_LABELS))]])
    _write_csv(root / "train_metadata.csv", ["VolumeName", "Manufacturer", "KVP", "XYSpacing", "ZSpacing",
                                             "RescaleSlope", "RescaleIntercept", "Rows", "Columns"], meta_rows)
    _write_csv(root / "train_reports.csv", ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                            "Impressions_EN"], report_rows)
    _write_csv(root / "train_labels.csv", ["VolumeName", *CTRATE_LABELS], label_rows)
    return root


def test_metadata_and_loader_give_hu_and_metadata_spacing(ctrate: Path) -> None:
    meta = read_metadata(ctrate / "train_metadata.csv")
    assert set(meta) == set(NAMES) and meta[NAMES[0]]["intercept"] == -1024
    loader = CtRateLoader(ctrate / "train_metadata.csv")
    path = next((ctrate / "dataset").rglob(f"{NAMES[1]}.nii.gz"))
    vol = loader.load(SeriesRef("nifti", (path,), NAMES[1]))
    synth = sitk.ReadImage(str(ctrate / "synth" / "images" / "synth_00001.nii.gz"))
    assert np.allclose(vol.image.GetSpacing(), synth.GetSpacing())
    assert np.allclose(sitk.GetArrayViewFromImage(vol.image), sitk.GetArrayViewFromImage(synth))
    assert any("metadata" in n for n in vol.notes)
    with pytest.raises(VolumeError, match="no row in the CT-RATE metadata"):
        loader.load(SeriesRef("nifti", (path,), "valid_9_a_1"))


def test_ctrate_layout_becomes_the_same_output(ctrate: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["preprocess", str(ctrate / "dataset"), str(out), "--ct-rate", str(ctrate / "train_metadata.csv"),
                 "--masks", str(ctrate / "masks"), "--reports", str(ctrate / "train_reports.csv"),
                 "--labels", str(ctrate / "train_labels.csv"), "--config", str(fast_config(tmp_path)),
                 "--no-progress"]) == 0
    rows = manifest(out)
    assert sorted(r["case_id"] for r in rows) == sorted(NAMES)  # CT-RATE names are the case ids
    assert all(r["status"] == "ok" and r["report"] == "yes" and r["labels"] == "yes" for r in rows)
    reports = {r["VolumeName"]: r for r in csv.DictReader(open(ctrate / "train_reports.csv"))}
    for i, name in enumerate(NAMES):
        case = case_json(out, name)
        assert case["anatomy_set"] == "ct-rate4"
        assert case["labels_table"] == {"1": "lung", "2": "heart", "3": "esophagus", "4": "aorta"}
        assert all(a["present"] for a in case["anatomies"])
        assert case["report"]["findings"] == reports[f"{name}.nii.gz"]["Findings_EN"]
        assert case["report"]["impression"] == reports[f"{name}.nii.gz"]["Impressions_EN"]
        assert list(case["labels"]) == list(CTRATE_LABELS) and case["labels"]["Medical material"] == i % 2
        parsed = case["report"]["parsed"]
        if parsed is not None:
            assert set(parsed["anatomies"]) == {"lung", "heart", "esophagus", "aorta"}
        hu = np.load(out / "cases" / name / "image.npy")
        lab = np.load(out / "cases" / name / "anatomy.npy")
        assert hu[lab == 1].mean() < -500 and 0 < hu[lab == 2].mean() < 150  # HU after the metadata rescale
    assert json.loads((out / "preprocess.json").read_text())["input_format"] == "ct-rate"
