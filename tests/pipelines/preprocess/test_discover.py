"""Series discovery: grouping by UID, filtering to axial CT image series, one series per study by rule,
every skipped series with a reason, no identifiers in any reason."""

from __future__ import annotations

import dataclasses
import random
import shutil

import numpy as np
import pytest

from pipelines.preprocess.discover import SERIES_RULES, discover
from tests.pipelines.preprocess.dicom_fixtures import (
    CORONAL,
    ENHANCED_MR,
    PHI_STRINGS,
    SECONDARY_CAPTURE,
    new_uid,
    random_volume,
    write_ct_series,
    write_dose_report,
    write_multiframe,
)


def _no_phi(found) -> None:
    for item in [*found.selected, *found.skipped]:
        texts = [item.folder_key, item.description, getattr(item, "reason", "")]
        for text in texts:
            for s in PHI_STRINGS:
                assert s not in text, f"identifier {s!r} leaked into {text!r}"


def _names(rng: random.Random, n: int, sub: str) -> list[str]:
    return [f"{sub}/{rng.randrange(16**10):010x}" + (".dcm" if rng.random() < 0.5 else "") for _ in range(n)]


def _messy_study(root, rng):
    """One study folder with the axial series to keep and everything a real archive puts beside it."""
    study = new_uid()
    uids = {k: new_uid() for k in ("thin", "thick", "coronal", "scout", "sc", "single", "enhanced")}
    small = random_volume((20, 16, 16))
    write_ct_series(root / "exam", small, slice_spacing=2.5, study_uid=study, series_uid=uids["thin"],
                    names=_names(rng, 20, "s1/deeper"))
    write_ct_series(root / "exam", small[:10], slice_spacing=5.0, study_uid=study, series_uid=uids["thick"],
                    names=_names(rng, 10, "s2"))
    write_ct_series(root / "exam", small[:12], orientation=CORONAL, slice_spacing=2.0, study_uid=study,
                    series_uid=uids["coronal"], description="COR MPR", names=_names(rng, 12, "s3"))
    write_ct_series(root / "exam", small[:2], study_uid=study, series_uid=uids["scout"], description="Topogram",
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), names=_names(rng, 2, "s1/deeper"))
    write_ct_series(root / "exam", small[:1], study_uid=study, series_uid=uids["sc"], description="Dose Info",
                    sop_class=SECONDARY_CAPTURE, names=_names(rng, 1, "s4"))
    write_ct_series(root / "exam", small[:1], study_uid=study, series_uid=uids["single"], names=_names(rng, 1, "s5"))
    sources = write_ct_series(root / "src", small[:3], study_uid=study, series_uid=uids["enhanced"])
    # an Enhanced MR object (multi-frame, not CT)
    write_multiframe(root / "exam" / "s6" / "mr", sources, sop_class=ENHANCED_MR, modality="MR")
    shutil.rmtree(root / "src")
    write_dose_report(root / "exam" / "sr" / "dose", study)
    return study, uids


