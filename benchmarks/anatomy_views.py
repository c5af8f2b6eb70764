"""Per-anatomy views of an ``fvlm preprocess`` output: the issue-15 geometry option "a window of fixed physical
size per anatomy at a fixed zoom, encoded by the shared tower, pooled inside its mask", as data, so that
``fvlm train`` and ``fvlm evaluate`` run on it unchanged (``benchmarks.ceiling_probe``'s ``anatomy-views``).

For every case and every anatomy ``a`` present in it, one new case ``<case>--<anatomy>``:

* a window of the physical size ``E_a`` (z, y, x mm), the same for every case: the ``percentile`` of the
  anatomy's bounding-box extent over the reference cohort's first ``reference_cases`` cases, times ``margin``,
  at least ``min_mm``; centred on the anatomy's bounding box in this case;
* resampled to ``S`` (z, y, x) voxels, so the spacing ``s_a = E_a / S`` is fixed per anatomy: an organ keeps its
  absolute size (cardiomegaly, atrophy), and a small organ gets as many tokens as a large one. With the source
  spacing ``s`` the output voxel ``o`` reads the input at ``c + (o - (S - 1) / 2) * s_a / s`` (``c`` the box
  centre, in voxels): trilinear for the image, Gaussian prefiltered with ``sigma = (f - 1) / 2`` voxels along
  an axis the window shrinks by ``f = s_a / s > 1`` (scikit-image's anti-aliasing rule), air (``pad_hu``)
  outside the case; nearest for the anatomy map, of which only label ``a`` is kept, so the model pools the
  tokens of ``a`` alone;
* with the source case's report and labels. Only ``a`` is present, so a training step learns, and evaluation
  scores, ``a``'s tasks from this window (the other anatomies are masked; their scores are NaN and left out).

The views are cut from the preprocessed cases (here 6 x 6 x 10 mm): a window finer than that interpolates, it
does not add detail. What the views change is the token grid: each anatomy centred, separate from its
neighbours, and small organs spread over many tokens.

    .venv/bin/python -m benchmarks.anatomy_views data/bench15/prep/val data/anatomy-views/val \\
        --reference data/bench15/prep/train
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

SIZE_ZYX = (32, 32, 32)
VIEWS_FILE = "views.json"


def window_extents(reference: Path, reference_cases: int | None = 400, percentile: float = 95.0,
                   margin: float = 1.1, min_mm: float = 40.0) -> dict[str, list[float]]:
    """Anatomy name -> window size (z, y, x) mm from the bounding boxes (``case.json`` ``bbox_lps_mm``) of the
    first ``reference_cases`` cases of ``reference`` (None: all; module docstring)."""
    from pipelines.cases.format import read_case, read_index

    extents: dict[str, list[np.ndarray]] = {}
    for row in read_index(reference)[:reference_cases]:
        case = read_case(reference, row["case_id"])
        for a in case["anatomies"]:
            if a["present"]:
                lo, hi = np.asarray(a["bbox_lps_mm"], dtype=float)  # (x, y, z) each
                extents.setdefault(a["name"], []).append((hi - lo)[::-1])  # (z, y, x)
    if not extents:
        raise ValueError(f"{reference}: no present anatomy with a bounding box in its first "
                         f"{reference_cases or 'all'} cases")
    return {name: [round(max(min_mm, margin * float(v)), 1) for v in np.percentile(np.stack(e), percentile, axis=0)]
            for name, e in extents.items()}


def view(image: np.ndarray, anatomy: np.ndarray, label: int, spacing_zyx: Sequence[float],
         extent_zyx: Sequence[float], size_zyx: Sequence[int] = SIZE_ZYX,
         pad_hu: float = -1024.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One anatomy's window of a case (module docstring). image (Z, Y, X) HU, anatomy (Z, Y, X) labels ->
    (image (S) int16 HU, anatomy (S) uint8 holding ``label`` or 0, first output voxel in input voxels (3,),
    output spacing (z, y, x) mm (3,)). Raises ValueError when ``label`` is absent."""
    from scipy import ndimage

    where = np.nonzero(anatomy == label)
    if not len(where[0]):
        raise ValueError(f"anatomy label {label} is absent from the map")
    size = np.asarray(size_zyx, dtype=float)
    spacing = np.asarray(spacing_zyx, dtype=float)
    out_spacing = np.asarray(extent_zyx, dtype=float) / size
    step = out_spacing / spacing  # (3,) input voxels per output voxel
    centre = np.array([(w.min() + w.max()) / 2.0 for w in where])
    start = centre - (size - 1) / 2.0 * step  # input voxel of output voxel 0
    src = image.astype(np.float32)
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    if sigma.any():
        src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
    shape = tuple(int(s) for s in size_zyx)
    img = ndimage.affine_transform(src, step, offset=start, output_shape=shape, order=1, mode="constant",
                                   cval=float(pad_hu))
    mask = ndimage.affine_transform((anatomy == label).astype(np.uint8), step, offset=start, output_shape=shape,
                                    order=0, mode="constant", cval=0)
    img = np.clip(np.rint(img), -32768, 32767).astype(np.int16)
    return img, (mask * np.uint8(label)).astype(np.uint8), start, out_spacing


