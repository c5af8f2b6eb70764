"""Why the supervised ceiling is low: the ``supervised`` recipe at a quality config's budget, and variants of it
that each change one thing, trained on a training cohort and scored by their classifier on

* a validation cohort (what generalises): visible-task macro AUC (the config's ``evaluate.visible`` geometry)
  and the macro AUC over every task with enough positives;
* cases of the training cohort itself (what was fitted): the same macro AUCs on the first ``--fit-cases``
  training cases. Fit ~ validation means the tower underfits; fit >> validation means it memorises.

Variants (``VARIANTS``): ``base`` (the config's budget as it is), ``steps-x4`` and ``steps-x16`` (four and
sixteen times the steps, the same schedule shape: how fast more compute lifts the ceiling), ``wide`` (vision
width 128 and 4 blocks instead of 64 and 3), ``anatomy-input`` (the anatomy map as 4 learned input channels,
``vision.anatomy_channels``), ``memorise-64``: the base budget on the first
64 training cases only, fit scored on those 64 (can the tower fit at all?); and two that ask whether a step can
do more: ``lr-x3`` (learning rate 3e-3 instead of the config's) and ``no-clip`` (no gradient-norm clipping; the
recipes clip at 1.0, and the supervised loss's positive weights make large gradients); ``batch-x2`` (twice
the batch at the same steps: the samples of twice the steps in the base number of updates; with ``steps-x4``
it tells samples seen from updates made); ``anatomy-views`` and ``anatomy-views-whole``: per-anatomy windows
instead of the whole case (``benchmarks.anatomy_views``: one 32 x 32 x 32 window of a fixed physical size per
anatomy, sized on the training cohort: the p95 of the anatomy's box, or its largest box; the training, fit and
validation cohorts all as views), at the base's tokens per step (108 windows of 64 tokens = 16 cases of 432)
and steps.

    .venv/bin/python -m benchmarks.ceiling_probe --train data/bench15/prep/train --val data/bench15/prep/val \\
        --out data/ceiling-probe --config quality-core

Runs go through the real CLI (``fvlm train``, ``fvlm evaluate``) as children; a finished run (its
``probe-done.json`` records the same arguments) is not trained again.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.anatomy_views import SIZE_ZYX, derive, window_extents
from benchmarks.record import markdown_table, record
from configs.checks import deep_merge

#: per-anatomy view variants: 108 windows of 32^3 voxels (64 tokens each) per step, the voxels and tokens of a
#: step of 16 cases of 72 x 48 x 64
VIEW_BUDGET = {"model.overrides": {"vision": {"image_size": list(SIZE_ZYX)}}, "data.crop_size": list(SIZE_ZYX),
               "data.batch_size": 108}
#: name -> (what changes, overrides merged into the config's train overrides, training cases (None: all))
VARIANTS: dict[str, tuple[str, dict[str, Any], int | None]] = {
    "base": ("the config's budget", {}, None),
    "steps-x4": ("4 x the steps", {"optim.max_steps": "x4"}, None),
    "steps-x16": ("16 x the steps", {"optim.max_steps": "x16"}, None),
    "wide": ("vision width 128, 4 blocks", {"model.overrides": {"vision": {"width": 128, "depth": 4}}}, None),
    "anatomy-input": ("anatomy map as 4 input channels", {"model.overrides": {"vision": {"anatomy_channels": 4}}},
                      None),
    "memorise-64": ("64 training cases", {}, 64),
    "lr-x3": ("learning rate 3e-3", {"optim.lr": 3.0e-3}, None),
    "no-clip": ("no gradient clipping", {"optim.grad_clip": 0.0}, None),
    "batch-x2": ("2 x the batch (the samples of 2 x the steps)", {"data.batch_size": "x2"}, None),
    "anatomy-views": ("per-anatomy 32^3 windows (p95 box), 108 per step", VIEW_BUDGET, None),
    "anatomy-views-whole": ("per-anatomy 32^3 windows (largest box), 108 per step", VIEW_BUDGET, None),
}
#: variants trained and scored on per-anatomy views of the cohorts (``benchmarks.anatomy_views``): window size
#: and how the windows are sized (``window_extents`` options): the p95 of the anatomy's box over the first 400
#: training cases, or the largest box of the whole training cohort (an enlarged organ stays whole in its window)
VIEWS: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {
    "anatomy-views": (SIZE_ZYX, {"reference_cases": 400, "percentile": 95.0}),
    "anatomy-views-whole": (SIZE_ZYX, {"reference_cases": None, "percentile": 100.0}),
}


def variant_overrides(raw: dict, changes: dict[str, Any]) -> dict[str, Any]:
    """The config's ``train.overrides`` with ``changes`` merged in (``"xN"``: N x the config's value)."""
    over = copy.deepcopy(raw["train"]["overrides"])
    for k, v in changes.items():
        if isinstance(v, str) and v.startswith("x"):
            over[k] = int(v[1:]) * int(over[k])
        elif isinstance(v, dict):
            over[k] = deep_merge(over.get(k) or {}, v)
        else:
            over[k] = v
    return over


def train_overrides(raw: dict, changes: dict[str, Any], seed: int) -> list[str]:
    """``--set`` arguments of a variant's training run: :func:`variant_overrides`, then the seed."""
    from pipelines.demo.config import set_items

    items = (*set_items(variant_overrides(raw, changes)), f"seed={seed}")
    return [a for item in items for a in ("--set", item)]