def test_messy_folder_keeps_the_axial_series_and_explains_every_skip(tmp_path) -> None:
    rng = random.Random(0)
    study, uids = _messy_study(tmp_path, rng)
    # another patient's MR study, junk files, a DICOMDIR, a corrupt DICOM file
    write_ct_series(tmp_path / "mr_exam", random_volume((4, 8, 8)), modality="MR", series_uid=uids.get("mr"))
    (tmp_path / "README.txt").write_text("exported by PACS\n")
    (tmp_path / "exam" / "thumbs.db").write_bytes(bytes(range(256)))
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    bad = tmp_path / "exam" / "s7" / "broken.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)

    found = discover(tmp_path)
    assert len(found.selected) == 1
    ref = found.selected[0]
    assert ref.kind == "dicom" and ref.series_uid == uids["thin"] and ref.study_uid == study
    assert ref.n_slices == 20 and ref.slice_spacing_mm == pytest.approx(2.5)
    assert ref.folder_key == "deeper" and len(ref.files) == 20  # the localizer files there are not in it
    assert ref.accession_number == "ACC5550123"  # held for matching only

    reasons = {s.series_uid: s.reason for s in found.skipped}
    assert "thinner spacing (2.5 mm vs 5 mm)" in reasons[uids["thick"]]
    assert "not axial: coronal" in reasons[uids["coronal"]]
    assert reasons[uids["scout"]] == "localizer (scout)"
    assert "secondary capture" in reasons[uids["sc"]]
    assert reasons[uids["single"]] == "single slice"
    assert reasons[uids["enhanced"]] == "modality MR (multi-frame)"
    others = [s.reason for s in found.skipped if s.series_uid not in uids.values()]
    assert any(r.startswith("modality SR") for r in others)
    assert any(r == "modality MR" for r in others)
    assert any("unreadable" in r and "broken.dcm" in r for r in others)
    assert len(found.skipped) == 9  # 6 of the study + SR + MR + the corrupt file; junk and DICOMDIR ignored
    _no_phi(found)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_file_without_position_is_left_out_named_and_the_series_kept(tmp_path) -> None:
    from pipelines.preprocess.volume import load_volume

    paths = write_ct_series(tmp_path / "series", random_volume((8, 32, 32)))
    data = paths[4].read_bytes()
    cut = data.index(b"\x20\x00\x32\x00")  # ImagePositionPatient (0020,0032): the file ends before it
    paths[4].write_bytes(data[:cut])
    found = discover(tmp_path)
    assert not found.skipped
    (ref,) = found.selected
    assert ref.n_slices == 7 and paths[4] not in ref.files and ref.left_out == (paths[4].name,)
    assert paths[4].name in ref.description
    vol = load_volume(ref)
    assert vol.image.GetSize()[2] == 8
    assert any("left out 1 unreadable file" in n and paths[4].name in n for n in vol.notes), vol.notes
    assert any("interpolated 1 missing slice" in n for n in vol.notes), vol.notes
    _no_phi(found)

    for p in paths:  # no file has a position: the series is skipped, naming a file
        p.write_bytes(data[:cut])
    (skipped,) = discover(tmp_path).skipped
    assert "no ImagePositionPatient / ImageOrientationPatient" in skipped.reason and paths[0].name in skipped.reason


def test_rule_most_slices_and_explicit_series_uid(tmp_path) -> None:
    study = new_uid()
    thin, thick = new_uid(), new_uid()
    write_ct_series(tmp_path / "a", random_volume((8, 8, 8)), slice_spacing=1.0, study_uid=study, series_uid=thin)
    write_ct_series(tmp_path / "b", random_volume((15, 8, 8)), slice_spacing=3.0, study_uid=study, series_uid=thick)
    assert [r.series_uid for r in discover(tmp_path).selected] == [thin]
    found = discover(tmp_path, series_rule="most_slices")
    assert [r.series_uid for r in found.selected] == [thick]
    assert "more slices (15 vs 8)" in found.skipped[0].reason
    found = discover(tmp_path, series_uid=thick)
    assert [r.series_uid for r in found.selected] == [thick]
    assert "--series-uid" in found.skipped[0].reason
    assert set(SERIES_RULES) >= {"most_slices_thinnest", "most_slices"}
    with pytest.raises(ValueError, match="unknown series rule"):
        discover(tmp_path, series_rule="biggest")


def test_equal_spacing_tie_goes_to_most_slices(tmp_path) -> None:
    study, short, long = new_uid(), new_uid(), new_uid()
    write_ct_series(tmp_path / "a", random_volume((5, 8, 8)), study_uid=study, series_uid=short)
    write_ct_series(tmp_path / "b", random_volume((9, 8, 8)), study_uid=study, series_uid=long)
    found = discover(tmp_path)
    assert [r.series_uid for r in found.selected] == [long]
    assert "more slices (9 vs 5)" in found.skipped[0].reason


def test_one_series_per_study(tmp_path) -> None:
    for k in range(3):
        write_ct_series(tmp_path / f"case_{k}", random_volume((4, 8, 8)))
    found = discover(tmp_path)
    assert sorted(r.folder_key for r in found.selected) == ["case_0", "case_1", "case_2"]
    assert len({r.study_uid for r in found.selected}) == 3 and not found.skipped


