"""What ``fvlm preprocess`` writes, and how, so that a killed run never leaves a half-written case.

Layout of ``OUT``::

    cases/<case_id>/image.nii.gz     the crop, HU as int16, axis-aligned LPS grid
    cases/<case_id>/anatomy.nii.gz   anatomy label map of the set on the same grid (uint8, label k = anatomy k)
    cases/<case_id>/image.npy        packed copy for training: (Z, Y, X) int16, uncompressed (np.load mmap)
    cases/<case_id>/anatomy.npy      packed copy: (Z, Y, X) uint8
    cases/<case_id>/case.json        geometry, per-anatomy stats, label table, source hash, report, labels
    manifest.jsonl                   one line per input series: case id, status ok/failed/skipped, reason
    index.jsonl                      one line per finished case, for loaders: paths, shape, anatomies present
    preprocess.json                  the parameters of the run (no paths, no identifiers)
    .salt                            the generated salt of the case-id and source hashes (keep it private)

With ``--num-shards K`` the run-level files are per shard: ``manifest.shard-I-of-K.jsonl``,
``index.shard-I-of-K.jsonl``; loaders read ``index*.jsonl``.

Atomicity: a case is written into a hidden temporary folder ``cases/.<case_id>.*`` (``case.json`` last)
and renamed to ``cases/<case_id>`` in one step; a case folder with a readable ``case.json`` is complete.
Every other file is written to a temporary sibling and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipelines.atomic import write_text_atomic

CASE_FORMAT = "fvlm-case/1"
PACKS = ("npy", "none")
NIFTI_COMPRESSION_LEVEL = 1  # gzip level: 1 writes about 3x faster than 6 for ~10% more bytes


def dumps(obj: Any) -> str:
    """JSON as written everywhere: sorted keys off (fields keep their order), UTF-8, stable floats."""
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def shard_suffix(shard_index: int, num_shards: int) -> str:
    return "" if num_shards == 1 else f".shard-{shard_index:05d}-of-{num_shards:05d}"


def case_dir(out: Path, case_id: str) -> Path:
    return Path(out) / "cases" / case_id


def read_complete_case(out: Path, case_id: str) -> dict | None:
    """The case's ``case.json`` if the case is complete (present and parseable), else None."""
    path = case_dir(out, case_id) / "case.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == CASE_FORMAT else None


def remove_stale_temporaries(out: Path, case_id: str) -> None:
    """Delete temporary folders a killed run left for this case (only this case's: shards may share OUT)."""
    for tmp in (Path(out) / "cases").glob(f".{case_id}.*"):
        shutil.rmtree(tmp, ignore_errors=True)


def write_case(out: Path, case_id: str, image: sitk.Image, anatomy: sitk.Image, meta: dict, pack: str = "npy") -> Path:
    """Write one case atomically; ``meta`` becomes ``case.json`` (written last). Returns the case folder."""
    if pack not in PACKS:
        raise ValueError(f"unknown pack format {pack!r}; choose one of {', '.join(PACKS)}")
    cases = Path(out) / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, case_id)
    final = cases / case_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=cases))
    try:
        os.chmod(tmp, 0o755)
        sitk.WriteImage(image, str(tmp / "image.nii.gz"), True, NIFTI_COMPRESSION_LEVEL)
        sitk.WriteImage(anatomy, str(tmp / "anatomy.nii.gz"), True, NIFTI_COMPRESSION_LEVEL)
        if pack == "npy":
            np.save(tmp / "image.npy", sitk.GetArrayViewFromImage(image))  # (Z, Y, X) int16
            np.save(tmp / "anatomy.npy", sitk.GetArrayViewFromImage(anatomy))  # (Z, Y, X) uint8
        (tmp / "case.json").write_text(dumps({"format": CASE_FORMAT, **meta}), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def index_row(case: dict, pack: str) -> dict:
    """One ``index.jsonl`` line: where a loader finds the case and what it holds."""
    cid = case["case_id"]
    row = {
        "case_id": cid,
        "image": f"cases/{cid}/image.{'npy' if pack == 'npy' else 'nii.gz'}",
        "anatomy": f"cases/{cid}/anatomy.{'npy' if pack == 'npy' else 'nii.gz'}",
        "shape_zyx": case["geometry"]["shape_zyx"],
        "present": [a["name"] for a in case["anatomies"] if a["present"]],
        "cut": [a["name"] for a in case["anatomies"] if a["cut_by_scan_boundary"] or a["cut_by_crop"]],
        "report": case.get("report") is not None,
        "labels": case.get("labels") is not None,
    }
    return row


def load_packed(out: Path, row: dict, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image int16, anatomy uint8), both (Z, Y, X), of one ``index.jsonl`` row."""
    out = Path(out)
    if row["image"].endswith(".npy"):
        mode = "r" if mmap else None
        return np.load(out / row["image"], mmap_mode=mode), np.load(out / row["anatomy"], mmap_mode=mode)
    return (sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["image"]))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["anatomy"]))))
