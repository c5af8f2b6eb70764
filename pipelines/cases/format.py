"""The ``fvlm preprocess`` output format: its writer (``fvlm preprocess``) and its readers (training,
evaluation, ``fvlm embed``), one module so that both sides agree on one layout.

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

Reading (:func:`read_index`, :func:`read_run`, :func:`read_case`, :func:`load_packed`): every index row of
every shard, one per case id; ``preprocess.json``'s anatomy table (labels 1..A) and report parser preset; a
folder that is not such an output raises :class:`DataError`, naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.atomic import write_text_atomic

if TYPE_CHECKING:
    import SimpleITK as sitk

log = logging.getLogger(__name__)

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
    import SimpleITK as sitk

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
    import SimpleITK as sitk

    out = Path(out)
    if row["image"].endswith(".npy"):
        mode = "r" if mmap else None
        return np.load(out / row["image"], mmap_mode=mode), np.load(out / row["anatomy"], mmap_mode=mode)
    return (sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["image"]))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["anatomy"]))))


# ------------------------------------------------------------------------------------------ reading the run


class DataError(ValueError):
    """The data folder is not a usable ``fvlm preprocess`` output (message names the file and the fix)."""


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing {what}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read {what}: {e}") from e


def index_files(data_dir: str | os.PathLike) -> list[Path]:
    """``index.jsonl`` and the shard indexes ``index.shard-I-of-K.jsonl`` of a preprocess output."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (give the OUT folder of `fvlm preprocess`)")
    files = sorted(root.glob("index*.jsonl"))
    if not files:
        hint = (" (it holds raw series; run `fvlm preprocess` on it first)"
                if any(root.rglob("*.dcm")) or any(root.glob("*.nii*")) else "")
        raise DataError(
            f"{root} is not an `fvlm preprocess` output: no index.jsonl or index.shard-*.jsonl{hint}"
        )
    return files


def read_index(data_dir: str | os.PathLike) -> list[dict]:
    """All index rows of the run (every shard), one per case id, sorted by case id."""
    rows: dict[str, dict] = {}
    for path in index_files(data_dir):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                cid = row["case_id"]
                row["image"], row["anatomy"]  # noqa: B018 - required keys
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: not an index row of `fvlm preprocess` ({e!r})") from e
            rows[cid] = row
    return [rows[k] for k in sorted(rows)]


def read_run(data_dir: str | os.PathLike) -> dict:
    """``preprocess.json`` of the run (anatomy set, parameters, report parser preset)."""
    path = Path(data_dir) / "preprocess.json"
    run = _read_json(path, "preprocess.json (the run record of `fvlm preprocess`)")
    if not isinstance(run, dict) or not isinstance(run.get("anatomies"), dict) or not run["anatomies"]:
        raise DataError(f"{path}: no `anatomies` table; is this an `fvlm preprocess` output?")
    return run


def read_case(data_dir: str | os.PathLike, case_id: str) -> dict:
    """``cases/<case_id>/case.json`` of the run (geometry, per-anatomy stats, report, labels)."""
    return _read_json(Path(data_dir) / "cases" / case_id / "case.json", "case.json")


def run_anatomy_names(run: dict) -> list[str]:
    """The run's anatomy names, label 1..A in order (``preprocess.json`` ``anatomies``)."""
    table = {int(k): v for k, v in run["anatomies"].items()}
    if sorted(table) != list(range(1, len(table) + 1)):
        raise DataError(f"preprocess.json: anatomy labels must be 1..A, got {sorted(table)}")
    return [table[k] for k in range(1, len(table) + 1)]


def run_task_names(run: dict, anatomies: list[str], data_dir: Path, rows: list[dict]) -> list[list[str]]:
    """Each anatomy's task names, in the order of the report parser's task catalog."""
    preset = run.get("report_parser_preset")
    if preset:
        try:
            from anatomy.reports.preset import load_preset

            by = load_preset(preset).catalog.by_anatomy()
            return [[t.name for t in by.get(a, [])] for a in anatomies]
        except Exception as e:  # noqa: BLE001 - a custom preset that is gone: fall back to the data
            log.warning("report parser preset %r not loadable (%s); task order taken from the first case", preset, e)
    for row in rows[:1]:
        case = read_case(data_dir, row["case_id"])
        parsed = ((case.get("report") or {}).get("parsed") or {}).get("anatomies") or {}
        return [list((parsed.get(a) or {}).get("labels") or {}) for a in anatomies]
    return [[] for _ in anatomies]


def corpus_texts(data_dir: str | os.PathLike) -> list[str]:
    """Every anatomy text and every whole report of the run, for training a WordPiece tokenizer.

    Cases without a report or without parsed texts contribute what they have (nothing, or the report).
    """
    root = Path(data_dir)
    out: list[str] = []
    for row in read_index(root):
        if row.get("report") is False:
            continue
        case = read_case(root, row["case_id"])
        report = case.get("report") or {}
        if report.get("text"):
            out.append(report["text"])
        for entry in ((report.get("parsed") or {}).get("anatomies") or {}).values():
            if isinstance(entry, dict) and entry.get("text"):
                out.append(entry["text"])
    return out
