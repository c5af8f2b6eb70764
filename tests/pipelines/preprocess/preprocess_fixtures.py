"""Shared by the preprocess tests: a small synthetic cohort, a fast preprocessing config, output readers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipelines.synth.cohort import SynthConfig, make_cohort

#: A coarse grid so that end-to-end runs take a fraction of a second per case.
FAST_CONFIG = """name: test-fast
spacing_xyz_mm: [3.0, 3.0, 5.0]
margin_zyx_vox: [1, 2, 2]
min_size_zyx: [8, 16, 16]
max_size_zyx: [200, 200, 200]
pad_hu: -1024
clip_hu: [-1024, 3071]
interpolation: linear
window_hu: [-1150, 350]
min_voxels: 10
min_anatomies: 1
"""


def fast_config(folder: Path) -> Path:
    path = Path(folder) / "fast.yaml"
    path.write_text(FAST_CONFIG)
    return path


def cohort(folder: Path, cases: int = 3, fmt: str = "dicom", seed: int = 3) -> Path:
    make_cohort(Path(folder), SynthConfig(cases=cases, seed=seed, format=fmt, normal_share=0.3))
    return Path(folder)


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (names in ``skip`` left out)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name not in skip:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def manifest(out: Path, name: str = "manifest.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(out) / name).read_text().splitlines()]


def case_json(out: Path, case_id: str) -> dict:
    return json.loads((Path(out) / "cases" / case_id / "case.json").read_text())


def preprocessed_cohort(root: Path, cases: int, seed: int, normal_share: float = 0.25,
                        reports: Path | None = None) -> Path:
    """A synthetic NIfTI cohort under ``root/synth`` run through ``fvlm preprocess`` (fast config, masks,
    reports and labels, case ids from the file names) into ``root/prep``, which is returned.
    ``reports`` replaces the cohort's reports table (e.g. one with some cases left out)."""
    from pipelines.cli import main

    root = Path(root)
    synth = root / "synth"
    make_cohort(synth, SynthConfig(cases=cases, seed=seed, format="nifti", normal_share=normal_share))
    assert main(["preprocess", str(synth / "images"), str(root / "prep"), "--masks", str(synth / "segmentations"),
                 "--reports", str(reports or synth / "reports.csv"), "--labels", str(synth / "labels.csv"),
                 "--config", str(fast_config(root)), "--case-id", "key", "--no-progress"]) == 0
    return root / "prep"


def flipped_copy(labels: sitk.Image, shift_voxels: int = 3) -> sitk.Image:
    """The same physical label map, stored flipped along x and z, on a grid with another origin (padded).

    Flipping axis a of the array and negating direction column a, with the origin moved to the old last
    voxel, keeps every voxel's physical position; padding ``shift_voxels`` empty voxels in front then moves
    the origin once more.
    """
    arr = sitk.GetArrayFromImage(labels)[::-1, :, ::-1]  # (Z, Y, X) flipped in z and x
    arr = np.pad(arr, ((shift_voxels, 0), (0, 0), (shift_voxels, 0)))
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetSpacing(labels.GetSpacing())
    nx, ny, nz = labels.GetSize()
    last = labels.TransformIndexToPhysicalPoint((nx - 1, 0, nz - 1))
    sx, _, sz = labels.GetSpacing()
    out.SetOrigin((last[0] + shift_voxels * sx, last[1], last[2] + shift_voxels * sz))
    d = np.array(labels.GetDirection()).reshape(3, 3)
    d[:, 0] *= -1
    d[:, 2] *= -1
    out.SetDirection(tuple(d.ravel()))
    return out