def test_series_spanning_folders_takes_the_common_parent_name(tmp_path) -> None:
    names = [f"{'part1' if k < 3 else 'part2'}/f{k}" for k in range(6)]
    write_ct_series(tmp_path / "root" / "case_17", random_volume((6, 8, 8)), names=names)
    assert [r.folder_key for r in discover(tmp_path).selected] == ["case_17"]


def test_one_series_folder_as_input(tmp_path) -> None:
    write_ct_series(tmp_path / "case_3", random_volume((4, 8, 8)))
    found = discover(tmp_path / "case_3")
    assert [r.folder_key for r in found.selected] == ["case_3"]


def test_files_without_preamble_are_discovered(tmp_path) -> None:
    write_ct_series(tmp_path / "old", random_volume((4, 8, 8)), preamble=False, names=["1", "2", "3", "4"])
    assert [r.n_slices for r in discover(tmp_path).selected] == [4]


def test_empty_folder_has_no_series(tmp_path) -> None:
    found = discover(tmp_path)
    assert found.selected == [] and found.skipped == []
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "absent")


def test_tilted_axial_series_is_kept(tmp_path) -> None:
    c = np.cos(np.radians(20)), np.sin(np.radians(20))
    write_ct_series(tmp_path / "tilt", random_volume((4, 8, 8)), orientation=(1, 0, 0, 0, c[0], c[1]))
    assert len(discover(tmp_path).selected) == 1


def test_refs_are_frozen_dataclasses(tmp_path) -> None:
    write_ct_series(tmp_path / "x", random_volume((3, 8, 8)))
    ref = discover(tmp_path).selected[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.n_slices = 1  # type: ignore[misc]


def test_synthetic_cohort_series_round_trip(tmp_path) -> None:
    """The synthetic cohort's own DICOM writer: folder key = case id, exact HU and geometry back."""
    import SimpleITK as sitk

    from pipelines.preprocess.volume import load_volume
    from pipelines.synth.writers import StudyMeta, write_dicom_series

    meta = StudyMeta(
        case_id="synth_00001", patient_name="Doe^Jane", patient_id="PID9876543", birth_date="19600101", sex="F",
        accession_number="ACC5550123", study_date="20240101", study_time="101010", institution="Clinic",
        referring_physician="Ref^Doc", study_uid=new_uid(), series_uid=new_uid(), frame_uid=new_uid(),
        kvp=120.0, contrast=False,
    )
    hu = random_volume((6, 20, 24))
    write_dicom_series(tmp_path / "images" / "synth_00001", hu, (3.0, 0.8, 0.7), (-5.0, -6.0, -7.0), meta)
    found = discover(tmp_path)
    assert [r.folder_key for r in found.selected] == ["synth_00001"] and not found.skipped
    img = load_volume(found.selected[0]).image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu)
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.8, 3.0))
    np.testing.assert_allclose(img.GetOrigin(), (-5.0, -6.0, -7.0))
    _no_phi(found)


def test_dose_screen_saved_as_ct_is_skipped_but_low_dose_ct_is_kept(tmp_path) -> None:
    study, screen, lowdose = new_uid(), new_uid(), new_uid()
    write_ct_series(tmp_path / "a", random_volume((2, 8, 8)), study_uid=study, series_uid=screen,
                    description="Dose Report", image_type=("DERIVED", "SECONDARY", "OTHER"))
    write_ct_series(tmp_path / "b", random_volume((4, 8, 8)), study_uid=study, series_uid=lowdose,
                    description="LOW DOSE CHEST 1.25mm")
    found = discover(tmp_path)
    assert [r.series_uid for r in found.selected] == [lowdose]
    assert [(s.series_uid, s.reason) for s in found.skipped] == [(screen, "dose report / dose screen")]


def test_spacing_tie_goes_to_the_smaller_gap() -> None:
    from pipelines.preprocess.discover import most_common_gap

    assert most_common_gap(np.array([3.0, 2.0, 3.0, 2.0, 5.0])) == 2.0
