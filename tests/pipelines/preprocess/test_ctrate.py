"""CT-RATE adapter on small fixtures in CT-RATE's layout: nested NIfTI volumes, the metadata CSV (spacing,
rescale), the reports CSV (Findings_EN, Impressions_EN), the multi-abnormality labels CSV. Both releases: the
first stores raw values (HU = value - 1024 by the metadata), the second HU with the same metadata; the same
phantoms are stored both ways, so both must end as the same HU."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.cli import main
from pipelines.preprocess.ctrate import CTRATE_LABELS, CtRateLoader, decide_rescale, read_metadata
from pipelines.preprocess.hu_check import HUCheckConfig, sample_voxels
from pipelines.preprocess.series import SeriesRef, VolumeError
from tests.pipelines.preprocess.preprocess_fixtures import case_json, fast_config, manifest

NAMES = ("train_1_a_1", "train_2_a_2")  # first release: raw stored values
NAMES_V2 = ("train_3_a_1", "train_4_a_2")  # second release: the same two phantoms stored in HU


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def ctrate(synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctrate")
    synth = synthetic(2, seed=11)
    reports = list(csv.DictReader(open(synth / "reports.csv")))
    meta_rows, report_rows, label_rows = [], [], []
    (root / "masks").mkdir()
    for i, name in enumerate(NAMES + NAMES_V2):
        src = i % 2  # the phantom: NAMES_V2[k] holds the same phantom as NAMES[k]
        hu = sitk.ReadImage(str(synth / "images" / f"synth_{src:05d}.nii.gz"))
        spacing = hu.GetSpacing()
        # release 1 stores scanner values (HU = raw - 1024), release 2 HU; the metadata says -1024 for both
        raw = sitk.Cast(hu + 1024, sitk.sitkInt16) if name in NAMES else sitk.Cast(hu, sitk.sitkInt16)
        if src == 1:
            raw.SetSpacing((1.0, 1.0, 1.0))  # a header whose voxel size disagrees with the metadata
        patient, study = name.split("_")[1], name.split("_")[2]
        folder = root / "dataset" / "train" / f"train_{patient}" / f"train_{patient}_{study}"
        folder.mkdir(parents=True)
        sitk.WriteImage(raw, str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.ReadImage(str(synth / "segmentations" / f"synth_{src:05d}.nii.gz")),
                        str(root / "masks" / f"{name}.nii.gz"))
        meta_rows.append([f"{name}.nii.gz", "CT", 120, f"[{spacing[0]}, {spacing[1]}]", spacing[2], 1, -1024, 512, 512])
        report_rows.append([f"{name}.nii.gz", "Dyspnea.", "Non-contrast.", reports[src]["findings"],
                            reports[src]["impression"]])
        label_rows.append([f"{name}.nii.gz", *[(i + k) % 2 for k in range(len(CTRATE_LABELS))]])
    _write_csv(root / "train_metadata.csv", ["VolumeName", "Manufacturer", "KVP", "XYSpacing", "ZSpacing",
                                             "RescaleSlope", "RescaleIntercept", "Rows", "Columns"], meta_rows)
    _write_csv(root / "train_reports.csv", ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                            "Impressions_EN"], report_rows)
    _write_csv(root / "train_labels.csv", ["VolumeName", *CTRATE_LABELS], label_rows)
    return root


def test_metadata_and_loader_give_hu_and_metadata_spacing(ctrate: Path, synthetic) -> None:
    meta = read_metadata(ctrate / "train_metadata.csv")
    assert set(meta) == set(NAMES + NAMES_V2) and meta[NAMES[0]]["intercept"] == meta[NAMES_V2[0]]["intercept"] == -1024
    loader = CtRateLoader(ctrate / "train_metadata.csv")
    synth = sitk.ReadImage(str(synthetic(2, seed=11) / "images" / "synth_00001.nii.gz"))
    for name, release, applied in ((NAMES[1], 1, True), (NAMES_V2[1], 2, False)):
        path = next((ctrate / "dataset").rglob(f"{name}.nii.gz"))
        vol = loader.load(SeriesRef("nifti", (path,), name))
        assert np.allclose(vol.image.GetSpacing(), synth.GetSpacing())
        assert np.allclose(sitk.GetArrayViewFromImage(vol.image), sitk.GetArrayViewFromImage(synth))  # HU either way
        assert any("metadata" in n for n in vol.notes)
        decision = vol.meta["ct_rate"]
        assert (decision["release"], decision["applied"], decision["version"]) == (release, applied, "auto")
        chosen, other = (decision["after_rescale"], decision["as_stored"]) if applied else (
            decision["as_stored"], decision["after_rescale"])
        assert -1100 <= chosen["air_peak_hu"] <= -900 and -150 <= chosen["tissue_peak_hu"] <= 150
        assert other["air_peak_hu"] is None or other["air_peak_hu"] < -1500  # raw: no air; twice: air near -2024
    with pytest.raises(VolumeError, match="no row in the CT-RATE metadata"):
        loader.load(SeriesRef("nifti", (path,), "valid_9_a_1"))


def test_ctrate_layout_becomes_the_same_output(ctrate: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["preprocess", str(ctrate / "dataset"), str(out), "--ct-rate", str(ctrate / "train_metadata.csv"),
                 "--masks", str(ctrate / "masks"), "--reports", str(ctrate / "train_reports.csv"),
                 "--labels", str(ctrate / "train_labels.csv"), "--config", str(fast_config(tmp_path)),
                 "--no-progress"]) == 0
    rows = manifest(out)
    assert sorted(r["case_id"] for r in rows) == sorted(NAMES + NAMES_V2)  # CT-RATE names are the case ids
    assert all(r["status"] == "ok" and r["report"] == "yes" and r["labels"] == "yes" for r in rows)
    reports = {r["VolumeName"]: r for r in csv.DictReader(open(ctrate / "train_reports.csv"))}
    for i, name in enumerate(NAMES + NAMES_V2):
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
        assert hu[lab == 1].mean() < -500 and 0 < hu[lab == 2].mean() < 150  # HU, whichever the release
        intensity = case["intensity"]
        release = 1 if name in NAMES else 2
        assert intensity["ct_rate"]["release"] == release and intensity["ct_rate"]["applied"] == (release == 1)
        assert intensity["hu_check"]["status"] == "pass" and -1100 <= intensity["hu_check"]["air_peak_hu"] <= -900
    for v1, v2 in zip(NAMES, NAMES_V2):  # the same phantom from either release: the same HU, voxel for voxel
        assert np.array_equal(np.load(out / "cases" / v1 / "image.npy"), np.load(out / "cases" / v2 / "image.npy"))
    record = json.loads((out / "preprocess.json").read_text())
    assert record["input_format"] == "ct-rate" and record["ct_rate_version"] == "auto" and record["hu_check"] == "fail"


def _run_version(ctrate: Path, out: Path, *extra: str) -> dict[str, dict]:
    main(["preprocess", str(ctrate / "dataset"), str(out), "--ct-rate", str(ctrate / "train_metadata.csv"),
          "--masks", str(ctrate / "masks"), "--config", str(fast_config(out.parent)), "--no-progress", *extra])
    return {r["case_id"]: r for r in manifest(out)}


def test_a_forced_wrong_release_fails_with_the_cause(ctrate: Path, tmp_path: Path) -> None:
    """--ct-rate-version 1 on second-release files rescales twice; 2 on first-release files leaves raw values:
    both fail the HU check naming the cause, the right release's files stay ok."""
    rows = _run_version(ctrate, tmp_path / "v1", "--ct-rate-version", "1")
    assert all(rows[n]["status"] == "ok" for n in NAMES)
    for n in NAMES_V2:
        assert rows[n]["status"] == "failed" and "looks rescaled twice" in rows[n]["reason"], rows[n]
        assert "--ct-rate-version auto" in rows[n]["reason"] and rows[n]["hu_check"]["air_peak_hu"] < -1500
        assert rows[n]["hu_check"]["ct_rate"]["release"] == 1
    rows = _run_version(ctrate, tmp_path / "v2", "--ct-rate-version", "2")
    assert all(rows[n]["status"] == "ok" for n in NAMES_V2)
    for n in NAMES:
        assert rows[n]["status"] == "failed" and "looks like raw stored values: add the rescale" in rows[n]["reason"]
        assert rows[n]["hu_check"]["cause"] == "raw_stored_values"


