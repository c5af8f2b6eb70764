"""The embedding export of ``fvlm embed``: a folder that numpy, pandas and any safetensors reader open without
fvlm.

``DIR/embeddings.safetensors`` (one row per case, in ``cases.csv`` order; N cases, A anatomies, D dims)::

    image_emb         (N, A, D) float32  per-anatomy image embedding (L2-normalised; zero rows where not embedded)
    anatomy_mask      (N, A)    bool     embedded: present in the case and counted in the view (not cut)
    anatomy_present   (N, A)    bool     present in the case (preprocess statistics)
    anatomy_cut       (N, A)    bool     present but cut by the view (less than --min-inside of it visible)
    global_image_emb  (N, D)    float32  whole-scan embedding (the clip recipe's readout)
    text_emb          (N, A, D) float32  per-anatomy report text embedding (zero rows where the case has none)
    text_mask         (N, A)    bool     the case's report has a text for the anatomy
    text_group        (N, A)    int32    id of the distinct anatomy text (equal ids: identical texts), -1: none
    report_emb        (N, D)    float32  whole-report text embedding
    report_mask       (N,)      bool     the case has a report
    report_group      (N,)      int32    id of the distinct report text, -1: none

``DIR/cases.csv``: ``row, case_id, n_present, n_embedded, n_texts, has_report``; ``DIR/labels.csv``:
``case_id`` and one column per label that ``fvlm preprocess`` stored with the cases (ground truth, else the
labels parsed from the reports: ``meta.json`` ``labels_kind``), 0/1, empty where unknown; ``DIR/meta.json``:
format, anatomy names, sizes, the model's name and weights fingerprint, the view and the readout
(``pipelines.evaluate.readout``) resolved from the run's recipe. No text, path or identifier other than the
case ids (which ``fvlm preprocess`` already de-identified) is stored: equal texts are only told by their
group ids.

Reading::

    from safetensors.numpy import load_file; import pandas as pd, json
    arrays = load_file("DIR/embeddings.safetensors"); cases = pd.read_csv("DIR/cases.csv")
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import atomic_path, open_atomic, write_text_atomic

__all__ = ["FORMAT", "ARRAYS", "EmbeddingSet", "write_arrays", "read_arrays", "write_embeddings", "read_embeddings",
           "read_labels"]

FORMAT = "fvlm-embeddings/1"
#: array name -> (dtype, dims); dims name the axes ("N" cases, "A" anatomies, "D" embedding)
ARRAYS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "image_emb": (np.float32, ("N", "A", "D")), "anatomy_mask": (np.bool_, ("N", "A")),
    "anatomy_present": (np.bool_, ("N", "A")), "anatomy_cut": (np.bool_, ("N", "A")),
    "global_image_emb": (np.float32, ("N", "D")), "text_emb": (np.float32, ("N", "A", "D")),
    "text_mask": (np.bool_, ("N", "A")), "text_group": (np.int32, ("N", "A")),
    "report_emb": (np.float32, ("N", "D")), "report_mask": (np.bool_, ("N",)), "report_group": (np.int32, ("N",)),
}


class EmbeddingSet(dict):
    """A read export: the arrays of :data:`ARRAYS` by name, plus ``case_ids`` (list), ``meta`` (dict) and
    ``folder``. It is also the ``emb`` dict of :mod:`pipelines.evaluate.probe` (``image_emb``,
    ``anatomy_mask``, ``global_image_emb``, ``case_ids``)."""

    @property
    def n(self) -> int:
        return len(self["case_ids"])

    @property
    def anatomy_names(self) -> list[str]:
        return list(self["meta"]["anatomy_names"])


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> tuple[int, int, int]:
    """(N, A, D) of ``arrays`` after checking every array of :data:`ARRAYS` is there with its shape."""
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing array(s) {', '.join(missing)}; not an `fvlm embed` export")
    n, a, d = arrays["image_emb"].shape
    sizes = {"N": n, "A": a, "D": d}
    for k, (_, dims) in ARRAYS.items():
        want = tuple(sizes[x] for x in dims)
        if tuple(arrays[k].shape) != want:
            raise ValueError(f"{where}: {k} has shape {tuple(arrays[k].shape)}, expected {want} ({', '.join(dims)})")
    return n, a, d


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` (the names of :data:`ARRAYS`, cast to their dtypes) as safetensors."""
    from safetensors.numpy import save_file

    out = {k: np.ascontiguousarray(np.asarray(arrays[k]).astype(ARRAYS[k][0])) for k in ARRAYS}
    check_arrays(out, str(path))
    with atomic_path(Path(path)) as tmp:
        save_file(out, str(tmp))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    arrays = load_file(str(path))
    check_arrays(arrays, str(path))
    return arrays


