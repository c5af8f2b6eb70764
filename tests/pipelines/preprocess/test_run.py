"""``fvlm preprocess`` end to end on the synthetic cohort: joins, de-identification, resume, shards, bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from pipelines.cases.format import load_packed
from pipelines.cli import main
from pipelines.preprocess import run as run_mod
from tests.pipelines.preprocess.preprocess_fixtures import case_json, cohort, fast_config, manifest, tree_digest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cohort(tmp_path_factory.mktemp("synth"), cases=3)


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fast_config(tmp_path_factory.mktemp("cfg"))


def _args(synth: Path, out: Path, cfg: Path, *extra: str) -> list[str]:
    return ["preprocess", str(synth / "images"), str(out), "--masks", str(synth / "segmentations"),
            "--reports", str(synth / "reports.csv"), "--labels", str(synth / "labels.csv"),
            "--config", str(cfg), "--no-progress", *extra]


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


@pytest.mark.slow  # preprocesses a cohort
def test_synth_cohort_with_reports_and_labels_by_folder_name(synth: Path, cfg_file: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    keymap = tmp_path / "keys.csv"
    assert main(_args(synth, out, cfg_file, "--write-key-map", str(keymap))) == 0
    assert "3 ok" in capsys.readouterr().out
    rows = manifest(out)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["report"] == "yes" and r["labels"] == "yes" for r in rows)
    keys = {r["case_id"]: r["key"] for r in csv.DictReader(open(keymap))}
    reports, labels = _rows(synth / "reports.csv"), _rows(synth / "labels.csv")
    for row in rows:
        cid = row["case_id"]
        assert cid.startswith("c") and len(cid) == 16  # salted hash, not the key
        case = case_json(out, cid)
        key = keys[cid]
        assert reports[key]["findings"] in case["report"]["text"]
        assert reports[key]["impression"] in case["report"]["text"]
        assert case["labels"] == {k: int(v) for k, v in labels[key].items() if k != "case_id"}
        parsed = case["report"]["parsed"]
        assert parsed is None or set(parsed["anatomies"]) <= set(case["labels_table"].values())
        assert case["labels_table"]["1"] == "lung" and case["anatomy_set"] == "fvlm15"
        truth = json.loads((synth / "truth" / f"{key}.json").read_text())
        present = {a["name"] for a in case["anatomies"] if a["present"]}
        assert set(truth["anatomies_in_view"]) >= present and len(present) >= 10
        # the crop and the packed copy agree, the anatomy map is on the crop's grid
        img = sitk.ReadImage(str(out / "cases" / cid / "image.nii.gz"))
        anat = sitk.ReadImage(str(out / "cases" / cid / "anatomy.nii.gz"))
        assert img.GetPixelID() == sitk.sitkInt16 and anat.GetPixelID() == sitk.sitkUInt8
        assert img.GetSize() == anat.GetSize() and img.GetOrigin() == anat.GetOrigin()
        assert list(img.GetSize()[::-1]) == case["geometry"]["shape_zyx"]
        index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
        packed_img, packed_anat = load_packed(out, next(r for r in index if r["case_id"] == cid))
        assert np.array_equal(packed_img, sitk.GetArrayFromImage(img))
        assert np.array_equal(packed_anat, sitk.GetArrayFromImage(anat))
        # lungs are air-filled, the liver soft tissue: the crop holds HU, on the right voxels
        hu, lab = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(anat)
        assert hu[lab == 1].mean() < -500 and 0 < hu[lab == 5].mean() < 200


def test_no_phi_in_any_output_byte_file_name_or_log(synth: Path, cfg_file: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        assert main(["-v", *_args(synth, out, cfg_file)]) == 0
    captured = capfd.readouterr()
    log_text = captured.out + captured.err + caplog.text
    full, parts = set(), set()
    for truth in (synth / "truth").glob("*.json"):
        ids = json.loads(truth.read_text())["identifiers"]
        full.update(v for v in ids.values() if v)
        for k in ("PatientName", "ReferringPhysicianName", "InstitutionName"):
            parts.update(p for p in ids[k].replace("^", " ").split() if len(p) >= 4)
        full.add(ids["PatientName"].replace("^", " "))
    assert full and parts
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in [*files, *out.rglob("*")]:
        for ident in full | parts:
            assert ident not in str(path.relative_to(out)), f"identifier in file name {path}"
    for path in files:
        data = path.read_bytes()
        for ident in full:
            assert ident.encode() not in data, f"identifier in {path.relative_to(out)}"
        if path.suffix in (".json", ".jsonl", ".csv", ".txt") or path.name == ".salt":
            for ident in parts:
                assert ident.encode() not in data, f"identifier part in {path.relative_to(out)}"
    for ident in full | parts:
        assert ident not in log_text


@pytest.mark.slow  # preprocesses a cohort
def test_resume_after_injected_crash_equals_uninterrupted_run(synth: Path, cfg_file: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_args(synth, ref, cfg_file, "--salt", "s3cret", "--workers", "2")) == 0

    real_write = run_mod.write_case
    calls = {"n": 0}

    def crash_on_second(out_dir, case_id, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # a half-written case folder, then the process "dies"
            tmp = Path(out_dir) / "cases" / f".{case_id}.dead"
            tmp.mkdir(parents=True)
            (tmp / "image.nii.gz").write_bytes(b"\x1f\x8b partial")
            raise KeyboardInterrupt
        return real_write(out_dir, case_id, *a, **k)

    monkeypatch.setattr(run_mod, "write_case", crash_on_second)
    assert main(_args(synth, out, cfg_file, "--salt", "s3cret")) == 130
    assert not (out / "manifest.jsonl").exists()
    monkeypatch.setattr(run_mod, "write_case", real_write)
    assert main(_args(synth, out, cfg_file, "--salt", "s3cret")) == 0
    assert tree_digest(out) == tree_digest(ref)
    # a third run redoes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("image.nii.gz")}
    assert main(_args(synth, out, cfg_file, "--salt", "s3cret")) == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("image.nii.gz")}


def test_resume_after_sigkill_equals_uninterrupted_run(synth: Path, cfg_file: Path, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(_args(synth, ref, cfg_file, "--salt", "k")) == 0
    cmd = [sys.executable, "-m", "pipelines", *_args(synth, out, cfg_file, "--salt", "k")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "cases").glob("*/case.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.jsonl").exists(), "the run finished before it could be killed"
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert tree_digest(out) == tree_digest(ref)


@pytest.mark.slow  # preprocesses a cohort
def test_shards_split_deterministically_and_cover_the_input(synth: Path, cfg_file: Path, tmp_path: Path) -> None:
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    assert main(_args(synth, full, cfg_file, "--salt", "x")) == 0
    for i in range(2):
        assert main(_args(synth, sharded, cfg_file, "--salt", "x", "--shard-index", str(i), "--num-shards", "2")) == 0
    parts = [manifest(sharded, f"manifest.shard-{i:05d}-of-00002.jsonl") for i in range(2)]
    ids = [{r["case_id"] for r in p} for p in parts]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == {r["case_id"] for r in manifest(full)}
    assert tree_digest(sharded / "cases") == tree_digest(full / "cases")


def test_case_id_key_keeps_pseudonymous_keys(synth: Path, cfg_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(_args(synth, out, cfg_file, "--case-id", "key")) == 0
    assert sorted(r["case_id"] for r in manifest(out)) == ["synth_00000", "synth_00001", "synth_00002"]


# ------------------------------------------------------------------------------------------ bad input


def _copy_series(src: Path, dst: Path, *, new_uids: bool = True, edit=None, files: slice = slice(None)) -> None:
    dst.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(src.glob("*.dcm"))[files]:
        ds = pydicom.dcmread(f)
        if new_uids:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if edit:
            edit(ds, f)
        ds.save_as(dst / f.name)


@pytest.mark.slow  # preprocesses a cohort
def test_bad_inputs_become_manifest_lines_and_the_run_goes_on(synth: Path, cfg_file: Path, tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    masks.mkdir()
    seg = synth / "segmentations"
    good, corrupt, one, mr, mixed, partial, offside, noreport, badtext = (
        "good", "corrupt", "oneslice", "mr", "mixed", "partialmask", "offside", "noreport", "badtext")
    src = synth / "images" / "synth_00000"
    for name in (good, partial, offside, noreport, badtext, corrupt):
        _copy_series(src, images / name)
        shutil.copy(seg / "synth_00000.nii.gz", masks / f"{name}.nii.gz")
    for victim in sorted((images / corrupt).glob("*.dcm"))[10:12]:  # two adjacent: a gap too long to fill
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])  # truncated pixel data
    _copy_series(src, images / one, files=slice(0, 1))

    def to_mr(ds, f):
        ds.Modality = "MR"

    _copy_series(src, images / mr, edit=to_mr)

    def shrink(ds, f):
        if f.name == "IM0005.dcm":
            arr = ds.pixel_array[::2, ::2].copy()
            ds.Rows, ds.Columns = arr.shape
            ds.PixelData = arr.tobytes()

    _copy_series(src, images / mixed, edit=shrink)
    for name in (one, mr, mixed):
        shutil.copy(seg / "synth_00000.nii.gz", masks / f"{name}.nii.gz")
    # a label map without liver, spleen and kidneys; a label map 5 m away from its image
    m = sitk.ReadImage(str(seg / "synth_00000.nii.gz"))
    arr = sitk.GetArrayFromImage(m)
    arr[np.isin(arr, [1, 2, 3, 5])] = 0
    m2 = sitk.GetImageFromArray(arr)
    m2.CopyInformation(m)
    sitk.WriteImage(m2, str(masks / f"{partial}.nii.gz"))
    m.SetOrigin(tuple(o + 5000.0 for o in m.GetOrigin()))
    sitk.WriteImage(m, str(masks / f"{offside}.nii.gz"))
    # reports: one row in another encoding, one case without a row
    rows = [f"{n},No acute findings.,Normal study." for n in (good, partial, offside, corrupt, one, mr, mixed)]
    reports = tmp_path / "reports.csv"
    reports.write_bytes(("case_id,findings,impression\n" + "\n".join(rows) + "\n").encode()
                        + f"{badtext},Hypodense l\xe9sion in the liver.,Cyst.\n".encode("latin-1"))

    out = tmp_path / "out"
    args = ["preprocess", str(images), str(out), "--masks", str(masks), "--reports", str(reports),
            "--config", str(cfg_file), "--no-progress"]
    assert main(args) == 1  # failures -> non-zero exit
    rows = manifest(out)
    assert len(rows) == 9
    status = [r["status"] for r in rows]
    assert status.count("ok") == 3 and status.count("skipped") == 2 and status.count("failed") == 4, rows
    reasons = " | ".join(r["reason"] for r in rows)
    assert "modality MR" in reasons
    assert "missing 2 slices" in reasons and "left out 2 unreadable file(s): IM0011.dcm, IM0012.dcm" in reasons
    assert "single slice" in reasons or "one slice" in reasons
    assert "not valid utf-8" in reasons and "--table-encoding" in reasons
    assert "does not overlap the image in physical space" in reasons
    assert "anatomies absent from the label map: liver, spleen, kidney" in reasons
    assert any(r["status"] == "ok" and r["report"] == "missing" for r in rows)
    for r in rows:
        assert r["reason"] or r["status"] == "ok"
        for name in (good, corrupt, one, mr, mixed, partial, offside, noreport, badtext):
            # folder names are match keys: never written out (as words: "corrupt" may end "corrupted")
            assert not re.search(rf"(?<![A-Za-z]){name}(?![A-Za-z])", r["reason"]), r["reason"]
    # --allow-failures: same run, exit 0; failed cases are retried, finished ones reused
    assert main([*args, "--allow-failures"]) == 0


def test_empty_input_is_a_failed_manifest_line(tmp_path: Path, cfg_file: Path) -> None:
    empty, masks = tmp_path / "empty", tmp_path / "masks"
    empty.mkdir()
    masks.mkdir()
    out = tmp_path / "out"
    assert main(["preprocess", str(empty), str(out), "--masks", str(masks), "--config", str(cfg_file), "--no-progress"]) == 1
    (row,) = manifest(out)
    assert row["status"] == "failed" and "no DICOM or NIfTI" in row["reason"]


def test_input_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preprocess", str(tmp_path / "nope"), str(tmp_path / "out"), "--masks", str(tmp_path)]) == 2
    assert main(["preprocess", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "--masks" in capsys.readouterr().err