def _view_case(case: dict, name: str, voxels: int, start: np.ndarray, spacing_zyx: np.ndarray,
               extent_zyx: Sequence[float], size_zyx: Sequence[int]) -> dict:
    """The ``case.json`` of one view: the source's report, labels and provenance; geometry of the window; only
    ``name`` present."""
    out = copy.deepcopy(case)
    cid = f"{case['case_id']}--{name}"
    out["case_id"] = cid
    geo = out["geometry"]
    src_spacing_zyx = np.asarray(case["geometry"]["spacing_xyz_mm"], dtype=float)[::-1]
    origin_xyz = np.asarray(geo["origin_xyz_mm"], dtype=float) + (start * src_spacing_zyx)[::-1]  # axis-aligned
    geo.update(shape_zyx=list(size_zyx), spacing_xyz_mm=[round(float(v), 4) for v in spacing_zyx[::-1]],
               origin_xyz_mm=[round(float(v), 3) for v in origin_xyz])
    for a in out["anatomies"]:
        keep = a["name"] == name
        a.update(present=keep and voxels > 0, cut_by_scan_boundary=False, cut_by_crop=False,
                 crop_voxels=voxels if keep else 0)
    out["view"] = {"source_case": case["case_id"], "anatomy": name, "extent_zyx_mm": list(extent_zyx),
                   "start_zyx_vox": [round(float(v), 3) for v in start]}
    if isinstance(out.get("manifest"), dict):
        out["manifest"]["case_id"] = cid
    return out


def derive(prep: Path, out: Path, extents: dict[str, list[float]], size_zyx: Sequence[int] = SIZE_ZYX,
           log=print) -> Path:
    """Write the per-anatomy views of every case of ``prep`` to ``out`` (module docstring); made once, in a
    temporary folder renamed into place. An existing ``out`` made with other extents or size is an error."""
    from pipelines.cases.format import index_row, load_packed, read_index

    want = {"source": str(prep), "size_zyx": list(size_zyx), "extents_zyx_mm": extents}
    if (out / "index.jsonl").is_file():
        have = json.loads((out / VIEWS_FILE).read_text(encoding="utf-8"))
        if {k: have.get(k) for k in want} != want:
            raise ValueError(f"{out} holds views of other settings ({out / VIEWS_FILE}); remove it or pick another")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cases").mkdir(parents=True)
    rows, manifest, skipped = [], [], []
    cases = read_index(prep)
    for n, row in enumerate(cases, 1):
        case = json.loads((prep / "cases" / row["case_id"] / "case.json").read_text(encoding="utf-8"))
        image, anatomy = load_packed(prep, row, mmap=False)
        spacing_zyx = np.asarray(case["geometry"]["spacing_xyz_mm"], dtype=float)[::-1]
        pad = float(case.get("intensity", {}).get("pad_hu", -1024))
        in_map = set(np.unique(anatomy).tolist())
        for a in case["anatomies"]:
            name = a["name"]
            if not a["present"]:
                continue
            if int(a["label"]) not in in_map:  # present in the scan, cropped away by preprocessing: absent here too
                skipped.append(f"{row['case_id']}: {name} is not in the anatomy map")
                continue
            if name not in extents:
                skipped.append(f"{row['case_id']}: {name} has no window size (absent from the reference)")
                continue
            img, anat, start, sp = view(image, anatomy, int(a["label"]), spacing_zyx, extents[name], size_zyx, pad)
            doc = _view_case(case, name, int((anat > 0).sum()), start, sp, extents[name],
                             size_zyx)
            folder = tmp / "cases" / doc["case_id"]
            folder.mkdir()
            np.save(folder / "image.npy", img)
            np.save(folder / "anatomy.npy", anat)
            (folder / "case.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
            rows.append(json.dumps(index_row(doc, "npy")))
            manifest.append(json.dumps({**(doc.get("manifest") or {}), "case_id": doc["case_id"], "status": "ok"}))
        if n % 200 == 0:
            log(f"anatomy views: {n}/{len(cases)} cases of {prep}")
    (tmp / "index.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp / "manifest.jsonl").write_text("\n".join(manifest) + "\n", encoding="utf-8")
    (tmp / "preprocess.json").write_text((prep / "preprocess.json").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp / VIEWS_FILE).write_text(json.dumps({**want, "cases": len(cases), "views": len(rows),
                                              "skipped": skipped}, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prep", type=Path, help="an fvlm preprocess output")
    ap.add_argument("out", type=Path, help="where the views go (a preprocess-shaped folder)")
    ap.add_argument("--reference", type=Path, help="cohort whose bounding boxes size the windows (default: prep)")
    ap.add_argument("--size", type=int, nargs=3, default=list(SIZE_ZYX), metavar=("Z", "Y", "X"))
    args = ap.parse_args(argv)
    extents = window_extents(args.reference or args.prep)
    derive(args.prep, args.out, extents, args.size)
    print(json.dumps(extents))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