def subset(prep: Path, out: Path, n: int) -> Path:
    """A preprocess folder holding the first ``n`` cases of ``prep`` (case folders linked, index and manifest
    cut); made once."""
    if (out / "index.jsonl").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    (tmp / "cases").mkdir(parents=True, exist_ok=True)
    lines = (prep / "index.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    ids = [json.loads(line)["case_id"] for line in lines]
    for cid in ids:
        link = tmp / "cases" / cid
        if not link.exists():
            link.symlink_to((prep / "cases" / cid).resolve(), target_is_directory=True)
    keep = set(ids)
    manifest = [m for m in (prep / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
                if json.loads(m).get("case_id") in keep]
    (tmp / "manifest.jsonl").write_text("\n".join(manifest) + "\n", encoding="utf-8")
    (tmp / "preprocess.json").write_text((prep / "preprocess.json").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp / "index.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def macro(metrics: Path, visible: set[str], min_pos: int) -> tuple[float, float, int]:
    """(visible-task macro AUC, macro AUC over all tasks, visible tasks counted) of a ``metrics.json``, over the
    tasks with at least ``min_pos`` positives and negatives (NaN where no task counts)."""
    m = json.loads(metrics.read_text(encoding="utf-8"))
    aucs = {t: r["auc"]["auc"] for t, r in m["tasks"].items()
            if r["n_pos"] >= min_pos and r["n_neg"] >= min_pos and r["auc"]["auc"] is not None}
    vis = [a for t, a in aucs.items() if t in visible]

    def mean(xs) -> float:
        xs = list(xs)
        return statistics.fmean(xs) if xs else math.nan

    return mean(vis), mean(aucs.values()), len(vis)


def final_loss(run: Path, last: int = 50) -> float:
    """Mean training loss of the last ``last`` logged steps (a single batch's loss is noisy)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    cut = rows[-1]["step"] - last
    return statistics.fmean(r["loss"] for r in rows if r["step"] > cut)


def main(argv=None) -> int:
    from pipelines.atomic import write_text_atomic
    from pipelines.demo.config import load_demo_config
    from pipelines.demo.run import run_fvlm
    from pipelines.synth.findings import visible_tasks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="training cohort's preprocess folder")
    ap.add_argument("--val", type=Path, required=True, help="validation cohort's preprocess folder")
    ap.add_argument("--out", type=Path, default=Path("data/ceiling-probe"))
    ap.add_argument("--config", default="quality-core", help="demo config whose train overrides set the budget")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--fit-cases", type=int, default=300, help="training cases the fit is scored on")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    cfg = load_demo_config(args.config)
    visible = set(visible_tasks(cfg.evaluate.visible)) if cfg.evaluate.visible else set()
    out = args.out
    logs = out / "logs"
    rows = []
    for name in names:
        what, changes, n_cases = VARIANTS[name]
        data = subset(args.train, out / f"train-{n_cases}", n_cases) if n_cases else args.train
        fit_data = data if n_cases else subset(args.train, out / f"train-{args.fit_cases}", args.fit_cases)
        val = args.val
        if name in VIEWS:  # every cohort as per-anatomy views, the windows sized on the training cohort
            size, sizing = VIEWS[name]
            extents = window_extents(args.train, **sizing)
            data, fit_data, val = (derive(src, out / "views" / name / part, extents, size)
                                   for src, part in ((data, "train"), (fit_data, f"fit-{args.fit_cases}"),
                                                     (args.val, "val")))
        run = out / "runs" / name
        targs = ["train", "--config", "supervised", "--data", str(data), "--output", str(run), "--workers",
                 str(cfg.train_workers), *train_overrides(cfg.raw, changes, args.seed)]
        marker = run / "probe-done.json"
        done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        if done.get("argv") != targs or not (run / "model").is_dir():
            for split in ("val", "fit"):  # scores of an earlier model of this name are stale
                shutil.rmtree(out / "eval" / f"{name}-{split}", ignore_errors=True)
            t0 = time.perf_counter()
            run_fvlm(f"train-{name}", [*targs, "--resume"], logs, print)
            done = {"argv": targs, "seconds": time.perf_counter() - t0}
            write_text_atomic(marker, json.dumps(done, indent=2) + "\n")
        scores = {}
        for split, folder, min_pos in (
            ("val", val, cfg.evaluate.min_positives),
            ("fit", fit_data, 2 if n_cases and n_cases < 100 else cfg.evaluate.min_positives),
        ):
            ev = out / "eval" / f"{name}-{split}"
            if not (ev / "metrics.json").is_file():
                run_fvlm(f"evaluate-{name}-{split}", ["evaluate", "--checkpoint", str(run), "--data", str(folder),
                                                      "--tasks", cfg.tasks, "--output", str(ev), "--view", "center",
                                                      "--min-positives", str(min_pos), "--n-boot", "200",
                                                      "--no-text-ceiling"], logs, print)
            scores[split] = macro(ev / "metrics.json", visible, min_pos)
        max_steps = variant_overrides(cfg.raw, changes)["optim.max_steps"]
        rows.append([name, what, max_steps, n_cases or "all", f"{done['seconds']:.0f}", f"{final_loss(run):.3f}",
                     f"{scores['val'][0]:.3f}", f"{scores['val'][1]:.3f}",
                     f"{scores['fit'][0]:.3f} ({scores['fit'][2]})", f"{scores['fit'][1]:.3f}"])
    table = markdown_table(["variant", "change", "steps", "training cases", "train s", "final loss (last 50 steps)",
                            "validation: visible-task macro AUC", "validation: macro AUC (all)",
                            "fit: visible-task macro AUC (tasks)", "fit: macro AUC (all)"], rows)
    notes = "\n".join([
        f"- training cohort `{args.train}`, validation cohort `{args.val}`; fit = the first {args.fit_cases} "
        "training cases (memorise-64: its own 64, tasks with >= 2 positives)",
        f"- budget: `{args.config}`'s train overrides ({', '.join(cfg.train_overrides)}), training seed {args.seed}",
        f"- visible tasks: `{cfg.evaluate.visible}`; tasks need >= {cfg.evaluate.min_positives} positives and "
        "negatives",
    ])
    record(f"Supervised ceiling probe: budget, width, anatomy input, memorisation, per-anatomy views ({args.config})",
           table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