def write_embeddings(folder: Path, arrays: dict[str, np.ndarray], case_ids: list[str], labels: dict[str, dict],
                     meta: dict[str, Any]) -> dict[str, Path]:
    """Write the export (module docstring) to ``folder``: arrays, ``cases.csv``, ``labels.csv`` (``labels``: case
    id -> {label name: 0/1/None}; no file when empty) and, last, ``meta.json`` (a folder with ``meta.json`` is
    complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_arrays(folder / "embeddings.safetensors", arrays)
    n = len(case_ids)
    if len(arrays["image_emb"]) != n:
        raise ValueError(f"{len(arrays['image_emb'])} embedding rows for {n} case ids")
    with open_atomic(folder / "cases.csv", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "case_id", "n_present", "n_embedded", "n_texts", "has_report"])
        for i, cid in enumerate(case_ids):
            w.writerow([i, cid, int(arrays["anatomy_present"][i].sum()), int(arrays["anatomy_mask"][i].sum()),
                        int(arrays["text_mask"][i].sum()), int(bool(arrays["report_mask"][i]))])
    names = sorted({k for lab in labels.values() for k in lab})
    files = {"embeddings.safetensors": folder / "embeddings.safetensors", "cases.csv": folder / "cases.csv"}
    if names:
        with open_atomic(folder / "labels.csv", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case_id", *names])
            for cid in case_ids:
                lab = labels.get(cid) or {}
                w.writerow([cid, *("" if lab.get(k) is None else int(float(lab[k]) > 0.5) for k in names)])
        files["labels.csv"] = folder / "labels.csv"
    elif (folder / "labels.csv").exists():
        (folder / "labels.csv").unlink()
    n_, a, d = arrays["image_emb"].shape
    doc = {"format": FORMAT, "n_cases": n, "num_anatomies": a, "embed_dim": d, **meta,
           "arrays": {k: {"dtype": np.dtype(t).name, "dims": list(dims)} for k, (t, dims) in ARRAYS.items()}}
    write_text_atomic(folder / "meta.json", json.dumps(doc, indent=2) + "\n")
    files["meta.json"] = folder / "meta.json"
    return files


def read_meta(folder: Path, option: str = "--embeddings") -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {folder}: no such folder (give an `fvlm embed` output folder)")
    path = folder / "meta.json"
    if not path.is_file():
        partial = (folder / "parts").is_dir()
        raise ValueError(f"{option} {folder}: no meta.json: " + ("an unfinished `fvlm embed` (run it again with the "
                         "same options to finish)" if partial else "not an `fvlm embed` output folder"))
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{option} {folder}: format {meta.get('format')!r}, this fvlm reads {FORMAT!r}")
    return meta


def read_embeddings(folder: Path, option: str = "--embeddings") -> EmbeddingSet:
    """Read an export written by :func:`write_embeddings` (checked: format, shapes, case rows)."""
    folder = Path(folder)
    meta = read_meta(folder, option)
    arrays = read_arrays(folder / "embeddings.safetensors")
    with open(folder / "cases.csv", newline="", encoding="utf-8") as f:
        case_ids = [r["case_id"] for r in csv.DictReader(f)]
    if len(case_ids) != len(arrays["image_emb"]) or len(case_ids) != meta["n_cases"]:
        raise ValueError(f"{option} {folder}: cases.csv has {len(case_ids)} rows, the arrays "
                         f"{len(arrays['image_emb'])}, meta.json {meta['n_cases']}")
    if len(meta["anatomy_names"]) != arrays["image_emb"].shape[1]:
        raise ValueError(f"{option} {folder}: {len(meta['anatomy_names'])} anatomy names for "
                         f"{arrays['image_emb'].shape[1]} anatomy rows")
    out = EmbeddingSet(arrays)
    out.update(case_ids=case_ids, meta=meta, folder=folder, view=meta.get("view", {}).get("kind", "dataset"))
    return out


def read_labels(folder: Path, case_ids: list[str], tasks: list[Any], option: str = "--embeddings"
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, T) labels of the export's cases from its ``labels.csv`` (the labels ``fvlm preprocess`` stored), in
    the table format of ``fvlm evaluate --labels``; ``info`` as :func:`pipelines.evaluate.run.read_labels_table`
    with ``kind`` from ``meta.json``."""
    from pipelines.evaluate.run import read_labels_table

    path = Path(folder) / "labels.csv"
    if not path.is_file():
        raise ValueError(f"{option} {folder}: the cases stored no labels (no labels.csv); give a label table")
    y, info = read_labels_table(path, case_ids, tasks, option=f"{option} labels.csv")
    info["kind"] = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8")).get("labels_kind",
                                                                                             info.get("kind"))
    return y, info
