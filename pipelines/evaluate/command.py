"""``fvlm evaluate``: zero-shot per-anatomy AUC report of an exported model on a preprocessed cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from configs.paths import presets_help

EXAMPLE = """example:
  fvlm evaluate --checkpoint runs/tiny --data data/prep --tasks fvlm54 --output reports/tiny
  fvlm evaluate --checkpoint runs/fvlm/model --data data/ctrate-valid --tasks ct-rate \\
      --labels valid_predicted_labels.csv --ct-rate-labels 16 --threshold-split 0.2 --n-boot 2000 \\
      --output reports/ctrate
  fvlm evaluate ... --view center        # the central crop instead of windows around each anatomy
  fvlm evaluate ... --templates release  # the fVLM release prompts ("X." / "Not x.") instead of report style
  fvlm evaluate ... --probe-data data/prep-train   # + linear probe fitted on the training cohort's labels
  fvlm evaluate ... --readout global     # every task from the whole-scan embedding (auto for clip runs)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="zero-shot evaluation: per-task and per-anatomy AUC with CIs, thresholds, HTML report",
        description="Score every case of a preprocess output with an exported model (prompts of a task catalog), "
        "and write metrics.csv, metrics.json, report.md and a self-contained report.html to OUTPUT. Beside each "
        "AUC the text readout ceiling: the same prompts scored against each case's own report texts through the "
        "text tower, the AUC a perfect image tower could reach with these prompts. With --probe-data, the linear "
        "probe: a logistic regression per task on the frozen image embeddings, fitted on a training cohort's labels.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="training run folder (uses RUN/model) or export")
    p.add_argument("--data", required=True, type=Path, help="preprocess output folder")
    p.add_argument("--tasks", required=True, help=f"task catalog: {presets_help('tasks')} or a YAML file")
    p.add_argument("--labels", type=Path, default=None,
                   help="CSV keyed by case_id (or CT-RATE's VolumeName, with or without .nii.gz), a column per "
                   "task name or title (default: labels stored by preprocess, else "
                   "parsed report labels, marked silver)")
    p.add_argument("--ct-rate-labels", type=int, choices=(16, 18), default=16,
                   help="with --tasks ct-rate: 16 anatomy-bound labels as the fVLM paper (default) or all 18 "
                   "(medical material and lymphadenopathy scored with the global embedding)")
    p.add_argument("--threshold-split", type=float, default=0.2,
                   help="fraction of cases set aside to choose the thresholds of the threshold metrics, which are "
                   "reported on the other cases; the AUCs count every case (0: none; default 0.2)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the split")
    p.add_argument("--min-positives", type=int, default=10, help="tasks with fewer positives are flagged")
    p.add_argument("--templates", default=None,
                   help="prompt template set: report (default: sentences written the way reports state and deny "
                   "each finding, generated from the catalog's synonyms and phrasings, e.g. 'A 10 mm nodule is "
                   "observed in the lung.' / 'No nodules are seen.', 'The lung is normal.'), all (the catalog's "
                   "stored prompts), release ('X.' / 'Not x.'), ct-clip ('X is present.' / 'X is not present.'), "
                   "structured (stored prompts plus the tasks' structured sentences)")
    p.add_argument("--prompts", choices=("catalog", "learned"), default="catalog",
                   help="catalog: prompts of the task catalog (--templates); learned: the model's learned prompt "
                   "context + task title (models trained with the prompt_context head, e.g. fvlm-unified; "
                   "--templates is not used)")
    p.add_argument("--no-text-ceiling", dest="text_ceiling", action="store_false",
                   help="skip the text readout ceiling (scoring each case's own report texts with the prompts)")
    p.add_argument("--readout", choices=("auto", "anatomy", "global"), default="auto",
                   help="image embedding each task is read from: anatomy (the task's anatomy), global (the "
                   "whole-scan embedding, as CT-CLIP; tasks stay missing where their anatomy is absent), auto "
                   "(default: global when every objective of the run's recipe trains only the whole-scan "
                   "embedding, e.g. clip, else anatomy)")
    p.add_argument("--probe-data", type=Path, default=None, metavar="TRAIN_PREP",
                   help="linear-probe ceiling: the training cohort's preprocess folder; a logistic regression per "
                   "task on its frozen image embeddings (C chosen by cross-validation on it), scored on --data")
    p.add_argument("--probe-labels", type=Path, default=None, metavar="CSV",
                   help="labels of the --probe-data cases, as --labels (default: the labels stored by preprocess)")
    p.add_argument("--probe-folds", type=int, default=5,
                   help="cross-validation folds choosing the probe's regularisation; tasks with fewer training "
                   "positives or negatives are skipped (default 5)")
    p.add_argument("--mode", choices=("crop", "resize"), default=None,
                   help="input view (default: the run's recipe, else a central crop of the model's size)")
    p.add_argument("--view", choices=("windows", "center"), default="windows",
                   help="windows: a window of the input size around each anatomy, scores averaged over the windows "
                   "where the anatomy counts (default; crop-mode recipes only); center: the central crop")
    p.add_argument("--min-inside", type=float, default=0.5,
                   help="fraction of an anatomy's voxels that must lie inside a window or crop for it to count "
                   "(default 0.5)")
    p.add_argument("--crop-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--maps", type=int, default=0, metavar="N",
                   help="show, for the first N evaluated cases with a positive finding, the localisation map of their "
                   "top-scoring positive finding in the report (region head map when the model has one, else the "
                   "pooled token map; default 0: none)")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate.report import write_outputs
    from pipelines.evaluate.run import evaluate

    if args.maps < 0:
        raise ValueError(f"--maps must be 0 or more, got {args.maps}")
    if args.n_boot < 1:
        raise ValueError(f"--n-boot must be at least 1, got {args.n_boot}")
    split = args.threshold_split or None
    if split is not None and not 0 < split < 1:
        raise ValueError(f"--threshold-split must be in (0, 1), got {split}")
    ev = evaluate(args.checkpoint, args.data, args.tasks, labels=args.labels, threshold_split=split,
                  n_boot=args.n_boot, seed=args.seed, min_positives=args.min_positives, templates=args.templates,
                  mode=args.mode, crop_size=tuple(args.crop_size) if args.crop_size else None,
                  batch_size=args.batch_size, view_kind=args.view, min_inside=args.min_inside,
                  ct_rate_labels=args.ct_rate_labels, prompts=args.prompts, maps=args.maps,
                  text_ceiling=args.text_ceiling, readout=args.readout, probe_data=args.probe_data,
                  probe_labels=args.probe_labels, probe_folds=args.probe_folds)
    files = write_outputs(ev, args.output)
    m = ev.summary["macro"]
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
    beside = []
    for what, block in (("text readout ceiling", ev.ceiling), ("linear probe", ev.probe)):
        if block is not None:
            c = block["macro"]["auc"]
            beside.append(f"{what} {'n/a' if c is None else f'{c:.3f}'}")
    ceiling = f" ({'; '.join(beside)})" if beside else ""
    print(f"evaluated {ev.info['n_cases']} case(s), {len(ev.tasks)} task(s), {ev.info['readout']} readout; macro "
          f"AUC {auc}{ceiling} over {m['n_tasks']} unflagged task(s); outputs: "
          f"{', '.join(str(f) for f in files.values())}")
    return 0
