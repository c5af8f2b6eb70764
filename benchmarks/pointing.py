"""Pointing game on a synthetic cohort: does a finding's localisation map peak inside its true lesion?

For every held-out case of a preprocessed synthetic cohort (``fvlm synth`` -> ``fvlm preprocess --case-id
key``) and every finding ``fvlm synth`` injected (``truth/<id>.json``: task, anatomy, lesion id), the
lesion map ``lesions/<id>.nii.gz`` is brought onto the model's input grid exactly as the CT was:

1. preprocess: resampled (nearest neighbour) onto the case's crop grid, ``case.json`` ``geometry``
   (origin, spacing, direction, shape; SimpleITK resampling in physical LPS coordinates, as ``crop_case``
   does for the CT and the label map);
2. evaluation view (``CaseDataset(train=False)``): ``crop`` mode takes the central crop and pads centred
   (MONAI SpatialPad: ``(size - shape) // 2`` before), ``resize`` mode resizes with MONAI ``Resize``
   (nearest), like the anatomy map.

A token touches the lesion when any voxel of its patch has the finding's lesion id (the anatomy touch rule).
Methods, each a map over the tokens restricted to the finding's anatomy; its peak token (argmax over the
anatomy's tokens) scores a hit when it touches the lesion:

* ``region``: the region head's map (:func:`fvlm.localize.region_map`, positive prompts, product mode);
  only for models trained with the region head.
* ``pooled``: the pooled-embedding heatmap (:func:`fvlm.heatmap.task_heatmap`, probability mode).
* ``random``: a uniformly random token of the anatomy; its hit rate is computed exactly, not sampled: the
  fraction of the anatomy's tokens that touch the lesion, averaged over findings.

A finding counts when its anatomy is present and not cut in the view and its lesion touches at least one
token of the view (a lesion smaller than the resize step can vanish in ``resize`` mode, as small
anatomy parts do); the others are listed as skipped with the reason. Hit rates come with a seeded
bootstrap 95% interval over findings, and the paired difference to the random baseline with its interval.

Usage::

    python -m benchmarks.pointing --run RUN_DIR --data PREP --cohort COHORT [--out JSON] [--no-record]

Prints a table and records it in BENCHMARKS.md (``benchmarks/record.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["lesion_on_crop", "lesion_on_input", "token_touch", "point", "summarize", "run_pointing", "main"]

METHODS = ("region", "pooled", "random")


# ------------------------------------------------------------------------------------------- geometry


def lesion_on_crop(lesion: Any, geometry: dict) -> np.ndarray:
    """A lesion map (SimpleITK image on the source CT grid) resampled (nearest) onto the preprocess crop grid
    of ``case.json`` ``geometry`` -> (Z, Y, X) uint8 array; 0 outside the source volume."""
    import SimpleITK as sitk

    try:
        size = [int(v) for v in geometry["shape_zyx"][::-1]]
        origin = [float(v) for v in geometry["origin_xyz_mm"]]
        spacing = [float(v) for v in geometry["spacing_xyz_mm"]]
        direction = [float(v) for v in geometry.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1))]
    except (KeyError, TypeError) as e:
        raise ValueError(f"case.json geometry lacks {e} (needs shape_zyx, origin_xyz_mm, spacing_xyz_mm)") from None
    out = sitk.Resample(lesion, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin, spacing, direction, 0,
                        sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)  # (Z, Y, X)


def lesion_on_input(on_crop: np.ndarray, mode: str, size_zyx: Sequence[int]) -> np.ndarray:
    """The evaluation view of ``CaseDataset(train=False)`` (``pipelines.cases.view``) applied to a label array
    on the crop grid: (Z, Y, X) -> ``size_zyx`` (central crop + centred padding with 0, or the anatomy map's
    ``nearest-exact`` resize)."""
    from pipelines.cases.view import crop_box, crop_view, resize_view

    size = tuple(int(s) for s in size_zyx)
    lab = np.asarray(on_crop, dtype=np.uint8)
    if mode == "crop":
        _, out, _ = crop_view(lab, lab, size, crop_box(lab.shape, size, None), (False, False, False), (0, 1), 0)
        return out.numpy().astype(on_crop.dtype)
    if mode == "resize":
        _, out = resize_view(lab, lab, size, (0, 1))
        return out.numpy().astype(on_crop.dtype)
    raise ValueError(f"view mode must be crop or resize, got {mode!r}")


def token_touch(mask: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """(Z, Y, X) bool -> (N,) bool: token n (row-major over the grid) has a True voxel in its patch."""
    import torch

    from fvlm.model.pooling import touch_mask

    lab = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))[None]  # (1, Z, Y, X) labels 0/1
    return touch_mask(lab, 1, tuple(int(p) for p in patch))[0, 0].numpy()


# ------------------------------------------------------------------------------------------- scoring


def point(token_map: np.ndarray, anatomy_tokens: np.ndarray, lesion_tokens: np.ndarray) -> tuple[bool, float, int]:
    """One finding: (hit of the map's peak inside the anatomy, exact random-baseline hit probability, peak).

    ``token_map`` (N,) float, ``anatomy_tokens`` and ``lesion_tokens`` (N,) bool. The baseline is the chance
    that a uniformly random token of the anatomy touches the lesion: |anatomy & lesion| / |anatomy|.
    """
    token_map, anat, les = np.asarray(token_map, float).ravel(), np.asarray(anatomy_tokens, bool).ravel(), \
        np.asarray(lesion_tokens, bool).ravel()
    if not (token_map.shape == anat.shape == les.shape):
        raise ValueError(f"map, anatomy and lesion tokens differ in size: {token_map.shape}, {anat.shape}, {les.shape}")
    if not anat.any():
        raise ValueError("the anatomy touches no token: nothing to point at")
    peak = int(np.argmax(np.where(anat, np.nan_to_num(token_map, nan=-np.inf), -np.inf)))
    return bool(les[peak]), float((anat & les).sum() / anat.sum()), peak


def _interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarize(rows: list[dict], methods: Sequence[str], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per method: n, hits, hit rate, bootstrap 95% CI, and the paired difference to the random baseline."""
    base = np.array([r["random"] for r in rows], float)
    out = {}
    for m in methods:
        vals = np.array([float(r[m]) for r in rows], float)
        lo, hi = _interval(vals, n_boot, seed)
        d_lo, d_hi = _interval(vals - base, n_boot, seed)
        out[m] = {"n": len(vals), "hits": float(vals.sum()), "rate": float(vals.mean()) if len(vals) else None,
                  "ci_low": lo, "ci_high": hi,
                  "minus_random": float((vals - base).mean()) if len(vals) else None,
                  "minus_random_ci": [d_lo, d_hi]}
    return out


# ------------------------------------------------------------------------------------------------ run


def run_pointing(run: Path, data: Path, cohort: Path, tasks: str = "fvlm54", max_cases: int | None = None,
                 log=print) -> dict[str, Any]:
    """Score every (held-out case, injected finding) of ``data``; returns rows, skipped and the summary."""
    import SimpleITK as sitk
    import torch

    from anatomy.catalog import load_task_catalog
    from fvlm.heatmap import task_heatmap
    from fvlm.localize import prompt_tokens, region_map
    from fvlm.model.pooling import touch_mask
    from fvlm.zeroshot import encode_prompts
    from pipelines.cases.dataset import CaseDataset
    from pipelines.inference.model import data_view, load_model

    cohort = Path(cohort)
    if not (cohort / "truth").is_dir() or not (cohort / "lesions").is_dir():
        raise FileNotFoundError(f"--cohort {cohort}: not an `fvlm synth` folder (needs truth/ and lesions/)")
    model, tok, model_dir = load_model(Path(run))
    model.eval()
    view = data_view(Path(run), model, None, None)
    ds = CaseDataset(data, tok, crop_size_zyx=view["crop_size_zyx"], mode=view["mode"], train=False,
                     max_text_len=int(model.config.text.max_length or 64))
    catalog = load_task_catalog(tasks)
    bank = encode_prompts(model, tok, catalog)
    has_region = "region" in getattr(model, "heads", {})
    methods = [m for m in METHODS if m != "region" or has_region]
    patch = model.vision.patch_size
    missing = [c for c in ds.case_ids if not (cohort / "truth" / f"{c}.json").is_file()]
    if missing:
        raise ValueError(f"--data {data}: {len(missing)} case id(s) have no truth file in {cohort}/truth (first: "
                         f"{missing[0]}); preprocess the synthetic cohort with --case-id key so ids match")
    rows, skipped = [], []
    n_cases = len(ds) if max_cases is None else min(len(ds), int(max_cases))
    for i in range(n_cases):
        cid = ds.case_ids[i]
        truth = json.loads((cohort / "truth" / f"{cid}.json").read_text())
        if not truth.get("findings"):
            continue
        case = ds.case_json(i)
        lesion = lesion_on_input(lesion_on_crop(sitk.ReadImage(str(cohort / "lesions" / f"{cid}.nii.gz")),
                                                case["geometry"]), view["mode"], view["crop_size_zyx"])
        sample = ds[i]
        image, anatomy, cut = sample["image"][None], sample["anatomy"][None], sample["cut"]
        touch = touch_mask(anatomy, model.config.num_anatomies, patch)[0].numpy()  # (A, N)
        for f in truth["findings"]:
            where = {"case": cid, "task": f["task"], "anatomy": f["anatomy"], "lesion_id": f["lesion_id"]}
            if f["task"] not in bank.task_names:
                skipped.append({**where, "reason": f"task not in catalog {catalog.name}"})
                continue
            j = list(bank.task_names).index(f["task"])
            a = bank.anatomy_index[j]
            if a < 0:
                skipped.append({**where, "reason": "whole-study task"})
                continue
            if not touch[a].any() or bool(cut[a]):
                skipped.append({**where, "reason": "anatomy absent or cut in the view"})
                continue
            les = token_touch(lesion == int(f["lesion_id"]), patch)
            if not les.any():
                skipped.append({**where, "reason": "lesion not on the input grid (outside the view, or lost by a "
                                                   "nearest resize)"})
                continue
            row: dict[str, Any] = dict(where)
            maps = {}
            pooled, _ = task_heatmap(model, image, anatomy, bank.positive[j], bank.negative[j], a, "probability")
            maps["pooled"] = pooled[0].flatten().numpy()
            if has_region:
                ids, mask = prompt_tokens(model, tok, bank.prompts[j][0])
                rmap, _ = region_map(model, image, anatomy, ids, mask, a)
                maps["region"] = rmap[0].flatten().numpy()
            for m, tmap in maps.items():
                hit, base, peak = point(tmap, touch[a], les)
                row[m], row[f"{m}_peak"] = hit, peak
            row["random"] = base
            row["anatomy_tokens"], row["lesion_tokens"] = int(touch[a].sum()), int((touch[a] & les).sum())
            rows.append(row)
        log(f"case {cid}: {len(truth['findings'])} finding(s); {len(rows)} scored so far")
    return {"run": str(model_dir), "data": str(data), "cohort": str(cohort), "view": view, "methods": methods,
            "rows": rows, "skipped": skipped, "summary": summarize(rows, methods)}


def _run_name(result: dict) -> str:
    run = Path(result["run"])
    return run.parent.name if run.name == "model" else run.name


def _table(results: list[dict]) -> str:
    """One row per run and method."""
    from benchmarks.record import markdown_table

    def f(v):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

    rows = []
    for result in results:
        for m in result["methods"]:
            s = result["summary"][m]
            lo, hi = s["minus_random_ci"]
            hits = f"{s['hits']:.1f} (expected)" if m == "random" else int(s["hits"])
            rows.append([_run_name(result), m, s["n"], hits, f(s["rate"]), f"{f(s['ci_low'])}-{f(s['ci_high'])}",
                         "-" if m == "random" else f"{f(s['minus_random'])} ({f(lo)} to {f(hi)})"])
    return markdown_table(["run", "method", "findings", "hits", "hit rate", "95% CI", "minus random (95% CI)"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pointing", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, nargs="+",
                   help="training run folder(s) (RUN/model) or model export(s); one table row group per run")
    p.add_argument("--data", required=True, type=Path, help="preprocess output of the held-out synthetic cohort")
    p.add_argument("--cohort", required=True, type=Path, help="the `fvlm synth` folder it was made from")
    p.add_argument("--tasks", default="fvlm54", help="task catalog (default fvlm54)")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write rows, skipped findings and the summaries as JSON")
    p.add_argument("--title", default=None, help="BENCHMARKS.md block title (default: from the run names)")
    p.add_argument("--no-record", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    results = [run_pointing(run, args.data, args.cohort, args.tasks, args.max_cases,
                            log=lambda s: print(s, file=sys.stderr)) for run in args.run]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    table = _table(results)
    reasons: dict[str, int] = {}
    for s in results[0]["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    view = results[0]["view"]
    notes = (f"View {view['mode']} {view['crop_size_zyx']}. A hit: the map's peak token inside "
             "the finding's anatomy touches the finding's lesion. random: exact expected hit rate of a uniform token "
             "of the anatomy. Skipped findings (first run): "
             + (", ".join(f"{n} {r}" for r, n in reasons.items()) or "none") + ".")
    if args.no_record:
        print(table + "\n\n" + notes)
    else:
        from benchmarks.record import record

        record(args.title or f"Pointing game: {', '.join(_run_name(r) for r in results)}", table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
