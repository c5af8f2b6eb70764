"""`fvlm synth` end to end: files, geometry, identifiers, tables, determinism, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from anatomy.catalog import load_task_catalog
from anatomy.totalseg import total_class_ids
from pipelines.cli import main
from pipelines.synth.cohort import SynthConfig, make_cohort

N_CASES = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, SynthConfig(cases=N_CASES, seed=11, normal_share=0.0))
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _truth(out: Path, cid: str) -> dict:
    return json.loads((out / "truth" / f"{cid}.json").read_text())


def test_layout_and_tables(cohort: Path) -> None:
    catalog = load_task_catalog("fvlm54")
    with open(cohort / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == [f"synth_{i:05d}" for i in range(N_CASES)]
    assert list(rows[0]) == ["case_id", *catalog.names]
    with open(cohort / "reports.csv") as f:
        reports = {r["case_id"]: r for r in csv.DictReader(f)}
    for row in rows:
        cid = row["case_id"]
        truth = _truth(cohort, cid)
        assert (cohort / "images" / cid).is_dir()
        assert (cohort / "segmentations" / f"{cid}.nii.gz").is_file()
        assert (cohort / "lesions" / f"{cid}.nii.gz").is_file()
        labelled = {t for t in catalog.names if row[t] == "1"}
        assert labelled == {f["task"] for f in truth["findings"]}
        assert labelled, "normal_share=0 must give every case a finding"
        assert reports[cid]["findings"].strip() and reports[cid]["impression"].strip()
    summary = json.loads((cohort / "cohort.json").read_text())
    assert summary["cases"] == N_CASES and summary["catalog"] == "fvlm54"


def test_dicom_geometry_matches_truth(cohort: Path) -> None:
    cid = "synth_00000"
    truth = _truth(cohort, cid)
    img = _read_series(cohort / "images" / cid)
    nz, ny, nx = truth["shape_zyx"]
    assert img.GetSize() == (nx, ny, nz)
    np.testing.assert_allclose(img.GetSpacing(), truth["spacing_zyx_mm"][::-1], atol=1e-3)
    np.testing.assert_allclose(img.GetOrigin(), truth["origin_xyz_mm"], atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), truth["direction"], atol=1e-6)
    hu = sitk.GetArrayFromImage(img)
    assert hu.min() >= -1024 and hu.max() > 300, "HU after rescale: air floor and bone above 300"


def test_dicom_headers_are_a_valid_ct_series_with_fake_identifiers(cohort: Path) -> None:
    cid = "synth_00001"
    truth = _truth(cohort, cid)
    files = sorted((cohort / "images" / cid).glob("*.dcm"))
    assert len(files) == truth["shape_zyx"][0]
    z = []
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert ds.StudyInstanceUID == truth["identifiers"]["StudyInstanceUID"]
        assert ds.SeriesInstanceUID == truth["identifiers"]["SeriesInstanceUID"]
        for key in ("PatientID", "PatientBirthDate", "AccessionNumber"):
            assert str(getattr(ds, key)) == truth["identifiers"][key] and str(getattr(ds, key))
        assert str(ds.PatientName) == truth["identifiers"]["PatientName"]
        z.append(float(ds.ImagePositionPatient[2]))
    steps = np.diff(z)
    np.testing.assert_allclose(steps, truth["spacing_zyx_mm"][0], atol=1e-3)


def test_label_map_lies_on_the_image_in_physical_space(cohort: Path) -> None:
    """Read image and label map independently, resample the labels onto the image through physical
    space, and check that anatomy labels fall on tissue of the right density."""
    ids = total_class_ids()
    for i in range(N_CASES):
        cid = f"synth_{i:05d}"
        img = _read_series(cohort / "images" / cid)
        seg = sitk.ReadImage(str(cohort / "segmentations" / f"{cid}.nii.gz"))
        np.testing.assert_allclose(seg.GetOrigin(), img.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(seg.GetSpacing(), img.GetSpacing(), atol=1e-3)
        on_image = sitk.Resample(seg, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        labels = sitk.GetArrayFromImage(on_image)
        np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(seg))
        hu = sitk.GetArrayFromImage(img).astype(np.float32)
        lung = np.isin(labels, [ids[c] for c in ids if c.startswith("lung_")])
        assert lung.sum() > 100 and np.median(hu[lung]) < -600
        bone = np.isin(labels, [ids[c] for c in ids if c.startswith("vertebrae_")])
        assert bone.sum() > 100 and np.median(hu[bone]) > 150
        liver = labels == ids["liver"]
        assert liver.sum() > 100 and 20 < np.median(hu[liver]) < 150


def test_nifti_format(tmp_path: Path) -> None:
    make_cohort(tmp_path, SynthConfig(cases=1, seed=3, format="nifti"))
    img = sitk.ReadImage(str(tmp_path / "images" / "synth_00000.nii.gz"))
    seg = sitk.ReadImage(str(tmp_path / "segmentations" / "synth_00000.nii.gz"))
    truth = _truth(tmp_path, "synth_00000")
    assert img.GetSize() == tuple(truth["shape_zyx"][::-1]) == seg.GetSize()
    np.testing.assert_allclose(img.GetOrigin(), truth["origin_xyz_mm"], atol=1e-3)
    assert not (tmp_path / "images" / "synth_00000").exists()


def test_same_seed_writes_identical_files(tmp_path: Path, cohort: Path) -> None:
    """Same seed, serial or parallel: byte-identical output. Another seed: other images."""
    again = tmp_path / "again"
    make_cohort(again, SynthConfig(cases=N_CASES, seed=11, normal_share=0.0, workers=2))
    assert _digest(again) == _digest(cohort)
    other = tmp_path / "other"
    make_cohort(other, SynthConfig(cases=1, seed=12, normal_share=0.0))
    first = "segmentations/synth_00000.nii.gz"
    assert _digest(other)[first] != _digest(cohort)[first]


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        make_cohort(tmp_path, SynthConfig(cases=1))
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"cases": 0}, "--cases"), ({"size": "huge"}, "--size"), ({"format": "png"}, "--format"),
     ({"label_noise": 1.5}, "--label-noise"), ({"normal_share": -0.1}, "--normal-share")],
)
def test_bad_config_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "c"), "--cases", "1", "--seed", "5", "--label-noise", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 cases" in out and "reports.csv" in out and "labels.csv" in out
    assert main(["synth", str(tmp_path / "c"), "--cases", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "example:" in capsys.readouterr().out


def test_every_labelled_finding_is_in_its_lesion_map_inside_its_anatomy(cohort: Path) -> None:
    """From the written files alone: each finding of truth/<id>.json has voxels in lesions/<id>.nii.gz,
    all within 10 mm of its anatomy in segmentations/<id>.nii.gz."""
    from scipy import ndimage

    from anatomy.catalog import load_anatomy_set

    fvlm15 = load_anatomy_set("fvlm15")
    ids = total_class_ids()
    for i in range(N_CASES):
        cid = f"synth_{i:05d}"
        truth = _truth(cohort, cid)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "segmentations" / f"{cid}.nii.gz")))
        les = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "lesions" / f"{cid}.nii.gz")))
        assert set(np.unique(les)) - {0} == {f["lesion_id"] for f in truth["findings"]}
        for f in truth["findings"]:
            region = les == f["lesion_id"]
            anatomy = np.isin(seg, [ids[c] for c in fvlm15[f["anatomy"]].classes])
            distance = ndimage.distance_transform_edt(~anatomy, sampling=truth["spacing_zyx_mm"])  # mm
            assert region.any() and distance[region].max() <= 10.0, (cid, f["task"])


def test_prevalence_mix_evens_out_the_tasks() -> None:
    """prevalence_mix = 1 draws every task about equally often (the rare ones lifted to benchmark counts);
    0 keeps the catalog's prevalences; outside [0, 1] is an error naming the option."""
    from collections import Counter

    from pipelines.synth.findings import findings_config, sample_tasks

    def counts(mix: float) -> Counter:
        c: Counter = Counter()
        for i in range(3000):
            c.update(sample_tasks(np.random.default_rng([7, i]), normal_share=0.0, max_findings=1, prevalence_mix=mix))
        return c

    tasks = findings_config().tasks
    even, catalog = counts(1.0), counts(0.0)
    rare = min(tasks, key=lambda t: tasks[t].prevalence)
    common = max(tasks, key=lambda t: tasks[t].prevalence)
    assert 0.5 * 3000 / len(tasks) < even[rare] < 1.5 * 3000 / len(tasks)
    assert catalog[common] > 4 * max(catalog[rare], 1)
    with pytest.raises(ValueError, match="prevalence_mix must lie in"):
        sample_tasks(np.random.default_rng(0), prevalence_mix=1.5)