def test_hu_check_warn_keeps_a_wrongly_rescaled_volume_and_records_it(ctrate: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = _run_version(ctrate, out, "--ct-rate-version", "1", "--hu-check", "warn")
    assert all(r["status"] == "ok" for r in rows.values())
    for n in NAMES_V2:
        assert "HU check failed, kept (--hu-check warn)" in rows[n]["reason"] and "rescaled twice" in rows[n]["reason"]
        check = case_json(out, n)["intensity"]["hu_check"]
        assert check["status"] == "fail" and check["mode"] == "warn" and check["cause"] == "rescaled_twice"
    assert case_json(out, NAMES[0])["intensity"]["hu_check"]["status"] == "pass"


def test_decide_rescale_rules() -> None:
    cfg = HUCheckConfig()
    rng = np.random.default_rng(0)
    hu = np.concatenate([rng.normal(-1000, 10, 4000), rng.normal(40, 10, 4000), rng.normal(-100, 10, 1000)])
    sample = sample_voxels(hu, cfg.max_sample_voxels)
    apply, rec = decide_rescale(sample + 1024, 1.0, -1024.0, "auto", False, cfg)
    assert apply and rec["release"] == 1
    apply, rec = decide_rescale(sample, 1.0, -1024.0, "auto", False, cfg)
    assert not apply and rec["release"] == 2
    apply, rec = decide_rescale(sample, 1.0, 0.0, "auto", False, cfg)
    assert not apply and "identity" in rec["reason"]
    apply, rec = decide_rescale(sample + 60, 1.0, -60.0, "auto", False, cfg)  # both plausible: the nearer to nominal
    assert apply and "both" in rec["reason"]
    apply, rec = decide_rescale(sample / 3000 + 0.5, 1.0, -1024.0, "auto", False, cfg)  # neither: metadata applies
    assert apply and rec["release"] is None and "neither" in rec["reason"]
    assert decide_rescale(sample, 1.0, -1024.0, "1", True, cfg)[0] is False  # v1: the header's own scaling wins
    assert decide_rescale(sample, 1.0, -1024.0, "1", False, cfg)[0] is True
    assert decide_rescale(sample + 1024, 1.0, -1024.0, "2", False, cfg)[0] is False
    with pytest.raises(ValueError, match="--ct-rate-version"):
        decide_rescale(sample, 1.0, -1024.0, "3", False, cfg)


def test_ct_rate_version_needs_ct_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out"), "--masks", str(tmp_path),
                 "--ct-rate-version", "2"]) == 2
    assert "--ct-rate" in capsys.readouterr().err
