"""Real-world DICOM shapes: multi-frame Enhanced / Legacy Converted Enhanced CT read natively through the
same assembly as single-frame series, and series whose Study/Series Instance UIDs are empty grouped under a
pseudo id. Each multi-frame fixture is a single-frame series converted to one file, so the single-frame
read is the reference."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import uid

from pipelines.preprocess.discover import discover
from pipelines.preprocess.volume import load_volume
from tests.pipelines.preprocess.dicom_fixtures import (
    ENHANCED_CT,
    ENHANCED_MR,
    LEGACY_ENHANCED_CT,
    PHI_STRINGS,
    random_volume,
    stored_hu,
    write_ct_series,
    write_multiframe,
)
from tests.pipelines.preprocess.preprocess_fixtures import case_json, cohort, fast_config, manifest

#: A slightly rotated axial plane, so that rows, columns and the normal are all exercised.
_ROT = (np.cos(0.2), np.sin(0.2), 0.0, -np.sin(0.2), np.cos(0.2), 0.0)
_SLOPES = [1.0, 1.0, 0.5, 2.0, 1.0]
_INTERCEPTS = [-1024.0, -1030.0, -1024.0, -1024.0, -1040.0]


def _no_phi(texts) -> None:
    for text in texts:
        for s in PHI_STRINGS:
            assert s not in text, f"identifier {s!r} leaked into {text!r}"


def _single_frame(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    hu = random_volume((5, 32, 36), seed=4)  # J2K needs 32+ pixels per side
    paths = write_ct_series(tmp_path / "single", hu, orientation=_ROT, slopes=_SLOPES, intercepts=_INTERCEPTS)
    return paths, stored_hu(hu, _SLOPES, _INTERCEPTS)


def _same_image(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize(
    "sop_class, syntax",
    [(ENHANCED_CT, uid.ExplicitVRLittleEndian), (LEGACY_ENHANCED_CT, uid.ExplicitVRLittleEndian),
     (LEGACY_ENHANCED_CT, uid.RLELossless), (ENHANCED_CT, uid.JPEG2000Lossless)],
)
def test_multiframe_equals_the_single_frame_read(tmp_path, sop_class, syntax) -> None:
    paths, expected = _single_frame(tmp_path)
    reference = load_volume(discover(tmp_path / "single").selected[0]).image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference), expected)
    write_multiframe(tmp_path / "multi" / "ct.dcm", paths, sop_class=sop_class, transfer_syntax=syntax)
    found = discover(tmp_path / "multi")
    assert not found.skipped
    (ref,) = found.selected
    assert ref.n_slices == 5 and len(ref.files) == 1 and ref.slice_spacing_mm == pytest.approx(2.5)
    vol = load_volume(ref)
    _same_image(vol.image, reference)
    assert vol.notes == []
    _no_phi([ref.description, ref.folder_key])


def test_shuffled_frames_give_the_same_volume(tmp_path) -> None:
    paths, _ = _single_frame(tmp_path)
    reference = load_volume(discover(tmp_path / "single").selected[0]).image
    order = [3, 0, 4, 2, 1]
    write_multiframe(tmp_path / "multi" / "ct", paths, sop_class=LEGACY_ENHANCED_CT, order=order)
    ds = pydicom.dcmread(tmp_path / "multi" / "ct")
    assert "ImagePositionPatient" not in ds and int(ds.NumberOfFrames) == 5  # geometry only in the groups
    _same_image(load_volume(discover(tmp_path / "multi").selected[0]).image, reference)
    (ref,) = discover(tmp_path / "multi" / "ct").selected  # the file itself as INPUT (as `fvlm predict` takes it)
    _same_image(load_volume(ref).image, reference)


def test_missing_and_duplicate_frames_are_handled_as_in_a_single_frame_series(tmp_path) -> None:
    paths, expected = _single_frame(tmp_path)
    write_multiframe(tmp_path / "gap" / "ct", paths, order=[0, 1, 3, 4])  # frame at index 2 missing
    vol = load_volume(discover(tmp_path / "gap").selected[0])
    assert vol.image.GetSize()[2] == 5
    assert any("interpolated 1 missing slice" in n for n in vol.notes), vol.notes
    write_multiframe(tmp_path / "dup" / "ct", paths, order=[0, 1, 2, 2, 3, 4])
    vol = load_volume(discover(tmp_path / "dup").selected[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), expected)
    assert any("dropped 1 duplicate slice" in n and "frame" not in n for n in vol.notes), vol.notes


def test_non_ct_multiframe_is_skipped_with_its_reason(tmp_path) -> None:
    paths, _ = _single_frame(tmp_path)
    write_multiframe(tmp_path / "in" / "mr", paths, sop_class=ENHANCED_MR, modality="MR")
    others = write_ct_series(tmp_path / "other", random_volume((3, 8, 8)))  # another series
    write_multiframe(tmp_path / "in" / "sc", others, sop_class="1.2.840.10008.5.1.4.1.1.7.3")  # multi-frame SC
    found = discover(tmp_path / "in")
    assert not found.selected
    assert {s.reason for s in found.skipped} == {
        "modality MR (multi-frame)", "SOP class 1.2.840.10008.5.1.4.1.1.7.3 (multi-frame): not a CT image series"}


def test_uid_less_series_is_grouped_under_a_stable_pseudo_id(tmp_path) -> None:
    hu = random_volume((6, 8, 8), seed=2)
    write_ct_series(tmp_path / "a" / "anon", hu, empty_uids=True)
    # beside it, without UIDs either: a localizer (another orientation) and a thicker series (another number)
    write_ct_series(tmp_path / "a" / "anon", hu[:2], empty_uids=True, orientation=(1, 0, 0, 0, 0, -1),
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), names=["loc1", "loc2"])
    write_ct_series(tmp_path / "a" / "anon", hu[:3], empty_uids=True, slice_spacing=5.0, description="AX 5mm",
                    names=["t1", "t2", "t3"])
    found = discover(tmp_path / "a")
    (ref,) = found.selected
    assert ref.series_uid is None and ref.study_uid is None and ref.n_slices == 6
    assert ref.pseudo_id.startswith("nouid-") and len(ref.pseudo_id) == 22
    (note,) = ref.notes
    assert "no StudyInstanceUID / SeriesInstanceUID: files grouped by folder" in note and ref.pseudo_id in note
    reasons = sorted(s.reason for s in found.skipped)
    assert reasons[0] == "localizer (scout)" and "study has a series" in reasons[1]
    vol = load_volume(ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), hu)
    assert vol.notes == [note]
    _no_phi([note, ref.description, *(s.reason for s in found.skipped)])
    # stable: the same files elsewhere give the same id; another folder name another id
    shutil.copytree(tmp_path / "a", tmp_path / "b" / "moved")
    assert discover(tmp_path / "b" / "moved").selected[0].pseudo_id == ref.pseudo_id
    shutil.move(tmp_path / "a" / "anon", tmp_path / "a" / "other")
    assert discover(tmp_path / "a").selected[0].pseudo_id != ref.pseudo_id
    # it can be chosen like a UID
    assert discover(tmp_path / "b" / "moved", series_uid=ref.pseudo_id).selected[0].pseudo_id == ref.pseudo_id


def test_file_with_no_usable_header_names_what_is_missing(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)
    (skipped,) = discover(tmp_path).skipped
    assert skipped.reason == ("unreadable or incomplete DICOM header in 1 file(s), e.g. broken.dcm: "
                              "no StudyInstanceUID, SeriesInstanceUID, SOPClassUID or Modality")


def _strip_uids(folder: Path) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ""
        ds.SeriesInstanceUID = ""
        ds.save_as(path, enforce_file_format=True)


def _run(images: Path, synth: Path, out: Path, tmp_path: Path) -> dict:
    from pipelines.cli import main

    assert main(["preprocess", str(images), str(out), "--masks", str(synth / "segmentations"), "--salt", "s",
                 "--config", str(fast_config(tmp_path)), "--no-progress"]) == 0
    (row,) = manifest(out)
    assert row["status"] == "ok", row
    return case_json(out, row["case_id"])


@pytest.mark.slow  # preprocesses a cohort
def test_uid_less_and_multiframe_series_become_ok_cases_without_identifiers(tmp_path) -> None:
    """``fvlm preprocess`` on the same series three ways: as written, without UIDs, as one multi-frame file."""
    synth = cohort(tmp_path / "synth", cases=1)
    (case,) = sorted((synth / "images").iterdir())
    ref_case = _run(synth / "images", synth, tmp_path / "out_ref", tmp_path)
    reference = sitk.ReadImage(str(tmp_path / "out_ref" / "cases" / ref_case["case_id"] / "image.nii.gz"))

    anon = tmp_path / "anon" / case.name
    shutil.copytree(case, anon)
    _strip_uids(anon)
    anon_case = _run(anon.parent, synth, tmp_path / "out_anon", tmp_path)
    (note,) = anon_case["source"]["notes"]
    assert "files grouped by folder" in note and "pseudo-series nouid-" in note
    _same_image(sitk.ReadImage(str(tmp_path / "out_anon" / "cases" / anon_case["case_id"] / "image.nii.gz")),
                reference)

    multi = tmp_path / "multi" / case.name
    write_multiframe(multi / "ct.dcm", sorted(case.glob("*.dcm")), sop_class=LEGACY_ENHANCED_CT,
                     order=random.Random(1).sample(range(len(list(case.glob("*.dcm")))), len(list(case.glob("*.dcm")))))
    multi_case = _run(multi.parent, synth, tmp_path / "out_multi", tmp_path)
    assert multi_case["source"]["slices"] == ref_case["source"]["slices"]
    _same_image(sitk.ReadImage(str(tmp_path / "out_multi" / "cases" / multi_case["case_id"] / "image.nii.gz")),
                reference)

    identifiers = {v for v in json.loads((synth / "truth" / f"{case.name}.json").read_text())["identifiers"].values()
                   if v}
    identifiers |= set(PHI_STRINGS)  # the multi-frame file carries the fixtures' fake identifiers
    for out in (tmp_path / "out_anon", tmp_path / "out_multi"):
        for path in (p for p in out.rglob("*") if p.is_file()):
            data = path.read_bytes()
            text = path.suffix in (".json", ".jsonl", ".csv", ".txt")
            for ident in identifiers:
                assert ident not in str(path.relative_to(out)), (ident, path)
                assert (not text and len(ident) < 8) or ident.encode() not in data, (ident, path)


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless])
def test_highdicom_legacy_conversion_reads_as_the_single_frame_series(tmp_path, syntax) -> None:
    """An independent writer (issue 16): highdicom's Legacy Converted Enhanced CT conversion of a single-frame
    series (per-frame positions, a rotated plane, per-slice rescale) gives the single-frame read's HU and
    geometry through ``fvlm preprocess``'s discovery and assembly, and no identifier in what discovery reports."""
    from highdicom import UID, legacy

    paths, expected = _single_frame(tmp_path)
    reference = load_volume(discover(tmp_path / "single").selected[0]).image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference), expected)
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds in datasets:  # attributes highdicom copies and our single-frame writer leaves out
        for key, value in {"Manufacturer": "fvlm-test", "PatientBirthDate": "19700101", "PatientSex": "O",
                           "AccessionNumber": "ACC0001", "StudyID": "1", "StudyDate": "20260101",
                           "StudyTime": "120000", "ReferringPhysicianName": ""}.items():
            if key not in ds:
                setattr(ds, key, value)
    image = legacy.LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=UID(), series_number=99,
                                                  sop_instance_uid=UID(), instance_number=1,
                                                  transfer_syntax_uid=syntax)
    (tmp_path / "multi").mkdir()
    image.save_as(tmp_path / "multi" / "ct.dcm")
    found = discover(tmp_path / "multi")
    assert not found.skipped
    (ref,) = found.selected
    assert ref.n_slices == 5 and len(ref.files) == 1
    vol = load_volume(ref)
    _same_image(vol.image, reference)
    assert vol.notes == []
    _no_phi([ref.description, ref.folder_key])
